"""RoPE context-extension scalings against independent implementations of the reference formulas.

Each ``reference_*`` function below is written in plain Python floats from the
reference code, not from ropelm.rope_scaling:

* YaRN: the authors' code (github.com/jquesnelle/yarn, ``_yarn_find_correction_range``,
  ``_yarn_linear_ramp_mask``) as transformers ``_compute_yarn_parameters`` has it;
* dynamic NTK: transformers ``_compute_dynamic_ntk_parameters``;
* Llama 3.1: transformers ``_compute_llama3_parameters`` (Meta's ``apply_scaling``);
* ABF: the trained formula with the raised base (https://arxiv.org/abs/2309.16039).

Frequencies are compared with a relative tolerance of 1e-6 (relative, so that the
lowest frequencies, 1e-4 .. 1e-9, are checked as strictly as the highest; the two
float64 computations agree to ~1e-15 in practice).
"""

from __future__ import annotations

import math

import pytest
import torch

from ropelm.rope import RopeTables, build_rope_cache, rope_inv_freq
from ropelm.rope_scaling import RopeScaling, yarn_correction_range

CPU = torch.device("cpu")
REL_TOL = 1e-6


def reference_default(head_dim: int, base: float) -> list[float]:
    """1 / base^(2i/d), i = 0 .. d/2 - 1."""
    return [1.0 / base ** (2 * i / head_dim) for i in range(head_dim // 2)]


def reference_yarn_bounds(
    head_dim: int, base: float, original: int, beta_fast: float, beta_slow: float
) -> tuple[int, int]:
    """find_correction_range: floor / ceil of the correction dimensions, clamped to [0, d-1]."""

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low = math.floor(correction_dim(beta_fast))
    high = math.ceil(correction_dim(beta_slow))
    return max(low, 0), min(high, head_dim - 1)


def reference_yarn(
    head_dim: int,
    base: float,
    factor: float,
    original: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> list[float]:
    """YaRN frequencies: a linear ramp mask over the d/2 indices between the bounds."""
    low, high = reference_yarn_bounds(head_dim, base, original, beta_fast, beta_slow)
    if low == high:
        high += 0.001  # the reference's guard against a singular ramp
    out = []
    for j in range(head_dim // 2):
        extrapolation = 1.0 / base ** (2 * j / head_dim)
        interpolation = extrapolation / factor
        ramp = min(max((j - low) / (high - low), 0.0), 1.0)
        extrapolation_factor = 1.0 - ramp
        out.append(
            interpolation * (1 - extrapolation_factor) + extrapolation * extrapolation_factor
        )
    return out


def reference_dynamic(
    head_dim: int, base: float, factor: float, original: int, current: int
) -> list[float]:
    """Dynamic NTK: base * ((s * L_cur / L) - (s - 1)) ** (d / (d - 2)) once L_cur > L."""
    seq_len = current if current > original else original
    base = base * ((factor * seq_len / original) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return reference_default(head_dim, base)


def reference_llama3(
    head_dim: int,
    base: float,
    factor: float,
    original: int,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
) -> list[float]:
    """Llama 3.1: keep short wavelengths, divide long ones by s, blend in between."""
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    out = []
    for freq in reference_default(head_dim, base):
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            out.append(freq)
        elif wavelen > low_freq_wavelen:
            out.append(freq / factor)
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out.append((1 - smooth) * freq / factor + smooth * freq)
    return out


def assert_frequencies_close(got: torch.Tensor, want: list[float]) -> None:
    """|got - want| <= REL_TOL * |want| for every frequency."""
    assert got.dtype == torch.float64 and got.shape == (len(want),)
    want_t = torch.tensor(want, dtype=torch.float64)
    worst = ((got - want_t).abs() / want_t.abs()).max().item()
    assert worst <= REL_TOL, f"max relative difference {worst:.3g}"


# -- YaRN -------------------------------------------------------------------------------------

YARN_CASES = [
    # (head size, base, factor, original length, beta_fast, beta_slow)
    (32, 10000.0, 8.0, 128, 32.0, 1.0),  # the example of issue 10
    (16, 10000.0, 4.0, 1024, 32.0, 1.0),
    (64, 10000.0, 4.0, 2048, 32.0, 1.0),
    (128, 500000.0, 8.0, 8192, 32.0, 1.0),
    (128, 10000.0, 16.0, 4096, 16.0, 2.0),  # other betas
    (8, 10.0, 2.0, 16384, 32.0, 1.0),  # low == high: the reference's 0.001 guard
    (8, 10.0, 2.0, 2**20, 32.0, 1.0),  # low > high after clamping: all interpolated
]


@pytest.mark.parametrize(("hs", "base", "s", "L", "beta_fast", "beta_slow"), YARN_CASES)
def test_yarn_matches_the_reference_formula(hs, base, s, L, beta_fast, beta_slow):
    scaling = RopeScaling(
        "yarn", s, original_max_position_embeddings=L, beta_fast=beta_fast, beta_slow=beta_slow
    )
    got = rope_inv_freq(hs, base, scaling=scaling)
    assert_frequencies_close(got, reference_yarn(hs, base, s, L, beta_fast, beta_slow))
    assert yarn_correction_range(beta_fast, beta_slow, hs, base, L) == reference_yarn_bounds(
        hs, base, L, beta_fast, beta_slow
    )


def test_yarn_cases_cover_the_guard_and_the_clamps():
    bounds = [reference_yarn_bounds(hs, b, L, bf, bs) for hs, b, _, L, bf, bs in YARN_CASES]
    assert any(low == high for low, high in bounds)
    assert any(low > high for low, high in bounds)
    assert any(low == 0 for low, _ in bounds)


def test_yarn_issue_example_by_hand():
    """hs 32, L 128, s 8: correction dims 32 ln(128 / (64 pi)) / (2 ln 1e4) = -0.78 -> 0 and
    32 ln(128 / (2 pi)) / (2 ln 1e4) = 5.24 -> 6, so index i keeps 1 - (7/8) i / 6 of its
    frequency up to i = 6 and 1/8 from there; index 0 keeps all of it (the r-ramp gave 0.672)."""
    plain = rope_inv_freq(32)
    got = rope_inv_freq(32, scaling=RopeScaling("yarn", 8.0, original_max_position_embeddings=128))
    want_ratio = [1 - (7 / 8) * min(i, 6) / 6 for i in range(16)]
    torch.testing.assert_close(
        got / plain, torch.tensor(want_ratio, dtype=torch.float64), rtol=0, atol=1e-12
    )
    assert got[0] == plain[0]


@pytest.mark.parametrize("s", [1.0, 2.0, 8.0])
def test_yarn_attention_factor_scales_both_tables(s):
    """Radius sqrt(cos^2 + sin^2) = 0.1 ln(s) + 1 within 1e-6 (float32 tables); s = 1 is RoPE."""
    scaling = RopeScaling("yarn", s, original_max_position_embeddings=64)
    cos, sin = build_rope_cache(200, 16, scaling=scaling)
    radius = (cos.double() ** 2 + sin.double() ** 2).sqrt()
    want = 0.1 * math.log(s) + 1.0
    assert (radius - want).abs().max().item() <= 1e-6
    assert scaling.attention_factor == pytest.approx(want, rel=1e-15)
    if s == 1.0:
        plain_cos, plain_sin = build_rope_cache(200, 16)
        assert torch.equal(cos, plain_cos) and torch.equal(sin, plain_sin)


def test_attention_factor_is_one_except_for_yarn():
    for kind, extra in [
        ("linear", {}),
        ("ntk", {}),
        ("dynamic", {"original_max_position_embeddings": 32}),
        ("llama3", {"original_max_position_embeddings": 32}),
    ]:
        assert RopeScaling(kind, 4.0, **extra).attention_factor == 1.0
    assert RopeScaling("abf", new_base=1e6).attention_factor == 1.0


# -- dynamic NTK ------------------------------------------------------------------------------


@pytest.mark.parametrize(("hs", "base", "s"), [(16, 1e4, 1.0), (64, 1e4, 2.0), (128, 5e5, 4.0)])
@pytest.mark.parametrize("current", [1, 64, 128, 129, 256, 1024])
def test_dynamic_matches_the_reference_formula(hs, base, s, current):
    L = 128
    scaling = RopeScaling("dynamic", s, original_max_position_embeddings=L)
    got = rope_inv_freq(hs, base, scaling=scaling, current_len=current)
    assert_frequencies_close(got, reference_dynamic(hs, base, s, L, current))
    if current <= L:  # the trained frequencies, bit for bit
        assert torch.equal(got, rope_inv_freq(hs, base))
        assert not scaling.depends_on_length(current)
    else:
        assert scaling.depends_on_length(current)
        assert bool((got[1:] < rope_inv_freq(hs, base)[1:]).all())  # every other one slows down
    assert torch.equal(rope_inv_freq(hs, base, scaling=scaling), rope_inv_freq(hs, base))  # None


def reference_tables(
    positions: range, frequencies: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    cos = [[math.cos(m * f) for f in frequencies] for m in positions]
    sin = [[math.sin(m * f) for f in frequencies] for m in positions]
    return torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)


def test_dynamic_tables_follow_the_end_of_each_call():
    """Rows start..end-1 use the frequencies at L_cur = end (float64, within 1e-12): a call
    that ends past L scales all its positions, one that ends within L gets the trained tables."""
    hs, base, s, L = 16, 10000.0, 2.0, 32
    tables = RopeTables(
        hs, base, scaling=RopeScaling("dynamic", s, original_max_position_embeddings=L)
    )
    for start, end in [(0, 20), (10, 32), (0, 33), (0, 100), (40, 41), (99, 100)]:
        cos, sin = tables.get(start, end, CPU, torch.float64)
        ref_cos, ref_sin = reference_tables(
            range(start, end), reference_dynamic(hs, base, s, L, end)
        )
        assert cos.shape == sin.shape == (end - start, hs // 2)
        assert (cos - ref_cos).abs().max().item() <= 1e-12
        assert (sin - ref_sin).abs().max().item() <= 1e-12
    # what a KV cache sees: position 40 decoded alone (L_cur 41) is not row 40 of one pass
    # over 100 positions (L_cur 100), while within L a single row is the same either way
    alone, _ = tables.get(40, 41, CPU, torch.float64)
    in_pass, _ = tables.get(0, 100, CPU, torch.float64)
    assert (alone[0] - in_pass[40]).abs().max().item() > 1e-3
    assert torch.equal(
        tables.get(20, 21, CPU, torch.float64)[0], tables.get(0, 32, CPU, torch.float64)[0][20:21]
    )


# -- Llama 3.1 --------------------------------------------------------------------------------

LLAMA3_CASES = [
    # (head size, base, factor, original length, low_freq_factor, high_freq_factor)
    (128, 500000.0, 8.0, 8192, 1.0, 4.0),  # Llama 3.1's own configuration
    (32, 10000.0, 8.0, 128, 1.0, 4.0),
    (64, 10000.0, 4.0, 256, 2.0, 8.0),
    (16, 10000.0, 2.0, 1024, 0.5, 3.0),
]


@pytest.mark.parametrize(("hs", "base", "s", "L", "low", "high"), LLAMA3_CASES)
def test_llama3_matches_the_reference_formula(hs, base, s, L, low, high):
    scaling = RopeScaling(
        "llama3", s, original_max_position_embeddings=L, low_freq_factor=low, high_freq_factor=high
    )
    got = rope_inv_freq(hs, base, scaling=scaling)
    assert_frequencies_close(got, reference_llama3(hs, base, s, L, low, high))


def test_llama3_configuration_has_all_three_regimes():
    """Llama 3.1 (hs 128, base 5e5, s 8, L 8192): kept, divided by 8, and blended frequencies."""
    scaling = RopeScaling("llama3", 8.0, original_max_position_embeddings=8192)
    plain = rope_inv_freq(128, 500000.0)
    ratio = rope_inv_freq(128, 500000.0, scaling=scaling) / plain
    kept, divided = ratio == 1.0, (ratio - 1 / 8).abs() <= 1e-12
    between = ~kept & ~divided
    assert kept.any() and divided.any() and between.any()
    assert bool(((ratio[between] > 1 / 8) & (ratio[between] < 1)).all())


# -- ABF --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("hs", "new_base"), [(16, 10000.0), (64, 500000.0), (128, 8e6)])
def test_abf_is_the_trained_formula_with_the_new_base(hs, new_base):
    got = rope_inv_freq(hs, 10000.0, scaling=RopeScaling("abf", new_base=new_base))
    assert_frequencies_close(got, reference_default(hs, new_base))
    if new_base == 10000.0:
        assert torch.equal(got, rope_inv_freq(hs, 10000.0))


# -- validation -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kind": "longrope"}, r"RoPE scaling must be one of none, linear, ntk, dynamic"),
        ({"kind": "linear", "factor": 0.5}, r"scale_factor must be >= 1, got 0\.5"),
        ({"kind": "none", "factor": 2.0}, r"scale_factor=2\.0 has no effect with scaling 'none'"),
        ({"kind": "abf", "factor": 2.0, "new_base": 1e6}, r"has no effect with scaling 'abf'"),
        ({"kind": "abf"}, r"scaling 'abf' needs new_base"),
        ({"kind": "abf", "new_base": -1.0}, r"new_base must be a positive number, got -1\.0"),
        ({"kind": "yarn", "factor": 2.0}, r"scaling 'yarn' needs original_max_position_emb"),
        ({"kind": "dynamic"}, r"scaling 'dynamic' needs original_max_position_embeddings"),
        ({"kind": "llama3", "original_max_position_embeddings": 0}, r">= 1.*got 0"),
        ({"kind": "yarn", "beta_fast": 1.0, "beta_slow": 1.0}, r"0 < beta_slow < beta_fast"),
        ({"kind": "yarn", "beta_slow": 0.0}, r"0 < beta_slow < beta_fast"),
        ({"kind": "llama3", "low_freq_factor": 4.0}, r"0 < low_freq_factor < high_freq_factor"),
    ],
)
def test_bad_values_are_rejected_in_one_sentence(kwargs, message):
    with pytest.raises(ValueError, match=message) as info:
        RopeScaling(**{"original_max_position_embeddings": None, **kwargs})
    assert "\n" not in str(info.value)


def test_head_size_limits():
    with pytest.raises(ValueError, match="head size above 2"):
        rope_inv_freq(2, scaling=RopeScaling("dynamic", 2.0, original_max_position_embeddings=8),
                      current_len=16)  # fmt: skip
    with pytest.raises(ValueError, match="positive, even head size"):
        rope_inv_freq(6 + 1, scaling=RopeScaling("abf", new_base=1e5))
    with pytest.raises(ValueError, match="base above 1"):
        rope_inv_freq(8, 1.0, scaling=RopeScaling("yarn", 2.0, original_max_position_embeddings=8))
