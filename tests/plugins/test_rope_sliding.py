"""RoPE-Sliding: banded attention equals full attention under an explicit band mask."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ropelm.plugins.rope_sliding import RoPESlidingOptions, SlidingRoPEAttention, build

from ropelm import ConfigError, ModelConfig, Registry


def config(block_size: int = 64, **options) -> ModelConfig:
    return ModelConfig(
        block_size=block_size,
        vocab_size=61,
        n_layer=1,
        n_head=4,
        n_embd=32,
        dropout=0.0,
        att_type="RoPE-Sliding",
        att_options=options,
    )


def layer(block_size: int = 64, chunk_size: int | None = None, **options) -> SlidingRoPEAttention:
    torch.manual_seed(0)
    cfg = config(block_size, **options)
    attn = build(cfg, RoPESlidingOptions(**options)).eval()
    if chunk_size is not None:
        attn.chunk_size = chunk_size  # exercise the chunked path at small T
    return attn


def naive_band(q, k, v, window: int) -> torch.Tensor:
    """Full T x T softmax attention with the band 0 <= i - j < window built element by element."""
    T, hs = q.size(2), q.size(3)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        for j in range(T):
            allowed[i, j] = 0 <= i - j < window
    groups = q.size(1) // k.size(1)
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q @ k.transpose(-1, -2) / math.sqrt(hs)).masked_fill(~allowed, float("-inf"))
    return scores.softmax(-1) @ v


@pytest.mark.parametrize(
    ("T", "window", "chunk", "n_kv_head"),
    [
        (20, 32, None, 4),  # T <= window: plain causal
        (40, 7, None, 4),  # dense band mask
        (61, 5, 8, 2),  # chunked, T not a multiple of the chunk, GQA
        (64, 13, 4, 1),  # chunked with chunk < window (several padded chunks), MQA
        (50, 1, 16, 4),  # each position sees only itself
        (40, 20, 16, 4),  # chunked path, but the head covers nearly all: one dense call
    ],
)
def test_matches_naive_band_attention(T, window, chunk, n_kv_head):
    attn = layer(chunk_size=chunk, window=window, n_kv_head=n_kv_head)
    q = torch.randn(2, 4, T, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, n_kv_head, T, 8, dtype=torch.float64).unbind(0)
    got = attn.attend(q, k, v, start=0)
    torch.testing.assert_close(got, naive_band(q, k, v, window), rtol=0, atol=1e-10)


def test_chunked_path_never_builds_the_full_score_matrix(monkeypatch):
    attn = layer(chunk_size=8, window=6)
    seen: list[tuple[int, ...]] = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.size(-2), k.size(-2)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    attn(torch.randn(1, 64, 32))
    # the first chunk (its window would reach before position 0) as one dense block, then
    # one batched call over every later chunk's (chunk, chunk + window) block
    assert seen == [(8, 8), (8, 8 + 6)]


def test_window_covering_the_sequence_equals_rope_sm():
    registry = Registry.default()
    sliding = layer(window=64)
    cfg = config()
    full = registry.get("RoPE-SM").factory(cfg, registry.get("RoPE-SM").parse_options({}))
    full.load_state_dict(sliding.state_dict())
    x = torch.randn(2, 64, 32)
    torch.testing.assert_close(sliding(x), full.eval()(x), rtol=0, atol=1e-6)


def test_keys_outside_the_window_have_no_influence():
    attn = layer(chunk_size=8, window=6)
    with torch.no_grad():
        attn.c_attn.weight.normal_(0.0, 0.5)  # sharp attention, so changes show
    x = torch.randn(1, 48, 32)
    x_changed = x.clone()
    x_changed[:, 10] += 1.0
    with torch.no_grad():
        y, y_changed = attn(x), attn(x_changed)
    diff = (y - y_changed).abs().amax(-1)[0]  # (T,)
    assert torch.all(diff[:10] == 0) and torch.all(diff[16:] < 1e-6)
    assert torch.all(diff[10:16] > 1e-4)  # positions 10..15 see position 10


def test_cached_decoding_matches_full_forward():
    attn = layer(chunk_size=8, window=5, n_kv_head=2)
    x = torch.randn(2, 40, 32)
    cache = attn.init_cache(2, 40, x.device, x.dtype)
    assert cache.k.shape == (2, 2, 40, 8)
    with torch.no_grad():
        full = attn(x)  # chunked path
        parts, start = [], 0
        for size in (17, 1, 1, 3, 2, 6, 1, 9):
            parts.append(attn(x[:, start : start + size], cache=cache))
            start += size
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_default_window_and_validation():
    assert layer(block_size=64).window == 16  # block_size // 4
    assert layer(window=3).window == 3
    with pytest.raises(ConfigError, match="window must be >= 1"):
        Registry.default().get("RoPE-Sliding").parse_options({"window": 0})
    with pytest.raises(ConfigError, match="scale_factor"):  # the RoPE-SM options still apply
        Registry.default().get("RoPE-Sliding").parse_options({"window": 4, "scale_factor": 2})
