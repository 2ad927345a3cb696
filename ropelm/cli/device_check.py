"""``ropelm-exp device-check``: conformance, training speed, bench and quickstart on a GPU."""

from __future__ import annotations

import os
from pathlib import Path

import click

from ropelm.cli.app import main


@main.command("device-check")
@click.option(
    "--device", default="auto", show_default=True,
    help="auto or cuda[:N] (the GPU to check); cpu only together with --smoke.",
)  # fmt: skip
@click.option(
    "--nanogpt",
    type=click.Path(dir_okay=False, path_type=Path),
    envvar="ROPELM_NANOGPT",
    help="nanoGPT's model.py (a local copy of karpathy/nanoGPT) to time beside ropelm's step; "
    "default: $ROPELM_NANOGPT. Without it the peer comparison is skipped.",
)
@click.option(
    "--experiments",
    type=click.Path(file_okay=False, exists=True, path_type=Path),
    default=Path("experiments"),
    show_default=True,
    help="Folder holding rope_base.yaml (the model timed) and quickstart.yaml (run end to end).",
)
@click.option(
    "--smoke", is_flag=True,
    help="Toy sizes: try the whole check in a minute (on the CPU too); no figures to report.",
)  # fmt: skip
@click.option(
    "--parts",
    default="conformance,training,bench,quickstart",
    show_default=True,
    metavar="PART,...",
    help="The parts to run, in this order (e.g. bench alone to measure again).",
)
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("device-check"),
    show_default=True,
    help="Folder for device_check.json and the readable device_check.md.",
)
def device_check_command(
    device: str, nanogpt: Path | None, experiments: Path, smoke: bool, parts: str, out_dir: Path
) -> None:
    """Check and measure ropelm on one GPU, in about eight minutes.

    \b
    1. conformance: every check of every variant, the bf16 CUDA ones included;
    2. training: tokens/s and MFU of rope_base's model (12x12x768, T=1024) trained
       by the engine's own step (bf16, compile, fused AdamW) at the largest
       micro-batch that fits, beside nanoGPT's model.py when --nanogpt is given;
    3. bench: every variant at T=1024 and 4096;
    4. quickstart: experiments/quickstart.yaml trained and evaluated on the GPU.

    A part that fails is recorded and the others still run. On a machine without
    CUDA the command says so and exits 0, so scripts can call it anywhere.

    \b
    Examples:
      ropelm-exp device-check --nanogpt ~/nanoGPT/model.py --out results/h200
      ropelm-exp device-check --device cpu --smoke      # the code path, on the CPU
    """
    import torch

    from ropelm.device_check import NO_CUDA, PARTS, CheckPlan, run_device_check
    from ropelm.distributed import resolve_device
    from ropelm.errors import ConfigError

    if device == "auto" and not torch.cuda.is_available():
        click.echo(NO_CUDA)
        return
    torch_device = resolve_device(device)
    if torch_device.type != "cuda" and not smoke:
        raise ConfigError(
            f"--device {device}: the device check measures a GPU; add --smoke to run its code "
            "path at toy sizes on the CPU."
        )
    plan = CheckPlan.smoke(experiments, out_dir / "cache") if smoke else CheckPlan.full(experiments)
    chosen = tuple(part.strip() for part in parts.split(",") if part.strip())
    unknown = sorted(set(chosen) - set(PARTS))
    if unknown or not chosen:
        raise ConfigError(f"--parts {parts}: choose among {', '.join(PARTS)} (comma-separated).")
    if nanogpt is not None and not os.path.isfile(nanogpt):
        raise ConfigError(f"--nanogpt {nanogpt}: no such file (give nanoGPT's model.py).")
    run_device_check(
        plan, torch_device, out_dir, nanogpt=nanogpt, parts=chosen,
        log=lambda m: click.echo(m, err=True),
    )  # fmt: skip
    click.echo((out_dir / "device_check.md").read_text(), nl=False)
    click.echo(f"written: {out_dir / 'device_check.json'}")
