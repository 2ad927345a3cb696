"""Passkey retrieval results as tables and a heatmap (``eval`` and ``compare`` output).

* :func:`format_passkey_table` -- one evaluation's accuracy, length x depth, as text
  (printed by ``ropelm-exp eval --passkey``);
* :func:`passkey_table` -- the ``compare`` table: one row per variant (and set of
  evaluation-time ``att_options``) and length, one column per depth and the mean over
  depths, each cell the mean ± std over seeds of the accuracy in percent;
* :func:`plot_passkey_heatmap` -- the same means as a length x depth heatmap, one panel
  per row group, written as ``passkey_accuracy.png`` by :func:`save_passkey_plots`.

The numbers come from the ``passkey`` section of ``eval*.json``
(:class:`ropelm.passkey.PasskeyRunner`); :attr:`ropelm.report.RunRecord.passkeys`
holds them by evaluation label.
"""

from __future__ import annotations

import math
import statistics
import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tabulate import tabulate

from ropelm.passkey import NA
from ropelm.run_records import row_name

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from ropelm.report import RunRecord, Table

HEATMAP_FILE = "passkey_accuracy.png"
TITLE_WIDTH = 36  # characters per line of a panel title: long variant labels wrap


def _depth_label(depth: float) -> str:
    return f"{depth:g}"


def format_passkey_table(passkey: Mapping[str, Any], title: str = "") -> str:
    """The accuracy (%) of one evaluation, one row per length, one column per depth."""
    depths = [_depth_label(d) for d in passkey["depths"]]
    rows, reasons = [], []
    for label, entry in passkey["results"].items():
        if entry.get("status") == NA:
            rows.append([label, entry["length"], *[NA] * (len(depths) + 1)])
            reasons += [entry["reason"]] if entry["reason"] not in reasons else []
            continue
        cells = [f"{100 * a:.0f}" for a in entry["accuracy"]]
        rows.append([label, entry["length"], *cells, f"{100 * entry['mean_accuracy']:.1f}"])
    headers = ["length", "tokens", *(f"depth {d}" for d in depths), "mean"]
    head = (
        f"Passkey retrieval accuracy (%), {passkey['trials']} trials per cell, key seed "
        f"{passkey['seed']} (chance {100 * passkey['chance']:.4f} %)"
    )
    text = tabulate(rows, headers=headers, disable_numparse=True)
    return "\n".join([t for t in (title, head) if t] + [text] + [f"n/a: {r}." for r in reasons])


def _rows(records: Sequence[RunRecord]) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """(variant label, eval label) -> the passkey sections of its seeds, in order of appearance."""
    from ropelm.report import group_runs

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for label, runs in group_runs(records).items():
        for run in runs:
            for eval_label, passkey in run.passkeys.items():
                rows.setdefault((label, eval_label), []).append(passkey)
    return rows


def _lengths_and_depths(sections: Sequence[Mapping[str, Any]]) -> tuple[dict[str, int], list]:
    lengths: dict[str, int] = {}
    depths: list[float] = []
    for section in sections:
        for label, entry in section["results"].items():
            lengths.setdefault(label, entry["length"])
        depths += [d for d in section["depths"] if d not in depths]
    order = dict(sorted(lengths.items(), key=lambda item: item[1]))
    return order, sorted(depths)


def _accuracies(
    sections: Sequence[Mapping[str, Any]], length: str, depth: float | None
) -> list[float] | None:
    """Accuracy (%) of each seed at (length, depth) (depth None: mean over depths);
    None when some seed could not run there (n/a)."""
    values = []
    for section in sections:
        entry = section["results"].get(length)
        if entry is None or (depth is not None and depth not in section["depths"]):
            continue  # this seed was not evaluated there
        if entry.get("status") == NA:
            return None
        if depth is None:
            values.append(100 * entry["mean_accuracy"])
        else:
            values.append(100 * entry["accuracy"][section["depths"].index(depth)])
    return values


def passkey_table(records: Sequence[RunRecord]) -> Table:
    """Accuracy (%) per variant x length (rows) and depth (columns), mean ± std over seeds."""
    from ropelm.report import NOT_RUN, Stat, Table

    groups = _rows(records)
    all_sections = [s for sections in groups.values() for s in sections]
    _, depths = _lengths_and_depths(all_sections)
    headers = ["variant", "seeds", "length", *(f"depth {_depth_label(d)}" for d in depths), "mean"]
    rows: list[list[Any]] = []
    for (label, eval_label), sections in groups.items():
        name = row_name(label, eval_label)
        lengths, _ = _lengths_and_depths(sections)
        for length, tokens in lengths.items():
            row: list[Any] = [name, len(sections), f"{length} ({tokens})"]
            for depth in [*depths, None]:
                values = _accuracies(sections, length, depth)
                row.append(None if values is None else Stat.of(values) or NOT_RUN)
            rows.append(row)
    n = len(headers)
    title = "Passkey retrieval accuracy (%) by length and depth of the key"
    return Table("passkey", title, headers, rows, [1] * n, [False] * n)


def heatmap_grid(
    sections: Sequence[Mapping[str, Any]],
) -> tuple[list[str], list[float], list[list[float]]]:
    """Length labels (rows), depths (columns) and the mean accuracy (%) over seeds (nan: n/a
    or not evaluated)."""
    lengths, depths = _lengths_and_depths(sections)
    grid = []
    for length in lengths:
        row = []
        for depth in depths:
            values = _accuracies(sections, length, depth)
            row.append(statistics.fmean(values) if values else math.nan)
        grid.append(row)
    labels = [f"{label} ({tokens})" for label, tokens in lengths.items()]
    return labels, depths, grid


def plot_passkey_heatmap(records: Sequence[RunRecord]) -> Figure:
    """Accuracy heatmaps, length (rows) x depth (columns), one panel per variant row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ropelm.plots import DPI

    groups = _rows(records)
    cols = min(3, len(groups))
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.4 * cols, 3.4 * nrows), dpi=DPI,
                             squeeze=False, layout="constrained")  # fmt: skip
    image = None
    for ax, ((label, eval_label), sections) in zip(axes.flat, groups.items(), strict=False):
        lengths, depths, grid = heatmap_grid(sections)
        image = ax.imshow(grid, vmin=0, vmax=100, cmap="viridis", aspect="auto")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):
                text = NA if math.isnan(value) else f"{value:.0f}"
                color = "white" if math.isnan(value) or value < 60 else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color=color)
        ax.set_xticks(range(len(depths)), [_depth_label(d) for d in depths])
        ax.set_yticks(range(len(lengths)), lengths)
        ax.set_xlabel("depth of the key")
        name = row_name(label, eval_label)
        title = f"{name} ({len(sections)} seed{'s' * (len(sections) > 1)})"
        ax.set_title("\n".join(textwrap.wrap(title, TITLE_WIDTH)), fontsize=8)
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    if image is not None:
        fig.colorbar(image, ax=axes, label="accuracy (%)", shrink=0.8)
    fig.suptitle("Passkey retrieval accuracy (mean over seeds)", fontsize=10)
    return fig


def save_passkey_plots(records: Sequence[RunRecord], out: Path) -> list[Path]:
    """Write the heatmap into ``out`` when some run has passkey results; return the paths."""
    from ropelm.plots import save_figure

    if not any(r.passkeys for r in records):
        return []
    return [save_figure(plot_passkey_heatmap(records), out / HEATMAP_FILE)]
