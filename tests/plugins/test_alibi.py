"""ALiBi: slopes of the paper, bias against a hand-written reference, cached decoding."""

from __future__ import annotations

import math

import pytest
import torch
from ropelm.plugins.alibi import alibi_mask, alibi_slopes, build

from ropelm import KVHeadOptions, ModelConfig, Registry, TransformerLM


def config(**overrides) -> ModelConfig:
    base = dict(block_size=32, vocab_size=61, n_layer=1, n_head=4, n_embd=32, dropout=0.0)
    return ModelConfig(**{**base, **overrides, "att_type": "ALiBi"})


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
    scores = q @ k.transpose(-1, -2) / math.sqrt(hs) + bias
    return scores.softmax(-1) @ v


def test_attention_matches_hand_written_reference():
    torch.manual_seed(0)
    attn = build(config(), KVHeadOptions())
    q, k, v = torch.randn(3, 2, 4, 12, 8, dtype=torch.float64).unbind(0)
    torch.testing.assert_close(attn.attend(q, k, v, 0), reference(q, k, v, 0), rtol=0, atol=1e-10)
    # queries continuing a cache: 5 new positions after 7 cached keys
    got = attn.attend(q[:, :, 7:], k, v, start=7)
    torch.testing.assert_close(got, reference(q[:, :, 7:], k, v, 7), rtol=0, atol=1e-10)


def test_mask_values_and_dtype():
    mask = alibi_mask(2, 3, 2, 5, torch.device("cpu"), torch.bfloat16)
    assert mask.shape == (1, 2, 2, 5) and mask.dtype == torch.bfloat16
    # head 0 (slope 1/16 for 2 heads), query at position 3: keys 0..3 get -3/16 .. 0
    want = torch.tensor([-3 / 16, -2 / 16, -1 / 16, 0.0, float("-inf")])
    assert torch.equal(mask[0, 0, 0].float(), want)


def test_gqa_matches_reference_with_repeated_kv_heads():
    torch.manual_seed(0)
    attn = build(config(), KVHeadOptions(n_kv_head=2))
    q = torch.randn(2, 4, 10, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, 2, 10, 8, dtype=torch.float64).unbind(0)
    want = reference(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0)
    torch.testing.assert_close(attn.attend(q, k, v, 0), want, rtol=0, atol=1e-10)


def test_cached_decoding_equals_full_forward_beyond_block_size():
    torch.manual_seed(0)
    model = TransformerLM.from_config(config(n_layer=2), Registry.default()).eval()
    idx = torch.randint(0, 61, (2, 48))  # 1.5x block_size: ALiBi extrapolates
    state = model.init_decode_state(2, 48)
    with torch.no_grad():
        full, _ = model(idx)
        parts = [model(idx[:, :20], state=state)[0], model(idx[:, 20:30], state=state)[0]]
        parts += [model(idx[:, t : t + 1], state=state)[0] for t in range(30, 48)]
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_bias_is_not_state_and_follows_the_model_dtype():
    model = TransformerLM.from_config(config(), Registry.default())
    assert not any("mask" in name or "slope" in name for name in model.state_dict())
    model = model.to(torch.bfloat16)
    logits, _ = model(torch.randint(0, 61, (1, 16)))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
