"""``tokenizer``, ``prepare``, ``run`` and ``train``: the stages of an experiment."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import (
    experiment_argument,
    main,
    print_summary,
    quiet_option,
    resume_option,
    run_dir_option,
    set_option,
    show_pipeline_logs,
)
from ropelm.config import load_experiment


@main.command("tokenizer")
@experiment_argument
@set_option
@click.option("--force", is_flag=True, help="Retrain even when a cached tokenizer matches.")
@quiet_option
def tokenizer_command(
    experiment: Path, overrides: tuple[str, ...], force: bool, quiet: bool
) -> None:
    """Train the byte-level BPE tokenizer of an experiment (or reuse the cached one).

    The tokenizer is trained on the training split of `data` (capped by
    tokenizer.max_documents / tokenizer.max_characters) with model.vocab_size
    tokens, including <|endoftext|> and <|pad|>. It is saved as
    DATA.CACHE_DIR/tokenizer-HASH/tokenizer.json, HASH covering every setting
    that shapes it, and reused while those settings stay the same.

    \b
    Examples:
      ropelm-exp tokenizer experiments/quickstart.yaml
      ropelm-exp tokenizer experiments/quickstart.yaml --set model.vocab_size=8192
    """
    from ropelm.tokenizer import train_tokenizer

    config = load_experiment(experiment, overrides)
    show_pipeline_logs()
    info = train_tokenizer(config, force=force, progress=not quiet)
    click.echo(
        f"tokenizer: {info.path} ({info.vocab_size:,} tokens, <|endoftext|> = {info.eot_id}, "
        f"<|pad|> = {info.pad_id}, sha256 {info.sha256[:12]})"
    )


@main.command("prepare")
@experiment_argument
@set_option
@click.option(
    "--force", is_flag=True, help="Rebuild the token files even when complete ones exist."
)
@quiet_option
def prepare_command(experiment: Path, overrides: tuple[str, ...], force: bool, quiet: bool) -> None:
    """Split the corpus and write the token files of an experiment.

    Trains or reuses the tokenizer first (see `ropelm-exp tokenizer`). Documents
    go to the training or validation split by a hash of (data.split_seed, text);
    each split is written as a flat token file, every document followed by
    <|endoftext|>, in DATA.CACHE_DIR/tokens-HASH/ with train.bin, val.bin and
    meta.json. Complete token files are reused; --force rebuilds them (the
    tokenizer is kept).

    \b
    Examples:
      ropelm-exp prepare experiments/quickstart.yaml
      ropelm-exp prepare experiments/quickstart.yaml --set data.val_fraction=0.05 --force
    """
    from ropelm.data import prepare_data
    from ropelm.tokenizer import train_tokenizer

    config = load_experiment(experiment, overrides)
    show_pipeline_logs()
    info = train_tokenizer(config, progress=not quiet)
    data = prepare_data(config, info, force=force, progress=not quiet)
    click.echo(f"token files: {data.dir} ({data.meta['dtype']})")
    for split in ("train", "val"):
        entry = data.meta["splits"][split]
        click.echo(
            f"  {split + ':':6} {entry['tokens']:>13,} tokens  {entry['documents']:>9,} documents"
        )


@main.command("run")
@experiment_argument
@set_option
@run_dir_option
@resume_option
@quiet_option
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

    config = load_experiment(experiment, overrides)
    summary = run_experiment(
        config, out_dir=resume_dir or out_dir, resume=resume_dir is not None, progress=not quiet
    )
    print_summary(summary)


@main.command("train")
@experiment_argument
@set_option
@run_dir_option
@resume_option
@quiet_option
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

    config = load_experiment(experiment, overrides)
    summary = train_only(
        config,
        out_dir=resume_dir or out_dir,
        resume=resume_dir is not None,
        progress=not quiet,
        experiment=str(experiment),
    )
    print_summary(summary)
