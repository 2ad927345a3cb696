"""Training-step throughput: ropelm's engine step and a peer's, timed side by side.

``ropelm-exp device-check`` and ``benchmarks/test_bench_peer.py`` time the step
``ropelm-exp run`` executes -- :meth:`ropelm.engine.Trainer.train_step`: autocast,
``torch.compile`` when asked, fused AdamW on CUDA, gradient clipping, pinned and
prefetched batches -- against karpathy/nanoGPT's ``model.py``
(https://github.com/karpathy/nanoGPT), read from a local copy whose path the
caller gives (never bundled with ropelm). Both train the same shape on the same
batches (the same :class:`~ropelm.batches.TrainBatches`) with the same batch
size, precision, compile setting, clipping and optimizer (ropelm's
``build_optimizer``: fused AdamW, decay on matrices only, which is nanoGPT's
grouping too), in the same process, so only the model code differs; rounds
alternate so drift hits both alike.

The architectures differ only where the methods do: ropelm's RoPE-SM rotates q
and k, nanoGPT adds a learned position table; nanoGPT ties its LM head to the
token embedding, ropelm does not (the same matmul FLOPs; ropelm's AdamW updates
one more vocab x n_embd matrix). Data are random tokens: throughput does not
depend on what the tokens say.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import io
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from ropelm.batches import TrainBatches
from ropelm.bench import flops_per_token, matmul_params
from ropelm.data import PreparedData, token_dtype
from ropelm.distributed import DistributedContext
from ropelm.engine import Trainer
from ropelm.errors import ConfigError, TrainingError
from ropelm.experiment import Experiment
from ropelm.recipe import build_optimizer, resolve_compile, resolve_precision
from ropelm.runs import RunDir
from ropelm.tokenfile import TokenFile
from ropelm.tokenizer import TokenizerInfo

NANOGPT_ENV = "ROPELM_NANOGPT"  # path of a local copy of nanoGPT's model.py
NANOGPT_HINT = (
    "get a copy with `git clone https://github.com/karpathy/nanoGPT` and pass its model.py "
    f"with --nanogpt PATH or the {NANOGPT_ENV} environment variable"
)

Step = Callable[[], Any]


def synthetic_data(directory: Path, vocab_size: int, tokens: int, seed: int = 0) -> PreparedData:
    """Train and validation token files of uniformly random ids below the special tokens."""
    directory.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(vocab_size)
    rng = np.random.default_rng(seed)
    splits = {}
    for name in ("train", "val"):
        path = directory / f"{name}.bin"
        rng.integers(0, vocab_size - 2, size=tokens, dtype=np.int64).astype(dtype).tofile(path)
        splits[name] = TokenFile(path, dtype, name=name)
    return PreparedData(directory, splits["train"], splits["val"], {"synthetic": True})


def synthetic_tokenizer(vocab_size: int) -> TokenizerInfo:
    """What the engine needs of a tokenizer: the vocabulary and two special ids (the last two)."""
    return TokenizerInfo(
        path=Path("synthetic"), sha256="synthetic", vocab_size=vocab_size,
        eot_id=vocab_size - 2, pad_id=vocab_size - 1,
    )  # fmt: skip


def release_memory(device: torch.device) -> None:
    """Collect the garbage of a finished measurement (and CUDA's cached blocks)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class EngineStep:
    """ropelm's training step for ``experiment`` on ``data`` (a :class:`Trainer`, no files)."""

    trainer: Trainer

    @classmethod
    def build(cls, experiment: Experiment, data: PreparedData, scratch: Path) -> EngineStep:
        tokenizer = synthetic_tokenizer(experiment.config.model.vocab_size)
        trainer = Trainer.build(experiment, data, tokenizer, RunDir(scratch))
        trainer.model.train()
        return cls(trainer)

    def __call__(self) -> torch.Tensor:
        return self.trainer.train_step()

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    @property
    def tokens_per_step(self) -> int:
        return self.trainer.plan.tokens_per_step

    def flops_per_token(self) -> float:
        """PaLM's forward+backward FLOPs per token (``ropelm.bench``), for MFU."""
        config = self.trainer.model_config
        return flops_per_token(config, matmul_params(self.trainer.model), config.block_size, True)


def load_nanogpt(path: str | Path) -> ModuleType:
    """nanoGPT's ``model.py`` as a module (code the caller chose to run, from their disk).

    Raises:
        ConfigError: the file is missing or defines no ``GPT`` / ``GPTConfig``.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"No nanoGPT model.py at {path}; {NANOGPT_HINT}.")
    spec = importlib.util.spec_from_file_location("nanogpt_model", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not (hasattr(module, "GPT") and hasattr(module, "GPTConfig")):
        raise ConfigError(f"{path} defines no GPT and GPTConfig; is it nanoGPT's model.py?")
    return module


@dataclass
class PeerStep:
    """nanoGPT's model trained with the recipe and optimizer of :class:`EngineStep` on the
    same batches."""

    model: torch.nn.Module
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    batches: TrainBatches
    autocast: Callable[[], contextlib.AbstractContextManager]
    max_grad_norm: float
    device: torch.device

    @classmethod
    def build(cls, nanogpt: ModuleType, engine: EngineStep) -> PeerStep:
        trainer = engine.trainer
        mc, tc = trainer.model_config, trainer.train_config
        config = nanogpt.GPTConfig(
            block_size=mc.block_size, vocab_size=mc.vocab_size, n_layer=mc.n_layer,
            n_head=mc.n_head, n_embd=mc.n_embd, dropout=mc.dropout, bias=mc.bias,
        )  # fmt: skip
        torch.manual_seed(tc.seed)
        with contextlib.redirect_stdout(io.StringIO()):  # it prints its parameter count
            model = nanogpt.GPT(config).to(trainer.device).train()
        compiled = resolve_compile(tc.compile, trainer.device)
        batches = TrainBatches(
            trainer.data.train, batch_size=tc.batch_size, block_size=mc.block_size,
            generator=torch.Generator().manual_seed(tc.seed), device=trainer.device,
            dist=DistributedContext(),
        )  # fmt: skip
        return cls(
            model=model,
            train_model=torch.compile(model) if compiled else model,
            optimizer=build_optimizer(model, tc, trainer.device),  # only the model differs
            batches=batches,
            autocast=resolve_precision(tc.precision, trainer.device).autocast,
            max_grad_norm=tc.max_grad_norm,
            device=trainer.device,
        )

    def __call__(self) -> torch.Tensor:
        x, y = next(self.batches)  # (B, T) each, on the device
        with self.autocast():
            _, loss = self.train_model(x, y)
        loss.backward()
        if self.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def seconds_per_step(step: Step, steps: int, device: torch.device) -> float:
    """Wall time of ``steps`` consecutive steps (synchronised at both ends), per step."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def interleaved_rates(
    steps: dict[str, Step],
    tokens_per_step: int,
    device: torch.device,
    *,
    rounds: int,
    steps_per_round: int,
    warmup: int = 2,
) -> dict[str, dict[str, float]]:
    """Tokens/s of every step, measured in alternating order (ABBA...); medians over rounds.

    Each name gets ``tokens_per_s`` (median) and, against the first name,
    ``ratio_vs_first`` (the median of per-round ratios). ``warmup`` steps each
    run first (compilation, allocator, autotuning).
    """
    for step in steps.values():
        seconds_per_step(step, warmup, device)
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for number in range(rounds):
        for name in names if number % 2 == 0 else reversed(names):
            times[name].append(seconds_per_step(steps[name], steps_per_round, device))
    first = names[0]
    return {
        name: {
            "tokens_per_s": tokens_per_step / statistics.median(times[name]),
            "ratio_vs_first": statistics.median(
                a / b for a, b in zip(times[first], times[name], strict=True)
            ),
        }
        for name in names
    }


def largest_fitting_batch(
    fits: Callable[[int], None], candidates: Sequence[int], device: torch.device
) -> tuple[int | None, dict[int, str]]:
    """The first of ``candidates`` (largest first) for which ``fits(b)`` runs without
    running out of memory; and why each larger one failed."""
    failures: dict[int, str] = {}
    for batch_size in sorted(candidates, reverse=True):
        try:
            fits(batch_size)
        except (torch.OutOfMemoryError, TrainingError) as err:
            failures[batch_size] = str(err).splitlines()[0]
        else:
            return batch_size, failures
        finally:
            release_memory(device)
    return None, failures
