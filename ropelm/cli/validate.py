"""``ropelm-exp validate``: check an experiment without running it."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import experiment_argument, main, set_option
from ropelm.config import to_yaml
from ropelm.experiment import Experiment


@main.command("validate")
@experiment_argument
@set_option
@click.option("--show", is_flag=True, help="Print the resolved configuration as YAML.")
def validate_command(experiment: Path, overrides: tuple[str, ...], show: bool) -> None:
    """Check an experiment YAML without running anything.

    Unknown keys, wrong types, impossible values, unknown attention types and
    bad attention options are reported with the dotted path of the key: the
    same checks `run` makes before it trains anything.
    """
    config = Experiment.load(experiment, overrides).config
    if show:
        click.echo(to_yaml(config), nl=False)
    else:
        click.echo(f"{experiment}: OK (att_type {config.model.att_type}, name '{config.name}')")
