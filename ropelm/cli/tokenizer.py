"""``ropelm-exp tokenizer``: train (or reuse) an experiment's BPE tokenizer."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import experiment_argument, main, quiet_option, set_option, show_pipeline_logs
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
