"""RoPE-Sliding: banded attention equals full attention under an explicit band mask, on every
backend, and costs keys within the window only."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ropelm import ConfigError, ModelConfig, Registry
from ropelm.dense_attention import QUERY_CHUNK


def config(block_size: int = 64, backend: str = "auto", **options) -> ModelConfig:
    return ModelConfig(
        block_size=block_size,
        vocab_size=61,
        n_layer=1,
        n_head=4,
        n_embd=32,
        dropout=0.0,
        att_type="RoPE-Sliding",
        att_options=options,
        attention_backend=backend,
    )


def layer(registry: Registry, block_size: int = 64, backend: str = "auto", **options):
    torch.manual_seed(0)
    cfg = config(block_size, backend, **options)
    return registry.resolve(cfg).build_layer(cfg).eval()


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
    ("T", "window", "n_kv_head"),
    [
        (20, 32, 4),  # T <= window: plain causal
        (40, 7, 4),  # one chunk of queries
        (300, 5, 2),  # three chunks, T not a multiple of the chunk, GQA
        (260, 150, 1),  # a window longer than a chunk, MQA
        (50, 1, 4),  # each position sees only itself
    ],
)
def test_dense_matches_naive_band_attention(registry, T, window, n_kv_head):
    attn = layer(registry, backend="dense", window=window, n_kv_head=n_kv_head)
    q = torch.randn(2, 4, T, 8, dtype=torch.float64)
    k, v = torch.randn(2, 2, n_kv_head, T, 8, dtype=torch.float64).unbind(0)
    got = attn.attend(q, k, v, start=0)
    torch.testing.assert_close(got, naive_band(q, k, v, window), rtol=0, atol=1e-10)


def test_dense_reads_only_the_keys_inside_the_window(registry, monkeypatch):
    attn = layer(registry, block_size=512, backend="dense", window=40)
    seen: list[tuple[int, int, int]] = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, **kwargs):
        seen.append((q.size(0), q.size(-2), k.size(-2)))
        return sdpa(q, k, v, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        attn(torch.randn(1, 512, 32))
    # chunk 0 sees its own keys; every later chunk its queries' keys plus the 39 before them,
    # all of those in one call over the stacked windows (batch 1 x 7 chunks)
    n = 512 // QUERY_CHUNK
    assert seen == [(1, QUERY_CHUNK, QUERY_CHUNK), (n - 1, QUERY_CHUNK, QUERY_CHUNK + 39)]


def previous_implementation(attn, x: torch.Tensor, window: int, chunk: int = 8) -> torch.Tensor:
    """The query-chunked band attention ropelm shipped before the kernels change."""
    q, k, v = attn.project_qkv(x)
    q, k = attn.position_qk(q, k, 0)
    B, nh, T, hs = q.shape
    n, h = math.ceil(T / chunk), math.ceil(window / chunk)
    pad, head = n * chunk - T, h * chunk
    q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
    distance = torch.arange(head)[:, None] - torch.arange(head)[None, :]
    y_head = F.scaled_dot_product_attention(
        q[:, :, :head], k[:, :, :head], v[:, :, :head],
        attn_mask=(distance >= 0) & (distance < window), enable_gqa=attn.gqa,
    )  # fmt: skip
    m = n - h
    q_rest = q[:, :, head:].view(B, nh, m, chunk, hs).transpose(1, 2).reshape(B * m, nh, chunk, hs)

    def windows(t: torch.Tensor) -> torch.Tensor:
        t = t[:, :, head - window :].unfold(2, chunk + window, chunk)
        return t.permute(0, 2, 1, 4, 3).reshape(B * m, t.size(1), chunk + window, hs)

    a, b = torch.arange(chunk)[:, None], torch.arange(chunk + window)[None, :]
    y_rest = F.scaled_dot_product_attention(
        q_rest, windows(k), windows(v), attn_mask=(b > a) & (b <= a + window), enable_gqa=attn.gqa
    )
    y_rest = y_rest.view(B, m, nh, chunk, hs).transpose(1, 2).reshape(B, nh, m * chunk, hs)
    return attn.project_out(torch.cat([y_head, y_rest], dim=2)[:, :, :T])


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_equals_the_previous_implementation_on_the_same_weights(registry, backend):
    attn = layer(registry, block_size=32, backend=backend, window=6)
    x = torch.randn(2, 32, 32)
    with torch.no_grad():
        got, want = attn(x), previous_implementation(attn, x, window=6)
    assert attn.last_backend == backend
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_window_covering_the_sequence_equals_rope_sm(registry):
    sliding = layer(registry, window=64)
    cfg = config().model_copy(update={"att_type": "RoPE-SM", "att_options": {}})
    full = registry.resolve(cfg).build_layer(cfg).eval()
    full.load_state_dict(sliding.state_dict())
    x = torch.randn(2, 64, 32)
    with torch.no_grad():
        torch.testing.assert_close(sliding(x), full(x), rtol=0, atol=1e-6)


def test_keys_outside_the_window_have_no_influence(registry):
    attn = layer(registry, window=6)
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


@pytest.mark.parametrize("backend", ["auto", "flex"])
def test_cached_decoding_matches_full_forward(registry, backend):
    attn = layer(registry, backend=backend, window=5, n_kv_head=2)
    x = torch.randn(2, 40, 32)
    cache = attn.init_cache(2, 40, x.device, x.dtype)
    assert cache.k.shape == (2, 2, 40, 8)
    with torch.no_grad():
        full = attn(x)
        parts, start = [], 0
        for size in (17, 1, 1, 3, 2, 6, 1, 9):
            parts.append(attn(x[:, start : start + size], cache=cache))
            start += size
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_default_window_and_validation(registry):
    assert "in_window" in repr(layer(registry, block_size=64))  # block_size // 4 = 16
    with pytest.raises(ConfigError, match="window must be >= 1"):
        registry.get("RoPE-Sliding").parse_options({"window": 0})
    with pytest.raises(ConfigError, match="scale_factor"):  # the RoPE-SM options still apply
        registry.get("RoPE-Sliding").parse_options({"window": 4, "scale_factor": 2})
