"""``ropelm-exp run``: tokenizer, token files, training and evaluation of an experiment."""

from __future__ import annotations

from pathlib import Path

from ropelm.cli.app import (
    experiment_argument,
    main,
    print_summary,
    quiet_option,
    resume_option,
    run_dir_option,
    set_option,
    threads_option,
)
from ropelm.experiment import Experiment


@main.command("run")
@experiment_argument
@set_option
@run_dir_option
@resume_option
@quiet_option
@threads_option
def run_command(
    experiment: Path,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume_dir: Path | None,
    quiet: bool,
) -> None:
    """Run an experiment end to end: tokenizer, token files, training, evaluation.

    Cached stages (tokenizer, token files) are reused. The run directory gets
    config.yaml, metrics.jsonl, checkpoints/ (best and last) and summary.json.
    Ctrl-C saves a resumable checkpoint; continue with --resume RUN_DIR.

    \b
    Examples:
      ropelm-exp run experiments/quickstart.yaml
      ropelm-exp run experiments/quickstart.yaml --set train.max_steps=50 --out runs/short
      ropelm-exp run experiments/quickstart.yaml --resume runs/quickstart
    Multi-process (DDP):
      torchrun --nproc_per_node=2 -m ropelm.cli run experiments/quickstart.yaml
    """
    from ropelm.pipeline import run_experiment

    bound = Experiment.load(experiment, overrides)
    summary = run_experiment(
        bound, out_dir=resume_dir or out_dir, resume=resume_dir is not None, progress=not quiet
    )
    print_summary(summary)
