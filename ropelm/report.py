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
``csv`` with separate ``_mean``/``_std`` columns for machines. Finding and loading
the runs lives in :mod:`ropelm.run_records` (its names are re-exported here), plots
in :mod:`ropelm.plots`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tabulate import tabulate

from ropelm.errors import ConfigError
from ropelm.passkey_report import passkey_table, save_passkey_plots
from ropelm.perplexity import METHODS
from ropelm.run_records import RunRecord, find_runs, group_runs, load_run, row_name
from ropelm.variants import VariantChoice

__all__ = [
    "FORMATS",
    "NOT_RUN",
    "Comparison",
    "RunRecord",
    "Stat",
    "Table",
    "compare",
    "find_runs",
    "group_runs",
    "length_table",
    "load_run",
    "read_bench",
    "summary_table",
    "write_outputs",
]

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
        name = row_name(label, eval_label)
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
