"""ModelConfig validation and TransformerLM behaviour shared by every attention variant."""

from __future__ import annotations

import math

import pytest
import torch

from ropelm import ConfigError, ModelConfig, TransformerLM
from ropelm.config import validate
from ropelm.experiment import Experiment

SMALL = {"block_size": 32, "vocab_size": 64, "n_layer": 2, "n_head": 4, "n_embd": 32}


def small_model(**overrides) -> TransformerLM:
    torch.manual_seed(0)
    return TransformerLM.from_config(ModelConfig(**{**SMALL, "dropout": 0.0, **overrides})).eval()


def test_defaults_are_the_seeds():
    config = ModelConfig()
    assert config.model_dump() == {
        "block_size": 1024,
        "vocab_size": 32768,
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "dropout": 0.1,
        "bias": True,
        "att_type": "RoPE-SM",
        "pad_token_id": None,
        "rope_theta": 10000.0,
        "att_options": {},
        "attention_backend": "auto",
    }
    assert config.head_size == 64


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"n_embd": 30, "n_head": 4},
            "model: n_embd (30) must be divisible by n_head (4); change one of them.",
        ),
        (
            {"dropout": -0.1},
            "model.dropout: Input should be greater than or equal to 0 (got -0.1).",
        ),
        (
            {"pad_token_id": 64, "vocab_size": 64},
            "model: pad_token_id (64) must be below vocab_size (64).",
        ),
        ({"n_haed": 4}, "model.n_haed: unknown key (did you mean 'n_head'?)"),
    ],
    ids=["n_embd-not-divisible", "negative-dropout", "pad-out-of-vocab", "unknown-key"],
)
def test_invalid_config_is_one_clear_sentence(overrides, message, assert_one_sentence):
    with pytest.raises(ConfigError) as info:
        ModelConfig(**overrides)
    assert str(info.value).startswith(message)
    assert_one_sentence(str(info.value))


def test_odd_head_size_is_rejected_for_rope(assert_one_sentence):
    config = ModelConfig(**{**SMALL, "n_embd": 36})  # 36 / 4 = 9: valid shape, odd head size
    expected = (
        "model: attention 'RoPE-SM' needs an even head size, but n_embd / n_head = 36 / 4 = 9"
    )
    with pytest.raises(ConfigError) as info:
        TransformerLM.from_config(config)
    assert str(info.value).startswith(expected)
    assert_one_sentence(str(info.value))
    with pytest.raises(ConfigError, match="needs an even head size"):  # caught before training
        Experiment.bind(validate({"model": {**SMALL, "n_embd": 36}}))
    TransformerLM.from_config(
        config.model_copy(update={"att_type": "NoPE"})
    )  # no rotation: odd is fine


def test_loss_ignores_pad_token():
    pad = 3
    model = small_model(pad_token_id=pad)
    generator = torch.Generator().manual_seed(1)
    idx = torch.randint(64, (2, 16), generator=generator)
    targets = torch.randint(64, (2, 16), generator=generator)
    targets[targets == pad] = pad + 1
    targets[0, 10:] = pad  # right padding
    targets[1, ::3] = pad
    logits, loss = model(idx, targets=targets)

    log_probs = logits.double().log_softmax(-1)
    keep = targets != pad
    manual = -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)[keep].mean()
    torch.testing.assert_close(loss.double(), manual, rtol=1e-6, atol=0)
    with_pad = -log_probs.gather(-1, targets.unsqueeze(-1)).mean()
    assert abs(with_pad.item() - loss.item()) > 1e-3  # the pad positions would matter


def test_loss_without_pad_token_counts_every_target():
    model = small_model()
    idx = torch.randint(64, (2, 16), generator=torch.Generator().manual_seed(2))
    logits, loss = model(idx, targets=idx)
    manual = -logits.double().log_softmax(-1).gather(-1, idx.unsqueeze(-1)).mean()
    torch.testing.assert_close(loss.double(), manual, rtol=1e-6, atol=0)


@torch.no_grad()
def test_whole_model_is_causal():
    """Logits at positions < t do not change when tokens at positions >= t change."""
    model = small_model()
    generator = torch.Generator().manual_seed(3)
    idx = torch.randint(64, (2, 32), generator=generator)
    logits, _ = model(idx)
    for t in (1, 17, 31):
        changed = idx.clone()
        changed[:, t:] = (idx[:, t:] + 1 + torch.randint(63, (2, 32 - t), generator=generator)) % 64
        logits_changed, _ = model(changed)
        torch.testing.assert_close(logits_changed[:, :t], logits[:, :t], rtol=0, atol=1e-6)
        assert not torch.allclose(logits_changed[:, t:], logits[:, t:], rtol=0, atol=1e-4)


@pytest.mark.parametrize("bias", [True, False])
def test_parameter_count_formula(bias):
    V, C, L = 64, 32, 2
    model = small_model(bias=bias)
    if bias:
        # tok_emb + L * (2 LayerNorms, c_attn, attn c_proj, c_fc, mlp c_proj) + ln_f + lm_head
        per_layer = 2 * 2 * C + (3 * C * C + 3 * C) + (C * C + C) + (4 * C * C + 4 * C)
        per_layer += 4 * C * C + C
        expected = V * C + L * per_layer + 2 * C + (V * C + V)
        assert expected == 2 * V * C + V + L * (12 * C * C + 13 * C) + 2 * C
    else:
        expected = 2 * V * C + L * (12 * C * C + 2 * C) + C
    assert model.num_parameters() == expected
    assert model.num_parameters(trainable_only=True) == expected


def test_residual_projections_are_scaled_down_with_depth():
    n_layer, C = 4, 64
    torch.manual_seed(0)
    model = TransformerLM.from_config(
        ModelConfig(block_size=32, vocab_size=128, n_layer=n_layer, n_head=4, n_embd=C)
    )
    params = dict(model.named_parameters())
    residual = torch.cat([p.flatten() for n, p in params.items() if n.endswith("c_proj.weight")])
    other = torch.cat(
        [
            p.flatten()
            for n, p in params.items()
            if n.endswith("weight") and p.dim() == 2 and not n.endswith("c_proj.weight")
        ]
    )
    # 81,920 and 98,304 samples: the std estimates are within 1% of the truth
    target = 0.02 / math.sqrt(2 * n_layer)
    assert residual.std().item() == pytest.approx(target, rel=0.05)
    assert other.std().item() == pytest.approx(0.02, rel=0.05)
    assert residual.mean().abs().item() < 0.1 * target
    biases = [p for n, p in params.items() if n.endswith("bias")]
    assert all(torch.all(b == 0) for b in biases)
    norms = [p for n, p in params.items() if "ln_" in n and n.endswith("weight")]
    assert all(torch.all(w == 1) for w in norms)


@pytest.mark.parametrize("att_type", ["RoPE-SM", "T5-Bias"])
def test_activation_checkpointing_gives_the_same_gradients(att_type):
    """Blocks recomputed in the backward pass redraw the same dropout masks (the RNG state
    is saved with each checkpoint): the gradients are those of the plain model."""
    model = small_model(att_type=att_type, dropout=0.1).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    calls, block_forward = [], model.blocks[0].forward
    model.blocks[0].forward = lambda *args: calls.append(1) or block_forward(*args)
    grads, forwards = {}, {}
    for checkpointed in (False, True):
        model.activation_checkpointing = checkpointed
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        calls.clear()
        _, loss = model(idx, idx)
        loss.backward()
        grads[checkpointed] = {n: p.grad.clone() for n, p in model.named_parameters()}
        forwards[checkpointed] = len(calls)
    assert forwards == {False: 1, True: 2}  # recomputed in the backward pass
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("att_type", ["Learned-APE", "Sinusoidal-APE", "RoPE-SM", "RoPE-Linear"])
def test_training_forward_compiles_into_one_graph(att_type):
    """No host syncs in the forward pass (positions are Python ints, tables are sliced):
    torch.compile captures it whole (dynamo's explain counts the graph breaks)."""
    import torch._dynamo

    model = small_model(att_type=att_type, dropout=0.1).train()
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
