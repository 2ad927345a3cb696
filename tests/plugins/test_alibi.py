"""ALiBi: the paper's slopes, the bias against a hand-written reference on every backend,
the implementation it replaced, cached decoding."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ropelm.plugins.alibi import alibi_score_mod, alibi_slopes

from ropelm import ModelConfig, Registry, TransformerLM


def config(**overrides) -> ModelConfig:
    base = dict(block_size=32, vocab_size=61, n_layer=1, n_head=4, n_embd=32, dropout=0.0)
    return ModelConfig(**{**base, **overrides, "att_type": "ALiBi"})


def layer(registry: Registry, backend: str = "auto", **overrides) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = config(attention_backend=backend, **overrides)
    return registry.resolve(cfg).build_layer(cfg).eval()


@pytest.mark.parametrize(
    ("n_head", "exponents"),
    [
        (1, [8]),
        (4, [2, 4, 6, 8]),
        (8, [1, 2, 3, 4, 5, 6, 7, 8]),
        (6, [2, 4, 6, 8, 1, 3]),  # 4 heads' slopes, then every other slope of 8 heads
        (12, [1, 2, 3, 4, 5, 6, 7, 8, 0.5, 1.5, 2.5, 3.5]),  # 8 heads', then 16 heads' odd ones
    ],
)
def test_slopes_follow_the_paper(n_head, exponents):
    assert alibi_slopes(n_head) == pytest.approx([2.0**-e for e in exponents], rel=1e-12)


@pytest.mark.parametrize("n_head", range(1, 17))
def test_score_mod_applies_the_slope_of_each_head(n_head):
    mod = alibi_score_mod(n_head)
    zero, b = torch.zeros(()), torch.tensor(0, dtype=torch.int32)
    for h, slope in enumerate(alibi_slopes(n_head)):
        got = mod(zero, b, torch.tensor(h, dtype=torch.int32), torch.tensor(9), torch.tensor(2))
        assert got.item() == pytest.approx(-slope * 7, rel=1e-6)


def reference(q, k, v, start: int) -> torch.Tensor:
    """Softmax(q k^T / sqrt(hs) - m_h (i - j)) v with the bias written out position by position."""
    nh, T, hs = q.shape[1:]
    L = k.size(2)
    slopes = alibi_slopes(nh)
    bias = torch.full((nh, T, L), float("-inf"), dtype=q.dtype)
    for h in range(nh):
        for t in range(T):
            i = start + t
            for j in range(i + 1):
                bias[h, t, j] = -slopes[h] * (i - j)
    groups = nh // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs) + bias
    return scores.softmax(-1) @ v


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_dense_attention_matches_the_hand_written_reference(registry, n_kv_head):
    attn = layer(registry, "dense")
    q = torch.randn(2, 4, 150, 8, dtype=torch.float64)  # > one 128-query chunk
    k, v = torch.randn(2, 2, n_kv_head, 150, 8, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(attn.attend(q, k, v, 0), reference(q, k, v, 0), rtol=0, atol=1e-10)
    # queries continuing a cache: 5 new positions after 145 cached keys
    got = attn.attend(q[:, :, 145:], k, v, start=145)
    torch.testing.assert_close(got, reference(q[:, :, 145:], k, v, 145), rtol=0, atol=1e-10)


def previous_implementation(attn, x: torch.Tensor) -> torch.Tensor:
    """ALiBi as ropelm computed it before the kernels change: a (1, nh, T, T) float mask in SDPA."""
    q, k, v = attn.project_qkv(x)
    T = q.size(2)
    distance = (torch.arange(T)[:, None] - torch.arange(T)[None, :]).float()
    slopes = torch.tensor(alibi_slopes(attn.n_head))[:, None, None]
    mask = (-slopes * distance).masked_fill(distance < 0, float("-inf"))[None]
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=attn.gqa)
    return attn.project_out(y)


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_equals_the_previous_implementation_on_the_same_weights(registry, backend):
    attn = layer(registry, backend)
    x = torch.randn(2, 32, 32)
    with torch.no_grad():
        got, want = attn(x), previous_implementation(attn, x)
    assert attn.last_backend == backend
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_cached_decoding_equals_full_forward_beyond_block_size(registry, backend):
    torch.manual_seed(0)
    cfg = config(n_layer=2, attention_backend=backend)
    model = TransformerLM(cfg, registry.resolve(cfg)).eval()
    idx = torch.randint(0, 61, (2, 48))  # 1.5x block_size: ALiBi extrapolates
    state = model.init_decode_state(2, 48)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, :20], state=state)[0], model(idx[:, 20:30], state=state)[0]]
        parts += [model(idx[:, t : t + 1], state=state)[0] for t in range(30, 36)]
    assert model.blocks[0].attn.last_backend == ("flex" if backend == "flex" else "dense")
    torch.testing.assert_close(torch.cat(parts, 1), full[:, :36], rtol=1e-5, atol=1e-5)


def test_bias_is_not_state_and_follows_the_model_dtype(registry):
    model = TransformerLM.from_config(config(), registry)
    assert not any("mask" in name or "slope" in name for name in model.state_dict())
    model = model.to(torch.bfloat16)
    logits, _ = model(torch.randint(0, 61, (1, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
