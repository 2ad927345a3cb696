"""``ropelm-exp check``: run the conformance suite on one plugin and print a pass/fail table."""

from __future__ import annotations

import click

from ropelm.cli.app import main


def _is_module_ref(target: str) -> bool:
    return target.endswith(".py") or "/" in target or "\\" in target or "." in target


@main.command("check")
@click.argument("targets", nargs=-1, required=True, metavar="VARIANT_OR_PLUGIN...")
@click.option("--verbose", "-v", is_flag=True, help="Also print why checks were not applicable.")
def check_command(targets: tuple[str, ...], verbose: bool) -> None:
    """Run the conformance suite on attention variants and print a pass/fail table.

    Each target is a registered variant name (RoPE-SM), or a plugin module -- a
    .py file or a dotted module name -- whose variants are all checked. The checks
    are those of `ropelm.testing.run_all` (shape, causality, batch independence,
    determinism, dropout, gradients, lengths, KV cache, bf16, document mask,
    backends); checks that need CUDA are "not applicable" on a CPU-only machine.
    Exit status 1 when any check fails.

    \b
    Examples:
      ropelm-exp check my_attention.py
      ropelm-exp check RoPE-SM ALiBi
      ropelm-exp check my_package.my_plugin -v
    """
    from tabulate import tabulate

    from ropelm.registry import Registry
    from ropelm.testing import run_checks

    registry = Registry.default()
    names: list[str] = []
    for target in targets:
        if target in registry:
            names.append(target)
        elif _is_module_ref(target):
            before = set(registry.names())
            registry.load_module(target)
            added = [name for name in registry.names() if name not in before]
            if not added:
                raise click.ClickException(f"{target} registers no new attention variant.")
            names += added
        else:
            registry.get(target)  # an unknown name: one sentence listing the valid ones
    failures = 0
    for name in dict.fromkeys(names):
        results = run_checks(registry.get(name))
        rows = [[r.check.removeprefix("check_"), r.outcome, _message(r, verbose)] for r in results]
        failed = sum(r.outcome == "failed" for r in results)
        passed = sum(r.outcome == "passed" for r in results)
        failures += failed
        click.echo(f"{name}: {passed} passed, {failed} failed, {len(results) - passed - failed} "
                   "not applicable")  # fmt: skip
        click.echo(tabulate(rows, headers=["check", "outcome", "message"], tablefmt="github"))
        click.echo()
    if failures:
        raise SystemExit(1)


def _message(result, verbose: bool) -> str:
    if result.outcome == "failed" or verbose:
        return result.message.splitlines()[0][:160] if result.message else ""
    return ""
