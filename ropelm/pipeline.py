"""``ropelm-exp run``: tokenizer -> token files -> training -> final evaluation.

Each stage reuses its cached result when the inputs are unchanged, so running
the same experiment twice only trains twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ropelm.config import ExperimentConfig
from ropelm.data import prepare_data
from ropelm.distributed import init_distributed, resolve_device
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
    dist_ctx = init_distributed(resolve_device(config.train.device))
    if dist_ctx.is_main:  # one process builds the caches, the others then reuse them
        run_dir.claim(config, resume=resume)
        tokenizer = train_tokenizer(config, progress=progress)
        data = prepare_data(config, tokenizer, progress=progress)
    dist_ctx.barrier()
    if not dist_ctx.is_main:
        tokenizer = train_tokenizer(config, progress=False)
        data = prepare_data(config, tokenizer, progress=False)
    return train(config, data, tokenizer, run_dir, resume=resume, progress=progress)
