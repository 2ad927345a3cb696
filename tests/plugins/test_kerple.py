"""KERPLE-Log: the paper's logarithmic bias, positivity by clamping, trained parameters."""

from __future__ import annotations

import math

import pytest
import torch

from ropelm import ConfigError, ModelConfig, Registry


def config(backend: str = "auto", **options) -> ModelConfig:
    return ModelConfig(block_size=32, vocab_size=61, n_layer=1, n_head=4, n_embd=32,
                       dropout=0.0, att_type="KERPLE-Log", att_options=options,
                       attention_backend=backend)  # fmt: skip


def reference(q, k, v, r1: list[float], r2: list[float]) -> torch.Tensor:
    """softmax(q k^T / sqrt(hs) - r1_h log(1 + r2_h |i - j|)) v, element by element (eq. 7)."""
    nh, T, hs = q.shape[1:]
    bias = torch.full((nh, T, T), float("-inf"))
    for h in range(nh):
        for i in range(T):
            for j in range(i + 1):
                bias[h, i, j] = -r1[h] * math.log(1 + r2[h] * abs(i - j))
    return (q @ k.transpose(-1, -2) / math.sqrt(hs) + bias).softmax(-1) @ v


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_attention_matches_the_paper_with_clamped_parameters(registry: Registry, backend):
    cfg = config(backend)
    attn = registry.resolve(cfg).build_layer(cfg).eval()
    with torch.no_grad():
        attn.score_mod.r1.copy_(torch.tensor([0.5, 2.0, -1.0, 1.0]))  # -1 acts as eps
        attn.score_mod.r2.copy_(torch.tensor([1.0, 0.1, 0.3, 0.0]))  # 0 acts as eps
    q, k, v = torch.randn(3, 2, 4, 32, 8).unbind(0)
    want = reference(q, k, v, [0.5, 2.0, 0.01, 1.0], [1.0, 0.1, 0.3, 0.01])
    with torch.no_grad():
        got = attn.attend(q, k, v, 0)
    assert attn.last_backend == backend
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_parameters_start_as_the_authors_and_train(registry: Registry):
    cfg = config()
    torch.manual_seed(0)
    attn = registry.resolve(cfg).build_layer(cfg)
    r1, r2 = attn.score_mod.r1, attn.score_mod.r2
    assert r1.shape == r2.shape == (4,)
    assert r1.min() >= 0 and r1.max() <= 2 and r2.min() >= 0 and r2.max() <= 1
    attn(torch.randn(2, 32, 32)).sum().backward()
    assert r1.grad.abs().sum() > 0 and r2.grad.abs().sum() > 0


def test_eps_is_validated(registry: Registry):
    with pytest.raises(ConfigError, match="eps must be > 0"):
        registry.get("KERPLE-Log").parse_options({"eps": 0})
