"""``ropelm-exp compare``: tables (mean ± std over seeds) and plots of finished runs."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import main


@main.command("compare")
@click.argument(
    "run_dirs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path),
    metavar="RUN_DIR...",
)  # fmt: skip
@click.option(
    "--bench",
    "bench_files",
    multiple=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A bench JSON from `ropelm-exp bench` (tokens/s and memory columns, throughput plot).",
)
@click.option(
    "--format",
    "tablefmt",
    type=click.Choice(["github", "latex", "csv"]),
    default="github",
    show_default=True,
)
@click.option(
    "--bench-length",
    type=click.IntRange(min=1),
    help="Sequence length of the bench columns (default: the runs' block size).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Also write comparison.md/.tex, one CSV per table and the PNG plots here.",
)
def compare_command(
    run_dirs: tuple[Path, ...],
    bench_files: tuple[Path, ...],
    tablefmt: str,
    bench_length: int | None,
    out_dir: Path | None,
) -> None:
    """Compare finished runs: tables of mean ± std over seeds, and plots.

    RUN_DIR is a run directory or a directory of runs (a sweep). Runs of the same
    variant (att_type and att_options) are grouped; std is over seeds (n - 1).
    Runs evaluated with `ropelm-exp eval --passkey` add the passkey accuracy table
    (length x depth) and, with --out, passkey.csv and the passkey_accuracy.png heatmap.

    \b
    Examples:
      ropelm-exp compare runs/quickstart-sweep
      ropelm-exp compare runs/quickstart-sweep --bench bench.json --out docs/
      ropelm-exp compare runs/a runs/b --format latex
    """
    from ropelm.report import compare, read_bench, write_outputs

    comparison = compare(run_dirs, bench=bench_files, tablefmt=tablefmt, bench_length=bench_length)
    click.echo(comparison.text)
    if out_dir is not None:
        benches = [read_bench(b) for b in bench_files]
        for path in write_outputs(comparison, out_dir, benches):
            click.echo(f"written: {path}")
