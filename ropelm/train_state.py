"""What a training run carries from step to step, and what a checkpoint saves of it.

:class:`TrainState` holds the counters (step, tokens, best validation loss,
times); :func:`trainer_state` and :func:`restore_trainer_state` turn it, the
optimizer, the gradient scaler and every random number generator into the
``trainer.pt`` dictionary and back, which is what makes a resumed run end with
the same weights as an uninterrupted one. :class:`LossMeter` keeps the training
loss on the device between log lines. :func:`graceful_interrupt` turns the
first Ctrl-C into a stop request the loop answers at the next step boundary.
"""

from __future__ import annotations

import contextlib
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TrainState:
    """Everything that changes as training goes on (saved in every checkpoint)."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float | None = None
    initial_val_loss: float | None = None  # of the untrained model: the baseline to beat
    train_time: float = 0.0
    wall_time: float = 0.0  # of earlier sessions of this run (resume)
    session_start: float = field(default_factory=time.perf_counter)
    stop_requested: bool = False
    last_eval: dict[str, Any] = field(default_factory=dict)

    def wall(self) -> float:
        """Wall-clock seconds of the whole run so far, over every resumed session."""
        return self.wall_time + time.perf_counter() - self.session_start

    def advance(self, tokens: int) -> None:
        """Count one optimizer step of ``tokens`` tokens."""
        self.step += 1
        self.tokens_seen += tokens

    def record_eval(self, val_loss: float) -> bool:
        """Remember an evaluation; True when it is the best so far."""
        self.last_eval = {"val_loss": val_loss, "step": self.step}
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        return improved


class LossMeter:
    """Training losses summed on the device, read only when logged (no per-step host sync).

    It also remembers, on the device, the first step whose loss was not finite,
    so the loop can stop before anything is saved from that step on.
    """

    def __init__(self, device: torch.device) -> None:
        self._sum = torch.zeros((), dtype=torch.float64, device=device)
        self._count = torch.zeros((), dtype=torch.int64, device=device)
        self._first_bad = torch.full((), -1, dtype=torch.int64, device=device)

    def add(self, loss: torch.Tensor, step: int) -> None:
        """Count the loss of optimizer step ``step`` (1-based), a device scalar."""
        finite = torch.isfinite(loss)
        self._sum += torch.where(finite, loss.detach().double(), 0.0)
        self._count += finite
        first = (self._first_bad < 0) & ~finite
        self._first_bad = torch.where(first, step, self._first_bad)

    def first_nonfinite_step(self) -> int | None:
        """The first step whose loss was NaN or infinite (reads the device), or None."""
        step = int(self._first_bad)
        return step if step >= 0 else None

    def mean(self) -> float:
        """The mean finite loss since the last reading (reads the device); a new window."""
        value = (self._sum / self._count.clamp(min=1)).item()
        self._sum.zero_()
        self._count.zero_()
        return value


class ThroughputMeter:
    """Training time and tokens between the points where the host waits for the device.

    On a GPU a step only queues work, so time is read where the loop synchronises
    anyway (a log line, an evaluation, a checkpoint), never per step.
    """

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a stretch of training (after an evaluation or a checkpoint: not training time)."""
        self._start, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def lap(self) -> tuple[float, float]:
        """Seconds and tokens per second since the last lap or restart; starts the next lap."""
        elapsed = time.perf_counter() - self._start
        rate = self._tokens / max(elapsed, 1e-9)
        self.restart()
        return elapsed, rate


class ThroughputWatch:
    """Notices when training throughput collapses mid-run (other jobs taking the CPU cores).

    The reference is the best rate of the first ``warmup`` log intervals; a later rate
    below ``fraction`` of it gets one warning for the run (the cure is outside ropelm:
    ``--threads`` / ``OMP_NUM_THREADS`` so that concurrent jobs do not oversubscribe).
    """

    def __init__(self, warmup: int = 3, fraction: float = 0.5) -> None:
        self.warmup, self.fraction = warmup, fraction
        self.best = 0.0
        self.seen = 0
        self.warned = False

    def observe(self, tokens_per_s: float) -> str | None:
        """Record one log interval's rate; a one-sentence warning the first time it collapses."""
        self.seen += 1
        if self.seen <= self.warmup:
            self.best = max(self.best, tokens_per_s)
            return None
        if self.warned or tokens_per_s >= self.fraction * self.best:
            return None
        self.warned = True
        return (
            f"Warning: training slowed from {self.best:,.0f} to {tokens_per_s:,.0f} tokens/s; "
            "other processes are probably competing for the CPU cores: give each job fewer "
            "threads (--threads N or OMP_NUM_THREADS=N, N x jobs <= cores)."
        )


def rng_state(device: torch.device) -> dict[str, torch.Tensor | None]:
    """This process's random number generators (dropout masks, ...)."""
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"torch": torch.get_rng_state(), "cuda": cuda}


def trainer_state(
    state: TrainState,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler,
    data_state: torch.Tensor,
    rng_per_rank: list[dict[str, torch.Tensor | None]],
) -> dict[str, Any]:
    """The ``trainer.pt`` dictionary: counters, optimizer, scaler and every rank's RNG states.

    ``optimizer`` is None when its state is saved elsewhere (sharded, under FSDP).
    """
    return {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": state.best_val_loss,
        "initial_val_loss": state.initial_val_loss,
        "train_time": state.train_time,
        "wall_time": state.wall(),
        "last_eval": dict(state.last_eval),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict(),
        "rng": rng_per_rank,
        "rng_data": data_state,
    }


def restore_trainer_state(
    saved: dict[str, Any],
    state: TrainState,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler,
    rank: int,
    device: torch.device,
    fallback_seed: int,
) -> torch.Tensor:
    """Put a :func:`trainer_state` dictionary back; returns the data generator's state.

    Each rank takes back its own RNG states, so dropout masks continue to differ
    between ranks. A run resumed on more processes than saved it gives the new
    ranks ``fallback_seed`` plus the step (the data order, which all ranks share,
    still continues exactly).
    """
    if optimizer is not None:
        optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    # checkpoints of ropelm 0.1 kept the main process's generators only
    rng = saved.get("rng") or [{"torch": saved["rng_torch"], "cuda": saved.get("rng_cuda")}]
    if rank < len(rng):
        torch.set_rng_state(rng[rank]["torch"])
        if rng[rank]["cuda"] is not None and device.type == "cuda":
            torch.cuda.set_rng_state(rng[rank]["cuda"], device)
    else:
        torch.manual_seed(fallback_seed + saved["step"])
    state.step = saved["step"]
    state.tokens_seen = saved["tokens_seen"]
    state.best_val_loss = saved["best_val_loss"]
    state.initial_val_loss = saved["initial_val_loss"]
    state.train_time = saved["train_time"]
    state.wall_time = saved["wall_time"]
    state.last_eval = dict(saved["last_eval"])
    return saved["rng_data"]


@contextlib.contextmanager
def graceful_interrupt(state: TrainState) -> Iterator[None]:
    """Ctrl-C (SIGINT) or SIGTERM (schedulers, ``docker stop``, ``kill``): stop at the next
    step boundary and save a resumable checkpoint; a second signal stops at once."""

    def handler(signum: int, frame: Any) -> None:
        if state.stop_requested:
            raise KeyboardInterrupt
        state.stop_requested = True

    watched = (signal.SIGINT, signal.SIGTERM)
    try:
        previous = {signum: signal.signal(signum, handler) for signum in watched}
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        for signum, old in previous.items():
            signal.signal(signum, old)
