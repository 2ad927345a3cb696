"""``ropelm-exp bench``: throughput, peak memory and MFU of every variant, side by side."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import main, set_option, threads_option


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
@click.option(
    "--attention-backend",
    type=click.Choice(["auto", "sdpa", "flex", "dense"]),
    help="Kernel for attention (default: the experiment's model.attention_backend, auto: the "
    "fastest for each variant, device and mode).",
)
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
@threads_option
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
    attention_backend: str | None,
    rounds: int,
    warmup: int,
    no_memory: bool,
    peak_tflops: float | None,
    out_file: Path,
) -> None:
    """Forward and forward+backward tokens/s, peak memory and MFU of every variant.

    All variants are measured side by side on the same batch, interleaved round
    by round; the ratio columns are tokens/s relative to RoPE-SM measured in the
    same rounds, and the backend column says which kernel ran (sdpa, flex,
    dense; see `model.attention_backend`). MFU (CUDA) uses PaLM's
    6N + 12*L*H*Q*T FLOPs per token.

    \b
    Examples:
      ropelm-exp bench --lengths 128,256,512,1024 --out bench.json
      ropelm-exp bench --variants RoPE-SM,RoPE-Sliding:window=64 --lengths 2048 --threads 1
      ropelm-exp bench --experiment experiments/rope_base.yaml --device cuda --batch-size 8
    """
    import torch

    from ropelm.atomic import atomic_write_json
    from ropelm.bench import bench_variants, format_bench_table
    from ropelm.config import ModelConfig, load_experiment
    from ropelm.errors import ConfigError
    from ropelm.perplexity import split_specs
    from ropelm.registry import Registry
    from ropelm.variants import VariantChoice, parse_variants

    if experiment is not None:
        config = load_experiment(experiment, overrides)
        model, registry = config.model, Registry.default(config.plugins)
    else:
        if overrides:
            raise ConfigError("--set needs --experiment (it overrides that YAML's values).")
        model = ModelConfig(n_layer=4, n_head=4, n_embd=128, vocab_size=4096)
        registry = Registry.default()
    if attention_backend is not None:
        model = model.model_copy(update={"attention_backend": attention_backend})
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
    bench = bench_variants(
        choices, sizes, registry, model=model, batch_size=batch_size, devices=device_list,
        rounds=rounds, warmup=warmup, memory=not no_memory, peak_tflops=peak_tflops,
        log=lambda m: click.echo(m, err=True),
    )  # fmt: skip
    atomic_write_json(out_file, bench)
    click.echo(format_bench_table(bench))
    click.echo(f"written: {out_file}")
