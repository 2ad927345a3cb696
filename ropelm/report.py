"""``ropelm-exp compare``: comparison tables of finished runs, mean ± std over seeds.

Runs are grouped by variant (``att_type`` plus its ``att_options``); every group
gets one row with the mean ± sample standard deviation (n - 1) over its seeds
(a single seed shows the value alone). Three tables:

* ``summary`` -- seeds, parameters, validation perplexity (the final evaluation
  of the best checkpoint, ``summary.json``), training tokens/s, and, from a bench
  JSON (``ropelm-exp bench``), forward+backward tokens/s and peak memory at one
  sequence length;
* ``nonoverlapping`` and ``strided`` -- perplexity at each evaluation length
  (from ``eval.json``; one extra row per set of evaluation-time ``att_options``,
  e.g. ``RoPE-SM [eval scaling=yarn, scale_factor=4]``).

Formats: ``github`` and ``latex`` (cells "12.34 ± 0.56") via tabulate, and
``csv`` with separate ``_mean``/``_std`` columns for machines. Plots live in
:mod:`ropelm.plots`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from tabulate import tabulate

from ropelm.errors import ConfigError
from ropelm.passkey_report import passkey_table, save_passkey_plots
from ropelm.perplexity import METHODS
from ropelm.runs import RunDir
from ropelm.variants import VariantChoice

FORMATS = ("github", "latex", "csv")
NOT_RUN = "–"  # a length a run was not evaluated at (n/a: evaluated, could not run)


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation of one quantity over seeds."""

    mean: float
    std: float | None  # None for a single value
    n: int

    @classmethod
    def of(cls, values: Iterable[float]) -> Stat | None:
        """The statistic of the finite values, or None when there are none."""
        finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
        if not finite:
            return None
        std = statistics.stdev(finite) if len(finite) > 1 else None
        return cls(statistics.fmean(finite), std, len(finite))

    def format(self, digits: int = 2, *, latex: bool = False, thousands: bool = False) -> str:
        """``"12.34"`` for one value, ``"12.34 ± 0.56"`` for several (LaTeX: ``$\\pm$``)."""
        spec = f",.{digits}f" if thousands else f".{digits}f"
        text = format(self.mean, spec)
        if self.std is not None:
            pm = " $\\pm$ " if latex else " ± "
            text += pm + format(self.std, spec)
        return text


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


def group_runs(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """Variant label -> its runs (one per seed), in order of first appearance."""
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.label, []).append(record)
    return groups


@dataclass
class Table:
    """A table whose numeric cells are :class:`Stat` (or None for n/a, or plain text)."""

    name: str
    title: str
    headers: list[str]
    rows: list[list[Any]]
    digits: list[int]  # decimals per column (for Stat cells)
    thousands: list[bool]

    def render(self, tablefmt: str) -> str:
        """The table as ``github``, ``latex`` or ``csv`` text."""
        if tablefmt == "csv":
            return self._csv()
        latex = tablefmt == "latex"
        body = []
        for row in self.rows:
            cells = []
            for cell, digits, thousands in zip(row, self.digits, self.thousands, strict=True):
                if isinstance(cell, Stat):
                    text = cell.format(digits, latex=latex, thousands=thousands)
                else:
                    text = "n/a" if cell is None else str(cell)
                    text = _latex_escape(text) if latex else text
                cells.append(text)
            body.append(cells)
        headers = [_latex_escape(h) for h in self.headers] if latex else self.headers
        fmt = "latex_raw" if latex else tablefmt
        return tabulate(body, headers=headers, tablefmt=fmt, disable_numparse=True)

    def _csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        header: list[str] = []
        stat_columns = [
            any(isinstance(r[i], Stat) for r in self.rows) for i in range(len(self.headers))
        ]
        for name, is_stat in zip(self.headers, stat_columns, strict=True):
            key = _csv_key(name)
            header += [f"{key}_mean", f"{key}_std"] if is_stat else [key]
        writer.writerow(header)
        for row in self.rows:
            line: list[Any] = []
            for cell, is_stat in zip(row, stat_columns, strict=True):
                if is_stat:
                    if isinstance(cell, Stat):
                        line += [repr(cell.mean), "" if cell.std is None else repr(cell.std)]
                    else:  # n/a, not run, or a number shown as text (identical over seeds)
                        line += ["" if cell in (None, NOT_RUN) else cell, ""]
                else:
                    line.append("" if cell is None else cell)
            writer.writerow(line)
        return out.getvalue().rstrip("\n")


def _csv_key(header: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in header.lower())
    return "_".join(part for part in cleaned.split("_") if part)


def _latex_escape(text: str) -> str:
    for char, escaped in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"), ("&", r"\&"),
                          ("#", r"\#"), ("$", r"\$"), ("{", r"\{"), ("}", r"\}")):  # fmt: skip
        text = text.replace(char, escaped)
    return text


def _bench_lookup(
    benches: Sequence[dict[str, Any]],
) -> dict[tuple[VariantChoice, int], dict[str, Any]]:
    """(variant, T) -> the bench result (the first device listed wins)."""
    table: dict[tuple[VariantChoice, int], dict[str, Any]] = {}
    for bench in benches:
        for row in bench.get("results", []):
            choice = VariantChoice.of(row["att_type"], row.get("att_options"))
            table.setdefault((choice, int(row["T"])), row)
    return table


def _params_cell(counts: list[int]) -> str | Stat | None:
    """Millions of parameters: one number when every seed has the same (the usual case)."""
    if len(set(counts)) == 1:
        return f"{counts[0] / 1e6:.3f}"
    return Stat.of(c / 1e6 for c in counts)


def summary_table(
    groups: dict[str, list[RunRecord]],
    benches: Sequence[dict[str, Any]] = (),
    bench_length: int | None = None,
) -> Table:
    """Seeds, parameters, validation perplexity, tokens/s and (from bench) memory per variant."""
    lookup = _bench_lookup(benches)
    lengths = sorted({t for _, t in lookup})
    if bench_length is None and lengths:
        block_sizes = [r.block_size for runs in groups.values() for r in runs]
        bench_length = next((b for b in block_sizes if b in lengths), lengths[-1])
    headers = ["variant", "seeds", "params (M)", "val ppl", "train tokens/s"]
    digits, thousands = [0, 0, 3, 2, 0], [False, False, False, False, True]
    if lookup:
        headers += [f"fwd+bwd tokens/s @T={bench_length}", f"peak MB @T={bench_length}"]
        digits += [0, 1]
        thousands += [True, False]
    rows = []
    for label, runs in groups.items():
        row: list[Any] = [
            label,
            len(runs),
            _params_cell([r.summary["n_params"] for r in runs]),
            Stat.of(r.summary.get("final_val_ppl") for r in runs),
            Stat.of(r.summary.get("train_tokens_per_s") for r in runs),
        ]
        if lookup:
            bench = lookup.get((runs[0].choice, bench_length)) or {}
            row.append(Stat.of([bench.get("fwd_bwd_tokens_per_s")]))
            row.append(Stat.of([bench.get("fwd_bwd_peak_mb")]))
        rows.append(row)
    return Table("summary", "Summary", headers, rows, digits, thousands)


def length_table(groups: dict[str, list[RunRecord]], method: str) -> Table:
    """Perplexity per evaluation length with ``method``; one row per variant x eval options."""
    specs: dict[int, set[str]] = {}  # length in tokens -> the specs that named it (1x, 2x, ...)
    row_keys: list[tuple[str, str]] = []
    for label, runs in groups.items():
        for run in runs:
            for eval_label, report in run.evals.items():
                if (label, eval_label) not in row_keys:
                    row_keys.append((label, eval_label))
                for spec, entry in report["results"].items():
                    specs.setdefault(entry["length"], set()).add(spec)
    order = sorted(specs)  # columns by length in tokens: runs of other block sizes line up
    one_block = len({r.block_size for runs in groups.values() for r in runs}) == 1
    headers = [
        "variant",
        "seeds",
        *(_length_header(specs[length], length, one_block) for length in order),
    ]
    rows = []
    for label, eval_label in row_keys:
        name = f"{label} [eval {eval_label}]" if eval_label else label
        seeds = sum(eval_label in r.evals for r in groups[label])
        row: list[Any] = [name, seeds]
        for length in order:
            values, missing = [], False
            for run in (r for r in groups[label] if eval_label in r.evals):  # seeds evaluated
                entry = _result_at(run.evals[eval_label], length)
                if entry is None:
                    continue  # this evaluation did not include the length
                cell = entry.get(method)
                if cell is None or "ppl" not in cell:
                    missing = True
                else:
                    values.append(cell["ppl"])
            if not values and not missing:
                row.append(NOT_RUN)  # no run was evaluated at this length
            else:
                row.append(None if missing else Stat.of(values))
        rows.append(row)
    n = len(headers)
    title = f"Perplexity at each evaluation length ({method} windows)"
    return Table(method, title, headers, rows, [2] * n, [False] * n)


def _length_header(specs: set[str], length: int, one_block: bool) -> str:
    """``1x (128)`` when all runs share a block size and name the length alike, else ``T=512``."""
    return f"{next(iter(specs))} ({length})" if one_block and len(specs) == 1 else f"T={length}"


def _result_at(report: dict[str, Any], length: int) -> dict[str, Any] | None:
    """The result of an eval report at ``length`` tokens, whatever spec named it."""
    for entry in report.get("results", {}).values():
        if entry.get("length") == length:
            return entry
    return None


@dataclass
class Comparison:
    """The tables of a comparison and their rendering in one format."""

    records: list[RunRecord]
    tables: list[Table]
    tablefmt: str

    @property
    def text(self) -> str:
        parts = []
        for table in self.tables:
            if table.rows and len(table.headers) > 1:
                parts.append(f"{table.title}\n\n{table.render(self.tablefmt)}")
        return "\n\n".join(parts)


def read_bench(path: str | Path) -> dict[str, Any]:
    try:
        bench = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(f"Cannot read bench file {path} ({err}).") from None
    if not isinstance(bench, dict) or "results" not in bench:
        raise ConfigError(f"{path} is not a bench JSON written by `ropelm-exp bench`.")
    return bench


def compare(
    paths: Iterable[str | Path],
    *,
    bench: Iterable[str | Path] = (),
    tablefmt: str = "github",
    bench_length: int | None = None,
) -> Comparison:
    """Load the runs under ``paths`` (and bench JSONs) and build the comparison tables."""
    if tablefmt not in FORMATS:
        raise ConfigError(f"Unknown table format '{tablefmt}'; use one of {', '.join(FORMATS)}.")
    records = [load_run(p) for p in find_runs(paths)]
    groups = group_runs(records)
    benches = [read_bench(b) for b in bench]
    tables = [summary_table(groups, benches, bench_length)]
    tables += [length_table(groups, method) for method in METHODS]
    if any(record.passkeys for record in records):  # runs evaluated with `eval --passkey`
        tables.append(passkey_table(records))
    return Comparison(records, tables, tablefmt)


def write_outputs(
    comparison: Comparison, out: Path, benches: Sequence[dict[str, Any]] = ()
) -> list[Path]:
    """Write every table in every format, and the plots, into ``out``; return the paths."""
    from ropelm.atomic import atomic_write_text
    from ropelm.plots import save_plots

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt, suffix in (("github", "md"), ("latex", "tex")):
        text = "\n\n".join(
            f"{t.title}\n\n{t.render(fmt)}" if fmt == "github" else f"% {t.title}\n{t.render(fmt)}"
            for t in comparison.tables
            if t.rows and len(t.headers) > 1
        )
        path = out / f"comparison.{suffix}"
        atomic_write_text(path, text + "\n")
        written.append(path)
    for table in comparison.tables:
        if table.rows and len(table.headers) > 1:
            path = out / f"{table.name}.csv"
            atomic_write_text(path, table.render("csv") + "\n")
            written.append(path)
    written += save_plots(comparison.records, benches, out)
    written += save_passkey_plots(comparison.records, out)
    return written
