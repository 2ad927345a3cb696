"""Comparison plots (matplotlib, Agg backend: no display needed), written as PNG.

* :func:`plot_val_loss` -- validation loss against training tokens, one line per
  variant (the mean over seeds at each evaluation; a band of ± one std when
  there are several seeds);
* :func:`plot_length_ppl` -- perplexity against evaluation length, one panel per
  method (non-overlapping, strided), one line per variant and set of
  evaluation-time options; the training block size is marked;
* :func:`plot_throughput` -- tokens/s against sequence length from bench JSON,
  one panel for the forward pass and one for forward+backward, one line per
  variant (and device).

Every function returns the figure; :func:`save_plots` writes them and closes them.
Lines that carry data have labels; helper lines (the block-size marker) have
labels starting with ``_`` (matplotlib's convention for "not in the legend").
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import FuncFormatter

from ropelm.atomic import atomic_path
from ropelm.perplexity import METHODS

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ropelm.report import RunRecord

DPI = 100
METHOD_TITLES = {"nonoverlapping": "non-overlapping windows", "strided": "strided windows"}


def _groups(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    from ropelm.report import group_runs

    return group_runs(records)


def plot_val_loss(records: Sequence[RunRecord]) -> Figure:
    """Validation loss against tokens seen, one line per variant (mean over seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=DPI)
    for label, runs in _groups(records).items():
        by_tokens: dict[int, list[float]] = {}
        for run in runs:
            for row in run.metrics:
                if "val_loss" in row:
                    by_tokens.setdefault(int(row["tokens"]), []).append(float(row["val_loss"]))
        xs = sorted(by_tokens)
        means = [statistics.fmean(by_tokens[x]) for x in xs]
        (line,) = ax.plot(xs, means, marker="o", markersize=3, label=label)
        if len(runs) > 1:
            stds = [statistics.pstdev(by_tokens[x]) for x in xs]
            lo = [m - s for m, s in zip(means, stds, strict=True)]
            hi = [m + s for m, s in zip(means, stds, strict=True)]
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15, linewidth=0)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss during training")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    return fig


def _length_series(
    records: Sequence[RunRecord], method: str
) -> list[tuple[str, str, list[int], list[float]]]:
    """(name, line style, lengths, mean perplexities) per variant x evaluation options."""
    series = []
    for label, runs in _groups(records).items():
        eval_labels = list(dict.fromkeys(e for r in runs for e in r.evals))
        for eval_label in eval_labels:
            points: dict[int, list[float]] = {}
            for run in runs:
                report = run.evals.get(eval_label)
                for entry in (report or {}).get("results", {}).values():
                    cell = entry.get(method) or {}
                    points.setdefault(int(entry["length"]), []).append(cell.get("ppl", math.nan))
            xs = sorted(points)
            ys = [
                statistics.fmean(points[x]) if all(math.isfinite(v) for v in points[x])
                else math.nan
                for x in xs
            ]  # fmt: skip
            name = f"{label} [eval {eval_label}]" if eval_label else label
            series.append((name, "--" if eval_label else "-", xs, ys))
    return series


def plot_length_ppl(records: Sequence[RunRecord]) -> Figure:
    """Perplexity against evaluation length: one panel per method, one line per row.

    The y axis stops at 1.5 times the median perplexity shown, so one variant that
    fails badly does not flatten the others; such a line is drawn up to the edge
    and its label says "(off scale)".
    """
    fig, axes = plt.subplots(1, len(METHODS), figsize=(11, 4.2), dpi=DPI, sharey=True)
    block_sizes = {r.block_size for r in records if r.block_size}
    per_method = {method: _length_series(records, method) for method in METHODS}
    values = [y for series in per_method.values() for *_, ys in series for y in ys]
    finite = [y for y in values if math.isfinite(y)]
    top = 1.5 * statistics.median(finite) if finite else None
    for ax, method in zip(axes, METHODS, strict=True):
        for name, style, xs, ys in per_method[method]:
            off = top is not None and any(math.isfinite(y) and y > top for y in ys)
            label = f"{name} (off scale)" if off else name
            ax.plot(xs, ys, style, marker="o", markersize=4, label=label)
        for block in sorted(block_sizes):
            ax.axvline(block, color="grey", linestyle=":", linewidth=1, label="_block_size")
        ax.set_xscale("log", base=2)
        if top is not None:
            ax.set_ylim(0.95 * min(finite), top)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_title(METHOD_TITLES.get(method, method))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity")
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Length extrapolation (dotted line: training block size)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_throughput(benches: Sequence[dict[str, Any]]) -> Figure:
    """Tokens/s against sequence length from bench JSONs: forward and forward+backward."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=DPI)
    devices = {row["device"] for bench in benches for row in bench.get("results", [])}
    for ax, key, title in zip(
        axes,
        ("fwd_tokens_per_s", "fwd_bwd_tokens_per_s"),
        ("forward", "forward + backward"),
        strict=True,
    ):
        series: dict[str, dict[int, float]] = {}
        for bench in benches:
            for row in bench.get("results", []):
                name = row["variant"] + (f" ({row['device']})" if len(devices) > 1 else "")
                value = row.get(key)
                series.setdefault(name, {})[int(row["T"])] = (
                    math.nan if value is None else float(value)
                )
        for name, points in series.items():
            xs = sorted(points)
            ax.plot(xs, [points[x] for x in xs], marker="o", markersize=4, label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.yaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:,.0f}"))
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=7)
    first = benches[0] if benches else {}
    fig.suptitle(f"Throughput ({first.get('device_name', '')})", fontsize=10)
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG (atomically) and close it."""
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def save_plots(
    records: Sequence[RunRecord], benches: Sequence[dict[str, Any]], out: Path
) -> list[Path]:
    """Write the plots that the data allows into ``out``; return their paths."""
    out.mkdir(parents=True, exist_ok=True)
    written = [save_figure(plot_val_loss(records), out / "val_loss.png")]
    if any(r.evals for r in records):
        written.append(save_figure(plot_length_ppl(records), out / "ppl_vs_length.png"))
    if benches:
        written.append(save_figure(plot_throughput(benches), out / "tokens_per_s.png"))
    return written
