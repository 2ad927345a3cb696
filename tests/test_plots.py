"""What the comparison plots draw: smoothed training curves from metrics.jsonl, the zoomed
range, readable tick labels and legends (the data handed to matplotlib, not pixels)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from ropelm.plots import (
    human_count,
    loss_curves,
    plot_length_ppl,
    plot_throughput,
    plot_val_loss,
    smooth,
    zoom_limits,
)
from ropelm.report import load_run

INITIAL = 10.4  # the untrained model's validation loss (about ln(vocab_size))


def write_run(root: Path, att_type: str, seed: int, train: dict[int, float], val: dict[int, float]):
    """A finished run directory as the engine writes it (tokens = 100 per step)."""
    run = root / f"{att_type}-{seed}"
    run.mkdir(parents=True)
    summary = {"att_type": att_type, "att_options": {}, "n_params": 10}
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"model": {"block_size": 64}, "train": {"seed": seed}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": s, "tokens": 100 * s, "train_loss": v, "lr": 1e-3} for s, v in train.items()]
    rows += [{"step": s, "tokens": 100 * s, "val_loss": v} for s, v in val.items()]
    rows.sort(key=lambda r: r["step"])
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return load_run(run)


def test_smooth_is_a_debiased_exponential_average():
    assert smooth([3.0] * 7, span=4) == pytest.approx([3.0] * 7)  # no pull towards zero
    alpha = 2 / (4 + 1)
    # x = 0, 1, 1, 1, ...: m_k = 1 - (1 - a)^(k - 1), shown as m_k / (1 - (1 - a)^k)
    expected = [(1 - (1 - alpha) ** (k - 1)) / (1 - (1 - alpha) ** k) for k in range(1, 9)]
    assert smooth([0.0] + [1.0] * 7, span=4) == pytest.approx(expected, rel=1e-12)
    few = [5.0, 4.0, 4.5]
    assert smooth(few) == few  # default span: a tenth of the points, at least one
    noisy = [4.0 + (0.5 if i % 2 else -0.5) for i in range(200)]  # 200 points: span 20
    assert max(abs(v - 4.0) for v in smooth(noisy)[50:]) < 0.06


def test_curves_read_training_losses_from_metrics_jsonl(tmp_path):
    """A run evaluated only at its start and end still has a training curve (mean over seeds)."""
    records = [
        write_run(
            tmp_path,
            "RoPE-SM",
            seed,
            {2: 8.0 + seed, 4: 6.0 + seed, 6: 5.0 + seed},
            {0: INITIAL, 6: 5.5 + seed},
        )
        for seed in (0, 1)
    ]
    (curve,) = loss_curves(records)
    assert curve.label == "RoPE-SM"
    assert curve.train_tokens == [200, 400, 600]
    assert curve.train_smoothed == pytest.approx([8.5, 6.5, 5.5])  # 3 points: not smoothed
    assert curve.val_tokens == [0, 600] and curve.val_mean == pytest.approx([INITIAL, 6.0])
    assert curve.val_std == pytest.approx([0.0, 0.5])


def test_the_zoom_leaves_out_the_untrained_loss_and_fits_the_second_half(tmp_path):
    train = {s: 5.0 + 5.0 * math.exp(-s / 10) for s in range(2, 101, 2)}
    records = [
        write_run(tmp_path, "RoPE-SM", 0, train, {0: INITIAL, 50: 5.1, 100: 5.02}),
        write_run(
            tmp_path, "ALiBi", 0, {s: v + 0.03 for s, v in train.items()}, {0: INITIAL, 100: 5.06}
        ),
    ]
    curves = loss_curves(records)
    x0, x1, y0, y1 = zoom_limits(curves)
    assert x0 < 5000 < 10000 < x1 < 10500  # the second half of 10,000 tokens
    finals = [5.02, 5.06]
    assert y0 < min(finals) and max(finals) < y1 < 5.2  # final values far apart, 10.4 off
    fig = plot_val_loss(records)
    whole, zoom = fig.axes
    assert zoom.get_ylim() == pytest.approx((y0, y1))
    assert whole.get_ylim()[1] > INITIAL  # the whole run stays visible in the first panel


def test_each_training_curve_has_its_variants_colour_and_stays_out_of_the_legend(tmp_path):
    records = [
        write_run(tmp_path, name, 0, {2: 6.0, 4: 5.0}, {0: INITIAL, 4: 5.5})
        for name in ("RoPE-SM", "ALiBi", "NoPE")
    ]
    whole = plot_val_loss(records).axes[0]
    lines = {line.get_label(): line for line in whole.get_lines()}
    for name in ("RoPE-SM", "ALiBi", "NoPE"):
        assert lines[f"_train {name}"].get_color() == lines[name].get_color()
        assert lines[f"_train {name}"].get_linewidth() < lines[name].get_linewidth()
    colours = {lines[name].get_color() for name in ("RoPE-SM", "ALiBi", "NoPE")}
    assert len(colours) == 3


def test_legends_are_readable_and_counts_read_like_500k(tmp_path):
    assert [human_count(v) for v in (0, 128, 500_000, 1_500_000, 2.5e9)] == [
        "0",
        "128",
        "500k",
        "1.5M",
        "2.5B",
    ]
    run = write_run(tmp_path, "RoPE-SM", 0, {2: 6.0}, {0: INITIAL, 2: 5.5})
    eval_results = {s: {"length": 64 * m, "nonoverlapping": {"ppl": 10.0 * m}} for s, m in
                    (("1x", 1), ("2x", 2), ("4x", 4))}  # fmt: skip
    run.evals[""] = {"results": eval_results}
    fig = plot_length_ppl([run])
    ax = fig.axes[0]
    ticks = list(ax.get_xticks())
    labels = [ax.xaxis.get_major_formatter()(t) for t in ticks]
    assert ticks == [64, 128, 256] and labels == ["64\n1x", "128\n2x", "256\n4x"]  # not 2⁶
    legend = fig.axes[-1].get_legend()
    assert all(text.get_fontsize() >= 8 for text in legend.get_texts())
    bench = {"results": [{"variant": "RoPE-SM", "device": "cpu", "T": t,
                          "fwd_tokens_per_s": 500_000.0, "fwd_bwd_tokens_per_s": 2e6}
                         for t in (128, 1024)]}  # fmt: skip
    ax = plot_throughput([bench]).axes[0]
    assert ax.yaxis.get_major_formatter()(500_000) == "500k"
    assert [ax.xaxis.get_major_formatter()(t) for t in ax.get_xticks()] == ["128", "1024"]
