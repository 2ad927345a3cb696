"""``ropelm-exp extend``: fine-tune a trained run at a longer context with a RoPE scaling."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import (
    main,
    plugin_option,
    print_summary,
    quiet_option,
    set_option,
    threads_option,
    trust_plugins_option,
)


def _scale_factor(text: str) -> float | None:
    """``auto`` -> None (new block size / old); otherwise a number."""
    if text == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise click.BadParameter(f"'{text}' is neither auto nor a number.") from None


@main.command("extend")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--block-size",
    required=True,
    help="The new context: a multiple of the run's block size (4x) or tokens (512).",
)
@click.option(
    "--scaling",
    default="none",
    show_default=True,
    metavar="METHOD[:KEY=VALUE...]",
    help="none, linear (position interpolation), ntk, dynamic, yarn, llama3 or abf, with the "
    "method's own options, e.g. abf:new_base=500000 or yarn:beta_fast=16. `none` only "
    "lengthens the block: the one method for variants without RoPE (ALiBi, NoPE, ...).",
)
@click.option(
    "--scale-factor",
    default="auto",
    show_default=True,
    help="The stretch s >= 1 written into the scaling; auto = new block size / old.",
)
@click.option(
    "--steps",
    default=100,
    show_default=True,
    type=click.IntRange(min=1),
    help="Fine-tuning steps at the new block size (train.max_steps of the new run).",
)
@set_option
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="The new run's directory (default: beside RUN_DIR, RUN_DIR-extend-METHOD-BLOCK).",
)
@click.option("--resume", is_flag=True, help="Continue an interrupted extension in its directory.")
@plugin_option
@trust_plugins_option
@quiet_option
@threads_option
def extend_command(
    run_dir: Path,
    block_size: str,
    scaling: str,
    scale_factor: str,
    steps: int,
    overrides: tuple[str, ...],
    out_dir: Path | None,
    resume: bool,
    plugin_modules: tuple[str, ...],
    trust_plugins: bool,
    quiet: bool,
) -> None:
    """Continue RUN_DIR's best checkpoint at a longer block size with a RoPE scaling.

    The new run is an ordinary run directory (checkpoints, metrics, summary, resume)
    whose config.yaml holds the new block size, the scaling in model.att_options and
    init.from_run / init.method naming the parent and the method. It trains on the
    parent's token files, or on the documents a --set data.... names (long ones, say),
    always read with the parent's tokenizer; RUN_DIR itself is only read. Evaluate it
    with `ropelm-exp eval` like any run (1x is then the new block size).

    \b
    Examples:
      ropelm-exp extend runs/quickstart --block-size 4x --scaling yarn --steps 200
      ropelm-exp extend runs/quickstart --block-size 512 --scaling abf:new_base=500000
      ropelm-exp extend runs/alibi --block-size 4x          # no RoPE: block size alone
      ropelm-exp extend runs/passkey --block-size 4x --set data.passkey_filler_words=200
      ropelm-exp eval runs/quickstart-extend-yarn-512 --lengths 1x,2x,4x
    """
    from ropelm.extend import ExtensionMethod, default_extension_dir, plan_extension
    from ropelm.pipeline import train_only

    experiment = plan_extension(
        run_dir,
        ExtensionMethod.parse(scaling),
        block_size=block_size,
        scale_factor=_scale_factor(scale_factor),
        steps=steps,
        overrides=overrides,
        trust_plugins=trust_plugins,
        plugins=plugin_modules,
    )
    target = out_dir or default_extension_dir(run_dir, experiment)
    if not quiet:
        click.echo(f"Extending {run_dir} into {target}", err=True)
    summary = train_only(
        experiment,
        out_dir=target,
        resume=resume,
        progress=not quiet,
        experiment_file=str(run_dir / "config.yaml"),
    )
    print_summary(summary)
