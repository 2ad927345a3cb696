"""``ropelm-exp sweep``: train and evaluate attention variants x seeds on one experiment."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import experiment_argument, main, quiet_option, set_option, threads_option
from ropelm.experiment import Experiment


@main.command("sweep")
@experiment_argument
@click.option(
    "--variants",
    multiple=True,
    required=True,
    metavar="NAME[:K=V],...",
    help="Attention variants, comma-separated; options after colons, e.g. "
    "RoPE-SM,ALiBi,RoPE-Sliding:window=32 (repeatable).",
)
@click.option(
    "--seeds", multiple=True, default=("0",), show_default=True, metavar="S1,S2,...",
    help="Training seeds, e.g. 0,1,2.",
)  # fmt: skip
@set_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Sweep directory (default runs/NAME-sweep).",
)
@click.option(
    "--lengths",
    multiple=True,
    metavar="L1,L2,...",
    help="Evaluation lengths after training (default: eval.lengths of the experiment).",
)
@click.option(
    "--max-windows",
    type=click.IntRange(min=1),
    help="Cap on evaluation windows per length (see `ropelm-exp eval`).",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="Cap on scored tokens per length (see `ropelm-exp eval`).",
)
@click.option("--no-eval", is_flag=True, help="Train only; skip the length evaluation.")
@click.option(
    "--extend",
    "extend_block",
    metavar="BLOCK",
    help="Then extend every run to this block size (4x or tokens) with each of --methods, "
    "as `ropelm-exp extend` does; the extended runs are evaluated and compared too.",
)
@click.option(
    "--methods",
    multiple=True,
    default=("none",),
    show_default=True,
    metavar="M1,M2,...",
    help="Extension methods for --extend: none, linear, ntk, dynamic, yarn, llama3, "
    "abf:new_base=VALUE (with options after colons).",
)
@click.option(
    "--extend-steps",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Fine-tuning steps of each extension run.",
)
@click.option(
    "--extend-set",
    "extend_overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a setting of the extension runs only, e.g. --extend-set "
    "train.learning_rate=5e-4 (repeatable).",
)
@quiet_option
@threads_option
def sweep_command(
    experiment: Path,
    variants: tuple[str, ...],
    seeds: tuple[str, ...],
    overrides: tuple[str, ...],
    out_dir: Path | None,
    lengths: tuple[str, ...],
    max_windows: int | None,
    max_tokens: int | None,
    no_eval: bool,
    extend_block: str | None,
    methods: tuple[str, ...],
    extend_steps: int,
    extend_overrides: tuple[str, ...],
    quiet: bool,
) -> None:
    """Train and evaluate several attention variants x seeds on one experiment.

    Every run uses the same tokenizer, token files and token budget (they are
    built once and reused). Runs go to SWEEP_DIR/VARIANT-seedK/; a finished run
    is skipped and an interrupted one resumed when the same sweep is run again.
    At the end the comparison table is printed and saved as SWEEP_DIR/comparison.md.

    \b
    Examples:
      ropelm-exp sweep experiments/quickstart.yaml --variants RoPE-SM,ALiBi,NoPE --seeds 0,1,2
      ropelm-exp sweep experiments/quickstart.yaml \\
          --variants RoPE-SM,RoPE-Sliding:window=32 --lengths 1x,2x,4x --max-windows 100
    Context extension, methods x seeds in one table:
      ropelm-exp sweep experiments/quickstart.yaml --variants RoPE-SM --seeds 0,1,2 \\
          --extend 4x --methods none,linear,ntk,yarn --extend-steps 100
    """
    from ropelm.extend import parse_methods
    from ropelm.sweep import SweepExtension, parse_seeds, run_sweep
    from ropelm.variants import parse_variants

    choices = parse_variants(variants)
    seed_list = parse_seeds(seeds)
    extension = None
    if extend_block is not None:
        extension = SweepExtension(
            extend_block, tuple(parse_methods(methods)), extend_steps, extend_overrides
        )
    base = Experiment.load(experiment, overrides)
    sweep_dir, runs = run_sweep(
        base, choices, seed_list, out=out_dir, lengths=list(lengths) or None,
        max_windows=max_windows, max_tokens=max_tokens, evaluate=not no_eval,
        progress=not quiet, log=click.echo,
        origin={"experiment": str(experiment), "overrides": list(overrides)},
        extension=extension,
    )  # fmt: skip
    counts = {s: sum(r.status == s for r in runs) for s in ("trained", "resumed", "skipped")}
    click.echo(
        f"sweep: {sweep_dir} ({counts['trained']} trained, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped)"
    )
