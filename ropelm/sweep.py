"""``ropelm-exp sweep``: train and evaluate several variants x seeds on one experiment.

Every run of a sweep shares the experiment's tokenizer, token files and token
budget; only ``model.att_type`` (with its ``att_options``) and ``train.seed``
change. The tokenizer and token files do not depend on either, so they are
built once and reused from the cache by every run.

Layout (``--out`` replaces ``runs/<name>-sweep``)::

    runs/<name>-sweep/
      sweep.json                   variants, seeds and the status of every run
      comparison.md                the comparison table (github format)
      <variant>-seed<k>/           an ordinary run directory (+ eval.json)

A run whose ``summary.json`` exists is finished and is skipped on a re-run; a
run with checkpoints but no summary (interrupted) is resumed from its last
checkpoint; so an interrupted sweep continues where it stopped. Evaluation is
skipped when the run's ``eval.json`` already holds the requested lengths.

Variants are written ``NAME[:KEY=VALUE[:KEY=VALUE...]]`` (:mod:`ropelm.variants`),
e.g. ``RoPE-Sliding:window=32``; the options replace the YAML's ``att_options``
(which are kept only for the variant the YAML itself names, when no options
are given). Every run is resolved against the one registry of the experiment's
plugins before the first one trains.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ropelm.atomic import atomic_write_json, atomic_write_text
from ropelm.errors import ConfigError, RopelmError
from ropelm.experiment import Experiment
from ropelm.perplexity import split_specs
from ropelm.runs import RunDir, exclusive_writer
from ropelm.variants import VariantChoice

SWEEP_FILE = "sweep.json"


class SweepError(RopelmError):
    """Some runs of a sweep failed; the others finished and were compared."""


def parse_seeds(items: Iterable[str]) -> list[int]:
    """``["0,1", "2"]`` -> ``[0, 1, 2]``; a non-integer is a one-sentence error."""
    seeds: list[int] = []
    for item in split_specs(list(items)):
        try:
            seed = int(item)
        except ValueError:
            raise ConfigError(f"--seeds '{item}' is not an integer; write e.g. 0,1,2.") from None
        if seed not in seeds:
            seeds.append(seed)
    if not seeds:
        raise ConfigError("--seeds is empty; give at least one seed, e.g. 0.")
    return seeds


@dataclass
class PlannedRun:
    """One run of the sweep: its variant, seed, validated config and directory."""

    variant: VariantChoice
    seed: int
    experiment: Experiment
    dir: Path
    status: str = "pending"  # trained | resumed | skipped | failed
    error: str | None = None
    evaluated: str = "no"  # yes | skipped | no | failed
    summary: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {
            "variant": self.variant.label,
            "att_type": self.variant.name,
            "att_options": self.variant.options_dict,
            "seed": self.seed,
            "dir": self.dir.name,
            "status": self.status,
            "evaluated": self.evaluated,
            "error": self.error,
        }


def default_sweep_dir(base: Experiment) -> Path:
    return Path("runs") / f"{base.config.name}-sweep"


def plan_sweep(
    base: Experiment,
    variants: Sequence[VariantChoice],
    seeds: Sequence[int],
    *,
    out: str | Path | None = None,
) -> tuple[Path, list[PlannedRun]]:
    """Resolve every (variant, seed) of ``base`` before anything runs; the sweep dir and runs.

    A variant's options replace the experiment's ``att_options``, which are kept
    only for the variant the experiment itself names, when no options are given.

    Raises:
        ropelm.RopelmError: an unknown variant or bad options, naming it.
    """
    sweep_dir = Path(out) if out is not None else default_sweep_dir(base)
    yaml_model = base.config.model
    runs = []
    for seed in seeds:
        for variant in variants:
            keep_yaml_options = yaml_model.att_type == variant.name and not variant.options
            options = yaml_model.att_options if keep_yaml_options else variant.options_dict
            model = yaml_model.model_copy(update={"att_type": variant.name, "att_options": options})
            train = base.config.train.model_copy(update={"seed": seed})
            config = base.config.model_copy(update={"model": model, "train": train})
            run_dir = sweep_dir / f"{variant.dir_label}-seed{seed}"
            runs.append(PlannedRun(variant, seed, base.with_config(config), run_dir))
    return sweep_dir, runs


def _prepare_run_dir(run: PlannedRun) -> bool:
    """Check a run directory left by an earlier sweep; True when training should resume.

    A directory of a different experiment is an error (``RunDir.claim``); one that
    was claimed but never checkpointed is cleared so the run starts afresh.
    """
    run_dir = RunDir(run.dir)
    if not run_dir.config_path.is_file():
        return False
    run_dir.claim(run.experiment.config, resume=True)  # raises if it holds another experiment
    if (run_dir.checkpoints / "last.json").is_file():
        return True
    leftovers = {p.name for p in run.dir.iterdir()}
    if leftovers <= {"config.yaml", "metrics.jsonl", "environment.json", "checkpoints"}:
        shutil.rmtree(run.dir)
        return False
    raise ConfigError(
        f"{run.dir} holds an unfinished run without checkpoints and other files; "
        "delete it to let the sweep start that run again."
    )


def _has_eval(
    run: PlannedRun, lengths: list[str], max_windows: int | None, max_tokens: int | None
) -> bool:
    from ropelm.eval_run import EVAL_FILE, read_eval

    path = run.dir / EVAL_FILE
    if not path.is_file():
        return False
    try:
        report = read_eval(path)
    except RopelmError:
        return False
    same_caps = (report.get("max_windows"), report.get("max_tokens")) == (max_windows, max_tokens)
    return same_caps and all(length in report.get("results", {}) for length in lengths)


def run_sweep(
    base: Experiment,
    variants: Sequence[VariantChoice],
    seeds: Sequence[int],
    *,
    out: str | Path | None = None,
    lengths: Iterable[str] | None = None,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    evaluate: bool = True,
    progress: bool = True,
    log: Callable[[str], None] = print,
    origin: dict[str, Any] | None = None,
) -> tuple[Path, list[PlannedRun]]:
    """Train (or skip, or resume) and evaluate every run, then write the comparison.

    Returns the sweep directory and the runs with their status. Runs go
    seed by seed, so the first seed of every variant is done early. ``origin``
    (the experiment file and overrides) is recorded in ``sweep.json``.

    Raises:
        SweepError: after all runs, when some failed (the message names them).
    """

    sweep_dir, runs = plan_sweep(base, variants, seeds, out=out)
    with exclusive_writer(sweep_dir, what="sweep"):  # a second sweep here: one sentence
        _run_all(base, runs, sweep_dir, variants, seeds, lengths, max_windows, max_tokens,
                 evaluate, progress, log, origin)  # fmt: skip
    return sweep_dir, runs


def _run_all(
    base: Experiment,
    runs: list[PlannedRun],
    sweep_dir: Path,
    variants: Sequence[VariantChoice],
    seeds: Sequence[int],
    lengths: Iterable[str] | None,
    max_windows: int | None,
    max_tokens: int | None,
    evaluate: bool,
    progress: bool,
    log: Callable[[str], None],
    origin: dict[str, Any] | None,
) -> None:
    """Every run of the sweep in order, the manifest after each, then the comparison."""
    from ropelm.eval_run import evaluate_run
    from ropelm.pipeline import run_experiment

    def save_manifest() -> None:
        atomic_write_json(
            sweep_dir / SWEEP_FILE,
            {
                **(origin or {}),
                "variants": [v.label for v in variants],
                "seeds": list(seeds),
                "lengths": eval_lengths,
                "max_windows": max_windows,
                "max_tokens": max_tokens,
                "runs": [r.record() for r in runs],
            },
        )

    eval_lengths: list[str] = []
    for number, run in enumerate(runs, 1):
        eval_lengths = split_specs(list(lengths) if lengths else run.experiment.config.eval.lengths)
        where = f"[{number}/{len(runs)}] {run.variant.label} seed {run.seed}"
        try:
            if (run.dir / "summary.json").is_file():
                _prepare_run_dir(run)  # still checks it is the same experiment
                run.status = "skipped"
                log(f"{where}: finished earlier, skipped ({run.dir})")
            else:
                resume = _prepare_run_dir(run)
                log(f"{where}: {'resuming' if resume else 'training'} in {run.dir}")
                run_experiment(run.experiment, out_dir=run.dir, resume=resume, progress=progress)
                run.status = "resumed" if resume else "trained"
        except RopelmError as err:
            run.status, run.error = "failed", str(err)
            log(f"{where}: failed: {err}")
            save_manifest()
            continue
        if evaluate:
            if _has_eval(run, eval_lengths, max_windows, max_tokens):
                run.evaluated = "skipped"
            else:
                try:
                    evaluate_run(
                        run.dir, base.registry, lengths=eval_lengths, max_windows=max_windows,
                        max_tokens=max_tokens,
                    )  # fmt: skip
                    run.evaluated = "yes"
                except RopelmError as err:
                    run.evaluated, run.error = "failed", str(err)
                    log(f"{where}: evaluation failed: {err}")
        save_manifest()

    from ropelm.report import compare

    finished = [r.dir for r in runs if r.status != "failed" and (r.dir / "summary.json").is_file()]
    if finished:
        comparison = compare(finished, tablefmt="github")
        atomic_write_text(sweep_dir / "comparison.md", comparison.text + "\n")
        log(comparison.text)
    failed = [r for r in runs if r.status == "failed" or r.evaluated == "failed"]
    if failed:
        names = ", ".join(f"{r.variant.label} seed {r.seed}" for r in failed)
        raise SweepError(
            f"{len(failed)} of {len(runs)} runs failed ({names}); see {sweep_dir / SWEEP_FILE} "
            "for the reasons, fix them and run the same sweep again to finish it."
        )
