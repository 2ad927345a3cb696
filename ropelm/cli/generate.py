"""``ropelm-exp generate``: sample text from a trained model with the KV cache."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import main


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
@click.option(
    "--trust-plugins",
    is_flag=True,
    help="Import the plugin modules the checkpoint names (files or dotted names: code that "
    "runs). Only for runs you trust; built-in and installed plugins need no flag.",
)
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
    trust_plugins: bool,
) -> None:
    """Stream text from a trained model to stdout.

    RUN_DIR is a run directory (its best checkpoint by default) or a checkpoint
    directory. Example:

    \b
      ropelm-exp generate runs/quickstart --prompt "The history of" --top-p 0.9 --seed 0
    """
    from ropelm.checkpoint import checkpoint_registry, load_model, resolve_checkpoint
    from ropelm.distributed import resolve_device
    from ropelm.generate import generate_text
    from ropelm.tokenizer import load_tokenizer

    directory = resolve_checkpoint(run_dir, which)
    model = load_model(
        directory,
        checkpoint_registry(directory, trust_plugins=trust_plugins),
        device=resolve_device(device),
    )
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    click.echo(prompt, nl=False)
    for piece in generate_text(
        model, tokenizer, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
        top_p=top_p, seed=seed, use_cache=not no_cache,
    ):  # fmt: skip
        click.echo(piece, nl=False)
    click.echo()
