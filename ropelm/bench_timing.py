"""The measuring side of ``ropelm-exp bench``: models, batch, timed rounds and peak memory.

:mod:`ropelm.bench` decides what to measure and turns the measurements into
result rows (its docstring gives the method); this module measures. It builds
one model per variant (:class:`Candidate`), the random batch at one length and
the forward / forward+backward steps on it (:class:`Steps`), times every
candidate round by round in alternating order (:func:`time_rounds`) and
measures the peak memory of one step (:func:`peak_step_memory`).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from ropelm.attention import ResolvedAttention
from ropelm.config import ModelConfig
from ropelm.errors import RopelmError, UnsupportedModelError
from ropelm.model import TransformerLM
from ropelm.recipe import Precision
from ropelm.registry import Registry
from ropelm.variants import VariantChoice


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def _native_stderr_silenced() -> Iterator[None]:
    """Send file descriptor 2 to /dev/null: the profiler's C++ side logs every start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_step_memory(step: Callable[[], None], device: torch.device) -> int:
    """Bytes allocated during ``step()`` at its peak, above what was allocated before it."""
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        sync(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before)
    from torch.profiler import ProfilerActivity, profile

    with (
        _native_stderr_silenced(),
        profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof,
    ):
        step()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    events.sort(key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        if event.device_type() == torch.autograd.DeviceType.CPU:
            live += event.nbytes()  # + allocation, - free
            peak = max(peak, live)
    return peak


@dataclass
class Candidate:
    """A variant to measure: its config, resolved attention and model on the current device.

    ``model`` is None when the variant cannot be built (``reason`` says why).
    """

    choice: VariantChoice
    config: ModelConfig
    attention: ResolvedAttention | None
    reason: str | None = None
    model: TransformerLM | None = None

    @classmethod
    def resolve(cls, choice: VariantChoice, config: ModelConfig, registry: Registry) -> Candidate:
        """Unknown names and bad options raise; a model shape the variant rejects is n/a."""
        config = config.model_copy(
            update={"att_type": choice.name, "att_options": choice.options_dict}
        )
        try:
            return cls(choice, config, registry.resolve(config))
        except UnsupportedModelError as err:  # e.g. an odd head size for RoPE
            return cls(choice, config, None, str(err).splitlines()[0])

    def build_on(self, device: torch.device) -> None:
        """Build the model on ``device`` (seed 0, train mode), replacing the previous one."""
        self.model = None
        if self.attention is None:
            return
        try:
            torch.manual_seed(0)
            self.model = TransformerLM(self.config, self.attention).to(device).train()
        except RuntimeError as err:  # out of memory
            self.reason = str(err).splitlines()[0]


@dataclass(frozen=True)
class Steps:
    """The random batch at one length on ``device`` and the two measured steps on it."""

    x: torch.Tensor  # (B, T) token ids, seeded by T
    y: torch.Tensor  # (B, T) any valid targets
    device: torch.device
    precision: Precision  # bf16 autocast on CUDA, as training

    @classmethod
    def make(
        cls,
        config: ModelConfig,
        batch_size: int,
        length: int,
        device: torch.device,
        precision: Precision,
    ) -> Steps:
        generator = torch.Generator().manual_seed(length)
        x = torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)
        x = x.to(device)  # (B, T)
        return cls(x, torch.roll(x, -1, dims=1), device, precision)

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def length(self) -> int:
        return self.x.shape[1]

    def forward(self, model: TransformerLM) -> None:
        """``model(x)`` under ``torch.no_grad()``."""
        with torch.no_grad(), self.precision.autocast():
            model(self.x)

    def forward_backward(self, model: TransformerLM) -> None:
        """Backward of the training loss, gradients cleared first (no optimizer step)."""
        model.zero_grad(set_to_none=True)
        with self.precision.autocast():
            _, loss = model(self.x, self.y)
        loss.backward()

    def timed(self, step: Callable[[TransformerLM], None], model: TransformerLM) -> float:
        """Seconds ``step(model)`` takes, the device synchronised before and after."""
        sync(self.device)
        start = time.perf_counter()
        step(model)
        sync(self.device)
        return time.perf_counter() - start


@dataclass
class Timings:
    """What :func:`time_rounds` measured, by variant label.

    ``fwd`` and ``fwd_bwd`` hold one time in seconds per timed round (warm-up
    rounds left out); ``backends`` the attention kernel each step ran;
    ``failed`` the reason of every variant that could not be built or run.
    """

    fwd: dict[str, list[float]]
    fwd_bwd: dict[str, list[float]]
    backends: dict[str, dict[str, str]]
    failed: dict[str, str]


def time_rounds(candidates: Sequence[Candidate], steps: Steps, rounds: int, warmup: int) -> Timings:
    """Time both steps of every candidate, ``warmup + rounds`` rounds in ABBA order.

    A candidate whose step raises (cannot run at this T, out of memory) is
    failed and left out of the later rounds.
    """
    live = [c for c in candidates if c.model is not None]
    fwd: dict[str, list[float]] = {c.choice.label: [] for c in live}
    fwd_bwd: dict[str, list[float]] = {c.choice.label: [] for c in live}
    backends: dict[str, dict[str, str]] = {}
    failed: dict[str, str] = {c.choice.label: c.reason for c in candidates if c.model is None}
    for number in range(warmup + rounds):
        order = live if number % 2 == 0 else list(reversed(live))
        for c in order:
            label = c.choice.label
            if label in failed:
                continue
            try:
                f = steps.timed(steps.forward, c.model)
                fwd_backend = c.model.attention_backend()
                fb = steps.timed(steps.forward_backward, c.model)
            except (RopelmError, RuntimeError) as err:  # cannot run at T, out of memory
                failed[label] = str(err).splitlines()[0]
                continue
            backends[label] = {"fwd": fwd_backend, "fwd_bwd": c.model.attention_backend()}
            if number >= warmup:
                fwd[label].append(f)
                fwd_bwd[label].append(fb)
    return Timings(fwd, fwd_bwd, backends, failed)
