"""``ropelm-exp eval``: perplexity of a trained run at several lengths -> eval.json."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import click

from ropelm.cli.app import (
    device_option,
    main,
    plugin_option,
    threads_option,
    trust_plugins_option,
    which_option,
)

if TYPE_CHECKING:
    from ropelm.passkey import PasskeySettings


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
@which_option
@device_option
@click.option(
    "--attention-backend",
    type=click.Choice(["auto", "sdpa", "flex", "dense"]),
    help="Kernel for attention (default: the run's model.attention_backend, usually auto).",
)
@trust_plugins_option
@click.option(
    "--data",
    "data_experiment",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="For a transformers directory (exported, or built by transformers with the same "
    "structure): the experiment YAML whose validation split is scored, tokenized with the "
    "model's own tokenizer.",
)
@plugin_option
@threads_option
@click.option(
    "--passkey",
    is_flag=True,
    help="Test passkey retrieval instead of perplexity: a 5-digit key hidden at each --depths "
    "in filler text of each length, greedily decoded (result under 'passkey' in eval.json).",
)
@click.option(
    "--depths",
    metavar="D1,D2,...",
    help="With --passkey: where the key sits, as fractions of the filler before it "
    "(0 = first, 1 = just before the question). Default: 0,0.25,0.5,0.75,1.",
)
@click.option(
    "--trials",
    type=int,
    help="With --passkey: prompts (keys) per length and depth. Default: 50.",
)
@click.option(
    "--seed",
    type=int,
    help="With --passkey: seed of the random keys (the same keys at every cell). Default: 0.",
)
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
    attention_backend: str | None,
    trust_plugins: bool,
    plugin_modules: tuple[str, ...],
    data_experiment: Path | None,
    passkey: bool,
    depths: str | None,
    trials: int | None,
    seed: int | None,
    out_file: Path | None,
) -> None:
    """Validation perplexity of a run at several lengths (length extrapolation).

    Each length is scored with non-overlapping windows (every token of a window
    scored) and with strided windows (windows moved by --stride, scoring only
    tokens not scored before, so each has at least L - stride tokens of context).
    Variants that cannot run beyond their block size (e.g. Learned-APE) get n/a.
    The result is written atomically to RUN_DIR/eval.json and printed.

    With --passkey, the run is tested on passkey retrieval instead (Mohtashami &
    Jaggi 2023): each prompt is exactly L - 10 tokens of filler text with "The
    pass key is NNNNN. Remember it. NNNNN is the pass key." at a depth of the
    filler and the question "What is the pass key? The pass key is" at the end;
    the model greedily writes 10 tokens, and a trial succeeds when their first run
    of digits is the key. The accuracy per length and depth goes under "passkey"
    in the same eval.json, next to the perplexity results of the same checkpoint.

    \b
    Examples:
      ropelm-exp eval runs/quickstart --lengths 1x,2x,4x,8x
      ropelm-exp eval runs/quickstart --lengths 4x --att-option scaling=yarn \\
          --att-option scale_factor=4
      ropelm-exp eval runs/quickstart --lengths 1x,2x,4x,8x --att-option scaling=yarn \\
          --att-option scale_factor=auto
      ropelm-exp eval runs/quickstart --lengths 512,1024 --max-windows 50 --stride 64
      ropelm-exp eval runs/quickstart --lengths 1x,2x,4x,8x --max-tokens 131072
      ropelm-exp eval runs/quickstart --passkey --lengths 1x,2x,4x,8x
      ropelm-exp eval runs/quickstart --passkey --lengths 2x --depths 0,0.5,1 --trials 20
    """
    from ropelm.checkpoint import checkpoint_registry
    from ropelm.config import load_experiment
    from ropelm.eval_run import evaluate_run, format_eval_table, run_root
    from ropelm.perplexity import METHODS
    from ropelm.variants import parse_att_options

    overrides = parse_att_options(att_options)
    settings = _passkey_settings(passkey, depths, trials, seed, max_windows, max_tokens, methods)
    run_root(run_dir)  # a directory that is not a run: one sentence before anything loads
    report = evaluate_run(
        run_dir,
        checkpoint_registry(run_dir, which, trust_plugins=trust_plugins, plugins=plugin_modules),
        lengths=list(lengths) or None,
        att_options=overrides,
        max_windows=max_windows,
        max_tokens=max_tokens,
        stride=stride,
        batch_size=batch_size,
        methods=list(methods) or METHODS,
        which=which,
        device=device,
        attention_backend=attention_backend,
        out=out_file,
        passkey=settings,
        progress=settings is not None,
        data=load_experiment(data_experiment) if data_experiment is not None else None,
    )
    if settings is not None:
        from ropelm.passkey_report import format_passkey_table

        click.echo(format_passkey_table(report["passkey"], title=report["att_type"]))
    else:
        click.echo(format_eval_table(report))
    click.echo(f"written: {report['path']}")


def _passkey_settings(
    passkey: bool,
    depths: str | None,
    trials: int | None,
    seed: int | None,
    max_windows: int | None,
    max_tokens: int | None,
    methods: tuple[str, ...],
) -> PasskeySettings | None:
    """The passkey test's settings (None without --passkey); options of the other test: one
    sentence."""
    from ropelm.errors import ConfigError
    from ropelm.passkey import DEFAULT_DEPTHS, DEFAULT_TRIALS, PasskeySettings, parse_depths

    if not passkey:
        given = [name for name, v in (("--depths", depths), ("--trials", trials),
                                      ("--seed", seed)) if v is not None]  # fmt: skip
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --passkey; add --passkey.")
        return None
    given = [name for name, v in (("--max-windows", max_windows), ("--max-tokens", max_tokens),
                                  ("--method", methods or None)) if v is not None]  # fmt: skip
    if given:
        raise ConfigError(f"{', '.join(given)} only apply to perplexity, not to --passkey.")
    return PasskeySettings(
        depths=parse_depths(depths) if depths is not None else DEFAULT_DEPTHS,
        trials=trials if trials is not None else DEFAULT_TRIALS,
        seed=seed if seed is not None else 0,
    )
