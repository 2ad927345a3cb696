"""``ropelm-exp``: the command-line interface.

Every command catches :class:`ropelm.RopelmError` and prints its one-sentence
message (``Error: ...``, exit status 1) instead of a traceback.
"""

from __future__ import annotations

import json
from pathlib import Path

import click
from tabulate import tabulate

from ropelm.config import load_experiment, to_yaml
from ropelm.errors import RopelmError
from ropelm.registry import Registry


class _FriendlyGroup(click.Group):
    """A click group that turns user errors into one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RopelmError as err:
            raise click.ClickException(str(err)) from None


@click.group(cls=_FriendlyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ropelm")
def main() -> None:
    """Train language models and compare attention variants.

    \b
    A typical session:
      ropelm-exp plugins                          # which attention variants exist
      ropelm-exp validate experiments/quickstart.yaml
      ropelm-exp run experiments/quickstart.yaml  # tokenizer -> data -> train -> eval

    Run `ropelm-exp COMMAND --help` for the options of each command.
    """


experiment_argument = click.argument(
    "experiment", type=click.Path(dir_okay=False, path_type=Path), metavar="EXPERIMENT.yaml"
)
set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY.PATH=VALUE",
    help="Override a value of the YAML, e.g. --set train.batch_size=16 (repeatable).",
)


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


run_dir_option = click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Run directory (default: runs/NAME, NAME from the YAML).",
)
resume_option = click.option(
    "--resume",
    "resume_dir",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    help="Continue the run in this directory from its last checkpoint.",
)
quiet_option = click.option("--quiet", is_flag=True, help="No progress bars.")


def _print_summary(summary: dict) -> None:
    click.echo(
        f"done: {summary['att_type']}, {summary['n_params']:,} parameters, "
        f"{summary['tokens_seen']:,} tokens, val loss {summary['initial_val_loss']:.4f} -> "
        f"{summary['best_val_loss']:.4f} (best), "
        f"final val ppl {summary['final_val_ppl']:.2f}, "
        f"{summary['train_tokens_per_s']:,.0f} tokens/s"
    )


def _show_pipeline_logs() -> None:
    """Print the data pipeline's log lines (text column chosen, cache reused, ...) to stderr."""
    import logging

    logger = logging.getLogger("ropelm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)


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
    _show_pipeline_logs()
    info = train_tokenizer(config, force=force, progress=not quiet)
    click.echo(
        f"tokenizer: {info.path} ({info.vocab_size:,} tokens, <|endoftext|> = {info.eot_id}, "
        f"<|pad|> = {info.pad_id}, sha256 {info.sha256[:12]})"
    )


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
    _show_pipeline_logs()
    info = train_tokenizer(config, progress=not quiet)
    data = prepare_data(config, info, force=force, progress=not quiet)
    click.echo(f"token files: {data.dir} ({data.meta['dtype']})")
    for split in ("train", "val"):
        entry = data.meta["splits"][split]
        click.echo(
            f"  {split + ':':6} {entry['tokens']:>13,} tokens  {entry['documents']:>9,} documents"
        )


@main.command("run")
@experiment_argument
@set_option
@run_dir_option
@resume_option
@quiet_option
def run_command(
    experiment: Path,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume_dir: Path | None,
    quiet: bool,
) -> None:
    """Run an experiment end to end: tokenizer, token files, training, evaluation.

    Cached stages (tokenizer, token files) are reused. The run directory gets
    config.yaml, metrics.jsonl, checkpoints/ (best and last) and summary.json.
    Ctrl-C saves a resumable checkpoint; continue with --resume RUN_DIR.

    \b
    Examples:
      ropelm-exp run experiments/quickstart.yaml
      ropelm-exp run experiments/quickstart.yaml --set train.max_steps=50 --out runs/short
      ropelm-exp run experiments/quickstart.yaml --resume runs/quickstart
    Multi-process (DDP):
      torchrun --nproc_per_node=2 -m ropelm.cli run experiments/quickstart.yaml
    """
    from ropelm.pipeline import run_experiment

    config = load_experiment(experiment, overrides)
    summary = run_experiment(
        config, out_dir=resume_dir or out_dir, resume=resume_dir is not None, progress=not quiet
    )
    _print_summary(summary)


@main.command("train")
@experiment_argument
@set_option
@run_dir_option
@resume_option
@quiet_option
def train_command(
    experiment: Path,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume_dir: Path | None,
    quiet: bool,
) -> None:
    """Run only the training stage, on the tokenizer and token files built by `prepare`.

    \b
    Example:
      ropelm-exp prepare experiments/quickstart.yaml
      ropelm-exp train experiments/quickstart.yaml --set train.learning_rate=1e-3 --out runs/lr
    """
    from ropelm.pipeline import train_only

    config = load_experiment(experiment, overrides)
    summary = train_only(
        config,
        out_dir=resume_dir or out_dir,
        resume=resume_dir is not None,
        progress=not quiet,
        experiment=str(experiment),
    )
    _print_summary(summary)


@main.command("generate")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path), metavar="RUN_DIR")
@click.option("--prompt", default="", help="Text to continue (default: a new document).")
@click.option("--max-new-tokens", default=100, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--temperature",
    default=0.8,
    show_default=True,
    type=click.FloatRange(min=0.0),
    help="0 is greedy decoding.",
)
@click.option("--top-k", type=click.IntRange(min=1), help="Keep the k most likely tokens.")
@click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), help="Nucleus mass.")
@click.option("--seed", type=int, help="Seed for sampling (reproducible output).")
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--no-cache", is_flag=True, help="Recompute the whole context for every token.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")
def generate_command(
    run_dir: Path,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    which: str,
    no_cache: bool,
    device: str,
) -> None:
    """Stream text from a trained model to stdout.

    RUN_DIR is a run directory (its best checkpoint by default) or a checkpoint
    directory. Example:

    \b
      ropelm-exp generate runs/quickstart --prompt "The history of" --top-p 0.9 --seed 0
    """
    from ropelm.checkpoint import load_model as load_checkpoint_model
    from ropelm.checkpoint import resolve_checkpoint
    from ropelm.distributed import resolve_device
    from ropelm.generate import generate_text
    from ropelm.tokenizer import load_tokenizer

    directory = resolve_checkpoint(run_dir, which)
    model = load_checkpoint_model(directory, device=resolve_device(device))
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    click.echo(prompt, nl=False)
    for piece in generate_text(
        model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, use_cache=not no_cache,
    ):  # fmt: skip
        click.echo(piece, nl=False)
    click.echo()


# -- evaluation, sweeps, comparison, benchmarks ----------------------------------------------


@main.command("eval")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path), metavar="RUN_DIR")
@click.option(
    "--lengths",
    multiple=True,
    metavar="L1,L2,...",
    help="Evaluation lengths: relative to the block size (1x, 2x) or tokens (2048). "
    "Default: eval.lengths of the run.",
)
@click.option(
    "--att-option",
    "att_options",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override an att_option of the model for this evaluation (same weights), e.g. "
    "--att-option scaling=yarn --att-option scale_factor=4 (repeatable); scale_factor=auto "
    "uses length / block_size at each length.",
)
@click.option(
    "--max-windows",
    type=click.IntRange(min=1),
    help="At most this many non-overlapping windows per length (the strided method scores "
    "the same tokens). Default: the whole validation split.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    help="At most this many scored tokens per length, in whole windows; a multiple of every "
    "length (e.g. 131072) makes all lengths score the same tokens.",
)
@click.option(
    "--stride",
    default="0.5",
    show_default=True,
    help="Stride of the strided method: a fraction of the length (0.5) or tokens (64).",
)
@click.option(
    "--method",
    "methods",
    multiple=True,
    type=click.Choice(["nonoverlapping", "strided"]),
    help="Evaluate only with this method (repeatable; default both).",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    help="Windows of block_size tokens per forward pass; longer windows get the same "
    "number of tokens per batch (default: the run's eval or train batch size).",
)
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:1, ...")
@click.option(
    "--out",
    "out_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="JSON file to write (default RUN_DIR/eval.json, or RUN_DIR/eval-OPTIONS.json "
    "with --att-option).",
)
def eval_command(
    run_dir: Path,
    lengths: tuple[str, ...],
    att_options: tuple[str, ...],
    max_windows: int | None,
    max_tokens: int | None,
    stride: str,
    methods: tuple[str, ...],
    batch_size: int | None,
    which: str,
    device: str,
    out_file: Path | None,
) -> None:
    """Validation perplexity of a run at several lengths (length extrapolation).

    Each length is scored with non-overlapping windows (every token of a window
    scored) and with strided windows (windows moved by --stride, scoring only
    tokens not scored before, so each has at least L - stride tokens of context).
    Variants that cannot run beyond their block size (e.g. Learned-APE) get n/a.
    The result is written atomically to RUN_DIR/eval.json and printed.

    \b
    Examples:
      ropelm-exp eval runs/quickstart --lengths 1x,2x,4x,8x
      ropelm-exp eval runs/quickstart --lengths 4x --att-option scaling=yarn \\
          --att-option scale_factor=4
      ropelm-exp eval runs/quickstart --lengths 1x,2x,4x,8x --att-option scaling=yarn \\
          --att-option scale_factor=auto
      ropelm-exp eval runs/quickstart --lengths 512,1024 --max-windows 50 --stride 64
      ropelm-exp eval runs/quickstart --lengths 1x,2x,4x,8x --max-tokens 131072
    """
    from ropelm.evaluate import METHODS
    from ropelm.extrapolation import evaluate_run, format_eval_table, parse_att_options

    report = evaluate_run(
        run_dir,
        lengths=list(lengths) or None,
        att_options=parse_att_options(att_options),
        max_windows=max_windows,
        max_tokens=max_tokens,
        stride=stride,
        batch_size=batch_size,
        methods=list(methods) or METHODS,
        which=which,
        device=device,
        out=out_file,
    )
    click.echo(format_eval_table(report))
    click.echo(f"written: {report['path']}")


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


if __name__ == "__main__":  # pragma: no cover
    main()
