"""The training loop: AdamW, cosine schedule, clipping, accumulation, AMP, DDP/FSDP, exact resume.

:func:`train` is an ordinary function: give it a bound experiment, the prepared
token files and a run directory. Its loop reads top to bottom: set the learning
rate, take one optimizer step, count it, log, evaluate and checkpoint. The
:class:`Trainer` holds what the loop works with (model, optimizer, scaler,
batches, plan) and the named pieces it calls. On a GPU nothing in a step waits
for the device: the loss stays on the device until a log line reads it, a
non-finite loss is recorded on the device and acted on before anything is
saved, and the next batch is copied while the current step runs. Every piece
of state lives in the trainer or in the checkpoint it writes, so a run killed
at any moment and continued with ``resume=True`` ends with the same weights as
an uninterrupted run (bitwise on the CPU: data order, dropout masks and the
optimizer all continue from the saved state). What the trainer saves and
restores is in :mod:`ropelm.trainer_checkpoints`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ropelm.batches import TrainBatches
from ropelm.config import ModelConfig, TrainConfig
from ropelm.data import PreparedData
from ropelm.distributed import (
    DistributedContext,
    apply_cpu_threads,
    init_distributed,
    resolve_device,
)
from ropelm.errors import ConfigError, RopelmError, TrainingError, TrainingInterrupted
from ropelm.experiment import Experiment
from ropelm.kernels import flex_problem
from ropelm.loggers import MetricLoggers, open_loggers
from ropelm.masks import document_ids
from ropelm.model import TransformerLM
from ropelm.parallel import check_parallel, wrap_for_training
from ropelm.perplexity import evaluate_loss, perplexity
from ropelm.recipe import (
    Precision,
    StepPlan,
    build_optimizer,
    lr_at,
    resolve_compile,
    resolve_model_config,
    resolve_precision,
)
from ropelm.runs import RunDir
from ropelm.tokenizer import TokenizerInfo
from ropelm.train_state import (
    LossMeter,
    ThroughputMeter,
    ThroughputWatch,
    TrainState,
    graceful_interrupt,
)
from ropelm.trainer_checkpoints import TrainerCheckpoints, load_parent_weights

# the errors live in ropelm.errors; engine names them too, as the place training raises them
__all__ = ["Trainer", "TrainingError", "TrainingInterrupted", "load_parent_weights", "train"]


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
    trainer = Trainer.build(experiment, data, tokenizer, run_dir, fresh=not resume, log=log)
    state, plan, tc = trainer.state, trainer.plan, trainer.train_config
    if resume:
        trainer.restore(log)
    trainer.write_environment()
    meter, losses, watch = ThroughputMeter(), LossMeter(trainer.device), ThroughputWatch()
    with (
        graceful_interrupt(state),
        trainer.progress_bar(progress) as bar,
        trainer.metric_loggers(resume),  # train.loggers beyond metrics.jsonl (main process)
    ):
        if state.step == 0:
            trainer.evaluate_untrained()
        meter.restart()
        trainer.model.train()
        while state.step < plan.total_steps:
            if trainer.stop_agreed(log_step=state.step % tc.log_every == 0):
                trainer.save_and_stop()
            lr = trainer.set_learning_rate()
            loss = trainer.train_step()  # forward, backward, clip, optimizer step (no host sync)
            state.advance(plan.tokens_per_step)
            losses.add(loss, state.step)
            meter.add(plan.tokens_per_step)
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == plan.total_steps:
                trainer.stop_if_nonfinite(losses)  # reads the device: every queued step has run
                seconds, tokens_per_s = meter.lap()
                state.train_time += seconds
                trainer.log_step(losses.mean(), lr, tokens_per_s, bar)
                if (warning := watch.observe(tokens_per_s)) and trainer.dist.is_main:
                    log(warning)  # e.g. jobs oversubscribing the CPU cores
            evaluate = trainer.evaluation_due()
            if evaluate or (tc.save_every is not None and state.step % tc.save_every == 0):
                trainer.stop_if_nonfinite(losses)
                state.train_time += meter.lap()[0]
                if evaluate:
                    trainer.evaluate_and_checkpoint(bar)
                else:
                    trainer.save(("last",))
                meter.restart()  # evaluation and checkpoints are not training time
    return trainer.finish()


def _silent(message: str) -> None:
    """A log for the processes that do not print."""


@dataclass
class Trainer(TrainerCheckpoints):
    """What one training run works with, and the named steps of its loop.

    ``model`` is the TransformerLM (whose weights are evaluated and saved);
    ``train_model`` is what the steps run: the same model, compiled and/or
    wrapped in DDP (under FSDP the model itself is sharded). Saving, resuming
    and the final summary (:meth:`save`, :meth:`restore`, :meth:`finish`, ...)
    come from :class:`~ropelm.trainer_checkpoints.TrainerCheckpoints`.
    """

    experiment: Experiment
    model_config: ModelConfig
    model: TransformerLM
    train_model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: Precision
    data: PreparedData
    batches: TrainBatches
    plan: StepPlan
    device: torch.device
    dist: DistributedContext
    run_dir: RunDir
    tokenizer: TokenizerInfo
    state: TrainState = field(default_factory=TrainState)
    grad_norms: LossMeter | None = None  # pre-clipping gradient norms, on the device
    loggers: MetricLoggers = field(default_factory=MetricLoggers)  # open during train()

    @classmethod
    def build(
        cls,
        experiment: Experiment,
        data: PreparedData,
        tokenizer: TokenizerInfo,
        run_dir: RunDir,
        *,
        fresh: bool = True,
        log: Callable[[str], None] = print,
    ) -> Trainer:
        """Join the process group, seed, build the model and optimizer, plan the steps.

        A ``fresh`` run with ``init.from_run`` starts from that run's best weights
        (a resumed one from its own checkpoint, loaded later by :meth:`restore`).

        Raises:
            ConfigError: a setup that cannot run (flex for CPU training, fsdp without
                torchrun, compile without inductor, a tokens_per_step that does not divide).
        """
        config, tc = experiment.config, experiment.config.train
        device = resolve_device(tc.device)
        apply_cpu_threads(tc.threads)
        dist = init_distributed(device)
        model_config = resolve_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
        precision = resolve_precision(tc.precision, device)
        check_parallel(tc.parallel, dist, precision)
        compile_model = resolve_compile(tc.compile, device)
        if model_config.attention_backend == "flex":  # before any work, not at the first step
            problem = flex_problem(device, needs_grad=True, dropout_p=model_config.dropout)
            if problem is not None:
                raise ConfigError(problem)
        for split in (data.train, data.val):  # fail now, not after an epoch, if too small
            split.num_eval_windows(model_config.block_size)
        plan = StepPlan.build(tc, model_config.block_size, len(data.train), dist.world_size)
        if device.type == "cuda":  # TF32 tensor cores for the float32 matmuls that remain
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(tc.seed)
        model = TransformerLM(model_config, experiment.attention).to(device)
        model.activation_checkpointing = tc.activation_checkpointing
        if fresh and config.init.from_run is not None:  # before sharding or wrapping
            parent = Path(config.init.from_run)
            load_parent_weights(model, parent, device, log if dist.is_main else _silent)
        torch.manual_seed(tc.seed + dist.rank)  # dropout differs per rank, data does not
        train_model = wrap_for_training(model, tc.parallel, dist, device, precision, compile_model)
        batches = TrainBatches(
            data.train, batch_size=tc.batch_size, block_size=model_config.block_size,
            generator=torch.Generator().manual_seed(tc.seed), device=device, dist=dist,
        )  # fmt: skip
        return cls(
            experiment=experiment,
            model_config=model_config,
            model=model,
            train_model=train_model,
            optimizer=build_optimizer(model, tc, device),
            scaler=torch.amp.GradScaler(device.type, enabled=precision.needs_grad_scaler),
            precision=precision,
            data=data,
            batches=batches,
            plan=plan,
            device=device,
            dist=dist,
            run_dir=run_dir,
            tokenizer=tokenizer,
            grad_norms=LossMeter(device),
        )

    @property
    def train_config(self) -> TrainConfig:
        return self.experiment.config.train

    @property
    def sharded(self) -> bool:
        return self.train_config.parallel == "fsdp"

    # -- one optimizer step -------------------------------------------------------------------

    def set_learning_rate(self) -> float:
        lr = lr_at(self.state.step, self.plan.total_steps, self.train_config)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def train_step(self) -> torch.Tensor:
        """One optimizer step over the plan's micro-batches; the mean loss, on the device."""
        accum, eot = self.plan.grad_accum_steps, self.tokenizer.eot_id
        total = torch.zeros((), device=self.device)
        try:
            for micro in range(accum):
                x, y = next(self.batches)  # (B, T) each, already on the device
                documents = document_ids(x, eot) if self.train_config.document_mask else None
                with self._gradient_sync(last=micro == accum - 1), self.precision.autocast():
                    _, loss = self.train_model(x, y, document_ids=documents)
                self.scaler.scale(loss / accum).backward()
                total += loss.detach()
            if self.train_config.max_grad_norm > 0:
                self.scaler.unscale_(self.optimizer)
                norm = torch.nn.utils.clip_grad_norm_(
                    self.train_model.parameters(), self.train_config.max_grad_norm
                )
                if self.grad_norms is not None:  # FSDP: a DTensor, made whole (every rank)
                    full = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
                    self.grad_norms.add(full, self.state.step + 1)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        except torch.OutOfMemoryError:
            raise TrainingError(
                f"The device ran out of memory at step {self.state.step + 1} with "
                f"train.batch_size {self.train_config.batch_size}; lower train.batch_size "
                "(train.tokens_per_step keeps the optimisation the same) or set "
                "train.activation_checkpointing: true, the last checkpoint is kept."
            ) from None
        self.optimizer.zero_grad(set_to_none=True)
        return self.dist.all_reduce_mean(total / accum)

    def _gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """All-reduce (or reduce-scatter) gradients once per step, after the last micro-batch."""
        if self.sharded:  # FSDP: the sharded model itself switches its reduce-scatter
            self.model.set_requires_gradient_sync(last)
            return contextlib.nullcontext()
        if not self.dist.enabled or last:
            return contextlib.nullcontext()
        return self.train_model.no_sync()

    def stop_if_nonfinite(self, losses: LossMeter) -> None:
        """Stop before logging or saving anything of a step whose loss was NaN or infinite."""
        bad = losses.first_nonfinite_step()
        if bad is not None:
            raise TrainingError(
                f"The training loss became non-finite at step {bad}; {self.diverged()}"
            )

    # -- logging, evaluation ------------------------------------------------------------------

    def log_step(self, loss: float, lr: float, tokens_per_s: float, bar: Any) -> None:
        """``loss`` is the mean training loss since the previous log line."""
        state = self.state
        bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_s:,.0f}")
        if self.dist.is_main:
            row = {"step": state.step, "epoch": state.step / self.plan.steps_per_epoch,
                   "tokens": state.tokens_seen, "train_loss": loss, "lr": lr,
                   "tokens_per_s": tokens_per_s}  # fmt: skip
            if self.grad_norms is not None and self.train_config.max_grad_norm > 0:
                row["grad_norm"] = self.grad_norms.mean()  # before clipping, since the last row
            self.record(row)

    def record(self, row: dict[str, Any]) -> None:
        """Append ``row`` to metrics.jsonl and send it to ``train.loggers`` (main process)."""
        self.run_dir.append_metrics(row)
        self.loggers.log_metrics(row["step"], row)

    @contextlib.contextmanager
    def metric_loggers(self, resume: bool) -> Iterator[None]:
        """Open ``train.loggers`` for the loop (main process only) and log the configuration;
        close them however the loop ends (a failed or interrupted run is marked failed).
        Under torchrun every rank learns whether the main one could open them, so a
        backend that fails to start stops all ranks instead of leaving them waiting."""
        problem: RopelmError | None = None
        if self.dist.is_main:
            try:
                self.loggers = open_loggers(
                    self.train_config.loggers, self.run_dir.path,
                    resume_step=self.state.step if resume else None,
                )  # fmt: skip
            except RopelmError as err:
                problem = err
        failed_anywhere = problem is not None
        if self.dist.enabled:  # one all-reduce, before the loop's first collective
            flag = torch.tensor(float(failed_anywhere), device=self.device)
            failed_anywhere = self.dist.all_reduce_sum(flag).item() > 0
        if failed_anywhere:
            raise problem or TrainingError(
                "The main process could not open train.loggers; its message says why."
            )
        if not self.dist.is_main:
            yield
            return
        failed = True
        try:
            self.loggers.log_config(self.experiment.config.model_dump(mode="json"))
            yield
            failed = False
        finally:
            self.loggers.close(failed=failed)
            self.loggers = MetricLoggers()

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
            self.record({"step": 0, "tokens": 0, "val_loss": loss, "val_ppl": perplexity(loss)})

    def evaluation_due(self) -> bool:
        """After every epoch, every ``eval_every`` steps and after the last step."""
        step, tc = self.state.step, self.train_config
        return (
            step % self.plan.steps_per_epoch == 0
            or (tc.eval_every is not None and step % tc.eval_every == 0)
            or step == self.plan.total_steps
        )

    def stop_agreed(self, log_step: bool) -> bool:
        """Whether to stop for a signal now. One process: at the next step. Under torchrun
        the processes agree (one all-reduce) at log steps only, so every rank stops and
        saves at the same step without a host sync every step."""
        if not self.dist.enabled:
            return self.state.stop_requested
        if not log_step:
            return False
        flag = torch.tensor(float(self.state.stop_requested), device=self.device)
        return bool(self.dist.all_reduce_sum(flag).item() > 0)

    def progress_bar(self, enabled: bool) -> tqdm:
        return tqdm(
            total=self.plan.total_steps, initial=self.state.step,
            disable=not (enabled and self.dist.is_main), desc=f"train {self.model_config.att_type}",
            unit="step", dynamic_ncols=True,
        )  # fmt: skip
