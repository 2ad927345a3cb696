"""``ropelm-exp generate``: sample text from a trained model with the KV cache."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ropelm.cli.app import (
    device_option,
    main,
    plugin_option,
    trust_plugins_option,
    which_option,
)
from ropelm.errors import ConfigError


@main.command("generate")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path), metavar="RUN_DIR")
@click.option("--prompt", help="Text to continue (default: a new document).")
@click.option(
    "--prompt-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A UTF-8 file of prompts, one per line (blank lines skipped); prompts of equal "
    "token length are generated together as one batch.",
)
@click.option(
    "--num-samples",
    default=1,
    show_default=True,
    type=click.IntRange(min=1),
    help="Samples per prompt.",
)
@click.option("--max-new-tokens", default=100, show_default=True, type=click.IntRange(min=1))
@click.option(
    "--stop-at-eos/--no-stop-at-eos",
    default=True,
    show_default=True,
    help="End a sample at the end-of-text token, or write it as <|endoftext|> and go on.",
)
@click.option(
    "--stream/--no-stream",
    default=None,
    help="Print tokens as they come. Default: on for one sequence; several sequences are "
    "batched and printed when done (--stream generates them one after another).",
)
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
@which_option
@click.option("--no-cache", is_flag=True, help="Recompute the whole context for every token.")
@device_option
@plugin_option
@trust_plugins_option
def generate_command(
    run_dir: Path,
    prompt: str | None,
    prompt_file: Path | None,
    num_samples: int,
    max_new_tokens: int,
    stop_at_eos: bool,
    stream: bool | None,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    seed: int | None,
    which: str,
    no_cache: bool,
    device: str,
    plugin_modules: tuple[str, ...],
    trust_plugins: bool,
) -> None:
    """Generate text from a trained model: stream one sample, or batch many.

    RUN_DIR is a run directory (its best checkpoint by default) or a checkpoint
    directory. Each sample ends at the end-of-text token (--no-stop-at-eos goes
    on) or after --max-new-tokens. Several sequences (--prompt-file,
    --num-samples) are printed one after another under a "=== prompt i, sample
    j ===" line. Examples:

    \b
      ropelm-exp generate runs/quickstart --prompt "The history of" --top-p 0.9 --seed 0
      ropelm-exp generate runs/quickstart --prompt "The city" --num-samples 3
      ropelm-exp generate runs/quickstart --prompt-file prompts.txt --temperature 0
    """
    from ropelm.checkpoint import checkpoint_registry, load_model, resolve_checkpoint
    from ropelm.distributed import resolve_device
    from ropelm.generate import check_sampling, read_prompts
    from ropelm.tokenizer import load_tokenizer

    if prompt is not None and prompt_file is not None:
        raise ConfigError("Give --prompt or --prompt-file, not both.")
    check_sampling(temperature, top_k, top_p)  # before loading anything (nan is a float too)
    prompts = read_prompts(prompt_file) if prompt_file is not None else [prompt or ""]
    directory = resolve_checkpoint(run_dir, which)
    model = load_model(
        directory,
        checkpoint_registry(directory, trust_plugins=trust_plugins, plugins=plugin_modules),
        device=resolve_device(device),
    )
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p, "seed": seed,
                "use_cache": not no_cache, "stop_at_eos": stop_at_eos}  # fmt: skip
    several = len(prompts) * num_samples > 1
    if stream if stream is not None else not several:
        _stream_each(model, tokenizer, prompts, num_samples, max_new_tokens, sampling)
    else:
        _print_batched(model, tokenizer, prompts, num_samples, max_new_tokens, sampling)


def _header(i: int, prompts: int, j: int, samples: int) -> str | None:
    """``=== prompt 2, sample 1 ===`` (only the parts that count), or None for one sequence."""
    parts = ([f"prompt {i + 1}"] if prompts > 1 else []) + (
        [f"sample {j + 1}"] if samples > 1 else []
    )
    return f"=== {', '.join(parts)} ===" if parts else None


def _stream_each(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    sampling: dict[str, Any],
) -> None:
    """Generate the sequences one after another, printing every piece as it comes."""
    from ropelm.generate import generate_text

    seed = sampling.pop("seed")
    for i, prompt in enumerate(prompts):
        for j in range(num_samples):
            header = _header(i, len(prompts), j, num_samples)
            if header:
                click.echo(header)
            click.echo(prompt, nl=False)
            row_seed = None if seed is None else seed + i * num_samples + j
            for piece in generate_text(
                model, tokenizer, prompt, max_new_tokens, seed=row_seed, **sampling
            ):
                click.echo(piece, nl=False)
            click.echo()


def _print_batched(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    max_new_tokens: int,
    sampling: dict[str, Any],
) -> None:
    """Generate every sequence in batches (a progress bar on a terminal), then print them."""
    from ropelm.generate import generate_texts

    texts = generate_texts(
        model, tokenizer, prompts, max_new_tokens, num_samples=num_samples, progress=True,
        **sampling,
    )  # fmt: skip
    for i, (prompt, samples) in enumerate(zip(prompts, texts, strict=True)):
        for j, text in enumerate(samples):
            header = _header(i, len(prompts), j, num_samples)
            if header:
                click.echo(header)
            click.echo(prompt + text)
