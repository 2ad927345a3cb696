"""``ropelm-exp run``: tokenizer -> token files -> training -> final evaluation.

Each stage reuses its cached result when the inputs are unchanged, so running
the same experiment twice only trains twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ropelm.config import ExperimentConfig
from ropelm.data import prepare_data
from ropelm.distributed import context_from_env
from ropelm.engine import train
from ropelm.runs import RunDir
from ropelm.tokenizer import train_tokenizer


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / config.name


def run_experiment(
    config: ExperimentConfig,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage of ``config``; returns the training summary."""
    run_dir = RunDir(out_dir or default_run_dir(config))
    is_main = context_from_env().is_main
    if is_main:
        run_dir.claim(config, resume=resume)
    tokenizer = train_tokenizer(config, progress=progress and is_main)
    data = prepare_data(config, tokenizer, progress=progress and is_main)
    return train(config, data, tokenizer, run_dir, resume=resume, progress=progress)
