"""T5-Bias: T5's relative-position buckets, the learned bias on every backend, training."""

from __future__ import annotations

import math

import pytest
import torch
from ropelm.plugins.t5_bias import relative_bucket

from ropelm import ConfigError, ModelConfig, Registry


def t5_bucket(distance: int, num_buckets: int, max_distance: int) -> int:
    """T5's ``_relative_position_bucket`` for a decoder (bidirectional=False), written from the
    paper's description and the released code with plain Python numbers."""
    max_exact = num_buckets // 2
    if distance < max_exact:
        return distance
    scaled = math.log(distance / max_exact) / math.log(max_distance / max_exact)
    return min(max_exact + int(scaled * (num_buckets - max_exact)), num_buckets - 1)


@pytest.mark.parametrize(("num_buckets", "max_distance"), [(32, 128), (8, 16), (16, 1000)])
def test_buckets_match_t5(num_buckets, max_distance):
    distances = torch.arange(0, 3000)
    got = relative_bucket(distances, num_buckets, max_distance).tolist()
    want = [t5_bucket(d, num_buckets, max_distance) for d in range(3000)]
    assert got == want
    assert got[num_buckets // 2 - 1] == num_buckets // 2 - 1  # exact region
    assert got[-1] == num_buckets - 1  # beyond max_distance: the last bucket


def config(backend: str = "auto", **options) -> ModelConfig:
    return ModelConfig(block_size=32, vocab_size=61, n_layer=1, n_head=4, n_embd=32,
                       dropout=0.0, att_type="T5-Bias", att_options=options,
                       attention_backend=backend)  # fmt: skip


@pytest.mark.parametrize("backend", ["dense", "flex"])
def test_attention_adds_the_bucket_bias_of_each_head(registry: Registry, backend):
    cfg = config(backend, num_buckets=8, max_distance=16)
    attn = registry.resolve(cfg).build_layer(cfg).eval()
    with torch.no_grad():
        attn.score_mod.table.normal_(0.0, 1.0)  # a bias large enough to matter
    q, k, v = torch.randn(3, 2, 4, 32, 8).unbind(0)
    bias = torch.full((4, 32, 32), float("-inf"))
    for h in range(4):
        for i in range(32):
            for j in range(i + 1):
                bias[h, i, j] = attn.score_mod.table[h, t5_bucket(i - j, 8, 16)]
    want = (q @ k.transpose(-1, -2) / math.sqrt(8) + bias).softmax(-1) @ v
    with torch.no_grad():
        got = attn.attend(q, k, v, 0)
    assert attn.last_backend == backend
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_the_table_is_a_trained_parameter_with_t5_initialisation(registry: Registry):
    cfg = config()
    attn = registry.resolve(cfg).build_layer(cfg)
    assert dict(attn.named_parameters())["score_mod.table"].shape == (4, 32)
    big = ModelConfig(n_embd=768, n_head=12, att_type="T5-Bias")
    table = registry.resolve(big).build_layer(big).score_mod.table
    assert table.std().item() == pytest.approx(768**-0.5, rel=0.1)
    x = torch.randn(2, 32, 32)
    attn(x).sum().backward()
    assert attn.score_mod.table.grad.abs().sum() > 0


def test_options_are_validated(registry: Registry):
    spec = registry.get("T5-Bias")
    with pytest.raises(ConfigError, match="num_buckets must be >= 2"):
        spec.parse_options({"num_buckets": 1})
    with pytest.raises(ConfigError, match="max_distance must exceed"):
        spec.parse_options({"num_buckets": 32, "max_distance": 10})
