"""What ``ropelm-exp eval`` does: a trained run's perplexity at several lengths -> eval.json.

:func:`evaluate_run` loads a run's checkpoint (optionally with other
``att_options``, e.g. RoPE context-extension scaling switched on), evaluates it
on the run's validation split at each requested length with both methods of
:func:`ropelm.perplexity.length_perplexity` (the maths), and writes the result
atomically as JSON. A variant that declares ``capabilities.extrapolates = False`` (e.g.
Learned-APE) gets ``"n/a"`` with the reason for lengths beyond its block size,
instead of an error. The run is opened, and tested on passkey retrieval with
``passkey``, by :mod:`ropelm.eval_models`.

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
import dataclasses
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from ropelm.atomic import atomic_write_json, check_writable
from ropelm.checkpoint import TOKENIZER
from ropelm.config import ExperimentConfig, ModelConfig
from ropelm.data import PreparedData, prepare_data
from ropelm.errors import ConfigError, DataError
from ropelm.eval_models import EvalSetup, ModelCache, evaluate_passkey, open_for_eval
from ropelm.hf_import import is_hf_dir
from ropelm.passkey import PasskeySettings
from ropelm.perplexity import METHODS, LengthSpecError, length_perplexity, parse_stride
from ropelm.pipeline import cached_stages
from ropelm.recipe import Precision
from ropelm.registry import Registry
from ropelm.runs import exclusive_writer
from ropelm.tokenizer import tokenizer_info

EVAL_FILE = "eval.json"
NA = "n/a"


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
    if is_hf_dir(path):  # a transformers directory is scored where it is
        return path
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ConfigError(
        f"{path} is not a run directory (no config.yaml there or above); give the directory "
        "that `ropelm-exp run` or `sweep` wrote, or a transformers directory with --data."
    )


def evaluate_run(
    run_dir: str | Path,
    registry: Registry,
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
    attention_backend: str | None = None,
    out: str | Path | None = None,
    passkey: PasskeySettings | None = None,
    progress: bool = False,
    data: ExperimentConfig | None = None,
) -> dict[str, Any]:
    """Evaluate a run at several lengths and write the result as JSON (atomically).

    With ``passkey``, the run is tested on passkey retrieval (:mod:`ropelm.passkey`)
    instead of perplexity, and the result goes under ``"passkey"`` in the same file;
    either evaluation keeps the other's result already in the file when that was made
    from the same checkpoint and step.

    Args:
        run_dir: a run directory (or a checkpoint directory inside one).
        registry: a registry holding the run's attention variant
            (:func:`ropelm.checkpoint.checkpoint_registry` builds one for a run).
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
        methods: a subset of :data:`ropelm.perplexity.METHODS`.
        which: ``best`` or ``last`` checkpoint.
        device: ``auto``, ``cpu``, ``cuda``, ...
        attention_backend: the kernel to run attention on (default: the run's
            ``model.attention_backend``, usually ``auto``); recorded per length.
        out: where to write (default ``RUN_DIR/eval.json`` or ``eval-<options>.json``).
        passkey: depths, trials and seed of the passkey test (None: perplexity).
        data: for a transformers directory (``ropelm-exp export`` or the same structure),
            the experiment whose validation split is scored, tokenized with the model's
            own tokenizer (a run directory uses its own configuration).
        progress: show a progress bar (the passkey test).

    Returns:
        The dictionary written to the JSON file.
    """
    root = run_root(Path(run_dir))
    overrides = dict(att_options or {})
    target = Path(out) if out is not None else root / eval_file_name(overrides)
    check_writable(target)  # before minutes of computing, not after
    into_run = target.resolve().parent == root.resolve()
    with exclusive_writer(root) if into_run else contextlib.nullcontext():
        methods = _methods(methods) if passkey is None else []
        opened = open_for_eval(
            Path(run_dir), root, registry, overrides, data, lengths=lengths,
            stride=stride if passkey is None else "1", batch_size=batch_size, which=which,
            device=device, attention_backend=attention_backend,
        )  # fmt: skip
        if passkey is not None:
            report = evaluate_passkey(opened, passkey, progress=progress)
        else:
            report = _evaluate(
                opened, max_windows=max_windows, max_tokens=max_tokens, stride=stride,
                methods=methods,
            )  # fmt: skip
        report = _keep_other_result(target, report)
        atomic_write_json(target, report)
    report["path"] = str(target)
    return report


def _methods(methods: Iterable[str]) -> list[str]:
    methods = list(methods)
    for method in methods:
        if method not in METHODS:
            raise ConfigError(f"Unknown evaluation method '{method}'; use {' or '.join(METHODS)}.")
    return methods


def _evaluate(
    opened: EvalSetup,
    *,
    max_windows: int | None,
    max_tokens: int | None,
    stride: str,
    methods: Iterable[str],
) -> dict[str, Any]:
    """Perplexity at each length by each method -> the report."""
    config = opened.config
    prepared = _prepared_data(opened.checkpoint, config, opened.root)
    eot_id = prepared.meta["tokenizer"]["eot_id"] if config.train.document_mask else None
    scorer = _Scorer(
        models=opened.models, split=prepared.val, device=opened.device,
        precision=opened.precision, batch_tokens=opened.batch_tokens,
        max_windows=max_windows, max_tokens=max_tokens, stride=stride, eot_id=eot_id,
    )  # fmt: skip
    results: dict[str, Any] = {}
    for label, length in opened.lengths.items():
        entry: dict[str, Any] = {"length": length}
        if opened.auto_scaled:
            entry["att_options"] = opened.configs_at[label].att_options
        for method in methods:
            reason = opened.beyond_block(length)
            entry[method] = (
                {"status": NA, "reason": reason}
                if reason
                else scorer.cell(opened.configs_at[label], length, method)
            )
        results[label] = entry
    return {
        **opened.header,
        "max_windows": max_windows,
        "max_tokens": max_tokens,
        "stride": str(stride),
        "batch_tokens": opened.batch_tokens,
        "document_mask": eot_id is not None,
        "device": str(opened.device),
        "results": results,
    }


def _prepared_data(checkpoint: Path, config: ExperimentConfig, root: Path) -> PreparedData:
    """The run's token files; for a transformers directory, or a run that started from
    another's weights (and kept its tokenizer), the data tokenized with the checkpoint's own
    tokenizer (prepared once, then cached)."""
    if is_hf_dir(checkpoint) or config.init.from_run is not None:
        return prepare_data(config, tokenizer_info(checkpoint / TOKENIZER), progress=False)
    return cached_stages(config, str(root / "config.yaml"))[1]


def _keep_other_result(target: Path, report: dict[str, Any]) -> dict[str, Any]:
    """``report`` plus the other evaluation (perplexity or passkey) already in ``target``,
    when that was made from the same checkpoint, step and att_option overrides."""
    try:
        previous = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return report  # no file yet, or an unreadable one: replaced
    same = ("checkpoint", "step", "att_option_overrides")
    if not isinstance(previous, dict) or any(previous.get(k) != report.get(k) for k in same):
        return report
    if "passkey" in report:  # a passkey test: the perplexity results stay
        return {**previous, "passkey": report["passkey"]}
    return report | ({"passkey": previous["passkey"]} if "passkey" in previous else {})


@dataclasses.dataclass
class _Scorer:
    """Scores one (options, length, method) cell of the evaluation."""

    models: ModelCache
    split: Any
    device: torch.device
    precision: Precision
    batch_tokens: int
    max_windows: int | None
    max_tokens: int | None
    stride: str
    eot_id: int | None

    def cell(self, config: ModelConfig, length: int, method: str) -> dict[str, Any]:
        """The loss, perplexity and counts; n/a only when the data is too short for it."""
        step = parse_stride(self.stride, length) if method == "strided" else length
        model = self.models.get(config)
        try:
            result = length_perplexity(
                model, self.split, length=length, stride=step,
                batch_size=max(1, self.batch_tokens // length), max_windows=self.max_windows,
                max_tokens=self.max_tokens, device=self.device, autocast=self.precision.autocast,
                ignore_index=config.pad_token_id, eot_id=self.eot_id,
            )  # fmt: skip
        except (DataError, LengthSpecError) as err:  # too little data for this length
            return {"status": NA, "reason": str(err).rstrip(".")}
        cell = {
            "loss": result.loss,
            "ppl": result.ppl,
            "tokens": result.tokens,
            "windows": result.windows,
            "backend": model.attention_backend(),
        }
        return cell | ({"stride": step} if method == "strided" else {})


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
