import itertools
import math

import pytest
import torch

from ropelm import ModelConfig, TransformerLM
from ropelm.config import TrainConfig, validate
from ropelm.errors import ConfigError
from ropelm.recipe import StepPlan, build_optimizer, lr_at, resolve_compile, resolve_precision


def test_lr_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    tc = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    total = 110
    assert lr_at(0, total, tc) == pytest.approx(1e-4)
    assert lr_at(9, total, tc) == pytest.approx(1e-3)
    halfway = 10 + 50
    assert lr_at(halfway, total, tc) == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4))
    assert lr_at(total, total, tc) == pytest.approx(1e-4)
    decay = [lr_at(s, total, tc) for s in range(10, total + 1)]
    assert all(a >= b for a, b in itertools.pairwise(decay))


def test_lr_without_warmup_starts_at_the_peak():
    tc = TrainConfig(learning_rate=3e-4, min_lr_ratio=0.0)
    assert lr_at(0, 100, tc) == pytest.approx(3e-4)
    assert lr_at(100, 100, tc) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(25, 100, tc) == pytest.approx(3e-4 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_weight_decay_applies_to_matrices_only():
    model = TransformerLM.from_config(
        ModelConfig(block_size=8, vocab_size=20, n_layer=1, n_head=2, n_embd=8)
    )
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1), torch.device("cpu"))
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"])
    assert all(p.dim() < 2 for p in plain["params"])
    n_biases_and_norms = sum(1 for n, p in model.named_parameters() if p.dim() < 2)
    assert len(plain["params"]) == n_biases_and_norms > 0
    assert opt.defaults["betas"] == (0.9, 0.95)


def test_step_plan_counts_epochs_over_the_global_batch():
    tc = TrainConfig(num_epochs=3, batch_size=4, grad_accum_steps=2)
    plan = StepPlan.build(tc, block_size=16, train_tokens=16 * 4 * 2 * 2 * 10, world=2)
    assert plan.tokens_per_step == 4 * 2 * 2 * 16
    assert plan.steps_per_epoch == 10
    assert plan.total_steps == 30
    assert StepPlan.build(TrainConfig(max_steps=7), 16, 10_000, 1).total_steps == 7


def test_precision_defaults_to_fp32_on_cpu_and_rejects_fp16_there():
    cpu = torch.device("cpu")
    assert resolve_precision(TrainConfig().precision, cpu).dtype is None
    assert resolve_precision("fp32", cpu).name == "fp32"
    bf16 = resolve_precision("bf16", cpu)
    assert bf16.dtype == torch.bfloat16 and not bf16.needs_grad_scaler
    with bf16.autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.bfloat16
    with resolve_precision("auto", cpu).autocast():
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    with pytest.raises(ConfigError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", cpu)


def test_tokens_per_step_derives_the_accumulation_for_any_number_of_processes():
    tc = TrainConfig(batch_size=4, tokens_per_step=4 * 16 * 8)
    one = StepPlan.build(tc, block_size=16, train_tokens=100_000, world=1)
    four = StepPlan.build(tc, block_size=16, train_tokens=100_000, world=4)
    assert (one.grad_accum_steps, four.grad_accum_steps) == (8, 2)
    assert one.tokens_per_step == four.tokens_per_step == 512
    assert one.total_steps == four.total_steps  # the same optimisation either way


def test_tokens_per_step_must_be_whole_micro_batches(assert_one_sentence):
    tc = TrainConfig(batch_size=4, tokens_per_step=1000)
    with pytest.raises(ConfigError, match=r"not a multiple of .* = 4 x 16 x 2 = 128") as info:
        StepPlan.build(tc, block_size=16, train_tokens=10_000, world=2)
    assert_one_sentence(str(info.value))
    with pytest.raises(ConfigError, match="not both"):
        validate({"train": {"tokens_per_step": 512, "grad_accum_steps": 2}})


def test_compile_is_on_by_default_on_cuda_only(monkeypatch, assert_one_sentence):
    cpu = torch.device("cpu")
    assert resolve_compile("auto", cpu) is False
    assert resolve_compile(False, torch.device("cuda")) is False
    assert TrainConfig().compile == "auto" and TrainConfig(compile=True).compile is True
    monkeypatch.setattr("shutil.which", lambda name: None)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler") as info:
        resolve_compile(True, cpu)
    assert_one_sentence(str(info.value))


def test_auto_precision_does_not_take_emulated_bf16(monkeypatch):
    """V100 and T4 emulate bf16 slowly: they get fp16 with a gradient scaler."""
    calls = []

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        calls.append(including_emulation)
        return including_emulation  # an emulating GPU

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    precision = resolve_precision("auto", torch.device("cuda"))
    assert calls == [False] and precision.dtype == torch.float16 and precision.needs_grad_scaler
