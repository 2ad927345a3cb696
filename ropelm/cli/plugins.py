"""``ropelm-exp plugins``: the registered attention variants and where each comes from."""

from __future__ import annotations

import json
from pathlib import Path

import click
from tabulate import tabulate

from ropelm.cli.app import main
from ropelm.config import load_experiment
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
