"""Learned-APE: one trained vector per position, none beyond block_size."""

from __future__ import annotations

import pytest
import torch

from ropelm import ConfigError, ModelConfig, TransformerLM


def model(**options) -> TransformerLM:
    torch.manual_seed(0)
    cfg = ModelConfig(
        block_size=16,
        vocab_size=61,
        n_layer=1,
        n_head=4,
        n_embd=32,
        dropout=0.0,
        att_type="Learned-APE",
        att_options=options,
    )
    return TransformerLM.from_config(cfg).eval()


def test_table_is_a_block_size_parameter():
    lm = model()
    assert lm.state_dict()["pos_emb.weight"].shape == (16, 32)
    assert lm.pos_emb.weight.std().item() == pytest.approx(0.02, rel=0.2)  # GPT-2 init


def test_rejects_positions_at_or_beyond_block_size():
    lm = model()
    lm(torch.zeros(1, 16, dtype=torch.long))  # T = block_size is fine
    with pytest.raises(ConfigError, match=r"positions 0\.\.15 .* asked for position 16"):
        lm(torch.zeros(1, 17, dtype=torch.long))
    state = lm.init_decode_state(1, 32)
    lm(torch.zeros(1, 16, dtype=torch.long), state=state)
    with pytest.raises(ConfigError, match="asked for position 16"):
        lm(torch.zeros(1, 1, dtype=torch.long), state=state)  # decoding past block_size
    with pytest.raises(ConfigError, match="asked for position -1"):
        lm.pos_emb(-1, 2)


def test_only_used_positions_get_gradients():
    lm = model().train()
    idx = torch.randint(0, 61, (2, 10))
    _, loss = lm(idx, targets=idx)
    loss.backward()
    grad = lm.pos_emb.weight.grad
    assert (grad[:10].abs().sum(-1) > 0).all()
    assert torch.equal(grad[10:], torch.zeros_like(grad[10:]))


def test_positions_make_the_model_order_aware_with_one_layer():
    lm = model(n_kv_head=2)
    idx = torch.randint(0, 61, (1, 12))
    order = torch.randperm(11, generator=torch.Generator().manual_seed(1))
    perm = torch.cat([order, torch.tensor([11])])
    with torch.no_grad():
        lm.blocks[0].attn.c_attn.weight.normal_(0.0, 0.5)  # sharp attention, not uniform
        lm.pos_emb.weight.normal_(0.0, 1.0)  # make positions matter clearly
        last, last_perm = lm(idx)[0][:, -1], lm(idx[:, perm])[0][:, -1]
        lm.pos_emb.weight.zero_()  # without positions one layer sees a set (NoPE)
        flat, flat_perm = lm(idx)[0][:, -1], lm(idx[:, perm])[0][:, -1]
    assert (last - last_perm).abs().max() > 1e-3
    torch.testing.assert_close(flat, flat_perm, rtol=0, atol=1e-5)
