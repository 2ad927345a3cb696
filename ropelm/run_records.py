"""Finished runs for ``ropelm-exp compare``: find the run directories, load their records.

:func:`find_runs` turns run or sweep folders into run directories (a sweep in the
order of its ``sweep.json``); :func:`load_run` reads one into a :class:`RunRecord`
(summary, metrics, seed, block size and every ``eval*.json``); :func:`group_runs`
gathers the records by variant label. The tables built from them live in
:mod:`ropelm.report`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ropelm.errors import ConfigError
from ropelm.runs import RunDir
from ropelm.variants import VariantChoice


@dataclass
class RunRecord:
    """One finished run: its summary, metrics, evaluations and seed."""

    dir: Path
    summary: dict[str, Any]
    seed: int | None
    block_size: int | None
    metrics: list[dict[str, Any]]
    evals: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval label -> eval JSON
    passkeys: dict[str, dict[str, Any]] = field(default_factory=dict)  # eval label -> passkey
    extension: str | None = None  # init.method of a run made by `ropelm-exp extend`

    @property
    def choice(self) -> VariantChoice:
        """The variant the run trained: its att_type and att_options."""
        return VariantChoice.of(self.summary["att_type"], self.summary.get("att_options"))

    @property
    def label(self) -> str:
        """Variant label: ``RoPE-Sliding:window=32`` (att_type plus its att_options).

        An extended run is named by its parent's variant, the method and the new
        block size: ``RoPE-SM extended (yarn, 512)``.
        """
        if self.extension is None:
            return self.choice.label
        from ropelm.extend import parent_options

        parent = VariantChoice.of(self.summary["att_type"], parent_options(self.choice))
        return f"{parent.label} extended ({self.extension}, {self.block_size})"


def find_runs(paths: Iterable[str | Path]) -> list[Path]:
    """Run directories named by ``paths``: runs themselves, or folders of runs (a sweep).

    Raises:
        ConfigError: a path holds no finished run.
    """
    found: list[Path] = []
    paths = list(map(Path, paths))
    for path in paths:
        if path.is_file() and len(paths) > 1:
            continue  # a shell glob over a sweep picks up sweep.json and comparison.md
        if path.is_file():
            raise ConfigError(f"{path} is a file, not a run directory; give run or sweep folders.")
        if (path / "summary.json").is_file():
            candidates = [path]
        elif path.is_dir():
            candidates = sorted(
                (p for p in path.iterdir() if (p / "summary.json").is_file()),
                key=_sweep_order(path),
            )
        else:
            raise ConfigError(f"{path} does not exist; give run directories or a sweep directory.")
        if not candidates:
            hint = "it has not finished" if (path / "config.yaml").is_file() else "none inside"
            raise ConfigError(
                f"{path} holds no finished run (no summary.json, {hint}); give finished run "
                "directories or the sweep directory that holds them."
            )
        found += [c for c in candidates if c not in found]
    return found


def _sweep_order(sweep_dir: Path) -> Callable[[Path], tuple[int, str]]:
    """Sort key: the order of a sweep's ``sweep.json`` (variants as given), then by name."""
    order: dict[str, int] = {}
    try:
        runs = json.loads((sweep_dir / "sweep.json").read_text(encoding="utf-8"))["runs"]
        order = {run["dir"]: i for i, run in enumerate(runs)}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not a sweep (or an unreadable manifest): alphabetical
    return lambda p: (order.get(p.name, len(order)), p.name)


def load_run(path: Path) -> RunRecord:
    """Read a finished run directory (summary, metrics, seed, every eval*.json)."""
    try:
        summary = json.loads((path / "summary.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read {path / 'summary.json'} ({err}).") from None
    if not isinstance(summary, dict) or not {"att_type", "n_params"} <= set(summary):
        raise ConfigError(f"{path / 'summary.json'} is not the summary of a finished ropelm run.")
    seed = block_size = extension = None
    if (path / "config.yaml").is_file():
        config = yaml.safe_load((path / "config.yaml").read_text()) or {}
        seed = (config.get("train") or {}).get("seed", 0)
        block_size = (config.get("model") or {}).get("block_size")
        extension = (config.get("init") or {}).get("method")
    record = RunRecord(
        path, summary, seed, block_size, RunDir(path).read_metrics(), extension=extension
    )
    # eval.json (the model as trained) first, then the evaluations with other att_options
    for eval_path in sorted(path.glob("eval*.json"), key=lambda p: (p.name != "eval.json", p.name)):
        try:
            report = json.loads(eval_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        overrides = report.get("att_option_overrides") or {}
        label = ", ".join(f"{k}={v}" for k, v in overrides.items())
        if report.get("results"):  # perplexity (a passkey-only evaluation has none)
            record.evals[label] = report
        if report.get("passkey"):  # `eval --passkey` (ropelm.passkey_report)
            record.passkeys[label] = report["passkey"]
    return record


def row_name(label: str, eval_label: str | None) -> str:
    """A table row's or plot panel's name: the variant's label, with the evaluation-time
    option overrides when it has them (``RoPE-SM [eval scaling=yarn, scale_factor=4]``)."""
    return f"{label} [eval {eval_label}]" if eval_label else label


def group_runs(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Variant label -> its runs (one per seed), in order of first appearance."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.label, []).append(record)
    return groups
