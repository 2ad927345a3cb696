"""``ropelm-exp prepare``: split the corpus and write an experiment's token files."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import experiment_argument, main, quiet_option, set_option, show_pipeline_logs
from ropelm.config import load_experiment


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
