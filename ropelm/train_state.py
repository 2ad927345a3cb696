"""What a training run carries from step to step, and what a checkpoint saves of it.

:class:`TrainState` holds the counters (step, tokens, best validation loss,
times); :func:`trainer_state` and :func:`restore_trainer_state` turn it, the
optimizer, the gradient scaler and every random number generator into the
``trainer.pt`` dictionary and back, which is what makes a resumed run end with
the same weights as an uninterrupted one. :func:`graceful_interrupt` turns the
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

    def advance(self, tokens: int, seconds: float) -> None:
        """Count one optimizer step of ``tokens`` tokens that took ``seconds``."""
        self.step += 1
        self.tokens_seen += tokens
        self.train_time += seconds

    def record_eval(self, val_loss: float) -> bool:
        """Remember an evaluation; True when it is the best so far."""
        self.last_eval = {"val_loss": val_loss}
        improved = self.best_val_loss is None or val_loss < self.best_val_loss
        if improved:
            self.best_val_loss = val_loss
        return improved


class ThroughputMeter:
    """Training tokens per second over the steps since the last reading."""

    def __init__(self) -> None:
        self.restart()

    def restart(self) -> None:
        """Start a new window (after an evaluation or a checkpoint: not training time)."""
        self._start, self._tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self._tokens += tokens

    def read(self) -> float:
        """Tokens per second since the window started; starts the next window."""
        rate = self._tokens / max(time.perf_counter() - self._start, 1e-9)
        self.restart()
        return rate


def trainer_state(
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data_gen: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
    """The ``trainer.pt`` dictionary: counters, optimizer, scaler and RNG states."""
    return {
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "best_val_loss": state.best_val_loss,
        "initial_val_loss": state.initial_val_loss,
        "train_time": state.train_time,
        "wall_time": state.wall(),
        "last_eval": dict(state.last_eval),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "rng_torch": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "rng_data": data_gen.get_state(),
    }


def restore_trainer_state(
    saved: dict[str, Any],
    state: TrainState,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data_gen: torch.Generator,
    device: torch.device,
) -> None:
    """Put a :func:`trainer_state` dictionary back into the objects it was taken from."""
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    torch.set_rng_state(saved["rng_torch"])
    if saved["rng_cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(saved["rng_cuda"], device)
    data_gen.set_state(saved["rng_data"])
    state.step = saved["step"]
    state.tokens_seen = saved["tokens_seen"]
    state.best_val_loss = saved["best_val_loss"]
    state.initial_val_loss = saved["initial_val_loss"]
    state.train_time = saved["train_time"]
    state.wall_time = saved["wall_time"]
    state.last_eval = dict(saved["last_eval"])


@contextlib.contextmanager
def graceful_interrupt(state: TrainState) -> Iterator[None]:
    """First Ctrl-C: stop at the next step boundary and save; second: stop at once."""

    def handler(signum: int, frame: Any) -> None:
        if state.stop_requested:
            raise KeyboardInterrupt
        state.stop_requested = True

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
