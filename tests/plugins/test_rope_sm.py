"""RoPE-SM / RoPE-SM-complex options: context-extension scaling and grouped-query attention."""

from __future__ import annotations

import math

import pytest
import torch

from ropelm import ConfigError, ModelConfig, Registry, TransformerLM
from ropelm.rope import RopeScaling, build_rope_cache, rope_inv_freq

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


def test_yarn_ramp_and_temperature_match_the_paper():
    s, L, alpha, beta, base = 4.0, 1024, 1.0, 32.0, 10000.0
    scaling = RopeScaling("yarn", s, original_max_len=L, alpha=alpha, beta=beta)
    got = rope_inv_freq(HS, base, scaling=scaling)
    want = []
    for i in range(HS // 2):
        theta = base ** (-2 * i / HS)
        r = L / (2 * math.pi / theta)
        gamma = 0.0 if r < alpha else 1.0 if r > beta else (r - alpha) / (beta - alpha)
        want.append((1 - gamma) * theta / s + gamma * theta)
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=0)
    # with L = 1024 and hs = 16, r_i = 163, 52, 16, 5.2, 1.6, 0.5, ...: all three regimes
    plain = rope_inv_freq(HS, base)
    assert torch.equal(got[:2], plain[:2])  # r > beta: extrapolated, untouched
    torch.testing.assert_close(got[5:], plain[5:] / s, rtol=1e-12, atol=0)  # r < alpha: PI
    assert bool(((got[2:5] < plain[2:5]) & (got[2:5] > plain[2:5] / s)).all())  # the ramp
    assert scaling.attention_factor == pytest.approx(0.1 * math.log(4.0) + 1.0)
    cos, sin = build_rope_cache(8, HS, scaling=scaling)
    radius = (cos.double() ** 2 + sin.double() ** 2).sqrt()
    torch.testing.assert_close(radius, torch.full_like(radius, scaling.attention_factor))


def test_scaling_validation_errors():
    with pytest.raises(ValueError, match="scale factor must be >= 1"):
        RopeScaling("linear", 0.5)
    with pytest.raises(ValueError, match="original_max_len"):
        RopeScaling("yarn", 2.0)
    with pytest.raises(ValueError, match="head size above 2"):
        rope_inv_freq(2, scaling=RopeScaling("ntk", 2.0))


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"scale_factor": 4.0}, r"scale_factor=4\.0 has no effect with scaling 'none'"),
        ({"scaling": "dynamic"}, r"model\.att_options\.scaling: Input should be 'none'"),
        ({"scaling": "yarn", "scale_factor": 0.5}, r"scale_factor must be >= 1"),
        ({"n_kv_head": 0}, r"n_kv_head must be >= 1"),
        ({"scaling": "yarn", "scale_factor": 2, "yarn_alpha": 40}, r"yarn_alpha < yarn_beta"),
    ],
)
@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex"])
def test_options_are_validated(registry, att_type, options, message):
    with pytest.raises(ConfigError, match=message):
        registry.get(att_type).parse_options(options)


# -- scaling in the model ------------------------------------------------------------------


@pytest.mark.parametrize("att_type", ["RoPE-SM", "RoPE-SM-complex"])
def test_scaling_is_switchable_at_evaluation_time(registry, att_type):
    torch.manual_seed(0)
    trained = TransformerLM.from_config(config(att_type=att_type), registry).eval()
    idx = torch.randint(0, 61, (2, 4 * trained.config.block_size))  # 4x the training length
    for options in (
        {"scaling": "linear", "scale_factor": 4.0},
        {"scaling": "ntk", "scale_factor": 4.0},
        {"scaling": "yarn", "scale_factor": 4.0},
    ):
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


def test_complex_agrees_with_real_under_yarn(registry):
    cfg = config(n_embd=64, att_options={"scaling": "yarn", "scale_factor": 8.0})
    options = registry.get("RoPE-SM").parse_options(cfg.att_options)
    real = registry.get("RoPE-SM").factory(cfg, options)
    cplx = registry.get("RoPE-SM-complex").factory(cfg, options)
    q, k = torch.randn(2, 2, 4, 40, 16, dtype=torch.float64).unbind(0)
    for a, b in zip(real.position_qk(q, k, 3), cplx.position_qk(q, k, 3), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


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
