"""The ``ropelm-exp`` click group, its error handling and the options commands share.

Every command catches :class:`ropelm.RopelmError` and prints its one-sentence
message (``Error: ...``, exit status 1) instead of a traceback.
"""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.errors import RopelmError


class _FriendlyGroup(click.Group):
    """A click group that turns user errors into one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except RopelmError as err:
            raise click.ClickException(str(err)) from None
        except KeyboardInterrupt:  # Ctrl-C outside training (which stops at a checkpoint)
            click.echo(
                "Interrupted: finished caches and checkpoints are kept and unfinished files "
                "are never used; run the same command again to continue.",
                err=True,
            )
            ctx.exit(130)


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


def _set_threads(ctx: click.Context, param: click.Parameter, value: int | None) -> None:
    if value is not None:
        from ropelm.distributed import set_cpu_threads

        set_cpu_threads(value)


threads_option = click.option(
    "--threads",
    type=click.IntRange(min=1),
    expose_value=False,
    callback=_set_threads,
    help="CPU threads for torch (default: train.threads when training, else one per core). "
    "Jobs sharing the cores should split them: N x jobs <= cores.",
)

# The options of the commands that load a trained run's checkpoint (eval, generate, extend).
which_option = click.option(
    "--which",
    type=click.Choice(["best", "last"]),
    default="best",
    show_default=True,
    help="The run's checkpoint to load: best (lowest validation loss) or last.",
)
device_option = click.option(
    "--device",
    default="auto",
    show_default=True,
    help="Where to run: auto (CUDA when present, else the CPU), cpu, cuda, cuda:1, ...",
)
plugin_option = click.option(
    "--plugin",
    "plugin_modules",
    multiple=True,
    metavar="FILE_OR_MODULE",
    help="A plugin module that registers the run's variant (.py file or dotted name; "
    "repeatable): your own copy, imported instead of the one the checkpoint names, so it "
    "needs no --trust-plugins.",
)
trust_plugins_option = click.option(
    "--trust-plugins",
    is_flag=True,
    help="Import the plugin modules the checkpoint names (files or dotted names: code that "
    "runs). Only for runs you trust; built-in and installed plugins need no flag.",
)


def print_summary(summary: dict) -> None:
    """The run's one-line result (by the main process only, under torchrun)."""
    from ropelm.distributed import context_from_env

    if not context_from_env().is_main:
        return
    click.echo(
        f"done: {summary['att_type']}, {summary['n_params']:,} parameters, "
        f"{summary['tokens_seen']:,} tokens, val loss {summary['initial_val_loss']:.4f} -> "
        f"{summary['best_val_loss']:.4f} (best), "
        f"final val ppl {summary['final_val_ppl']:.2f}, "
        f"{summary['train_tokens_per_s']:,.0f} tokens/s"
    )


def show_pipeline_logs() -> None:
    """Print the data pipeline's log lines (text column chosen, cache reused, ...) to stderr."""
    import logging

    logger = logging.getLogger("ropelm")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
