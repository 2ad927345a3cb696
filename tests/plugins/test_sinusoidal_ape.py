"""Sinusoidal-APE: the formula of Vaswani et al., any position, no parameters."""

from __future__ import annotations

import math

import pytest
import torch
from ropelm.plugins.sinusoidal_ape import SinusoidalPositionEmbedding

from ropelm import ConfigError, ModelConfig, Registry, TransformerLM


def config(**overrides) -> ModelConfig:
    base = dict(block_size=16, vocab_size=61, n_layer=1, n_head=4, n_embd=32, dropout=0.0)
    return ModelConfig(**{**base, **overrides, "att_type": "Sinusoidal-APE"})


@pytest.mark.parametrize(("base", "scale"), [(10000.0, 1.0), (500.0, 0.25)])
def test_values_match_the_paper_formula(base, scale):
    pe = SinusoidalPositionEmbedding(8, base=base, scale=scale)
    positions = [0, 3, 1000, 123456]  # far beyond any block_size
    got = torch.cat([pe(m, 1) for m in positions])
    assert got.shape == (4, 8) and got.dtype == torch.float32
    torch.testing.assert_close(pe(998, 4)[2:], pe(1000, 2), rtol=0, atol=0)
    for row, m in enumerate(positions):
        for i in range(4):
            angle = m / base ** (2 * i / 8)
            assert got[row, 2 * i].item() == pytest.approx(scale * math.sin(angle), abs=1e-6)
            assert got[row, 2 * i + 1].item() == pytest.approx(scale * math.cos(angle), abs=1e-6)


def test_no_parameters_and_runs_past_block_size_in_bf16():
    torch.manual_seed(0)
    lm = TransformerLM.from_config(config())
    plain = TransformerLM.from_config(config(att_type="NoPE"))
    assert lm.num_parameters() == plain.num_parameters()
    assert not any(name.startswith("pos_emb") for name in lm.state_dict())
    lm = lm.to(torch.bfloat16).eval()
    logits, _ = lm(torch.randint(0, 61, (1, 40)))  # 2.5x block_size
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_embedding_is_added_at_the_input():
    torch.manual_seed(0)
    lm = TransformerLM.from_config(config(att_options={"scale": 0.5})).eval()
    idx = torch.randint(0, 61, (1, 6))
    captured = {}
    lm.drop.register_forward_hook(lambda mod, inp, out: captured.setdefault("x", out))
    lm(idx)
    expected = lm.tok_emb(idx) + 0.5 * SinusoidalPositionEmbedding(32)(0, 6)
    torch.testing.assert_close(captured["x"], expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    ("options", "message"),
    [({"base": 1.0}, "base must be > 1"), ({"scale": 0.0}, "scale must be > 0")],
)
def test_options_are_validated(options, message):
    with pytest.raises(ConfigError, match=message):
        Registry.default().get("Sinusoidal-APE").parse_options(options)


def test_odd_embedding_width_is_rejected():
    with pytest.raises(ConfigError, match="n_embd must be even"):
        TransformerLM.from_config(config(n_embd=33, n_head=3))


def test_default_amplitude_balances_position_and_token_signal():
    """At initialisation the position embedding is as large as the token embedding (RMS)."""
    lm = TransformerLM.from_config(config())
    pos_rms = lm.pos_emb(0, lm.config.block_size).pow(2).mean().sqrt().item()
    tok_rms = lm.tok_emb.weight.pow(2).mean().sqrt().item()
    assert 0.8 < pos_rms / tok_rms < 1.25
