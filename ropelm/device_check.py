"""``ropelm-exp device-check``: one script's worth of GPU evidence, as JSON and a summary.

On one CUDA device, in a few minutes, in this order (each part is timed and
isolated: one that fails records its error and the others still run; a part
that would start past the time budget is skipped and says so):

1. ``conformance`` -- every conformance check of every registered variant,
   including those that need the device (flex against dense, training in bf16
   against fp32 on the CPU, KV-cache decoding in bf16);
2. ``training`` -- tokens/s and MFU of ``experiments/rope_base.yaml``'s model
   (12 x 12 x 768, T = 1024, vocab 32768) trained by the engine's own step
   (bf16, compile, fused AdamW, clipping) at the largest micro-batch that fits,
   side by side with nanoGPT's ``model.py`` when a copy is given
   (:mod:`ropelm.throughput`);
3. ``bench`` -- ``ropelm-exp bench`` of every variant at T = 1024 and 4096;
4. ``quickstart`` -- ``experiments/quickstart.yaml`` trained and evaluated on
   the device end to end.

:meth:`CheckPlan.smoke` runs the same code at toy sizes, so ``--device cpu
--smoke`` (and the tests) exercise it without a GPU.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ropelm.atomic import atomic_write_json, atomic_write_text
from ropelm.bench import bench_variants, device_name, format_bench_table, peak_flops
from ropelm.config import load_experiment
from ropelm.errors import ConfigError
from ropelm.eval_run import evaluate_run
from ropelm.experiment import Experiment
from ropelm.pipeline import run_experiment
from ropelm.registry import Registry
from ropelm.testing import CHECKS, DEVICE_CHECKS, NotApplicable
from ropelm.throughput import (
    NANOGPT_HINT,
    EngineStep,
    PeerStep,
    interleaved_rates,
    largest_fitting_batch,
    load_nanogpt,
    release_memory,
    synthetic_data,
)
from ropelm.variants import VariantChoice

PARTS = ("conformance", "training", "bench", "quickstart")
RESULT_FILE = "device_check.json"
SUMMARY_FILE = "device_check.md"
NO_CUDA = (
    "No CUDA device here, so there is nothing for the device check to measure "
    "(`ropelm-exp device-check --device cpu --smoke` runs its code path on the CPU)."
)
SMOKE_MODEL = ("model.block_size=64", "model.vocab_size=512", "model.n_layer=2",
               "model.n_head=2", "model.n_embd=64")  # fmt: skip


@dataclass(frozen=True)
class CheckPlan:
    """What the device check runs, and how big."""

    model_experiment: Path  # the model and recipe timed by ``training``
    quickstart_experiment: Path
    model_overrides: tuple[str, ...] = ()
    quickstart_overrides: tuple[str, ...] = ()
    batch_candidates: tuple[int, ...] = (64, 48, 32, 24, 16, 12, 8, 4, 2, 1)
    rounds: int = 5
    steps_per_round: int = 10
    bench_lengths: tuple[int, ...] = (1024, 4096)
    bench_batch_size: int = 4
    bench_rounds: int = 3
    eval_lengths: tuple[str, ...] = ("1x", "2x", "4x", "8x")
    budget_s: float = 480.0

    @classmethod
    def full(cls, experiments: Path) -> CheckPlan:
        """The GPU check: rope_base's model, the quickstart as written."""
        return cls(experiments / "rope_base.yaml", experiments / "quickstart.yaml")

    @classmethod
    def smoke(cls, experiments: Path, cache_dir: Path) -> CheckPlan:
        """The same parts at toy sizes, for the CPU (tests, trying the command)."""
        cache = (f"data.cache_dir={cache_dir}",)
        quick = ("train.max_steps=4", "train.eval_every=2", "tokenizer.max_documents=200",
                 "data.max_documents=300", "eval.max_batches=2", *SMOKE_MODEL, *cache)  # fmt: skip
        return cls(
            experiments / "rope_base.yaml", experiments / "quickstart.yaml",
            model_overrides=SMOKE_MODEL, quickstart_overrides=quick,
            batch_candidates=(8, 4), rounds=2, steps_per_round=2, bench_lengths=(32, 64),
            bench_batch_size=2, bench_rounds=1, eval_lengths=("1x", "2x"), budget_s=600.0,
        )  # fmt: skip


@dataclass
class DeviceCheck:
    """One run of the check: its plan, device, registry and scratch directory."""

    plan: CheckPlan
    device: torch.device
    registry: Registry
    scratch: Path
    nanogpt: Path | None = None
    log: Callable[[str], None] = print

    def run(self, out_dir: Path, parts: tuple[str, ...] = PARTS) -> dict[str, Any]:
        """``parts`` in order, within the budget; writes the JSON and the summary to ``out_dir``."""
        report: dict[str, Any] = {"environment": environment(self.device), "plan": _plan(self)}
        start = time.monotonic()
        for name in parts:
            part = getattr(self, name)
            elapsed = time.monotonic() - start
            if elapsed > self.plan.budget_s:
                report[name] = {
                    "status": "skipped",
                    "reason": f"time budget spent ({elapsed:.0f} s)",
                }
                continue
            self.log(f"device check: {name}")
            began = time.monotonic()
            try:
                report[name] = {"status": "ok", **part()}
            except Exception as err:  # a failed part is a finding; the others still run
                report[name] = {"status": "error", "error": f"{type(err).__name__}: {err}"}
            report[name]["seconds"] = round(time.monotonic() - began, 1)
            release_memory(self.device)
        report["total_seconds"] = round(time.monotonic() - start, 1)
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out_dir / RESULT_FILE, report)
        atomic_write_text(out_dir / SUMMARY_FILE, summary(report))
        return report

    def experiment(self, path: Path, overrides: tuple[str, ...]) -> Experiment:
        """An experiment YAML with overrides, bound to this check's registry."""
        return Experiment.bind(load_experiment(path, overrides), self.registry)

    def conformance(self) -> dict[str, Any]:
        """Every check of every variant; the device checks on this device."""
        outcomes: dict[str, dict[str, str]] = {}
        for name in self.registry.names():
            spec = self.registry.get(name)
            outcomes[name] = {}
            for check in CHECKS:
                kwargs = {"device": self.device} if check in DEVICE_CHECKS else {}
                try:
                    check(spec, None, **kwargs)
                except NotApplicable as err:
                    outcome = f"n/a: {err}"
                except Exception as err:  # AssertionError or a crash: both are failures
                    outcome = f"FAILED: {type(err).__name__}: {err}"
                else:
                    outcome = "passed"
                outcomes[name][check.__name__.removeprefix("check_")] = outcome
        failed = sum(
            o.startswith("FAILED") for checks in outcomes.values() for o in checks.values()
        )
        passed = sum(o == "passed" for checks in outcomes.values() for o in checks.values())
        return {"passed": passed, "failed": failed, "checks": outcomes}

    def training(self) -> dict[str, Any]:
        """The engine's step at the largest micro-batch that fits; nanoGPT beside it."""
        model = self.experiment(self.plan.model_experiment, self.plan.model_overrides).config.model
        data = synthetic_data(self.scratch / "tokens", model.vocab_size, 64 * model.block_size)

        def experiment(batch_size: int, compile: str) -> Experiment:
            overrides = (f"train.batch_size={batch_size}", f"train.device={self.device}",
                         f"train.compile={compile}")  # fmt: skip
            return self.experiment(
                self.plan.model_experiment, self.plan.model_overrides + overrides
            )

        def fits(batch_size: int) -> None:  # eager, which needs more memory than compiled
            step = EngineStep.build(experiment(batch_size, "false"), data, self.scratch)
            step(), step()
            del step

        batch_size, failures = largest_fitting_batch(fits, self.plan.batch_candidates, self.device)
        if batch_size is None:
            raise RuntimeError(f"not even a micro-batch of 1 fits: {failures}")
        engine = EngineStep.build(experiment(batch_size, "auto"), data, self.scratch)
        steps: dict[str, Any] = {"ropelm": engine}
        peer_note = None
        if self.nanogpt is not None:
            steps["nanogpt"] = PeerStep.build(load_nanogpt(self.nanogpt), engine)
        else:
            peer_note = f"no nanoGPT copy given: {NANOGPT_HINT}"
        rates = interleaved_rates(
            steps, engine.tokens_per_step, self.device,
            rounds=self.plan.rounds, steps_per_round=self.plan.steps_per_round,
        )  # fmt: skip
        return _training_result(engine, batch_size, failures, rates, peer_note, self.device)

    def bench(self) -> dict[str, Any]:
        """``ropelm-exp bench`` of every variant on the model's shape, on this device."""
        model = self.experiment(self.plan.model_experiment, self.plan.model_overrides).config.model
        result = bench_variants(
            [VariantChoice(name) for name in self.registry.names()],
            self.plan.bench_lengths, self.registry, model=model,
            batch_size=self.plan.bench_batch_size, devices=(str(self.device),),
            rounds=self.plan.bench_rounds, warmup=1, log=self.log,
        )  # fmt: skip
        return {"table": format_bench_table(result), "bench": result}

    def quickstart(self) -> dict[str, Any]:
        """The quickstart experiment trained and evaluated on this device."""
        overrides = (*self.plan.quickstart_overrides, f"train.device={self.device}")
        experiment = self.experiment(self.plan.quickstart_experiment, overrides)
        run_dir = self.scratch / "quickstart"
        began = time.monotonic()
        summary = run_experiment(experiment, out_dir=run_dir, progress=False)
        trained = time.monotonic() - began
        report = evaluate_run(
            run_dir, experiment.registry, lengths=list(self.plan.eval_lengths),
            methods=["nonoverlapping"], device=str(self.device),
        )  # fmt: skip
        ppl = {
            label: cell["nonoverlapping"].get("ppl") for label, cell in report["results"].items()
        }
        keys = ("best_val_loss", "final_val_loss", "train_tokens_per_s", "steps", "precision")
        return {
            "train_seconds": round(trained, 1),
            **{key: summary.get(key) for key in keys},
            "ppl_at_length": ppl,
        }


def environment(device: torch.device) -> dict[str, Any]:
    """What ran the check."""
    import ropelm

    info: dict[str, Any] = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ropelm": ropelm.__version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": str(device),
        "device_name": device_name(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info |= {
            "cuda": torch.version.cuda,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "peak_bf16_tflops": (peak_flops(device) or 0) / 1e12 or None,
        }
    return info


def _plan(check: DeviceCheck) -> dict[str, Any]:
    plan = {
        k: str(v) if isinstance(v, Path) else v for k, v in dataclasses.asdict(check.plan).items()
    }
    return plan | {"nanogpt": str(check.nanogpt) if check.nanogpt else None}


def _training_result(
    engine: EngineStep,
    batch_size: int,
    failures: dict[int, str],
    rates: dict[str, dict[str, float]],
    peer_note: str | None,
    device: torch.device,
) -> dict[str, Any]:
    trainer = engine.trainer
    flops = engine.flops_per_token()
    peak = peak_flops(device)
    result: dict[str, Any] = {
        "model": trainer.model_config.model_dump(mode="json"),
        "micro_batch": batch_size,
        "larger_batches_failed": {str(b): why for b, why in failures.items()},
        "precision": trainer.precision.name,
        "compiled": trainer.train_model is not trainer.model,
        "flops_per_token": flops,
        "ropelm_tokens_per_s": rates["ropelm"]["tokens_per_s"],
        "ropelm_mfu": rates["ropelm"]["tokens_per_s"] * flops / peak if peak else None,
    }
    if "nanogpt" in rates:
        result["nanogpt_tokens_per_s"] = rates["nanogpt"]["tokens_per_s"]
        result["nanogpt_mfu"] = rates["nanogpt"]["tokens_per_s"] * flops / peak if peak else None
        # tokens/s of ropelm over nanoGPT's: the inverse of nanoGPT's time ratio
        result["ropelm_vs_nanogpt"] = 1 / rates["nanogpt"]["ratio_vs_first"]
    else:
        result["nanogpt"] = peer_note
    return result


def summary(report: dict[str, Any]) -> str:
    """The report as readable Markdown: one line per part, then the bench table."""
    env = report["environment"]
    lines = [f"# Device check: {env['device_name']} (torch {env['torch']}, ropelm {env['ropelm']})",
             ""]  # fmt: skip
    for part in PARTS:
        if part not in report:
            continue
        entry = report[part]
        status = entry["status"]
        if status == "ok":
            detail = _details(part, entry)
        else:
            detail = entry.get("error") or entry.get("reason")
        lines.append(f"- **{part}** ({status}, {entry.get('seconds', 0)} s): {detail}")
    if report.get("bench", {}).get("status") == "ok":
        lines += ["", "```", report["bench"]["table"], "```"]
    return "\n".join(lines) + "\n"


def _details(part: str, entry: dict[str, Any]) -> str:
    if part == "conformance":
        failed = [f"{v}: {c}" for v, checks in entry["checks"].items()
                  for c, o in checks.items() if o.startswith("FAILED")]  # fmt: skip
        return f"{entry['passed']} passed, {entry['failed']} failed" + (
            f" ({'; '.join(failed)})" if failed else ""
        )
    if part == "training":
        text = (f"micro-batch {entry['micro_batch']}, {entry['precision']}, compiled "
                f"{entry['compiled']}: {entry['ropelm_tokens_per_s']:,.0f} tokens/s")  # fmt: skip
        if entry.get("ropelm_mfu") is not None:
            text += f", MFU {entry['ropelm_mfu']:.1%}"
        if "ropelm_vs_nanogpt" in entry:
            text += (f"; nanoGPT {entry['nanogpt_tokens_per_s']:,.0f} tokens/s, ropelm "
                     f"{entry['ropelm_vs_nanogpt']:.3f}x nanoGPT")  # fmt: skip
        return text + (f"; {entry['nanogpt']}" if entry.get("nanogpt") else "")
    if part == "quickstart":
        ppl = ", ".join(f"{k} {v:.2f}" for k, v in entry["ppl_at_length"].items() if v)
        return (f"{entry['steps']} steps in {entry['train_seconds']} s "
                f"({entry['train_tokens_per_s']:,.0f} tokens/s), best val loss "
                f"{entry['best_val_loss']:.4f}; ppl at {ppl}")  # fmt: skip
    return "see the table below"


def run_device_check(
    plan: CheckPlan,
    device: torch.device,
    out_dir: Path,
    *,
    nanogpt: Path | None = None,
    parts: tuple[str, ...] = PARTS,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run ``parts`` of the check in a scratch directory that is removed afterwards."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(NO_CUDA)
    registry = Registry.default()
    with tempfile.TemporaryDirectory(prefix="ropelm-device-check-") as scratch:
        check = DeviceCheck(plan, device, registry, Path(scratch), nanogpt, log)
        return check.run(out_dir, parts)
