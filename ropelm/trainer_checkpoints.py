"""The checkpoint side of a training run: what it saves to and restores from its run directory.

:class:`TrainerCheckpoints` is mixed into :class:`ropelm.engine.Trainer`; it
writes a checkpoint of the current step (weights, optimizer, scaler, data
order and every rank's RNG, sharded under FSDP), answers a Ctrl-C with a
resumable one, restores a resumed run, words a divergence message around the
last good checkpoint, and ends a run with the summary of its best checkpoint.
:func:`load_parent_weights` starts a run from another run's best weights.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ropelm.batches import TrainBatches
from ropelm.checkpoint import (
    checkpoint_complete,
    load_trainer_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    staging_dir,
    start_staging,
    verify_checkpoint,
)
from ropelm.config import ModelConfig, TrainConfig
from ropelm.distributed import DistributedContext
from ropelm.errors import TrainingError, TrainingInterrupted
from ropelm.experiment import Experiment
from ropelm.model import TransformerLM
from ropelm.parallel import SHARDED_DIR, full_state_dict, load_sharded, save_sharded
from ropelm.perplexity import perplexity
from ropelm.recipe import Precision, StepPlan
from ropelm.runs import RunDir
from ropelm.tokenizer import TokenizerInfo
from ropelm.train_state import TrainState, restore_trainer_state, rng_state, trainer_state


def load_parent_weights(
    model: TransformerLM, parent_run: Path, device: torch.device, log: Callable[[str], None]
) -> None:
    """Start from ``parent_run``'s best checkpoint (verified); a missing one is one sentence."""
    directory = resolve_checkpoint(parent_run, "best")
    verify_checkpoint(directory)
    load_weights(model, directory, device)
    log(f"Starting from the weights of {directory}")


class TrainerCheckpoints:
    """Saving, resuming and finishing a :class:`ropelm.engine.Trainer`.

    The attributes below are the Trainer's fields and properties, and
    ``evaluate``/``record`` its methods; this class only declares them.
    """

    experiment: Experiment
    model_config: ModelConfig
    model: TransformerLM
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    batches: TrainBatches
    plan: StepPlan
    device: torch.device
    dist: DistributedContext
    run_dir: RunDir
    tokenizer: TokenizerInfo
    state: TrainState
    train_config: TrainConfig
    sharded: bool
    evaluate: Callable[[], float]
    record: Callable[[dict[str, Any]], None]

    # -- evaluation, checkpoints --------------------------------------------------------------

    def evaluate_and_checkpoint(self, bar: Any) -> None:
        """Evaluate, log, and save ``last`` (and ``best`` when the loss improved)."""

        val_loss = self.evaluate()
        if not math.isfinite(val_loss):  # never a checkpoint, never a metrics row
            raise TrainingError(
                f"The validation loss became non-finite at step {self.state.step}; "
                f"{self.diverged()}"
            )
        improved = self.state.record_eval(val_loss)
        if self.dist.is_main:
            self.record(
                {"step": self.state.step, "tokens": self.state.tokens_seen,
                 "val_loss": val_loss, "val_ppl": perplexity(val_loss)},
            )  # fmt: skip
            bar.write(f"step {self.state.step}: val_loss {val_loss:.4f}")
        self.save(("last", "best") if improved else ("last",))

    def save(self, pointers: tuple[str, ...]) -> None:
        """Write a checkpoint of this step and point ``pointers`` at it (every process joins:
        the RNG states of all ranks go in, and under FSDP every rank writes its shards)."""
        checkpoints, step = self.run_dir.checkpoints, self.state.step
        written = checkpoint_complete(checkpoints, step)
        collect = not written and (self.sharded or self.dist.is_main)  # FSDP: a collective
        weights = full_state_dict(self.model) if collect else {}
        rng = self.dist.gather_to_main(rng_state(self.device))
        if self.sharded and not written:
            if self.dist.is_main:
                start_staging(checkpoints, step)
            self.dist.barrier()
            save_sharded(staging_dir(checkpoints, step) / SHARDED_DIR, self.model, self.optimizer)
            self.dist.barrier()
        if self.dist.is_main:
            save_checkpoint(
                checkpoints, weights=weights, model_config=self.model_config,
                plugins=self.experiment.config.plugins, step=step,
                val_loss=self._val_loss_at(step),
                tokenizer_path=self.tokenizer.path, pointers=pointers, staged=self.sharded,
                trainer_state=trainer_state(
                    self.state, None if self.sharded else self.optimizer, self.scaler,
                    self.batches.state(), rng,
                ),
            )  # fmt: skip
        self.dist.barrier()

    def _val_loss_at(self, step: int) -> float | None:
        """The validation loss of ``step``; None when it was not evaluated (a Ctrl-C save)."""
        last = self.state.last_eval
        return last.get("val_loss") if last.get("step") == step else None

    def save_and_stop(self) -> None:
        """Answer a Ctrl-C or SIGTERM: save a resumable checkpoint and stop with the command
        to resume."""

        self.save(("last",))
        raise TrainingInterrupted(
            f"Interrupted at step {self.state.step}; a resumable checkpoint is saved, "
            f"continue with --resume {self.run_dir.path}."
        )

    def diverged(self) -> str:
        """The rest of a divergence message: where the last good checkpoint is, what to do."""
        last = self.run_dir.checkpoints / "last.json"
        if not last.is_file():
            return (
                "stopped before writing any checkpoint; lower train.learning_rate (or "
                "train.max_grad_norm, or add train.warmup_steps) and start the run again."
            )
        step = json.loads(last.read_text()).get("step")
        return (
            f"stopped without saving anything after it; the last good checkpoint is step "
            f"{step} in {self.run_dir.checkpoints}: continue from it with --resume "
            f"{self.run_dir.path} --set train.learning_rate=... (lower; or train.max_grad_norm, "
            "train.warmup_steps)."
        )

    # -- start and end ------------------------------------------------------------------------

    def restore(self, log: Callable[[str], None]) -> None:
        """Continue from the run directory's last checkpoint (weights, optimizer, RNGs)."""

        run_dir = self.run_dir
        if not (run_dir.checkpoints / "last.json").is_file():
            raise TrainingError(
                f"Cannot resume {run_dir.path}: it was stopped before its first checkpoint; "
                "delete the directory and start the run again."
            )
        directory = resolve_checkpoint(run_dir.path, "last")
        verify_checkpoint(directory)
        if self.sharded:
            load_sharded(directory / SHARDED_DIR, self.model, self.optimizer)
        else:
            load_weights(self.model, directory, self.device)
        saved = load_trainer_state(directory)
        data_state = restore_trainer_state(
            saved, self.state, None if self.sharded else self.optimizer, self.scaler,
            self.dist.rank, self.device, fallback_seed=self.train_config.seed + self.dist.rank,
        )  # fmt: skip
        self.batches.set_state(data_state)
        if self.dist.is_main:
            run_dir.truncate_metrics(self.state.step)
            log(f"Resuming {run_dir.path} at step {self.state.step} of {self.plan.total_steps}.")

    def write_environment(self) -> None:
        if self.dist.is_main:
            self.run_dir.write_environment(self.experiment.registry, self.device)

    def finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint once more, write and return the summary."""
        import ropelm

        state, attention = self.state, self.experiment.attention
        best_dir = resolve_checkpoint(self.run_dir.path, "best")
        if self.sharded:
            load_sharded(best_dir / SHARDED_DIR, self.model, self.optimizer)
        else:
            load_weights(self.model, best_dir, self.device)
        final_loss = self.evaluate()
        summary = {
            "name": self.experiment.config.name,
            "att_type": self.model_config.att_type,
            "att_options": self.model_config.att_options,
            "n_params": self.model.num_parameters(),
            "steps": state.step,
            "tokens_seen": state.tokens_seen,
            "initial_val_loss": state.initial_val_loss,
            "best_val_loss": state.best_val_loss,
            "final_val_loss": final_loss,
            "final_val_ppl": perplexity(final_loss),
            "train_tokens_per_s": state.tokens_seen / max(state.train_time, 1e-9),
            "train_time_s": state.train_time,
            "world_size": self.dist.world_size,
            "parallel": self.train_config.parallel if self.dist.launched else None,
            "device": str(self.device),
            "precision": self.precision.name,
            "versions": {
                "ropelm": ropelm.__version__,
                "torch": torch.__version__,
                "plugin": {"source": attention.source, "version": attention.version},
            },
            "best_checkpoint": str(best_dir),
            "wall_time_s": state.wall(),
        }
        if self.dist.is_main:
            self.run_dir.write_summary(summary)
        return summary
