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
from typing import Any, NoReturn

from ropelm.atomic import atomic_write_json, atomic_write_text
from ropelm.errors import ConfigError, RopelmError
from ropelm.experiment import Experiment
from ropelm.extend import (
    DEFAULT_STEPS,
    ExtensionMethod,
    check_extensible,
    extension_config,
    extension_name,
    parse_block_size,
)
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
    status: str = "pending"  # trained | resumed | skipped | failed | interrupted
    error: str | None = None
    evaluated: str = "no"  # yes | skipped | no | failed
    summary: dict[str, Any] = field(default_factory=dict)
    parent: PlannedRun | None = None  # the run an extension run continues
    method: ExtensionMethod | None = None  # its extension method

    def record(self) -> dict[str, Any]:
        return {
            "variant": self.variant.label,
            "att_type": self.variant.name,
            "att_options": self.variant.options_dict,
            "seed": self.seed,
            "dir": self.dir.name,
            "extension": self.method.label if self.method else None,
            "parent": self.parent.dir.name if self.parent else None,
            "status": self.status,
            "evaluated": self.evaluated,
            "error": self.error,
        }

    @property
    def title(self) -> str:
        method = f" extended ({self.method.label})" if self.method else ""
        return f"{self.variant.label}{method} seed {self.seed}"


@dataclass(frozen=True)
class SweepExtension:
    """``--extend 4x --methods none,yarn --extend-steps 100``: extend every run of the sweep."""

    block_size: str
    methods: tuple[ExtensionMethod, ...]
    steps: int = DEFAULT_STEPS
    overrides: tuple[str, ...] = ()  # --extend-set: for the extension runs only


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


def plan_extensions(
    sweep_dir: Path, runs: Sequence[PlannedRun], extension: SweepExtension
) -> list[PlannedRun]:
    """One extension run per (run, method), each checked before anything trains.

    Raises:
        ropelm.RopelmError: a method a variant lacks, weights that cannot grow, a bad
            block size: one sentence naming the variant.
    """
    planned = []
    for run in runs:
        parent = run.experiment.config
        block_size = parse_block_size(extension.block_size, parent.model.block_size)
        for method in extension.methods:
            child = extension_config(
                parent, run.dir, method, block_size=block_size, steps=extension.steps,
                overrides=extension.overrides,
            )  # fmt: skip
            check_extensible(parent, child, run.experiment.registry)
            target = sweep_dir / extension_name(run.dir, method, block_size)
            experiment = run.experiment.with_config(child)
            planned.append(
                PlannedRun(run.variant, run.seed, experiment, target, parent=run, method=method)
            )
    return planned


def _stop(
    run: PlannedRun, runs: list[PlannedRun], sweep_dir: Path, save_manifest: Callable[[], None]
) -> NoReturn:
    """Ctrl-C or SIGTERM: the sweep stops (not just this run), resumable by the same command."""
    run.status = "interrupted"
    save_manifest()
    done = sum(r.status in ("trained", "resumed", "skipped") for r in runs)
    raise SweepError(
        f"Sweep stopped during {run.title} ({done} of {len(runs)} runs done, the interrupted "
        f"one checkpointed); run the same command again to continue in {sweep_dir}."
    )


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
    extension: SweepExtension | None = None,
) -> tuple[Path, list[PlannedRun]]:
    """Train (or skip, or resume) and evaluate every run, then write the comparison.

    Returns the sweep directory and the runs with their status. Runs go
    seed by seed, so the first seed of every variant is done early. ``origin``
    (the experiment file and overrides) is recorded in ``sweep.json``. With
    ``extension``, every run is then extended with each method
    (:mod:`ropelm.extend`), so one sweep gives a table of methods x seeds.

    Raises:
        SweepError: after all runs, when some failed (the message names them).
    """

    sweep_dir, runs = plan_sweep(base, variants, seeds, out=out)
    if extension is not None:
        runs += plan_extensions(sweep_dir, runs, extension)
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
    from ropelm.errors import TrainingInterrupted

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
        where = f"[{number}/{len(runs)}] {run.title}"
        try:
            _train_one(run, where, progress, log)
            if evaluate:
                _evaluate_one(
                    run, base, eval_lengths, max_windows, max_tokens, progress, log, where
                )
        except (TrainingInterrupted, KeyboardInterrupt):
            _stop(run, runs, sweep_dir, save_manifest)
        except RopelmError as err:  # training failed: the next run goes on
            run.status, run.error = "failed", str(err)
            log(f"{where}: failed: {err}")
        save_manifest()
    _write_comparison(runs, sweep_dir, log)


def _train_one(run: PlannedRun, where: str, progress: bool, log: Callable[[str], None]) -> None:
    """Train one run, resume it, or skip it when it finished earlier."""
    from ropelm.pipeline import run_experiment

    if run.parent is not None and run.parent.status == "failed":
        raise SweepError(f"its parent run {run.parent.dir.name} failed.")
    if (run.dir / "summary.json").is_file():
        _prepare_run_dir(run)  # still checks it is the same experiment
        run.status = "skipped"
        log(f"{where}: finished earlier, skipped ({run.dir})")
        return
    resume = _prepare_run_dir(run)
    log(f"{where}: {'resuming' if resume else 'training'} in {run.dir}")
    run_experiment(run.experiment, out_dir=run.dir, resume=resume, progress=progress)
    run.status = "resumed" if resume else "trained"


def _evaluate_one(
    run: PlannedRun,
    base: Experiment,
    lengths: list[str],
    max_windows: int | None,
    max_tokens: int | None,
    progress: bool,
    log: Callable[[str], None],
    where: str,
) -> None:
    """Evaluate a trained run at ``lengths`` unless its eval.json already has them."""
    from ropelm.eval_run import evaluate_run

    if _has_eval(run, lengths, max_windows, max_tokens):
        run.evaluated = "skipped"
        return
    try:
        evaluate_run(
            run.dir, base.registry, lengths=lengths, max_windows=max_windows,
            max_tokens=max_tokens, progress=progress,
        )  # fmt: skip
        run.evaluated = "yes"
    except RopelmError as err:
        run.evaluated, run.error = "failed", str(err)
        log(f"{where}: evaluation failed: {err}")


def _write_comparison(runs: list[PlannedRun], sweep_dir: Path, log: Callable[[str], None]) -> None:
    """The comparison of the finished runs; then a SweepError naming the failed ones."""
    from ropelm.report import compare

    finished = [r.dir for r in runs if r.status != "failed" and (r.dir / "summary.json").is_file()]
    if finished:
        comparison = compare(finished, tablefmt="github")
        atomic_write_text(sweep_dir / "comparison.md", comparison.text + "\n")
        log(comparison.text)
    failed = [r for r in runs if r.status == "failed" or r.evaluated == "failed"]
    if failed:
        names = ", ".join(r.title for r in failed)
        raise SweepError(
            f"{len(failed)} of {len(runs)} runs failed ({names}); see {sweep_dir / SWEEP_FILE} "
            "for the reasons, fix them and run the same sweep again to finish it."
        )
