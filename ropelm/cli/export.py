"""``ropelm-exp export``: a trained run as a Hugging Face transformers model directory."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import main


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, path_type=Path), metavar="RUN_DIR")
@click.option(
    "--format",
    "format_",
    type=click.Choice(["hf"]),
    default="hf",
    show_default=True,
    help="hf: a Hugging Face transformers model directory (safetensors, config, tokenizer, "
    "model card).",
)
@click.option(
    "--out",
    "out_dir",
    required=True,
    type=click.Path(path_type=Path),
    help="Directory to write; it must not exist yet (see --force).",
)
@click.option("--which", type=click.Choice(["best", "last"]), default="best", show_default=True)
@click.option(
    "--force", is_flag=True, help="Replace --out if it holds a previous export (never half-way)."
)
def export_command(run_dir: Path, format_: str, out_dir: Path, which: str, force: bool) -> None:
    """Export a run's checkpoint for Hugging Face transformers (and lm-evaluation-harness).

    RUN_DIR is a run directory (its best checkpoint by default), a checkpoint
    directory, or a transformers directory ropelm can import. RoPE-SM and
    RoPE-SM-complex become GPTNeoXForCausalLM, Learned-APE becomes
    GPT2LMHeadModel; the result loads with AutoModelForCausalLM.from_pretrained(OUT)
    and AutoTokenizer.from_pretrained(OUT), no custom code, and computes the
    same logits. Other variants, grouped-query attention, a soft-cap and an LM
    head with a bias (trained with model.bias: true) have no such architecture
    and are refused. Needs transformers: pip install "ropelm[hf]".

    \b
    Examples:
      ropelm-exp export runs/quickstart --format hf --out hf/quickstart
      ropelm-exp export runs/quickstart --which last --out hf/quickstart --force
      ropelm-exp generate hf/quickstart --prompt "The history of"   # and back
    """
    from ropelm.hf_export import export_hf

    result = export_hf(run_dir, out_dir, which=which, force=force)
    click.echo(
        f"exported {result.source} ({result.att_type}, {result.n_params:,} parameters) as "
        f"{result.architecture} to {result.path}"
    )
