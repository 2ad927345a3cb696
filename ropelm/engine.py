"""The training loop: AdamW, cosine schedule, clipping, accumulation, AMP, DDP, exact resume.

:func:`train` is an ordinary function: give it a validated experiment, the
prepared token files and a run directory. Every piece of state it keeps lives
in local variables or in the checkpoint it writes, so a run killed at any
moment and continued with ``resume=True`` ends with the same weights as an
uninterrupted run (bitwise on the CPU: data order, dropout masks and the
optimizer all continue from the saved state).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable, Iterator
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
from ropelm.config import ExperimentConfig, TrainConfig
from ropelm.distributed import DistributedContext, init_distributed, resolve_device
from ropelm.errors import RopelmError
from ropelm.evaluate import evaluate_loss, perplexity
from ropelm.model import ModelConfig, TransformerLM
from ropelm.recipe import (
    StepPlan,
    build_optimizer,
    lr_at,
    resolve_model_config,
    resolve_precision,
)
from ropelm.registry import Registry
from ropelm.runs import RunDir


class TrainingError(RopelmError):
    """Training cannot go on (a non-finite loss, ...); the message says what to do."""


@dataclass
class _State:
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


@contextlib.contextmanager
def _graceful_interrupt(state: _State) -> Iterator[None]:
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


def train(
    config: ExperimentConfig,
    data: Any,
    tokenizer: Any,
    run_dir: RunDir,
    *,
    resume: bool = False,
    progress: bool = True,
    registry: Registry | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``config.model`` on ``data`` (a ``ropelm.data.PreparedData``) and return the summary.

    ``tokenizer`` is a ``ropelm.tokenizer.TokenizerInfo``. Checkpoints, metrics
    and ``summary.json`` go to ``run_dir`` (only on the main process under
    torchrun). With ``resume``, training continues from ``run_dir``'s last
    checkpoint.
    """
    tc = config.train
    device = resolve_device(tc.device)
    dist_ctx = init_distributed(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    registry = registry or config.registry()
    model_config = resolve_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
    block_size = model_config.block_size
    for split in (data.train, data.val):  # fail now, not after an epoch, if a split is too small
        split.num_eval_windows(block_size)
    plan = StepPlan.build(tc, block_size, len(data.train), dist_ctx.world_size)

    torch.manual_seed(tc.seed)
    model = TransformerLM(model_config, registry).to(device)
    torch.manual_seed(tc.seed + dist_ctx.rank)  # dropout differs per rank, data does not
    data_gen = torch.Generator().manual_seed(tc.seed)
    optimizer = build_optimizer(model, tc, device)
    amp_dtype = resolve_precision(tc, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    state = _State()
    if resume:
        _restore(run_dir, model, optimizer, scaler, data_gen, state, device)
        if dist_ctx.is_main:
            run_dir.truncate_metrics(state.step)
            log(f"Resuming {run_dir.path} at step {state.step} of {plan.total_steps}.")
    if dist_ctx.is_main:
        run_dir.write_environment(registry, device)

    train_model: torch.nn.Module = model
    if tc.compile:
        train_model = torch.compile(model)
    if dist_ctx.enabled:
        train_model = DistributedDataParallel(
            train_model, device_ids=[device.index] if device.type == "cuda" else None
        )

    eval_batch = config.eval.batch_size or tc.batch_size

    def evaluate() -> float:
        return evaluate_loss(
            model, data.val, batch_size=eval_batch, block_size=block_size,
            max_batches=config.eval.max_batches, device=device, autocast=autocast,
            dist_ctx=dist_ctx,
        )  # fmt: skip

    def save(pointers: tuple[str, ...]) -> None:
        if dist_ctx.is_main:
            save_checkpoint(
                run_dir.checkpoints, model=model, model_config=model_config,
                plugins=config.plugins, step=state.step,
                val_loss=state.last_eval.get("val_loss"), tokenizer_path=tokenizer.path,
                pointers=pointers,
                trainer_state=_trainer_state(state, optimizer, scaler, data_gen, device),
            )  # fmt: skip
        dist_ctx.barrier()

    bar = tqdm(
        total=plan.total_steps, initial=state.step, disable=not (progress and dist_ctx.is_main),
        desc=f"train {model_config.att_type}", unit="step", dynamic_ncols=True,
    )  # fmt: skip
    if state.step == 0:
        state.initial_val_loss = evaluate()
        if dist_ctx.is_main:
            run_dir.append_metrics(
                {"step": 0, "tokens": 0, "val_loss": state.initial_val_loss,
                 "val_ppl": perplexity(state.initial_val_loss)},
            )  # fmt: skip
    window_start, window_tokens = time.perf_counter(), 0
    model.train()
    with _graceful_interrupt(state), bar:
        while state.step < plan.total_steps:
            if state.stop_requested:
                save(("last",))
                raise TrainingError(
                    f"Interrupted at step {state.step}; a resumable checkpoint is saved, "
                    f"continue with --resume {run_dir.path}."
                )
            step_start = time.perf_counter()
            lr = lr_at(state.step, plan.total_steps, tc)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = _train_step(
                train_model, optimizer, scaler, data, data_gen, tc, block_size,
                dist_ctx, device, autocast,
            )  # fmt: skip
            loss_value = dist_ctx.all_reduce_mean(loss).item()
            if not math.isfinite(loss_value):
                raise TrainingError(
                    f"The training loss became {loss_value} at step {state.step + 1}; stopped "
                    f"without saving it, the last good checkpoint is in {run_dir.checkpoints}. "
                    "Lower train.learning_rate or train.max_grad_norm and resume or restart."
                )
            state.step += 1
            state.tokens_seen += plan.tokens_per_step
            elapsed = time.perf_counter() - step_start
            state.train_time += elapsed
            window_tokens += plan.tokens_per_step
            bar.update(1)
            if state.step % tc.log_every == 0 or state.step == plan.total_steps:
                rate = window_tokens / max(time.perf_counter() - window_start, 1e-9)
                window_start, window_tokens = time.perf_counter(), 0
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:,.0f}")
                if dist_ctx.is_main:
                    run_dir.append_metrics(
                        {"step": state.step, "epoch": state.step / plan.steps_per_epoch,
                         "tokens": state.tokens_seen, "train_loss": loss_value, "lr": lr,
                         "tokens_per_s": rate},
                    )  # fmt: skip
            at_epoch_end = state.step % plan.steps_per_epoch == 0
            at_eval = tc.eval_every is not None and state.step % tc.eval_every == 0
            final = state.step == plan.total_steps
            if at_epoch_end or at_eval or final:
                val_loss = evaluate()
                state.last_eval = {"val_loss": val_loss}
                improved = state.best_val_loss is None or val_loss < state.best_val_loss
                if improved:
                    state.best_val_loss = val_loss
                if dist_ctx.is_main:
                    run_dir.append_metrics(
                        {"step": state.step, "tokens": state.tokens_seen, "val_loss": val_loss,
                         "val_ppl": perplexity(val_loss)},
                    )  # fmt: skip
                    bar.write(f"step {state.step}: val_loss {val_loss:.4f}")
                save(("last", "best") if improved else ("last",))
                window_start = time.perf_counter()  # evaluation is not training time
            elif tc.save_every is not None and state.step % tc.save_every == 0:
                save(("last",))
                window_start = time.perf_counter()

    summary = _finish(config, run_dir, model, model_config, state, registry, evaluate, device,
                      dist_ctx)  # fmt: skip
    summary["wall_time_s"] = state.wall()
    if dist_ctx.is_main:
        run_dir.write_summary(summary)
    return summary


def _train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data: Any,
    data_gen: torch.Generator,
    tc: TrainConfig,
    block_size: int,
    dist_ctx: DistributedContext,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
) -> torch.Tensor:
    """One optimizer step over ``grad_accum_steps`` micro-batches; returns the mean loss.

    Every process draws the same *global* batch of window starts and trains on
    its own slice, so N processes with batch_size b see exactly the windows one
    process with batch_size N*b would.
    """
    total = torch.zeros((), device=device)
    per_rank = tc.batch_size
    lo, hi = dist_ctx.rank * per_rank, (dist_ctx.rank + 1) * per_rank
    for micro in range(tc.grad_accum_steps):
        starts = data.train.sample_starts(per_rank * dist_ctx.world_size, block_size, data_gen)
        x, y = data.train.windows(starts[lo:hi], block_size)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        last_micro = micro == tc.grad_accum_steps - 1
        sync = contextlib.nullcontext() if last_micro or not dist_ctx.enabled else model.no_sync()
        with sync:
            with autocast():
                _, loss = model(x, y)
            scaler.scale(loss / tc.grad_accum_steps).backward()
        total += loss.detach()
    if tc.max_grad_norm > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / tc.grad_accum_steps


def _trainer_state(
    state: _State,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data_gen: torch.Generator,
    device: torch.device,
) -> dict[str, Any]:
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


def _restore(
    run_dir: RunDir,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
    data_gen: torch.Generator,
    state: _State,
    device: torch.device,
) -> None:
    if not (run_dir.checkpoints / "last.json").is_file():
        raise TrainingError(
            f"Cannot resume {run_dir.path}: it was stopped before its first checkpoint; "
            "delete the directory and start the run again."
        )
    directory = resolve_checkpoint(run_dir.path, "last")
    verify_checkpoint(directory)
    load_weights(model, directory, device)
    saved = load_trainer_state(directory)
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


def _finish(
    config: ExperimentConfig,
    run_dir: RunDir,
    model: TransformerLM,
    model_config: ModelConfig,
    state: _State,
    registry: Registry,
    evaluate: Callable[[], float],
    device: torch.device,
    dist_ctx: DistributedContext,
) -> dict[str, Any]:
    """Evaluate the best checkpoint once more and gather the summary."""
    import ropelm

    best_dir = resolve_checkpoint(run_dir.path, "best")
    load_weights(model, best_dir, device)
    final_loss = evaluate()
    variant = registry.variant(model_config.att_type)
    summary = {
        "name": config.name,
        "att_type": model_config.att_type,
        "att_options": model_config.att_options,
        "n_params": model.num_parameters(),
        "steps": state.step,
        "tokens_seen": state.tokens_seen,
        "initial_val_loss": state.initial_val_loss,
        "best_val_loss": state.best_val_loss,
        "final_val_loss": final_loss,
        "final_val_ppl": perplexity(final_loss),
        "train_tokens_per_s": state.tokens_seen / max(state.train_time, 1e-9),
        "train_time_s": state.train_time,
        "world_size": dist_ctx.world_size,
        "device": str(device),
        "versions": {
            "ropelm": ropelm.__version__,
            "torch": torch.__version__,
            "plugin": {"source": variant.source, "version": variant.version},
        },
        "best_checkpoint": str(best_dir),
    }
    return summary
