"""``ropelm-exp train``: the training stage alone, on token files `prepare` wrote."""

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


@main.command("train")
@experiment_argument
@set_option
@run_dir_option
@resume_option
@quiet_option
@threads_option
def train_command(
    experiment: Path,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume_dir: Path | None,
    quiet: bool,
) -> None:
    """Run only the training stage, on the tokenizer and token files built by `prepare`.

    \b
    Example:
      ropelm-exp prepare experiments/quickstart.yaml
      ropelm-exp train experiments/quickstart.yaml --set train.learning_rate=1e-3 --out runs/lr
    """
    from ropelm.pipeline import train_only

    summary = train_only(
        Experiment.load(experiment, overrides),
        out_dir=resume_dir or out_dir,
        resume=resume_dir is not None,
        progress=not quiet,
        experiment_file=str(experiment),
    )
    print_summary(summary)
