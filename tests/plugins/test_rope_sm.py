"""RoPE-SM / RoPE-SM-complex options: context-extension scaling and grouped-query attention."""

from __future__ import annotations

import math

import pytest
import torch

from ropelm import ConfigError, ModelConfig, Registry, TransformerLM
from ropelm.rope import RoPEOptions, RopeScaling, build_rope_cache, rope_inv_freq
from ropelm.testing import (
    build_layer,
    check_kv_cache_matches_full_forward,
    check_sequence_lengths,
    conformance_config,
)

HS = 16


def original_tables(seq_len: int, head_dim: int, base: float = 10000.0):
    """The RoPE tables exactly as ropelm computed them before scaling existed."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def config(**overrides) -> ModelConfig:
    base = dict(
        block_size=32, vocab_size=61, n_layer=1, n_head=4, n_embd=32, dropout=0.0, bias=True
    )
    return ModelConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def registry() -> Registry:
    return Registry.default()


# -- scaling formulas -------------------------------------------------------------------------


def test_scaling_none_reproduces_original_tables_bit_for_bit():
    cos0, sin0 = original_tables(100, HS)
    for scaling in (None, RopeScaling()):
        cos, sin = build_rope_cache(100, HS, scaling=scaling)
        assert torch.equal(cos, cos0) and torch.equal(sin, sin0)


def test_linear_scaling_is_position_interpolation():
    s = 4.0
    cos, sin = build_rope_cache(64, HS, scaling=RopeScaling("linear", s))
    cos_pi, sin_pi = build_rope_cache(64, HS, position_scale=1 / s)
    torch.testing.assert_close(cos, cos_pi, rtol=0, atol=1e-7)
    torch.testing.assert_close(sin, sin_pi, rtol=0, atol=1e-7)
    # position 4m with scaling sits where position m sits without it
    cos_plain, _ = build_rope_cache(16, HS)
    torch.testing.assert_close(cos[::4], cos_plain, rtol=0, atol=1e-6)


def test_ntk_scaling_matches_hand_computed_base():
    s, base = 8.0, 10000.0
    got = rope_inv_freq(HS, base, scaling=RopeScaling("ntk", s))
    new_base = base * s ** (HS / (HS - 2))
    want = [new_base ** (-2 * i / HS) for i in range(HS // 2)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    plain = rope_inv_freq(HS, base)
    assert got[0] == plain[0]  # the highest frequency is untouched
    assert math.isclose(float(got[-1]), float(plain[-1]) / s, rel_tol=1e-12)  # lowest: exactly /s


def test_scaling_validation_errors():
    with pytest.raises(ValueError, match="scale_factor must be >= 1"):
        RopeScaling("linear", 0.5)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match="head size above 2"):
        rope_inv_freq(2, scaling=RopeScaling("ntk", 2.0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale_factor": 4.0}, r"scale_factor=4\.0 has no effect with scaling 'none'"),
        ({"scaling": "longrope"}, r"model\.att_options\.scaling: Input should be 'none'"),
        ({"scaling": "yarn", "scale_factor": 0.5}, r"scale_factor must be >= 1"),
        ({"scaling": "dynamic", "scale_factor": 0.5}, r"scale_factor must be >= 1"),
        ({"n_kv_head": 0}, r"n_kv_head must be >= 1"),
        ({"scaling": "yarn", "scale_factor": 2, "beta_slow": 40}, r"0 < beta_slow < beta_fast"),
        ({"scaling": "yarn", "original_max_position_embeddings": 0}, r"must be >= 1, got 0"),
        ({"scaling": "llama3", "low_freq_factor": 4}, r"low_freq_factor < high_freq_factor"),
        ({"scaling": "llama3", "high_freq_factor": 0.5}, r"low_freq_factor < high_freq_factor"),
        ({"scaling": "abf"}, r"scaling 'abf' needs new_base"),
        ({"scaling": "abf", "new_base": 0}, r"new_base must be a positive number"),
        ({"scaling": "abf", "new_base": 1e6, "scale_factor": 2}, r"no effect with scaling 'abf'"),
        ({"scaling": "ntk", "beta_fast": 16}, r"beta_fast applies to scaling yarn only"),
        ({"scaling": "yarn", "new_base": 1e6}, r"new_base applies to scaling abf only"),
        ({"scaling": "linear", "original_max_position_embeddings": 64}, r"applies to scaling"),
        ({"yarn_alpha": 1.0}, r"yarn_alpha: unknown option"),  # renamed: beta_slow
    ],
)
@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex"])
def test_options_are_validated(registry, att_type, options, message, assert_one_sentence):
    with pytest.raises(ConfigError, match=message) as info:
        registry.get(att_type).parse_options(options)
    assert_one_sentence(str(info.value))


# -- scaling in the model ------------------------------------------------------------------


SCALINGS = [
    {"scaling": "linear", "scale_factor": 4.0},
    {"scaling": "ntk", "scale_factor": 4.0},
    {"scaling": "dynamic", "scale_factor": 2.0},
    {"scaling": "dynamic"},  # factor 1 still scales past the original length
    {"scaling": "yarn", "scale_factor": 4.0},
    {"scaling": "yarn", "scale_factor": 4.0, "beta_fast": 16, "beta_slow": 2},
    {"scaling": "llama3", "scale_factor": 4.0},
    {"scaling": "llama3", "scale_factor": 8.0, "low_freq_factor": 2, "high_freq_factor": 8},
    {"scaling": "abf", "new_base": 500000.0},
]


@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex", "RoPE-Sliding"])
def test_scaling_is_switchable_at_evaluation_time(registry, att_type):
    torch.manual_seed(0)
    trained = TransformerLM.from_config(config(att_type=att_type), registry).eval()
    idx = torch.randint(0, 61, (2, 4 * trained.config.block_size))  # 4x the training length
    for options in SCALINGS:
        scaled = TransformerLM.from_config(
            config(att_type=att_type, att_options=options), registry
        ).eval()
        scaled.load_state_dict(trained.state_dict(), strict=True)  # no new parameters
        with torch.no_grad():
            logits, _ = scaled(idx)
            plain, _ = trained(idx)
        assert torch.isfinite(logits).all()
        assert not torch.allclose(logits, plain, atol=1e-4), options  # the scaling is in effect


def test_yarn_temperature_scales_logits_by_factor_squared(registry):
    s = 4.0
    cfg = config(att_options={"scaling": "yarn", "scale_factor": s})
    attn = registry.get("RoPE-SM").factory(
        cfg, registry.get("RoPE-SM").parse_options(cfg.att_options)
    )
    q, k = torch.randn(2, 4, 8, 8, dtype=torch.float64).unbind(0)  # (nh, T, hs) each
    qr, kr = attn.position_qk(q[None], k[None], start=5)
    # same positions: the rotations cancel and only the temperature remains
    same = (qr * kr).sum(-1)
    factor = 0.1 * math.log(s) + 1.0
    torch.testing.assert_close(same[0], factor**2 * (q * k).sum(-1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("options", SCALINGS, ids=lambda o: "-".join(map(str, o.values())))
def test_complex_agrees_with_real_under_every_scaling(registry, options):
    """Rotated q, k agree to 1e-10 in float64, at positions 3..42 (past block_size 32, so
    ``dynamic`` scales) and 3..12 (within it); and they do differ from plain RoPE."""
    cfg = config(n_embd=64, att_options=options)
    parsed = registry.get("RoPE-SM").parse_options(cfg.att_options)
    real = registry.get("RoPE-SM").factory(cfg, parsed)
    cplx = registry.get("RoPE-SM-complex").factory(cfg, parsed)
    plain = registry.get("RoPE-SM").factory(config(n_embd=64), RoPEOptions())
    generator = torch.Generator().manual_seed(7)
    q, k = torch.randn(2, 2, 4, 40, 16, dtype=torch.float64, generator=generator).unbind(0)
    for length in (40, 10):
        qs, ks = q[:, :, :length], k[:, :, :length]
        for a, b in zip(real.position_qk(qs, ks, 3), cplx.position_qk(qs, ks, 3), strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
        scaled_q, plain_q = real.position_qk(qs, ks, 3)[0], plain.position_qk(qs, ks, 3)[0]
        if options["scaling"] == "dynamic" and 3 + length <= cfg.block_size:
            assert torch.equal(scaled_q, plain_q)  # dynamic is plain RoPE up to L
        else:
            assert (scaled_q - plain_q).abs().max() > 1e-3


# -- dynamic scaling and the KV cache -----------------------------------------------------------


@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex", "RoPE-Sliding"])
def test_dynamic_passes_the_kv_cache_check_within_the_original_length(registry, att_type):
    """The conformance check decodes block_size = L positions: dynamic is plain RoPE there."""
    spec = registry.get(att_type)
    options = {"scaling": "dynamic", "scale_factor": 2.0}
    check_kv_cache_matches_full_forward(spec, conformance_config(spec, att_options=options))


@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex"])
def test_dynamic_past_the_original_length_is_declared_to_fail_two_checks(registry, att_type):
    """Declared behaviour, as transformers' ``dynamic``: past L, cached decoding differs from
    one full pass (cached keys keep the rotation of the step that wrote them), and the first
    positions of a longer pass differ from a shorter one (every position uses L_cur = T)."""
    spec = registry.get(att_type)
    options = {"scaling": "dynamic", "original_max_position_embeddings": 16}
    with pytest.raises(AssertionError, match="KV cache token by token"):
        check_kv_cache_matches_full_forward(spec, conformance_config(spec, att_options=options))
    options = {"scaling": "dynamic", "scale_factor": 2.0}
    with pytest.raises(AssertionError, match="first 32 positions at T=64"):
        check_sequence_lengths(spec, conformance_config(spec, att_options=options))


def reference_dynamic_rotation(x: torch.Tensor, position: int, current_len: int, L: int):
    """Rotate x (..., hs) at ``position`` with dynamic NTK frequencies at ``current_len``
    (transformers' formula, s = 1), pair by pair in float64."""
    hs = x.size(-1)
    base = 10000.0 * (max(current_len, L) / L) ** (hs / (hs - 2))
    out = x.clone()
    for i in range(hs // 2):
        angle = position / base ** (2 * i / hs)
        c, s = math.cos(angle), math.sin(angle)
        out[..., 2 * i] = c * x[..., 2 * i] - s * x[..., 2 * i + 1]
        out[..., 2 * i + 1] = s * x[..., 2 * i] + c * x[..., 2 * i + 1]
    return out


def test_dynamic_cached_decoding_rotates_each_token_at_its_own_length(registry):
    """Token by token past L = 8, step t rotates its query and key at L_cur = t + 1 and attends
    to the keys cached with the rotation of their own step: the layer's output matches that
    reference (causal softmax by hand, float64) within 1e-10."""
    L, T = 8, 20
    cfg = config(block_size=32, n_head=2, n_embd=16, att_options={
        "scaling": "dynamic", "original_max_position_embeddings": L})  # fmt: skip
    layer = build_layer(registry.get("RoPE-SM"), cfg).double()
    x = torch.randn(1, T, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cache = layer.init_cache(1, T, x.device, x.dtype)
    with torch.no_grad():
        decoded = torch.cat([layer(x[:, t : t + 1], cache=cache) for t in range(T)], dim=1)
        q, k, v = layer.project_qkv(x)  # (1, nh, T, hs) each
    keys = torch.stack([reference_dynamic_rotation(k[:, :, n], n, n + 1, L) for n in range(T)], 2)
    outputs = []
    for t in range(T):
        q_t = reference_dynamic_rotation(q[:, :, t], t, t + 1, L)  # (1, nh, hs)
        scores = torch.einsum("bhd,bhnd->bhn", q_t, keys[:, :, : t + 1]) / math.sqrt(8)
        outputs.append(torch.einsum("bhn,bhnd->bhd", scores.softmax(-1), v[:, :, : t + 1]))
    with torch.no_grad():
        expected = layer.project_out(torch.stack(outputs, 2))  # (1, T, C)
    assert (decoded - expected).abs().max().item() <= 1e-10
    with torch.no_grad():
        assert (layer(x) - decoded).abs().max().item() > 1e-4  # one pass uses L_cur = T for all


# -- grouped-query attention -------------------------------------------------------------------


def test_n_kv_head_equal_to_n_head_keeps_the_mha_layout(registry):
    torch.manual_seed(0)
    mha = TransformerLM.from_config(config(), registry)
    same = TransformerLM.from_config(config(att_options={"n_kv_head": 4}), registry)
    assert {k: v.shape for k, v in mha.state_dict().items()} == {
        k: v.shape for k, v in same.state_dict().items()
    }
    same.load_state_dict(mha.state_dict())
    idx = torch.randint(0, 61, (2, 20))
    torch.testing.assert_close(same(idx)[0], mha(idx)[0], rtol=0, atol=0)


@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex"])
@pytest.mark.parametrize("n_kv_head", [1, 2])
def test_gqa_equals_mha_with_shared_key_value_heads(registry, att_type, n_kv_head):
    """Query head h must read kv head h // (n_head // n_kv_head)."""
    torch.manual_seed(0)
    gqa = TransformerLM.from_config(
        config(att_type=att_type, att_options={"n_kv_head": n_kv_head}), registry
    )
    mha = TransformerLM.from_config(config(att_type=att_type), registry)
    state = gqa.state_dict()
    C, hs, group = 32, 8, 4 // n_kv_head
    for name in [n for n in state if n.endswith("c_attn.weight") or n.endswith("c_attn.bias")]:
        q, k, v = state[name].split([C, n_kv_head * hs, n_kv_head * hs])
        k, v = (
            t.unflatten(0, (n_kv_head, hs)).repeat_interleave(group, 0).flatten(0, 1)
            for t in (k, v)
        )
        state[name] = torch.cat([q, k, v])
    mha.load_state_dict(state)
    idx = torch.randint(0, 61, (2, 24))
    torch.testing.assert_close(gqa(idx)[0], mha(idx)[0], rtol=1e-5, atol=1e-5)


def test_mqa_shapes_and_cached_decoding(registry):
    torch.manual_seed(0)
    model = TransformerLM.from_config(config(att_options={"n_kv_head": 1}), registry).eval()
    attn = model.blocks[0].attn
    assert attn.c_attn.weight.shape == (32 + 2 * 8, 32)
    state = model.init_decode_state(batch_size=2, max_len=32)
    assert state.caches[0].k.shape == (2, 1, 32, 8)
    idx = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, :7], state=state)[0]]
        steps += [model(idx[:, t : t + 1], state=state)[0] for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_n_kv_head_must_divide_n_head(registry):
    with pytest.raises(ConfigError, match=r"n_kv_head: must divide n_head \(4\), got 3"):
        TransformerLM.from_config(config(att_options={"n_kv_head": 3}), registry)
