"""A run opened for evaluation: its model at each length, and the passkey test on them.

:func:`open_for_eval` does what every evaluation of ``ropelm-exp eval`` starts with:
it reads the checkpoint (or a transformers directory), applies the att_option
overrides and attention backend, resolves the model config at each length
(``scale_factor: auto`` is length / block size), resolves device, precision and
batch size, and builds the report header, every error before any work. The
checkpoint's weights are loaded into one model per set of options
(:class:`ModelCache`); a variant with ``capabilities.extrapolates = False`` gets
n/a with the reason beyond its block size.

:func:`evaluate_passkey` is ``eval --passkey``: :class:`ropelm.passkey.PasskeyRunner`
on those models, which needs no data. The perplexity side, which does, and
``eval.json`` are :mod:`ropelm.eval_run`'s.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from ropelm.attention import ResolvedAttention
from ropelm.checkpoint import (
    TOKENIZER,
    load_weights,
    read_model_config,
    resolve_checkpoint,
    verify_checkpoint,
)
from ropelm.config import ExperimentConfig, ModelConfig, validate
from ropelm.distributed import resolve_device
from ropelm.errors import ConfigError
from ropelm.hf_import import is_hf_dir, read_hf_model
from ropelm.model import TransformerLM
from ropelm.passkey import PasskeyRunner, PasskeySettings, PromptBuilder
from ropelm.perplexity import parse_length, parse_stride, split_specs
from ropelm.recipe import Precision, resolve_precision
from ropelm.registry import Registry
from ropelm.runs import RunDir
from ropelm.tokenizer import load_tokenizer

AUTO = "auto"


def options_for_length(options: Mapping[str, Any], length: int, block_size: int) -> dict[str, Any]:
    """``options`` with ``scale_factor: auto`` replaced by max(1, length / block_size).

    So ``--att-option scaling=yarn --att-option scale_factor=auto`` extends RoPE's
    context by exactly the factor each evaluation length needs (1 at 1x).

    Raises:
        ConfigError: ``auto`` given for an option other than ``scale_factor``.
    """
    resolved = dict(options)
    for key, value in options.items():
        if value == AUTO:
            if key != "scale_factor":
                raise ConfigError(
                    f"--att-option {key}=auto: only scale_factor can be auto (the length over "
                    "the block size); give a value."
                )
            resolved[key] = max(1.0, length / block_size)
    return resolved


@dataclasses.dataclass
class EvalSetup:
    """A run opened for evaluation (perplexity or passkey): what both start from."""

    root: Path
    checkpoint: Path
    config: ExperimentConfig
    model_config: ModelConfig  # with the att_option overrides and attention backend
    header: dict[str, Any]  # what every eval JSON starts with (:func:`_report_header`)
    lengths: dict[str, int]  # label ("2x") -> tokens
    configs_at: dict[str, ModelConfig]  # label -> the model config (scale_factor resolved)
    models: ModelCache
    extrapolates: bool  # the variant runs beyond its block size
    device: torch.device
    precision: Precision
    batch_tokens: int  # tokens per forward pass
    auto_scaled: bool  # an override is ``auto``: each length records its att_options

    def beyond_block(self, length: int) -> str | None:
        """Why ``length`` gets n/a (past the block size of a variant that cannot go there)."""
        if length <= self.model_config.block_size or self.extrapolates:
            return None
        return (
            f"{self.model_config.att_type} does not run beyond its block size of "
            f"{self.model_config.block_size} tokens (capabilities.extrapolates is False)"
        )


def open_for_eval(
    run_dir: Path,
    root: Path,
    registry: Registry,
    overrides: dict[str, Any],
    data: ExperimentConfig | None,
    *,
    lengths: Iterable[str] | None,
    stride: str,
    batch_size: int | None,
    which: str,
    device: str,
    attention_backend: str | None,
) -> EvalSetup:
    """The checkpoint, the model at each length, device, precision and batch size of a run
    (arguments as :func:`ropelm.eval_run.evaluate_run`'s): every error before any work."""
    checkpoint, manifest, config, model_config = _open(run_dir, root, which, data)
    update: dict[str, Any] = {"att_options": {**model_config.att_options, **overrides}}
    if attention_backend is not None:
        update["attention_backend"] = attention_backend
    model_config = model_config.model_copy(update=update)
    specs = split_specs(list(lengths) if lengths is not None else config.eval.lengths)
    parsed, configs_at, resolved = _plan_lengths(model_config, specs, stride, registry)
    torch_device = resolve_device(device)
    window_batch = batch_size or config.eval.batch_size or config.train.batch_size
    return EvalSetup(
        root=root, checkpoint=checkpoint, config=config, model_config=model_config,
        header=_report_header(root, checkpoint, manifest, model_config, overrides),
        lengths=parsed, configs_at=configs_at,
        models=ModelCache(checkpoint, torch_device, resolved),
        extrapolates=next(iter(resolved.values())).spec.capabilities.extrapolates,
        device=torch_device,
        precision=_eval_precision(config.train.precision, torch_device),
        batch_tokens=window_batch * model_config.block_size,
        auto_scaled=AUTO in overrides.values(),
    )  # fmt: skip


def _open(
    run_dir: Path, root: Path, which: str, data: ExperimentConfig | None
) -> tuple[Path, dict[str, Any], ExperimentConfig, ModelConfig]:
    """The directory with the weights, its manifest, the settings and the model to score."""
    if is_hf_dir(run_dir):
        if data is None:
            raise ConfigError(
                f"{run_dir} is a transformers model without ropelm's experiment; name the data "
                "to score with --data EXPERIMENT.yaml."
            )
        return Path(run_dir), {}, data, read_hf_model(run_dir)[0]
    checkpoint = resolve_checkpoint(run_dir, which)
    manifest = verify_checkpoint(checkpoint).manifest
    model_config, _ = read_model_config(checkpoint)
    return checkpoint, manifest, data or validate(RunDir(root).read_config()), model_config


def _report_header(
    root: Path,
    checkpoint: Path,
    manifest: dict[str, Any],
    model_config: ModelConfig,
    overrides: dict[str, Any],
) -> dict[str, Any]:
    """What every eval JSON starts with: which run, checkpoint and model it scored."""
    return {
        "run_dir": str(root),
        "checkpoint": str(checkpoint),
        "step": manifest.get("step"),
        "att_type": model_config.att_type,
        "att_options": dict(model_config.att_options),
        "att_option_overrides": overrides,
        "block_size": model_config.block_size,
    }


def _eval_precision(trained: str, device: torch.device) -> Precision:
    """The run's precision on ``device``; fp16 autocast is CUDA's alone (a GPU run scored
    elsewhere falls back to fp32)."""
    return resolve_precision(
        "fp32" if trained == "fp16" and device.type != "cuda" else trained, device
    )


def _plan_lengths(
    model_config: ModelConfig, specs: list[str], stride: str, registry: Registry
) -> tuple[dict[str, int], dict[str, ModelConfig], dict[str, ResolvedAttention]]:
    """Lengths in tokens, the model config at each (``scale_factor: auto`` resolved) and each
    distinct set of options resolved once: every error before any work."""
    if not specs:
        raise ConfigError("No evaluation lengths given; pass e.g. --lengths 1x,2x,4x.")
    block_size = model_config.block_size
    parsed = {spec: parse_length(spec, block_size) for spec in specs}
    for spec in specs:
        parse_stride(stride, parsed[spec])  # a bad stride fails before any work
    configs_at = {
        label: model_config.model_copy(
            update={"att_options": options_for_length(model_config.att_options, length, block_size)}
        )
        for label, length in parsed.items()
    }
    resolved = {_options_key(c): registry.resolve(c) for c in configs_at.values()}
    return parsed, configs_at, resolved


def _options_key(config: ModelConfig) -> str:
    return json.dumps(config.att_options, sort_keys=True)


class ModelCache:
    """The checkpoint's weights in the model of one set of att_options, kept while it repeats."""

    def __init__(
        self, checkpoint: Path, device: torch.device, resolved: Mapping[str, ResolvedAttention]
    ) -> None:
        self.checkpoint, self.device, self.resolved = checkpoint, device, resolved
        self._key: str | None = None
        self._model: TransformerLM | None = None

    def get(self, config: ModelConfig) -> TransformerLM:
        """The model of ``config`` with the checkpoint's weights, on the device, in eval mode."""
        key = _options_key(config)
        if self._model is None or self._key != key:
            self._model = None  # free the previous model before building the next one
            model = TransformerLM(config, self.resolved[key])
            load_weights(model, self.checkpoint, self.device)
            self._key, self._model = key, model.to(self.device).eval()
        return self._model


def evaluate_passkey(
    opened: EvalSetup, settings: PasskeySettings, *, progress: bool = False
) -> dict[str, Any]:
    """The passkey test at each length -> the report (``results`` empty, the test under
    ``passkey``); ``progress`` shows a progress bar."""
    runner = PasskeyRunner(
        PromptBuilder(load_tokenizer(opened.checkpoint / TOKENIZER)), settings, opened.device,
        opened.precision.autocast, batch_tokens=opened.batch_tokens,
    )  # fmt: skip

    def model_at(label: str) -> TransformerLM | str:
        reason = opened.beyond_block(opened.lengths[label])
        return reason if reason else opened.models.get(opened.configs_at[label])

    section = runner.run(opened.lengths, model_at, progress=progress)
    if opened.auto_scaled:
        for label, entry in section["results"].items():
            entry["att_options"] = opened.configs_at[label].att_options
    return {**opened.header, "device": str(opened.device), "results": {}, "passkey": section}
