"""``ropelm-exp eval``: perplexity of a trained run at several lengths, saved to eval.json.

:func:`evaluate_run` loads a run's checkpoint (optionally with other
``att_options``, e.g. RoPE context-extension scaling switched on), evaluates it
on the run's validation split at each requested length with both methods of
:func:`ropelm.evaluate.length_perplexity`, and writes the result atomically as
JSON. A variant that declares ``capabilities.extrapolates = False`` (e.g.
Learned-APE) gets ``"n/a"`` with the reason for lengths beyond its block size,
instead of an error.

``eval.json`` (``eval-<options>.json`` when att_options were overridden)::

    {"run_dir": ..., "checkpoint": ..., "step": 300, "att_type": "RoPE-SM",
     "att_options": {...effective...}, "att_option_overrides": {...},
     "block_size": 128, "max_windows": null, "max_tokens": null, "stride": "0.5",
     "batch_tokens": 2048,
     "results": {
        "2x": {"length": 256,
               "nonoverlapping": {"loss": 3.9, "ppl": 49.4, "tokens": 98304, "windows": 384},
               "strided": {"loss": 3.8, "ppl": 44.7, "tokens": 98304, "windows": 767,
                           "stride": 128}},
        "4x": {"length": 512, "nonoverlapping": {"status": "n/a", "reason": "..."}, ...}}}
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from tabulate import tabulate

from ropelm.atomic import atomic_write_json
from ropelm.checkpoint import load_weights, read_model_config, resolve_checkpoint, verify_checkpoint
from ropelm.config import validate
from ropelm.distributed import resolve_device
from ropelm.errors import ConfigError, RopelmError
from ropelm.evaluate import (
    METHODS,
    length_perplexity,
    parse_length,
    parse_stride,
    split_specs,
)
from ropelm.model import TransformerLM
from ropelm.pipeline import cached_stages
from ropelm.recipe import resolve_precision
from ropelm.registry import Registry
from ropelm.runs import RunDir

EVAL_FILE = "eval.json"
NA = "n/a"
AUTO = "auto"


def parse_att_options(items: Iterable[str]) -> dict[str, Any]:
    """``["scaling=yarn", "scale_factor=4"]`` -> ``{"scaling": "yarn", "scale_factor": 4}``.

    Values are read as YAML (numbers, booleans, null); the variant validates them.
    """
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(
                f"--att-option '{item}': write it as KEY=VALUE, e.g. --att-option scaling=yarn."
            )
        try:
            options[key.strip()] = yaml.safe_load(value) if value.strip() else None
        except yaml.YAMLError:
            options[key.strip()] = value
    return options


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


def eval_file_name(overrides: Mapping[str, Any]) -> str:
    """``eval.json``, or ``eval-scaling-yarn_scale_factor-4.json`` for overridden att_options."""
    if not overrides:
        return EVAL_FILE
    parts = [f"{key}-{value}" for key, value in sorted(overrides.items())]
    slug = re.sub(r"[^A-Za-z0-9._-]+", "", "_".join(parts))
    return f"eval-{slug}.json"


def run_root(path: Path) -> Path:
    """The run directory of ``path``: a run directory or one of its checkpoint directories."""
    path = Path(path)
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(
        f"{path} is not a run directory (no config.yaml there or above); give the directory "
        "that `ropelm-exp run` or `sweep` wrote."
    )


def evaluate_run(
    run_dir: str | Path,
    *,
    lengths: Iterable[str] | None = None,
    att_options: Mapping[str, Any] | None = None,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    stride: str = "0.5",
    batch_size: int | None = None,
    methods: Iterable[str] = METHODS,
    which: str = "best",
    device: str = "auto",
    out: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a run at several lengths and write the result as JSON (atomically).

    Args:
        run_dir: a run directory (or a checkpoint directory inside one).
        lengths: e.g. ``["1x", "2x", "2048"]``; default: the run's ``eval.lengths``.
        att_options: overrides of the model's ``att_options`` (same weights);
            ``scale_factor: auto`` is length / block_size at each length.
        max_windows: cap on non-overlapping windows per length (the strided method
            scores the same targets).
        max_tokens: cap on scored targets per length (whole windows); a multiple of
            every length makes all lengths score the same targets.
        stride: strided method's stride, a fraction of the length or tokens.
        batch_size: windows of ``block_size`` tokens per forward pass (default the
            run's eval.batch_size or train.batch_size); longer windows are batched
            to the same number of tokens.
        methods: a subset of :data:`ropelm.evaluate.METHODS`.
        which: ``best`` or ``last`` checkpoint.
        device: ``auto``, ``cpu``, ``cuda``, ...
        out: where to write (default ``RUN_DIR/eval.json`` or ``eval-<options>.json``).

    Returns:
        The dictionary written to the JSON file.
    """
    root = run_root(Path(run_dir))
    checkpoint = resolve_checkpoint(Path(run_dir), which)
    manifest = verify_checkpoint(checkpoint).manifest
    config = validate(RunDir(root).read_config())
    model_config, plugins = read_model_config(checkpoint)
    overrides = dict(att_options or {})
    model_config = model_config.model_copy(
        update={"att_options": {**model_config.att_options, **overrides}}
    )
    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"Unknown evaluation method '{method}'; use {' or '.join(METHODS)}.")
    specs = split_specs(list(lengths) if lengths is not None else config.eval.lengths)
    if not specs:
        raise ConfigError("No evaluation lengths given; pass e.g. --lengths 1x,2x,4x.")
    block_size = model_config.block_size
    parsed = {spec: parse_length(spec, block_size) for spec in specs}
    for spec in specs:
        parse_stride(stride, parsed[spec])  # a bad stride fails before any work

    registry = Registry.default(plugins)
    spec = registry.get(model_config.att_type)
    options_at = {
        label: options_for_length(model_config.att_options, length, block_size)
        for label, length in parsed.items()
    }
    for options in options_at.values():  # bad options fail before any work
        spec.parse_options(options)

    _, data = cached_stages(config, str(root / "config.yaml"))
    torch_device = resolve_device(device)
    loaded: tuple[str, TransformerLM] | None = None

    def model_with(options: dict[str, Any]) -> TransformerLM:
        """The checkpoint's weights in a model built with ``options`` (reused while equal)."""
        nonlocal loaded
        key = json.dumps(options, sort_keys=True)
        if loaded is None or loaded[0] != key:
            model = TransformerLM(
                model_config.model_copy(update={"att_options": options}), registry
            )
            load_weights(model, checkpoint, torch_device)
            loaded = (key, model.to(torch_device).eval())
        return loaded[1]

    amp_dtype = resolve_precision(config.train, torch_device)

    def autocast() -> contextlib.AbstractContextManager:
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(torch_device.type, dtype=amp_dtype)

    window_batch = batch_size or config.eval.batch_size or config.train.batch_size
    batch_tokens = window_batch * block_size
    results: dict[str, Any] = {}
    for label, length in parsed.items():
        entry: dict[str, Any] = {"length": length}
        if AUTO in overrides.values():
            entry["att_options"] = options_at[label]
        for method in methods:
            if length > block_size and not spec.capabilities.extrapolates:
                entry[method] = {
                    "status": NA,
                    "reason": f"{spec.name} does not run beyond its block size of "
                    f"{block_size} tokens (capabilities.extrapolates is False)",
                }
                continue
            step = parse_stride(stride, length) if method == "strided" else length
            try:
                result = length_perplexity(
                    model_with(options_at[label]), data.val, length=length, stride=step,
                    batch_size=max(1, batch_tokens // length), max_windows=max_windows,
                    max_tokens=max_tokens,
                    device=torch_device, autocast=autocast,
                    ignore_index=model_config.pad_token_id,
                )  # fmt: skip
            except RopelmError as err:  # too little data for this length, ...
                entry[method] = {"status": NA, "reason": str(err).rstrip(".")}
                continue
            entry[method] = {
                "loss": result.loss,
                "ppl": result.ppl,
                "tokens": result.tokens,
                "windows": result.windows,
            }
            if method == "strided":
                entry[method]["stride"] = step
        results[label] = entry
    report = {
        "run_dir": str(root),
        "checkpoint": str(checkpoint),
        "step": manifest.get("step"),
        "att_type": model_config.att_type,
        "att_options": dict(model_config.att_options),
        "att_option_overrides": overrides,
        "block_size": block_size,
        "max_windows": max_windows,
        "max_tokens": max_tokens,
        "stride": str(stride),
        "batch_tokens": batch_tokens,
        "device": str(torch_device),
        "results": results,
    }
    target = Path(out) if out is not None else root / eval_file_name(overrides)
    atomic_write_json(target, report)
    report["path"] = str(target)
    return report


def read_eval(path: str | Path) -> dict[str, Any]:
    """Read an eval JSON written by :func:`evaluate_run`."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read evaluation file {path} ({err}).") from None


def format_eval_table(report: Mapping[str, Any], tablefmt: str = "simple") -> str:
    """The evaluation as a table: one row per length, perplexity per method, then n/a reasons."""
    methods = [m for m in METHODS if any(m in e for e in report["results"].values())]
    rows, reasons = [], []
    for label, entry in report["results"].items():
        row: list[Any] = [label, entry["length"]]
        for method in methods:
            cell = entry.get(method)
            if cell is None:
                row.append("")
            elif cell.get("status") == NA:
                row.append(NA)
                if cell["reason"] not in reasons:
                    reasons.append(cell["reason"])
            else:
                row.append(f"{cell['ppl']:.2f}")
        tokens = next((entry[m]["tokens"] for m in methods if "tokens" in entry.get(m, {})), "")
        row.append(f"{tokens:,}" if tokens != "" else "")
        rows.append(row)
    headers = ["length", "window", *(f"ppl {m}" for m in methods), "scored tokens"]
    text = tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)
    options = report.get("att_options") or {}
    title = f"{report['att_type']}" + (
        " (" + ", ".join(f"{k}={v}" for k, v in options.items()) + ")" if options else ""
    )
    lines = [title, text, *(f"n/a: {reason}." for reason in reasons)]
    return "\n".join(lines)
