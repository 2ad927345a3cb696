"""The training loop: AdamW, cosine schedule, clipping, accumulation, AMP, DDP, exact resume.

:func:`train` is an ordinary function: give it a bound experiment, the prepared
token files and a run directory. Its loop reads top to bottom: set the learning
rate, take one optimizer step, count it, log, evaluate and checkpoint. The
:class:`Trainer` holds what the loop works with (model, optimizer, scaler,
data, plan) and the named pieces it calls. Every piece of state lives in the
trainer or in the checkpoint it writes, so a run killed at any moment and
continued with ``resume=True`` ends with the same weights as an uninterrupted
run (bitwise on the CPU: data order, dropout masks and the optimizer all
continue from the saved state).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from ropelm.checkpoint import (
    load_trainer_state,
    load_weights,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from ropelm.config import ModelConfig, TrainConfig
from ropelm.data import PreparedData
from ropelm.distributed import DistributedContext, init_distributed, resolve_device
from ropelm.errors import ConfigError, RopelmError
from ropelm.experiment import Experiment
from ropelm.kernels import flex_problem
from ropelm.masks import document_ids
from ropelm.model import TransformerLM
from ropelm.perplexity import evaluate_loss, perplexity
from ropelm.recipe import (
    Precision,
    StepPlan,
    build_optimizer,
    lr_at,
    resolve_model_config,
    resolve_precision,
)
from ropelm.runs import RunDir
from ropelm.tokenizer import TokenizerInfo
from ropelm.train_state import (
    ThroughputMeter,
    TrainState,
    graceful_interrupt,
    restore_trainer_state,
    trainer_state,
)


class TrainingError(RopelmError):
    """Training cannot go on (a non-finite loss, ...); the message says what to do."""


def train(
    experiment: Experiment,
    data: PreparedData,
    tokenizer: TokenizerInfo,
    run_dir: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``experiment``'s model on ``data`` and return the summary.

    Checkpoints, metrics and ``summary.json`` go to ``run_dir`` (only on the
    main process under torchrun). With ``resume``, training continues from
    ``run_dir``'s last checkpoint.
    """
    trainer = Trainer.build(experiment, data, tokenizer, run_dir)
    state, plan, tc = trainer.state, trainer.plan, trainer.train_config
    if resume:
        trainer.restore(log)
    trainer.write_environment()
    meter = ThroughputMeter()
    with graceful_interrupt(state), trainer.progress_bar(progress) as bar:
        if state.step == 0:
            trainer.evaluate_untrained()
            meter.restart()
        trainer.model.train()
        while state.step < plan.total_steps:
            if state.stop_requested:
                trainer.save_and_stop()
            lr = trainer.set_learning_rate()
            started = time.perf_counter()
            loss = trainer.train_step()  # forward, backward, clip, optimizer step
            trainer.stop_unless_finite(loss)
            state.advance(plan.tokens_per_step, time.perf_counter() - started)
            meter.add(plan.tokens_per_step)
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == plan.total_steps:
                trainer.log_step(loss, lr, meter.read(), bar)
            if trainer.evaluation_due():
                trainer.evaluate_and_checkpoint(bar)
                meter.restart()  # evaluation is not training time
            elif tc.save_every is not None and state.step % tc.save_every == 0:
                trainer.save(("last",))
                meter.restart()
    return trainer.finish()


@dataclass
class Trainer:
    """What one training run works with, and the named steps of its loop.

    ``model`` holds the weights (saved, evaluated); ``train_model`` is what the
    steps run: the same model, compiled and/or wrapped in DDP.
    """

    experiment: Experiment
    model_config: ModelConfig
    model: TransformerLM
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    data: PreparedData
    data_gen: torch.Generator
    plan: StepPlan
    device: torch.device
    dist: DistributedContext
    run_dir: RunDir
    tokenizer: TokenizerInfo
    state: TrainState = field(default_factory=TrainState)

    @classmethod
    def build(
        cls, experiment: Experiment, data: PreparedData, tokenizer: TokenizerInfo, run_dir: RunDir
    ) -> Trainer:
        """Join the process group, seed, build the model and optimizer, plan the steps."""
        config, tc = experiment.config, experiment.config.train
        device = resolve_device(tc.device)
        dist = init_distributed(device)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        model_config = resolve_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
        if model_config.attention_backend == "flex":  # before any work, not at the first step
            problem = flex_problem(device, needs_grad=True, dropout_p=model_config.dropout)
            if problem is not None:
                raise ConfigError(problem)
        for split in (data.train, data.val):  # fail now, not after an epoch, if too small
            split.num_eval_windows(model_config.block_size)
        plan = StepPlan.build(tc, model_config.block_size, len(data.train), dist.world_size)

        torch.manual_seed(tc.seed)
        model = TransformerLM(model_config, experiment.attention).to(device)
        torch.manual_seed(tc.seed + dist.rank)  # dropout differs per rank, data does not
        precision = resolve_precision(tc.precision, device)
        train_model: torch.nn.Module = torch.compile(model) if tc.compile else model
        if dist.enabled:
            device_ids = [device.index] if device.type == "cuda" else None
            train_model = DistributedDataParallel(train_model, device_ids=device_ids)
        return cls(
            experiment=experiment,
            model_config=model_config,
            model=model,
            train_model=train_model,
            optimizer=build_optimizer(model, tc, device),
            scaler=torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler),
            precision=precision,
            data=data,
            data_gen=torch.Generator().manual_seed(tc.seed),
            plan=plan,
            device=device,
            dist=dist,
            run_dir=run_dir,
            tokenizer=tokenizer,
        )

    @property
    def train_config(self) -> TrainConfig:
        return self.experiment.config.train

    # -- one optimizer step -------------------------------------------------------------------

    def set_learning_rate(self) -> float:
        lr = lr_at(self.state.step, self.plan.total_steps, self.train_config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> torch.Tensor:
        """One optimizer step over ``grad_accum_steps`` micro-batches; the mean loss.

        Every process draws the same *global* batch of window starts and trains on
        its own slice, so N processes with batch_size b see exactly the windows one
        process with batch_size N*b would.
        """
        tc, dist, block_size = self.train_config, self.dist, self.model_config.block_size
        total = torch.zeros((), device=self.device)
        lo, hi = dist.rank * tc.batch_size, (dist.rank + 1) * tc.batch_size
        for micro in range(tc.grad_accum_steps):
            starts = self.data.train.sample_starts(
                tc.batch_size * dist.world_size, block_size, self.data_gen
            )
            x, y = self.data.train.windows(starts[lo:hi], block_size)
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            documents = document_ids(x, self.tokenizer.eot_id) if tc.document_mask else None
            last_micro = micro == tc.grad_accum_steps - 1
            no_sync = dist.enabled and not last_micro  # all-reduce gradients once per step
            with self.train_model.no_sync() if no_sync else contextlib.nullcontext():
                with self.precision.autocast():
                    _, loss = self.train_model(x, y, document_ids=documents)
                self.scaler.scale(loss / tc.grad_accum_steps).backward()
            total += loss.detach()
        if tc.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.train_model.parameters(), tc.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return self.dist.all_reduce_mean(total / tc.grad_accum_steps)

    def stop_unless_finite(self, loss: torch.Tensor) -> None:
        """Stop without saving when the loss is NaN or infinite (the last checkpoint stays)."""
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"The training loss became {value} at step {self.state.step + 1}; stopped "
                f"without saving it, the last good checkpoint is in {self.run_dir.checkpoints}. "
                "Lower train.learning_rate or train.max_grad_norm and resume or restart."
            )

    # -- logging, evaluation, checkpoints -----------------------------------------------------

    def log_step(self, loss: torch.Tensor, lr: float, tokens_per_s: float, bar: Any) -> None:
        state, value = self.state, loss.item()
        bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.dist.is_main:
            self.run_dir.append_metrics(
                {"step": state.step, "epoch": state.step / self.plan.steps_per_epoch,
                 "tokens": state.tokens_seen, "train_loss": value, "lr": lr,
                 "tokens_per_s": tokens_per_s},
            )  # fmt: skip

    def evaluate(self) -> float:
        """Mean validation loss of the current weights (over every process)."""
        eval_config = self.experiment.config.eval
        return evaluate_loss(
            self.model, self.data.val,
            batch_size=eval_config.batch_size or self.train_config.batch_size,
            block_size=self.model_config.block_size, max_batches=eval_config.max_batches,
            device=self.device, autocast=self.precision.autocast, dist_ctx=self.dist,
            eot_id=self.tokenizer.eot_id if self.train_config.document_mask else None,
        )  # fmt: skip

    def evaluate_untrained(self) -> None:
        """The step-0 validation loss: the baseline training has to beat."""
        self.state.initial_val_loss = loss = self.evaluate()
        if self.dist.is_main:
            self.run_dir.append_metrics(
                {"step": 0, "tokens": 0, "val_loss": loss, "val_ppl": perplexity(loss)}
            )

    def evaluation_due(self) -> bool:
        """After every epoch, every ``eval_every`` steps and after the last step."""
        step, tc = self.state.step, self.train_config
        return (
            step % self.plan.steps_per_epoch == 0
            or (tc.eval_every is not None and step % tc.eval_every == 0)
            or step == self.plan.total_steps
        )

    def evaluate_and_checkpoint(self, bar: Any) -> None:
        """Evaluate, log, and save ``last`` (and ``best`` when the loss improved)."""
        val_loss = self.evaluate()
        improved = self.state.record_eval(val_loss)
        if self.dist.is_main:
            self.run_dir.append_metrics(
                {"step": self.state.step, "tokens": self.state.tokens_seen,
                 "val_loss": val_loss, "val_ppl": perplexity(val_loss)},
            )  # fmt: skip
            bar.write(f"step {self.state.step}: val_loss {val_loss:.4f}")
        self.save(("last", "best") if improved else ("last",))

    def save(self, pointers: tuple[str, ...]) -> None:
        """Write a checkpoint of this step (main process) and point ``pointers`` at it."""
        if self.dist.is_main:
            save_checkpoint(
                self.run_dir.checkpoints, model=self.model, model_config=self.model_config,
                plugins=self.experiment.config.plugins, step=self.state.step,
                val_loss=self.state.last_eval.get("val_loss"),
                tokenizer_path=self.tokenizer.path, pointers=pointers,
                trainer_state=trainer_state(
                    self.state, self.optimizer, self.scaler, self.data_gen, self.device
                ),
            )  # fmt: skip
        self.dist.barrier()

    def save_and_stop(self) -> None:
        """Answer a Ctrl-C: save a resumable checkpoint and stop with the command to resume."""
        self.save(("last",))
        raise TrainingError(
            f"Interrupted at step {self.state.step}; a resumable checkpoint is saved, "
            f"continue with --resume {self.run_dir.path}."
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
        load_weights(self.model, directory, self.device)
        saved = load_trainer_state(directory)
        restore_trainer_state(
            saved, self.state, self.optimizer, self.scaler, self.data_gen, self.device
        )
        if self.dist.is_main:
            run_dir.truncate_metrics(self.state.step)
            log(f"Resuming {run_dir.path} at step {self.state.step} of {self.plan.total_steps}.")

    def write_environment(self) -> None:
        if self.dist.is_main:
            self.run_dir.write_environment(self.experiment.registry, self.device)

    def progress_bar(self, enabled: bool) -> tqdm:
        return tqdm(
            total=self.plan.total_steps, initial=self.state.step,
            disable=not (enabled and self.dist.is_main), desc=f"train {self.model_config.att_type}",
            unit="step", dynamic_ncols=True,
        )  # fmt: skip

    def finish(self) -> dict[str, Any]:
        """Evaluate the best checkpoint once more, write and return the summary."""
        import ropelm

        state, attention = self.state, self.experiment.attention
        best_dir = resolve_checkpoint(self.run_dir.path, "best")
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
            "device": str(self.device),
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
