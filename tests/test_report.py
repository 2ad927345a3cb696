"""Comparison tables (github, LaTeX, CSV), mean ± std over seeds, and the PNG plots.

The run directories here are written by hand (summary.json, config.yaml,
metrics.jsonl, eval*.json as the engine, `eval` and `bench` write them), so no
training is needed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import statistics
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ropelm.cli import main
from ropelm.errors import ConfigError
from ropelm.plots import plot_length_ppl, plot_throughput, plot_val_loss, save_plots
from ropelm.report import Stat, compare, find_runs, load_run, write_outputs

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# RoPE-SM: 3 seeds; Learned-APE: 1 seed (n/a beyond the block size); RoPE-SM also has a
# YaRN evaluation of seed 0.
VAL_PPL = {"RoPE-SM": [10.0, 12.0, 14.0], "Learned-APE": [20.0]}
LENGTH_PPL = {"RoPE-SM": {"1x": [9.0, 10.0, 11.0], "2x": [30.0, 33.0, 36.0]},
              "Learned-APE": {"1x": [19.0], "2x": [None]}}  # fmt: skip


def write_run(root: Path, att_type: str, seed: int, index: int, options: dict | None = None):
    run = root / f"{att_type}-seed{seed}"
    run.mkdir(parents=True)
    summary = {"att_type": att_type, "att_options": options or {}, "n_params": 1_234_567,
               "final_val_ppl": VAL_PPL[att_type][index], "final_val_loss": 0.0,
               "train_tokens_per_s": 1000.0 * (index + 1)}  # fmt: skip
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"model": {"block_size": 32, "att_type": att_type}, "train": {"seed": seed}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": s, "tokens": 128 * s, "val_loss": 5.0 - s / 10 - index / 10} for s in (2, 4)]
    rows.insert(0, {"step": 1, "tokens": 128, "train_loss": 6.0})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {}
    for spec, length in (("1x", 32), ("2x", 64)):
        ppl = LENGTH_PPL[att_type][spec][index]
        cell = {"status": "n/a", "reason": "no"} if ppl is None else {"ppl": ppl, "loss": 1.0}
        results[spec] = {"length": length, "nonoverlapping": cell,
                         "strided": cell if ppl is None else {**cell, "ppl": ppl - 1}}  # fmt: skip
    report = {"att_type": att_type, "att_option_overrides": {}, "block_size": 32,
              "results": results}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(report))
    if att_type == "RoPE-SM" and seed == 0:
        yarn = {**report, "att_option_overrides": {"scaling": "yarn", "scale_factor": 2},
                "results": {"2x": results["2x"]}}  # evaluated at 2x only  # fmt: skip
        (run / "eval-scale_factor-2_scaling-yarn.json").write_text(json.dumps(yarn))
    return run


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    for index, seed in enumerate((0, 1, 2)):
        write_run(root, "RoPE-SM", seed, index)
    write_run(root, "Learned-APE", 0, 0)
    (root / "unfinished").mkdir()  # no summary.json: not a run, ignored inside a sweep
    return root


BENCH = {
    "device_name": "cpu: test",
    "reference": "RoPE-SM",
    "results": [
        {"variant": v, "att_type": v, "att_options": {}, "device": "cpu", "T": t, "status": "ok",
         "fwd_tokens_per_s": f * t,
         "fwd_bwd_tokens_per_s": f * t / 3, "fwd_bwd_peak_mb": t / 8}
        for v, f in (("RoPE-SM", 10.0), ("Learned-APE", 12.0)) for t in (32, 64, 128)
    ],
}  # fmt: skip


def test_stat_formatting_for_one_and_three_seeds():
    assert Stat.of([12.345]).format(2) == "12.35"  # one seed: no ± part
    three = Stat.of([10.0, 12.0, 14.0])
    assert (three.mean, three.std, three.n) == (12.0, 2.0, 3)  # sample std (n - 1)
    assert three.format(2) == "12.00 ± 2.00"
    assert three.format(1, latex=True) == "12.0 $\\pm$ 2.0"
    assert Stat.of([1000.0, 3000.0]).format(0, thousands=True) == "2,000 ± 1,414"
    assert Stat.of([None, math.nan]) is None
    assert Stat.of([math.inf, 2.0]).n == 1


def test_find_runs_expands_a_sweep_and_rejects_unfinished(sweep, tmp_path, assert_one_sentence):
    assert [p.name for p in find_runs([sweep])] == [
        "Learned-APE-seed0", "RoPE-SM-seed0", "RoPE-SM-seed1", "RoPE-SM-seed2",
    ]  # fmt: skip
    manifest = {"runs": [{"dir": d} for d in ("RoPE-SM-seed1", "Learned-APE-seed0")]}
    (sweep / "sweep.json").write_text(json.dumps(manifest))  # a sweep's order wins
    assert [p.name for p in find_runs([sweep])] == [
        "RoPE-SM-seed1", "Learned-APE-seed0", "RoPE-SM-seed0", "RoPE-SM-seed2",
    ]  # fmt: skip
    assert find_runs([sweep / "RoPE-SM-seed1"]) == [sweep / "RoPE-SM-seed1"]
    with pytest.raises(ConfigError, match="holds no finished run") as info:
        find_runs([sweep / "unfinished"])
    assert_one_sentence(str(info.value))
    record = load_run(sweep / "RoPE-SM-seed0")
    assert record.seed == 0 and record.block_size == 32
    assert list(record.evals) == ["", "scaling=yarn, scale_factor=2"]  # as trained first


def github_rows(text: str, title: str) -> list[list[str]]:
    block = text.split(title, 1)[1].strip().split("\n\n", 1)[0]
    lines = block.splitlines()
    assert re.fullmatch(r"\|[-|: ]+\|", lines[1]), lines[1]  # the separator row
    return [[c.strip() for c in line.strip("|").split("|")] for line in [lines[0], *lines[2:]]]


def test_github_tables_mean_std_and_na(sweep):
    text = compare([sweep], bench=[], tablefmt="github").text
    summary = github_rows(text, "Summary")
    assert summary[0] == ["variant", "seeds", "params (M)", "val ppl", "train tokens/s"]
    rows = {r[0]: r for r in summary[1:]}
    assert rows["RoPE-SM"][1:] == ["3", "1.235", "12.00 ± 2.00", "2,000 ± 1,000"]
    assert rows["Learned-APE"][1:] == ["1", "1.235", "20.00", "1,000"]
    plain = github_rows(text, "(nonoverlapping windows)")
    assert plain[0] == ["variant", "seeds", "1x (32)", "2x (64)"]
    rows = {r[0]: r[1:] for r in plain[1:]}
    assert rows["RoPE-SM"] == ["3", "10.00 ± 1.00", "33.00 ± 3.00"]
    # evaluated for one seed only, at 2x only
    assert rows["RoPE-SM [eval scaling=yarn, scale_factor=2]"] == ["1", "–", "30.00"]
    assert rows["Learned-APE"] == ["1", "19.00", "n/a"]
    strided = {r[0]: r[1:] for r in github_rows(text, "(strided windows)")[1:]}
    assert strided["RoPE-SM"] == ["3", "9.00 ± 1.00", "32.00 ± 3.00"]


def test_bench_columns_come_from_the_runs_block_size(sweep, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    text = compare([sweep], bench=[bench]).text
    summary = github_rows(text, "Summary")
    assert summary[0][-2:] == ["fwd+bwd tokens/s @T=32", "peak MB @T=32"]
    rows = {r[0]: r for r in summary[1:]}
    assert rows["Learned-APE"][-2:] == ["128", "4.0"]


def test_bench_rows_are_matched_to_runs_by_variant_not_by_label_text(tmp_path):
    """A bench row of RoPE-SM with its options written in another order is the same variant."""
    root = tmp_path / "runs"
    write_run(root, "RoPE-SM", 0, 0, options={"scaling": "ntk", "scale_factor": 2})
    row = {"variant": "RoPE-SM:scale_factor=2:scaling=ntk", "att_type": "RoPE-SM",
           "att_options": {"scale_factor": 2, "scaling": "ntk"}, "device": "cpu", "T": 32,
           "status": "ok", "fwd_bwd_tokens_per_s": 777.0, "fwd_bwd_peak_mb": 1.5}  # fmt: skip
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"results": [row]}))
    summary = github_rows(compare([root], bench=[bench]).text, "Summary")
    assert summary[1][0] == "RoPE-SM:scaling=ntk:scale_factor=2"  # the run's own label
    assert summary[1][-2:] == ["777", "1.5"]


def test_csv_parses_with_mean_and_std_columns(sweep):
    comparison = compare([sweep], tablefmt="csv")
    summary, plain, _ = comparison.tables
    rows = list(csv.DictReader(io.StringIO(summary.render("csv"))))
    assert list(rows[0]) == ["variant", "seeds", "params_m", "val_ppl_mean", "val_ppl_std",
                             "train_tokens_s_mean", "train_tokens_s_std"]  # fmt: skip
    rope = next(r for r in rows if r["variant"] == "RoPE-SM")
    assert float(rope["params_m"]) == 1.235 and int(rope["seeds"]) == 3
    assert float(rope["val_ppl_mean"]) == 12.0 and float(rope["val_ppl_std"]) == 2.0
    ape = next(r for r in rows if r["variant"] == "Learned-APE")
    assert float(ape["val_ppl_mean"]) == 20.0 and ape["val_ppl_std"] == ""
    lengths = list(csv.DictReader(io.StringIO(plain.render("csv"))))
    ape = next(r for r in lengths if r["variant"] == "Learned-APE")
    assert ape["2x_64_mean"] == "" and float(ape["1x_32_mean"]) == 19.0
    assert comparison.text.count("variant,") == 3  # three CSV blocks


def test_latex_parses_as_a_tabular(sweep):
    comparison = compare([sweep], tablefmt="latex")
    for table in comparison.tables:
        latex = table.render("latex")
        lines = [line for line in latex.splitlines() if "&" in line]
        assert latex.startswith("\\begin{tabular}") and latex.rstrip().endswith("\\end{tabular}")
        columns = re.search(r"\\begin\{tabular\}\{(\w+)\}", latex).group(1)
        assert all(line.count("&") == len(columns) - 1 for line in lines)
        assert all(line.rstrip().endswith("\\\\") for line in lines)
    latex = comparison.tables[1].render("latex")
    assert "10.00 $\\pm$ 1.00" in latex and "scale\\_factor=2" in latex  # _ escaped


def labelled_lines(ax) -> list:
    return [line for line in ax.get_lines() if not line.get_label().startswith("_")]


def test_plots_have_one_line_per_series(sweep):
    records = [load_run(p) for p in find_runs([sweep])]
    fig = plot_val_loss(records)
    lines = labelled_lines(fig.axes[0])
    assert sorted(line.get_label() for line in lines) == ["Learned-APE", "RoPE-SM"]
    rope = next(line for line in lines if line.get_label() == "RoPE-SM")
    assert list(rope.get_xdata()) == [256, 512]  # eval rows only, mean over seeds
    assert list(rope.get_ydata()) == pytest.approx([4.7, 4.5])

    fig = plot_length_ppl(records)
    assert len(fig.axes) == 2
    for ax in fig.axes:
        assert len(labelled_lines(ax)) == 3  # RoPE-SM, RoPE-SM [eval yarn], Learned-APE
        assert [
            line.get_xdata()[0] for line in ax.get_lines() if line.get_label() == "_block_size"
        ] == [32]
    ape = next(line for line in fig.axes[0].get_lines() if line.get_label() == "Learned-APE")
    assert ape.get_ydata()[0] == 19.0 and math.isnan(ape.get_ydata()[1])

    fig = plot_throughput([BENCH])
    assert [len(labelled_lines(ax)) for ax in fig.axes] == [2, 2]
    rope = next(line for line in fig.axes[1].get_lines() if line.get_label() == "RoPE-SM")
    assert list(rope.get_ydata()) == pytest.approx([10 * t / 3 for t in (32, 64, 128)])


def test_save_plots_writes_small_valid_pngs(sweep, tmp_path):
    records = [load_run(p) for p in find_runs([sweep])]
    paths = save_plots(records, [BENCH], tmp_path / "plots")
    assert [p.name for p in paths] == ["val_loss.png", "ppl_vs_length.png", "tokens_per_s.png"]
    for path in paths:
        data = path.read_bytes()
        assert data.startswith(PNG_SIGNATURE) and 5_000 < len(data) < 200_000


def test_cli_compare_writes_every_format_and_plot(sweep, tmp_path):
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(BENCH))
    out = tmp_path / "docs"
    result = CliRunner().invoke(
        main, ["compare", str(sweep), "--bench", str(bench), "--format", "latex", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "\\begin{tabular}" in result.output
    names = sorted(p.name for p in out.iterdir())
    assert names == ["comparison.md", "comparison.tex", "nonoverlapping.csv", "ppl_vs_length.png",
                     "strided.csv", "summary.csv", "tokens_per_s.png", "val_loss.png"]  # fmt: skip
    assert "| RoPE-SM " in (out / "comparison.md").read_text()


def test_cli_compare_bad_inputs_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "empty")])
    assert result.exit_code == 1 and "holds no finished run" in result.output
    assert result.output.count("\n") == 1
    bad = tmp_path / "bench.json"
    bad.write_text("[]")
    run = write_run(tmp_path / "s", "Learned-APE", 0, 0)
    result = CliRunner().invoke(main, ["compare", str(run), "--bench", str(bad)])
    assert result.exit_code == 1 and "is not a bench JSON" in result.output


def test_write_outputs_tables_agree_with_the_printed_ones(sweep, tmp_path):
    comparison = compare([sweep])
    write_outputs(comparison, tmp_path)
    assert (tmp_path / "comparison.md").read_text().strip() == comparison.text.strip()
    assert statistics.fmean(VAL_PPL["RoPE-SM"]) == 12.0


def test_a_failing_variant_is_marked_off_scale_not_flattening_the_plot(sweep):
    records = [load_run(p) for p in find_runs([sweep])]
    for record in records:  # Learned-APE explodes at 1x
        if record.label == "Learned-APE":
            record.evals[""]["results"]["1x"]["nonoverlapping"]["ppl"] = 5000.0
    ax = plot_length_ppl(records).axes[0]
    labels = [line.get_label() for line in labelled_lines(ax)]
    assert "Learned-APE (off scale)" in labels and "RoPE-SM" in labels
    assert ax.get_ylim()[1] < 100  # scaled to the others (perplexities 9 .. 36)


def test_compare_skips_files_a_glob_picks_up(sweep, assert_one_sentence):
    (sweep / "comparison.md").write_text("| table |\n")
    runs = sorted(p for p in sweep.iterdir() if (p / "summary.json").is_file())
    assert find_runs([*runs, sweep / "comparison.md"]) == find_runs(runs)  # sweep/* in a shell
    with pytest.raises(ConfigError, match="is a file, not a run directory") as info:
        find_runs([runs[0] / "summary.json"])
    assert_one_sentence(str(info.value))
