"""``ropelm-exp run``: tokenizer -> token files -> training -> final evaluation.

Each stage reuses its cached result when the inputs are unchanged, so running
the same experiment twice only trains twice.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ropelm.config import ExperimentConfig
from ropelm.data import PreparedData, load_prepared, prepare_data, tokens_dir
from ropelm.distributed import distributed_session, resolve_device
from ropelm.engine import train
from ropelm.errors import DataError
from ropelm.experiment import Experiment
from ropelm.runs import RunDir
from ropelm.tokenizer import TokenizerInfo, tokenizer_info, tokenizer_path, train_tokenizer


def default_run_dir(config: ExperimentConfig) -> Path:
    return Path("runs") / config.name


def inherited_tokenizer(config: ExperimentConfig) -> TokenizerInfo | None:
    """The tokenizer of the run ``init.from_run`` names (its best checkpoint's), or None.

    A run that starts from another run's weights must read text as that run did,
    whatever data it trains on: an extension fine-tuned on longer documents
    tokenizes them with its parent's tokenizer, never with one trained anew.
    """
    if config.init.from_run is None:
        return None
    from ropelm.checkpoint import TOKENIZER, resolve_checkpoint

    return tokenizer_info(resolve_checkpoint(Path(config.init.from_run), "best") / TOKENIZER)


def cached_stages(
    config: ExperimentConfig, experiment: str = "EXPERIMENT.yaml"
) -> tuple[TokenizerInfo, PreparedData]:
    """The tokenizer and token files built earlier for ``config``; an error if there are none."""
    path = tokenizer_path(config)
    if not path.is_file():
        raise DataError(
            f"No tokenizer for this experiment in {config.data.cache_dir}; build it with "
            f"`ropelm-exp prepare {experiment}` (or run everything with `ropelm-exp run`)."
        )
    tokenizer = tokenizer_info(path)
    directory = tokens_dir(config, tokenizer)
    if not directory.is_dir():
        raise DataError(
            f"No token files for this experiment in {config.data.cache_dir}; build them with "
            f"`ropelm-exp prepare {experiment}` (or run everything with `ropelm-exp run`)."
        )
    return tokenizer, load_prepared(directory, tokenizer)


def train_only(
    experiment: Experiment,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
    experiment_file: str = "EXPERIMENT.yaml",
) -> dict[str, Any]:
    """The training stage alone, on the tokenizer and token files prepared earlier."""
    config = experiment.config
    run_dir = RunDir(out_dir or default_run_dir(config))
    with (
        distributed_session(resolve_device(config.train.device)) as dist_ctx,
        run_dir.writing(enabled=dist_ctx.is_main),
    ):
        inherited = inherited_tokenizer(config)
        if inherited is None:
            tokenizer, data = cached_stages(config, experiment_file)
        if dist_ctx.is_main:
            run_dir.claim(config, resume=resume)
            if inherited is not None:
                tokenizer, data = inherited, prepare_data(config, inherited, progress=progress)
        dist_ctx.barrier()
        if inherited is not None and not dist_ctx.is_main:
            tokenizer, data = inherited, prepare_data(config, inherited, progress=False)
        return train(experiment, data, tokenizer, run_dir, resume=resume, progress=progress)


def run_experiment(
    experiment: Experiment,
    *,
    out_dir: Path | None = None,
    resume: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage of ``experiment``; returns the training summary."""
    config = experiment.config
    run_dir = RunDir(out_dir or default_run_dir(config))
    with (
        distributed_session(resolve_device(config.train.device)) as dist_ctx,
        run_dir.writing(enabled=dist_ctx.is_main),
    ):
        inherited = inherited_tokenizer(config)
        if dist_ctx.is_main:  # one process builds the caches, the others then reuse them
            run_dir.claim(config, resume=resume)
            tokenizer = inherited or train_tokenizer(config, progress=progress)
            data = prepare_data(config, tokenizer, progress=progress)
        dist_ctx.barrier()
        if not dist_ctx.is_main:
            tokenizer = inherited or train_tokenizer(config, progress=False)
            data = prepare_data(config, tokenizer, progress=False)
        return train(experiment, data, tokenizer, run_dir, resume=resume, progress=progress)
