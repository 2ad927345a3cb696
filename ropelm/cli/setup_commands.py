"""``plugins`` and ``validate``: what is installed, and whether an experiment is valid."""

from __future__ import annotations

import json
from pathlib import Path

import click
from tabulate import tabulate

from ropelm.cli.app import (
    experiment_argument,
    main,
    set_option,
)
from ropelm.config import load_experiment, to_yaml
from ropelm.registry import Registry


@main.command("plugins")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.option(
    "--plugin",
    "plugin_modules",
    multiple=True,
    metavar="MODULE",
    help="Also load this plugin module (dotted path or .py file); repeatable.",
)
@click.option(
    "--experiment",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Also load the plugins an experiment YAML names under `plugins:`.",
)
def plugins_command(
    as_json: bool, plugin_modules: tuple[str, ...], experiment: Path | None
) -> None:
    """List the registered attention variants and where each comes from.

    Variants come from the built-in plugins, installed packages with a `ropelm`
    entry point, and modules given with --plugin or named by --experiment.
    """
    modules = list(plugin_modules)
    if experiment is not None:
        modules += load_experiment(experiment).plugins
    registry = Registry.default(modules)
    rows = [
        {
            "name": v.spec.name,
            "description": v.spec.description,
            "source": v.source,
            "version": v.version,
            "reference": v.spec.reference,
            "capabilities": v.spec.capabilities.as_dict(),
        }
        for v in registry
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = [
        [
            r["name"],
            r["description"],
            r["source"],
            ", ".join(k for k, on in r["capabilities"].items() if on),
        ]
        for r in rows
    ]
    click.echo(
        tabulate(
            table,
            headers=["name", "description", "source", "capabilities"],
            tablefmt="simple",
            maxcolwidths=[None, 50, 40, 30],
        )
    )


@main.command("validate")
@experiment_argument
@set_option
@click.option("--show", is_flag=True, help="Print the resolved configuration as YAML.")
def validate_command(experiment: Path, overrides: tuple[str, ...], show: bool) -> None:
    """Check an experiment YAML without running anything.

    Unknown keys, wrong types, impossible values, unknown attention types and
    bad attention options are reported with the dotted path of the key.
    """
    config = load_experiment(experiment, overrides)
    if show:
        click.echo(to_yaml(config), nl=False)
    else:
        click.echo(f"{experiment}: OK (att_type {config.model.att_type}, name '{config.name}')")
