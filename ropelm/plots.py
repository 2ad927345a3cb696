"""Comparison plots (matplotlib, Agg backend: no display needed), written as PNG.

* :func:`plot_val_loss` -- validation loss against training tokens, one line per
  variant (the mean over seeds at each evaluation; a band of ± one std when
  there are several seeds), with each variant's smoothed training loss from
  ``metrics.jsonl`` as a thin line of the same colour (so a run evaluated only
  at its start and end still shows how it trained); a second panel zooms on
  the second half of training, where the curves end up close together;
* :func:`plot_length_ppl` -- perplexity against evaluation length, one panel per
  method (non-overlapping, strided), one line per variant and set of
  evaluation-time options; the training block size is marked;
* :func:`plot_throughput` -- tokens/s against sequence length from bench JSON,
  one panel for the forward pass and one for forward+backward, one line per
  variant (and device).

Every function returns the figure; :func:`save_plots` writes them and closes them.
Lines that carry data have labels; helper lines (the block-size marker, the
training curves, the zoomed copies) have labels starting with ``_``
(matplotlib's convention for "not in the legend"). Counts on the axes read
``500k`` and ``1.2M``; sequence lengths read ``128`` (with ``1x``, ``2x``, ...
of the training block size beneath), never ``2⁷``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

from ropelm.atomic import atomic_path
from ropelm.perplexity import METHODS
from ropelm.run_records import row_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ropelm.report import RunRecord

DPI = 100
METHOD_TITLES = {"nonoverlapping": "non-overlapping windows", "strided": "strided windows"}
LEGEND_FONT = 9  # points: readable at the PNG's size (the axes' own labels are 10)
TRAIN_LINE = {"linewidth": 1.0, "alpha": 0.55}  # the smoothed training loss, under the markers


def _groups(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    from ropelm.report import group_runs

    return group_runs(records)


def human_count(value: float, _pos: object = None) -> str:
    """A count for an axis: ``500000`` -> ``500k``, ``1.5e6`` -> ``1.5M``, ``128`` -> ``128``."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def smooth(values: Sequence[float], span: float | None = None) -> list[float]:
    """Exponential moving average with TensorBoard's debiasing (the first points are not
    pulled towards zero): ``m_k = (1 - a) m_(k-1) + a x_k``, reported as ``m_k / (1 - (1 -
    a)^k)``, with ``a = 2 / (span + 1)``. The default span is a tenth of the points (at
    least one: few points are left as they are)."""
    if span is None:
        span = max(1.0, len(values) / 10)
    alpha, average, smoothed = 2.0 / (span + 1.0), 0.0, []
    for k, value in enumerate(values, start=1):
        average = (1.0 - alpha) * average + alpha * value
        smoothed.append(average / (1.0 - (1.0 - alpha) ** k))
    return smoothed


@dataclass(frozen=True)
class LossCurves:
    """What :func:`plot_val_loss` draws for one variant (x values are training tokens)."""

    label: str
    val_tokens: list[int]
    val_mean: list[float]  # mean over seeds at each evaluation
    val_std: list[float] | None  # population std over seeds (None for one seed)
    train_tokens: list[int]
    train_smoothed: list[float]  # mean over seeds at each logged step, then smoothed


def _mean_by_tokens(runs: Sequence[RunRecord], key: str) -> dict[int, list[float]]:
    values: dict[int, list[float]] = {}
    for run in runs:
        for row in run.metrics:
            value = row.get(key)
            if value is not None and math.isfinite(float(value)):
                values.setdefault(int(row["tokens"]), []).append(float(value))
    return dict(sorted(values.items()))


def loss_curves(records: Sequence[RunRecord]) -> list[LossCurves]:
    """Validation and smoothed training loss of each variant, from the runs' metrics.jsonl."""
    curves = []
    for label, runs in _groups(records).items():
        val = _mean_by_tokens(runs, "val_loss")
        train = _mean_by_tokens(runs, "train_loss")
        curves.append(
            LossCurves(
                label=label,
                val_tokens=list(val),
                val_mean=[statistics.fmean(v) for v in val.values()],
                val_std=[statistics.pstdev(v) for v in val.values()] if len(runs) > 1 else None,
                train_tokens=list(train),
                train_smoothed=smooth([statistics.fmean(v) for v in train.values()]),
            )
        )
    return curves


def zoom_limits(curves: Sequence[LossCurves]) -> tuple[float, float, float, float] | None:
    """(x0, x1, y0, y1) of the second half of training, fitted to the curves there."""
    ends = [max(c.val_tokens + c.train_tokens) for c in curves if c.val_tokens + c.train_tokens]
    if not ends or max(ends) <= 0:
        return None
    x1 = max(ends)
    x0 = x1 / 2
    ys = [y for c in curves for x, y in zip(c.val_tokens, c.val_mean, strict=True) if x >= x0]
    ys += [y for c in curves for x, y in zip(c.train_tokens, c.train_smoothed, strict=True)
           if x >= x0]  # fmt: skip
    if not ys:
        return None
    pad = max(0.05 * (max(ys) - min(ys)), 0.002 * abs(max(ys)), 1e-6)
    return x0 - 0.02 * x1, x1 * 1.02, min(ys) - pad, max(ys) + pad


def _draw_loss_curves(ax: Any, curves: Sequence[LossCurves], colours: dict[str, str]) -> None:
    """Validation means (markers, std band) and smoothed training losses of every variant."""
    first = not colours  # the first panel picks the colours and carries the legend labels
    for c in curves:
        (line,) = ax.plot(
            c.val_tokens, c.val_mean, marker="o", markersize=3, color=colours.get(c.label),
            label=c.label if first else f"_{c.label}",
        )  # fmt: skip
        colour = colours.setdefault(c.label, line.get_color())
        if c.val_std is not None:
            lo = [m - s for m, s in zip(c.val_mean, c.val_std, strict=True)]
            hi = [m + s for m, s in zip(c.val_mean, c.val_std, strict=True)]
            ax.fill_between(c.val_tokens, lo, hi, color=colour, alpha=0.15, linewidth=0)
        ax.plot(c.train_tokens, c.train_smoothed, color=colour, label=f"_train {c.label}",
                **TRAIN_LINE)  # fmt: skip
    ax.xaxis.set_major_formatter(FuncFormatter(human_count))
    ax.set_xlabel("training tokens")
    ax.grid(alpha=0.3)


def plot_val_loss(records: Sequence[RunRecord]) -> Figure:
    """Loss against tokens seen: validation (markers, mean over seeds) and smoothed training
    loss (thin line, same colour) per variant; the whole run, and the second half zoomed."""
    curves = loss_curves(records)
    fig, (whole, zoom) = plt.subplots(1, 2, figsize=(12, 4.5), dpi=DPI)
    colours: dict[str, str] = {}
    _draw_loss_curves(whole, curves, colours)
    _draw_loss_curves(zoom, curves, colours)
    limits = zoom_limits(curves)
    if limits is not None:
        zoom.set_xlim(limits[0], limits[1])
        zoom.set_ylim(limits[2], limits[3])
    whole.set_ylabel("loss")
    whole.set_title("whole run")
    zoom.set_title("second half of training (zoomed)")
    handles, _ = whole.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="grey", marker="o", markersize=3, label="validation (mean)"),
        Line2D([], [], color="grey", label="training (smoothed)", **TRAIN_LINE),
    ]
    zoom.legend(handles=handles, fontsize=LEGEND_FONT, loc="upper left",
                bbox_to_anchor=(1.02, 1.0))  # fmt: skip
    fig.suptitle("Loss during training", fontsize=11)
    fig.tight_layout()
    return fig


def _length_axis(ax: Any, lengths: Sequence[int], block_sizes: set[int]) -> None:
    """Ticks at the lengths shown, as ``128`` (and ``1x`` beneath with one block size)."""
    block = next(iter(block_sizes)) if len(block_sizes) == 1 else None

    def label(value: float, _pos: object = None) -> str:
        text = f"{value:.0f}"
        return f"{text}\n{value / block:g}x" if block else text

    ax.xaxis.set_major_locator(FixedLocator(sorted(set(lengths))))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(label))


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
            name = row_name(label, eval_label)
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
        _length_axis(ax, [x for _, _, xs, _ in per_method[method] for x in xs], block_sizes)
        if top is not None:
            ax.set_ylim(0.95 * min(finite), top)
        ax.set_xlabel("evaluation length (tokens)")
        ax.set_title(METHOD_TITLES.get(method, method))
        ax.grid(alpha=0.3, which="both")
    axes[0].set_ylabel("perplexity")
    axes[-1].legend(fontsize=LEGEND_FONT, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Length extrapolation (dotted line: training block size)", fontsize=11)
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
        _length_axis(ax, [x for points in series.values() for x in points], set())
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(human_count))
        ax.yaxis.set_minor_formatter(FuncFormatter(human_count))
        ax.set_xlabel("sequence length T (tokens)")
        ax.set_ylabel("tokens/s")
        ax.set_title(title)
        ax.grid(alpha=0.3, which="both")
    axes[-1].legend(fontsize=LEGEND_FONT)
    first = benches[0] if benches else {}
    fig.suptitle(f"Throughput ({first.get('device_name', '')})", fontsize=11)
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
