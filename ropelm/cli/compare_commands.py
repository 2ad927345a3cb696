"""``sweep``, ``bench`` and ``compare``: put attention variants side by side."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import (
    experiment_argument,
    main,
    quiet_option,
    set_option,
)
from ropelm.config import load_experiment
from ropelm.registry import Registry


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
@quiet_option
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
    """
    from ropelm.sweep import parse_seeds, parse_variants, run_sweep

    choices = parse_variants(variants)
    sweep_dir, runs = run_sweep(
        experiment, choices, parse_seeds(seeds), overrides=overrides, out=out_dir,
        lengths=list(lengths) or None, max_windows=max_windows, max_tokens=max_tokens,
        evaluate=not no_eval,
        progress=not quiet, log=click.echo,
    )  # fmt: skip
    counts = {s: sum(r.status == s for r in runs) for s in ("trained", "resumed", "skipped")}
    click.echo(
        f"sweep: {sweep_dir} ({counts['trained']} trained, {counts['resumed']} resumed, "
        f"{counts['skipped']} skipped)"
    )


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


@main.command("bench")
@click.option(
    "--variants",
    multiple=True,
    metavar="NAME[:K=V],...",
    help="Variants to measure, as for `sweep` (default: every registered variant).",
)
@click.option(
    "--lengths", multiple=True, default=("128,256,512,1024",), show_default=True,
    metavar="T1,T2,...", help="Sequence lengths in tokens.",
)  # fmt: skip
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--experiment",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Take the model shape (and plugins) from this experiment YAML; default: the "
    "quickstart model (4 layers, 4 heads, n_embd 128, vocab 4096).",
)
@set_option
@click.option(
    "--device",
    "devices",
    default="auto",
    show_default=True,
    help="Comma-separated devices; auto = the CPU, plus CUDA when present.",
)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="torch intra-op threads on the CPU.")
@click.option("--no-memory", is_flag=True, help="Skip the peak-memory measurement.")
@click.option(
    "--peak-tflops",
    type=click.FloatRange(min=0.0, min_open=True),
    help="Peak FLOP/s of the device for MFU (default: known GPUs only).",
)
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("bench.json"),
    show_default=True,
    help="JSON file to write (atomically).",
)
def bench_command(
    variants: tuple[str, ...],
    lengths: tuple[str, ...],
    batch_size: int,
    experiment: Path | None,
    overrides: tuple[str, ...],
    devices: str,
    rounds: int,
    warmup: int,
    threads: int | None,
    no_memory: bool,
    peak_tflops: float | None,
    out_file: Path,
) -> None:
    """Forward and forward+backward tokens/s, peak memory and MFU of every variant.

    All variants are measured side by side on the same batch, interleaved round
    by round; the ratio column is tokens/s relative to RoPE-SM measured in the
    same rounds. MFU (CUDA) uses PaLM's 6N + 12*L*H*Q*T FLOPs per token.

    \b
    Examples:
      ropelm-exp bench --lengths 128,256,512,1024 --out bench.json
      ropelm-exp bench --variants RoPE-SM,RoPE-Sliding:window=64 --lengths 2048 --threads 1
      ropelm-exp bench --experiment experiments/rope_base.yaml --device cuda --batch-size 8
    """
    import torch

    from ropelm.atomic import atomic_write_json
    from ropelm.bench import bench_variants, format_bench_table
    from ropelm.errors import ConfigError
    from ropelm.evaluate import split_specs
    from ropelm.model import ModelConfig
    from ropelm.sweep import VariantChoice, parse_variants

    if experiment is not None:
        config = load_experiment(experiment, overrides)
        model, registry = config.model, config.registry()
    else:
        if overrides:
            raise ConfigError("--set needs --experiment (it overrides that YAML's values).")
        model = ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=4096)
        registry = Registry.default()
    choices = parse_variants(variants) if variants else [VariantChoice(n) for n in registry.names()]
    try:
        sizes = [int(t) for t in split_specs(list(lengths))]
    except ValueError:
        raise ConfigError(f"--lengths {','.join(lengths)}: give whole numbers of tokens.") from None
    if not sizes or min(sizes) < 1:
        raise ConfigError("--lengths needs positive numbers of tokens, e.g. 128,256.")
    device_list = split_specs(devices)
    if device_list == ["auto"]:
        device_list = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if threads is not None:
        torch.set_num_threads(threads)
    bench = bench_variants(
        choices, sizes, model=model, batch_size=batch_size, devices=device_list, rounds=rounds,
        warmup=warmup, memory=not no_memory, peak_tflops=peak_tflops, registry=registry,
        log=lambda m: click.echo(m, err=True),
    )  # fmt: skip
    atomic_write_json(out_file, bench)
    click.echo(format_bench_table(bench))
    click.echo(f"written: {out_file}")
