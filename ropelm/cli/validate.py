"""``ropelm-exp validate``: check an experiment without running it."""

from __future__ import annotations

from pathlib import Path

import click

from ropelm.cli.app import experiment_argument, main, set_option
from ropelm.config import to_yaml
from ropelm.errors import ConfigError
from ropelm.experiment import Experiment
from ropelm.tokenizer import check_vocab_size


def check_forward(experiment: Experiment) -> None:
    """One layer of the model on 8 tokens (CPU, float32): a ConfigError naming the variant
    when its module fails or returns another shape."""
    import torch

    from ropelm.model import TransformerLM

    model_config = experiment.config.model.model_copy(update={"n_layer": 1})
    tokens = torch.zeros(1, min(8, model_config.block_size), dtype=torch.long)
    attention = experiment.attention
    try:
        logits, _ = TransformerLM(model_config, attention).eval()(tokens)
    except Exception as err:  # the plugin's code: any failure is reported, in one sentence
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise ConfigError(
            f"Attention '{attention.name}' ({attention.source}) fails a forward pass on "
            f"{tokens.size(1)} tokens ({type(err).__name__}: {first_line}); fix the plugin."
        ) from None
    expected = (1, tokens.size(1), model_config.vocab_size)
    if tuple(logits.shape) != expected:
        raise ConfigError(
            f"Attention '{attention.name}' ({attention.source}) gives logits of shape "
            f"{tuple(logits.shape)} instead of {expected}; its module must map (B, T, C) to "
            "(B, T, C)."
        )


@main.command("validate")
@experiment_argument
@set_option
@click.option("--show", is_flag=True, help="Print the resolved configuration as YAML.")
def validate_command(experiment: Path, overrides: tuple[str, ...], show: bool) -> None:
    """Check an experiment YAML without running anything.

    Unknown keys, wrong types, impossible values, unknown attention types and
    bad attention options are reported with the dotted path of the key: the
    same checks `run` makes before it trains anything; then a forward pass of a
    one-layer model of the experiment's shape on a few tokens, so a plugin whose
    module returns the wrong shape fails here, not at the first training step.
    """
    bound = Experiment.load(experiment, overrides)
    config = bound.config
    check_vocab_size(config.model.vocab_size)
    check_forward(bound)
    if show:
        click.echo(to_yaml(config), nl=False)
    else:
        click.echo(f"{experiment}: OK (att_type {config.model.att_type}, name '{config.name}')")
