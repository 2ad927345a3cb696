"""RoPE-Linear: chunked causal linear attention against a naive O(T^2) reference."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from ropelm.plugins.rope_linear import (
    LinearAttentionState,
    RoPELinearOptions,
    build,
    causal_linear_attention,
)

from ropelm import ConfigError, ModelConfig, Registry
from ropelm.rope import apply_rotary_emb, build_rope_cache


def config(**overrides) -> ModelConfig:
    base = dict(block_size=64, vocab_size=61, n_layer=1, n_head=2, n_embd=16, dropout=0.0)
    return ModelConfig(**{**base, **overrides, "att_type": "RoPE-Linear"})


def rotate(x: torch.Tensor, m: int) -> torch.Tensor:
    """R_m x for one vector x (hs,), written out pair by pair."""
    out = torch.empty_like(x)
    for i in range(x.numel() // 2):
        angle = m * 10000.0 ** (-2 * i / x.numel())
        c, s = math.cos(angle), math.sin(angle)
        out[2 * i] = c * x[2 * i] - s * x[2 * i + 1]
        out[2 * i + 1] = s * x[2 * i] + c * x[2 * i + 1]
    return out


def naive(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, eps: float) -> torch.Tensor:
    """RoFormer eq. 19 made causal, one (batch, head, query, key) at a time."""
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    y = torch.zeros_like(v)
    B, nh, T, _ = q.shape
    for b in range(B):
        for h in range(nh):
            keys = [rotate(phi_k[b, h, n], n) for n in range(T)]
            for m in range(T):
                query = rotate(phi_q[b, h, m], m)
                num = sum((query @ keys[n]) * v[b, h, n] for n in range(m + 1))
                den = sum(phi_q[b, h, m] @ phi_k[b, h, n] for n in range(m + 1))
                y[b, h, m] = num / (den + eps)
    return y


def layer_core(q, k, v, chunk_size: int, start: int = 0, eps: float = 1e-6):
    T, hs = q.size(2), q.size(3)
    cos, sin = build_rope_cache(T, hs, dtype=torch.float64, start=start)
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    q_rot, k_rot = apply_rotary_emb(phi_q, cos, sin), apply_rotary_emb(phi_k, cos, sin)
    return causal_linear_attention(q_rot, k_rot, phi_q, phi_k, v, chunk_size, eps)


@pytest.mark.parametrize("chunk_size", [1, 4, 64])
def test_matches_naive_reference(chunk_size):
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, 11, 8, dtype=torch.float64).unbind(0)
    y, S, z = layer_core(q, k, v, chunk_size)
    torch.testing.assert_close(y, naive(q, k, v, 1e-6), rtol=1e-10, atol=1e-10)
    # the final state is the sum over all positions
    phi_k = F.elu(k) + 1
    torch.testing.assert_close(z, phi_k.sum(2), rtol=1e-12, atol=1e-12)
    assert S.shape == (1, 2, 8, 8)


def test_only_relative_positions_matter():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 2, 2, 20, 8, dtype=torch.float64).unbind(0)
    y0, _, _ = layer_core(q, k, v, 8, start=0)
    y1, _, _ = layer_core(q, k, v, 8, start=1000)
    torch.testing.assert_close(y0, y1, rtol=1e-9, atol=1e-9)


def test_recurrent_state_decoding_matches_full_forward():
    torch.manual_seed(0)
    cfg = config()
    layer = build(cfg, RoPELinearOptions(chunk_size=4)).eval()
    x = torch.randn(2, 23, 16)
    cache = layer.init_cache(2, 1, x.device, x.dtype)  # max_len is irrelevant: no keys stored
    assert isinstance(cache, LinearAttentionState) and cache.S.shape == (2, 2, 8, 8)
    with torch.no_grad():
        full = layer(x)
        parts, start = [], 0
        for size in (9, 1, 1, 5, 7):
            parts.append(layer(x[:, start : start + size], cache=cache))
            start += size
    assert cache.length == 23 and cache.S.shape == (2, 2, 8, 8)
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-6)


def test_bf16_model_keeps_float32_state():
    layer = build(config(), RoPELinearOptions()).to(torch.bfloat16).eval()
    cache = layer.init_cache(1, 8, torch.device("cpu"), torch.bfloat16)
    with torch.no_grad():
        y = layer(torch.randn(1, 8, 16, dtype=torch.bfloat16), cache=cache)
    assert y.dtype == torch.bfloat16 and cache.S.dtype == torch.float32


@pytest.mark.parametrize(
    ("options", "message"),
    [({"chunk_size": 0}, "chunk_size must be >= 1"), ({"eps": -1.0}, r"eps must be in \[0, 1\)")],
)
def test_options_are_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        Registry.default().get("RoPE-Linear").parse_options(options)


def test_linear_attention_runs_in_float32_outside_autocast(registry):
    """Under the engine's autocast the projections may run in bf16 or fp16, the running
    sums never (fp16 overflows them past 65,504 at long lengths)."""
    torch.manual_seed(0)
    cfg = config()
    layer = registry.resolve(cfg).build_layer(cfg).eval()
    inside = []
    attend = layer._attend

    def spy(*args):
        y = attend(*args)
        inside.append((torch.is_autocast_enabled("cpu"), y.dtype))
        return y

    layer._attend = spy
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(torch.randn(2, 64, cfg.n_embd))
    assert inside == [(False, torch.float32)]
    assert out.dtype == torch.bfloat16  # the output projection still runs under autocast
