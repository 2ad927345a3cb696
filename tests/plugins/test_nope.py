"""NoPE: attention carries no position information beyond the causal mask."""

from __future__ import annotations

import math

import torch
from ropelm.plugins.nope import build

from ropelm import ModelConfig, Registry, SoftmaxOptions, TransformerLM


def config(**overrides) -> ModelConfig:
    base = dict(block_size=32, vocab_size=61, n_layer=1, n_head=4, n_embd=32, dropout=0.0)
    return ModelConfig(**{**base, **overrides})


def test_matches_plain_causal_softmax():
    torch.manual_seed(0)
    attn = build(config(att_type="NoPE"), SoftmaxOptions())
    q, k, v = torch.randn(3, 2, 4, 9, 8, dtype=torch.float64).unbind(0)
    scores = q @ k.transpose(-1, -2) / math.sqrt(8)
    scores = scores.masked_fill(torch.ones(9, 9, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(attn.attend(q, k, v, 0), scores.softmax(-1) @ v, rtol=0, atol=1e-12)


def test_last_output_ignores_the_order_of_earlier_tokens():
    """Without positions one attention layer sees the prefix as a set; RoPE does not."""
    torch.manual_seed(0)
    x = torch.randn(1, 12, 32)
    perm = torch.cat([torch.randperm(11), torch.tensor([11])])
    for att_type, invariant in (("NoPE", True), ("RoPE-SM", False)):
        cfg = config(att_type=att_type)
        spec = Registry.default().get(att_type)
        attn = spec.factory(cfg, spec.parse_options({})).eval()
        with torch.no_grad():
            last, last_perm = attn(x)[:, -1], attn(x[:, perm])[:, -1]
        assert torch.allclose(last, last_perm, atol=1e-6) is invariant, att_type


def test_mqa_cache_holds_one_head_and_decoding_matches():
    torch.manual_seed(0)
    model = TransformerLM.from_config(config(att_type="NoPE", att_options={"n_kv_head": 1})).eval()
    state = model.init_decode_state(1, 40)
    assert state.caches[0].k.shape == (1, 1, 40, 8)
    idx = torch.randint(0, 61, (1, 40))  # beyond block_size: nothing limits NoPE's length
    with torch.no_grad():
        full, _ = model(idx)
        steps = [model(idx[:, t : t + 1], state=state)[0] for t in range(40)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
