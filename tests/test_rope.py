"""RoPE tables and rotation against an independent implementation of the RoFormer formula.

The reference below is written from the paper (Su et al., 2021, eq. 13-15), not
from ropelm.rope: theta_i = base^(-2i/d), and the consecutive feature pair
(x_{2i}, x_{2i+1}) at position m is multiplied by the 2x2 rotation matrix of
angle m * theta_i, one pair at a time, in float64 Python arithmetic.
"""

from __future__ import annotations

import math

import pytest
import torch
from ropelm.plugins.rope_sm_complex import apply_rotary_emb_complex, complex_rotation

from ropelm import ModelConfig, Registry
from ropelm.rope import RopeTables, apply_rotary_emb, build_rope_cache
from ropelm.testing import build_layer

CPU = torch.device("cpu")


def reference_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    """cos/sin of m * theta_i, as nested Python lists of floats (float64)."""
    thetas = [base ** (-2 * i / head_dim) for i in range(head_dim // 2)]
    cos = [[math.cos(m * theta) for theta in thetas] for m in range(seq_len)]
    sin = [[math.sin(m * theta) for theta in thetas] for m in range(seq_len)]
    return torch.tensor(cos, dtype=torch.float64), torch.tensor(sin, dtype=torch.float64)


def reference_rotate(x: torch.Tensor, positions: list[int], base: float = 10000.0) -> torch.Tensor:
    """Rotate x (B, nh, T, hs) pair by pair with explicit 2x2 matrices, in float64."""
    B, nh, T, hs = x.shape
    out = torch.empty(x.shape, dtype=torch.float64)
    x = x.double()
    for t, m in zip(range(T), positions, strict=True):
        for i in range(hs // 2):
            angle = m * base ** (-2 * i / hs)
            rotation = torch.tensor(
                [[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]],
                dtype=torch.float64,
            )
            for b in range(B):
                for h in range(nh):
                    out[b, h, t, 2 * i : 2 * i + 2] = rotation @ x[b, h, t, 2 * i : 2 * i + 2]
    return out


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


# -- tables -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("seq_len", "head_dim", "base"), [(64, 16, 10000.0), (1024, 128, 500.0)])
def test_tables_match_the_formula(seq_len, head_dim, base):
    """float64 tables within 1e-12 of the formula; float32 tables are those, rounded.

    Rounded means within half a float32 ulp of values in [-1, 1] (2**-25 ~ 3e-8):
    angles computed in float32 instead would be off by up to ~6e-5 at position 1023.
    """
    ref_cos, ref_sin = reference_tables(seq_len, head_dim, base)
    cos64, sin64 = build_rope_cache(seq_len, head_dim, base, dtype=torch.float64)
    assert cos64.shape == sin64.shape == (seq_len, head_dim // 2)
    assert max_abs_diff(cos64, ref_cos) <= 1e-12
    assert max_abs_diff(sin64, ref_sin) <= 1e-12

    cos32, sin32 = build_rope_cache(seq_len, head_dim, base)
    assert cos32.dtype == sin32.dtype == torch.float32  # the default
    assert max_abs_diff(cos32, ref_cos) <= 2**-25
    assert max_abs_diff(sin32, ref_sin) <= 2**-25


def test_tables_start_offset_and_no_half_precision():
    cos, sin = build_rope_cache(40, 16)
    cos_tail, sin_tail = build_rope_cache(10, 16, start=30)
    assert torch.equal(cos_tail, cos[30:]) and torch.equal(sin_tail, sin[30:])
    for dtype in (torch.bfloat16, torch.float16):
        with pytest.raises(ValueError, match="float32 or float64"):
            build_rope_cache(8, 16, dtype=dtype)
    with pytest.raises(ValueError, match="even head size"):
        build_rope_cache(8, 15)


# -- rotation ---------------------------------------------------------------------------------


def test_rotation_matches_explicit_rotation_matrices():
    x = torch.randn(2, 3, 12, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    start = 5  # positions 5..16, as in cached decoding
    cos, sin = build_rope_cache(12, 8, dtype=torch.float64, start=start)
    expected = reference_rotate(x, list(range(start, start + 12)))
    assert max_abs_diff(apply_rotary_emb(x, cos, sin), expected) <= 1e-12

    cos32, sin32 = build_rope_cache(12, 8, start=start)
    rotated32 = apply_rotary_emb(x.float(), cos32, sin32)
    assert rotated32.dtype == torch.float32
    assert max_abs_diff(rotated32, expected) <= 1e-6


def test_pairing_is_consecutive_features():
    """Feature 0 rotates into feature 1 (RoFormer), not into feature hs/2 (GPT-NeoX)."""
    hs, m = 8, 3
    x = torch.zeros(1, 1, 1, hs)
    x[..., 0] = 1.0
    cos, sin = build_rope_cache(1, hs, start=m)
    rotated = apply_rotary_emb(x, cos, sin)[0, 0, 0]
    expected = torch.zeros(hs)
    expected[0], expected[1] = math.cos(m), math.sin(m)  # theta_0 = 1
    torch.testing.assert_close(rotated, expected, rtol=0, atol=1e-7)


def test_scores_depend_only_on_relative_position():
    """q_m . k_n == q_{m+s} . k_{n+s} == q . R_{n-m} k, to 1e-10 in float64."""
    hs, length = 16, 300
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(hs, dtype=torch.float64, generator=generator)
    k = torch.randn(hs, dtype=torch.float64, generator=generator)
    cos, sin = build_rope_cache(length, hs, dtype=torch.float64)

    def rotate(v: torch.Tensor, position: int) -> torch.Tensor:
        return apply_rotary_emb(v.view(1, 1, 1, hs), cos[position], sin[position]).view(hs)

    scores = {}
    for m, n in [(0, 0), (7, 3), (3, 7), (100, 42), (250, 0)]:
        score = rotate(q, m) @ rotate(k, n)
        for shift in (1, 17, 49):
            shifted = rotate(q, m + shift) @ rotate(k, n + shift)
            assert abs(shifted.item() - score.item()) <= 1e-10
        if n >= m:
            assert abs((q @ rotate(k, n - m)).item() - score.item()) <= 1e-10
        scores[m - n] = score.item()
    assert len({round(s, 6) for s in scores.values()}) == len(scores)  # offsets do matter


def test_rotation_preserves_the_norm_of_every_pair():
    x = torch.randn(2, 4, 64, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    cos, sin = build_rope_cache(64, 32, dtype=torch.float64)
    rotated = apply_rotary_emb(x, cos, sin)
    pair_norms = x.unflatten(-1, (-1, 2)).norm(dim=-1)
    rotated_norms = rotated.unflatten(-1, (-1, 2)).norm(dim=-1)
    assert max_abs_diff(rotated_norms, pair_norms) <= 1e-12
    assert max_abs_diff(rotated, x) > 0.1  # it did rotate


def test_gradients_are_the_transposed_rotation():
    """The hand-written backward passes gradcheck (and double backward), in float64.

    Tables that require grad (learned frequencies) take the traced path, which
    must be differentiable with respect to the tables too.
    """
    generator = torch.Generator().manual_seed(6)
    x = torch.randn(1, 2, 8, 6, dtype=torch.float64, generator=generator, requires_grad=True)
    cos, sin = build_rope_cache(8, 6, dtype=torch.float64, start=3)
    assert torch.autograd.gradcheck(apply_rotary_emb, (x, cos, sin))
    assert torch.autograd.gradgradcheck(apply_rotary_emb, (x, cos, sin))
    scaled = (1.3 * cos).requires_grad_(True), (1.3 * sin).requires_grad_(True)  # YaRN-like
    assert torch.autograd.gradcheck(apply_rotary_emb, (x, *scaled))

    grad = torch.randn(x.shape, dtype=torch.float64, generator=generator)
    (x_grad,) = torch.autograd.grad(apply_rotary_emb(x, cos, sin), x, grad)
    expected = reference_rotate(grad, [-m for m in range(3, 11)])  # R(theta)^T g = R(-theta) g
    assert max_abs_diff(x_grad, expected) <= 1e-12


def test_bf16_input_is_rotated_in_float32():
    x = torch.randn(1, 2, 600, 16, generator=torch.Generator().manual_seed(3)).bfloat16()
    cos, sin = build_rope_cache(600, 16)
    rotated = apply_rotary_emb(x, cos, sin)
    assert rotated.dtype == torch.bfloat16
    assert torch.equal(rotated, apply_rotary_emb(x.float(), cos, sin).bfloat16())


# -- RopeTables -------------------------------------------------------------------------------


def test_rope_tables_grow_on_demand():
    tables = RopeTables(16)
    cos, sin = tables.get(0, 10, CPU, torch.float32)
    assert cos.shape == sin.shape == (10, 8)
    same, _ = tables.get(2, 10, CPU, torch.float32)
    assert same.untyped_storage().data_ptr() == cos.untyped_storage().data_ptr()  # reused

    grown, grown_sin = tables.get(5, 11, CPU, torch.float32)  # past the end: grows
    assert grown.untyped_storage().data_ptr() != cos.untyped_storage().data_ptr()
    full_cos, full_sin = build_rope_cache(11, 16)
    assert torch.equal(grown, full_cos[5:11]) and torch.equal(grown_sin, full_sin[5:11])
    doubled, _ = tables.get(0, 20, CPU, torch.float32)  # grew to 2 x 10, amortised
    assert doubled.untyped_storage().data_ptr() == grown.untyped_storage().data_ptr()

    far, _ = tables.get(1000, 1024, CPU, torch.float32)
    assert torch.equal(far, build_rope_cache(1024, 16)[0][1000:])


def test_rope_tables_dtype_follows_input_but_never_below_float32():
    tables = RopeTables(16)
    for x_dtype, table_dtype in [
        (torch.bfloat16, torch.float32),
        (torch.float16, torch.float32),
        (torch.float32, torch.float32),
        (torch.float64, torch.float64),
    ]:
        cos, sin = tables.get(0, 4, CPU, x_dtype)
        assert cos.dtype == sin.dtype == table_dtype


def test_module_to_bfloat16_does_not_cast_the_tables():
    registry = Registry.default()
    config = ModelConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16)
    layer = build_layer(registry.get("RoPE-SM"), config)
    x = torch.randn(1, 16, 16)
    layer(x)  # builds the float32 tables
    assert set(layer.state_dict()) == {
        "c_attn.weight",
        "c_attn.bias",
        "c_proj.weight",
        "c_proj.bias",
    }
    layer.to(torch.bfloat16)
    cos, sin = layer.rotation.tables.get(0, 16, CPU, torch.bfloat16)
    assert cos.dtype == sin.dtype == torch.float32
    assert layer(x.bfloat16()).dtype == torch.bfloat16


# -- RoPE-SM (real) and RoPE-SM-complex agree -------------------------------------------------

HEAD_SIZES = [2, 16, 64, 128]
TOLERANCE = {torch.float32: 1e-5, torch.float64: 1e-10}
MAX_LEN = 1024


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_real_and_complex_rotations_agree(head_size, dtype):
    """Every position 0..1023: max abs diff <= 1e-5 (float32), <= 1e-10 (float64)."""
    x = torch.randn(2, 3, MAX_LEN, head_size, generator=torch.Generator().manual_seed(4))
    x = x.to(dtype)
    cos, sin = RopeTables(head_size).get(0, MAX_LEN, CPU, dtype)
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    rotation = complex_rotation(MAX_LEN, head_size, 10000.0, None, CPU).to(complex_dtype)
    real = apply_rotary_emb(x, cos, sin)
    complex_ = apply_rotary_emb_complex(x, rotation)
    assert real.dtype == complex_.dtype == dtype
    assert max_abs_diff(real, complex_) <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("head_size", HEAD_SIZES)
def test_real_and_complex_attention_layers_agree(head_size, dtype):
    """Same weights, T = 1024: layer outputs agree to 1e-5 (float32), 1e-10 (float64).

    Weights are redrawn as in ropelm.testing (peaked attention), so the outputs
    are of order 1 and do depend on the rotation.
    """
    registry = Registry.default()
    config = ModelConfig(
        block_size=MAX_LEN, vocab_size=64, n_layer=1, n_head=2, n_embd=2 * head_size, dropout=0.0
    )
    real = build_layer(registry.get("RoPE-SM"), config).to(dtype)
    complex_ = build_layer(registry.get("RoPE-SM-complex"), config, seed=1).to(dtype)
    complex_.load_state_dict(real.state_dict())
    x = torch.randn(1, MAX_LEN, config.n_embd, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y_real, y_complex = real(x.to(dtype)), complex_(x.to(dtype))
    assert y_real.abs().max() > 0.5
    assert max_abs_diff(y_real, y_complex) <= TOLERANCE[dtype]
