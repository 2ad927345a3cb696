"""Sweeps: parsing --variants/--seeds, shared caches, skipping finished runs, resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ropelm.cli import main
from ropelm.errors import ConfigError, UnknownAttentionError
from ropelm.experiment import Experiment
from ropelm.sweep import SweepError, parse_seeds, plan_sweep, run_sweep
from ropelm.variants import parse_variants


def test_parse_seeds():
    assert parse_seeds(["0,1", "2", "1"]) == [0, 1, 2]
    with pytest.raises(ConfigError, match="'a' is not an integer"):
        parse_seeds(["0,a"])


@pytest.fixture()
def experiment(tmp_path: Path) -> Path:
    raw = {
        "name": "sw",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32,
                  "att_type": "RoPE-SM", "att_options": {"n_kv_head": 1}},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "log_every": 3},
        "eval": {"max_batches": 2, "lengths": ["1x", "2x"]},
    }  # fmt: skip
    path = tmp_path / "sw.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_plan_validates_every_run_and_sets_type_options_and_seed(experiment, tmp_path):
    variants = parse_variants(["RoPE-SM,ALiBi,RoPE-Sliding:window=8"])
    sweep_dir, runs = plan_sweep(Experiment.load(experiment), variants, [0, 5])
    assert sweep_dir == Path("runs/sw-sweep")
    assert [(r.variant.name, r.seed) for r in runs] == [
        ("RoPE-SM", 0), ("ALiBi", 0), ("RoPE-Sliding", 0),
        ("RoPE-SM", 5), ("ALiBi", 5), ("RoPE-Sliding", 5),
    ]  # fmt: skip
    by_name = {(r.variant.name, r.seed): r.experiment for r in runs}
    assert by_name[("RoPE-SM", 5)].config.model.att_options == {"n_kv_head": 1}  # the YAML's
    assert by_name[("ALiBi", 0)].config.model.att_options == {}  # not RoPE-SM's options
    assert by_name[("RoPE-Sliding", 0)].config.model.att_options == {"window": 8}
    assert by_name[("RoPE-Sliding", 0)].attention.options.window == 8  # resolved up front
    assert by_name[("ALiBi", 5)].config.train.seed == 5
    # one registry serves every run of the sweep
    assert len({id(e.registry) for e in by_name.values()}) == 1
    assert runs[5].dir == sweep_dir / "RoPE-Sliding_window8-seed5"
    assert not sweep_dir.exists()  # planning creates nothing


def test_unknown_variant_fails_before_anything_runs(experiment, tmp_path, assert_one_sentence):
    with pytest.raises(UnknownAttentionError) as info:
        plan_sweep(
            Experiment.load(experiment), parse_variants(["RoPE-SM,Alibi"]), [0], out=tmp_path / "s"
        )
    assert "did you mean 'ALiBi'" in str(info.value)
    assert_one_sentence(str(info.value))
    code, out = invoke("sweep", experiment, "--variants", "RoPE-SM,Alibi", "--out", tmp_path / "s")
    assert code == 1 and out.startswith("Error: Unknown attention type 'Alibi'")
    assert out.count("\n") == 1 and not (tmp_path / "s").exists()


def test_bad_variant_option_fails_before_anything_runs(experiment, tmp_path):
    code, out = invoke("sweep", experiment, "--variants", "RoPE-Sliding:windw=8",
                       "--out", tmp_path / "s")  # fmt: skip
    assert code == 1 and "model.att_options.windw" in out and "did you mean 'window'" in out
    assert not (tmp_path / "s").exists()


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_sweep_trains_evaluates_compares_then_skips_and_resumes(experiment, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", experiment, "--variants", "RoPE-SM,Learned-APE", "--seeds", "0",
            "--out", out, "--max-windows", "2", "--quiet"]  # fmt: skip
    code, text = invoke(*args)
    assert code == 0, text
    assert "(2 trained, 0 resumed, 0 skipped)" in text
    runs = {p.name: p for p in out.iterdir() if p.is_dir()}
    assert sorted(runs) == ["Learned-APE-seed0", "RoPE-SM-seed0"]
    for run in runs.values():
        assert (run / "summary.json").is_file()
        report = json.loads((run / "eval.json").read_text())
        assert list(report["results"]) == ["1x", "2x"] and report["max_windows"] == 2
    ape = json.loads((runs["Learned-APE-seed0"] / "eval.json").read_text())
    assert ape["results"]["2x"]["strided"]["status"] == "n/a"
    # one tokenizer and one set of token files served both variants
    cache = experiment.parent / "cache"
    assert len(list(cache.glob("tokenizer-*"))) == 1 and len(list(cache.glob("tokens-*"))) == 1
    comparison = (out / "comparison.md").read_text()
    assert "| RoPE-SM:n_kv_head=1 " in comparison and "| Learned-APE " in comparison
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["trained", "trained"]
    assert [r["evaluated"] for r in manifest["runs"]] == ["yes", "yes"]

    # a re-run skips finished runs (and their evaluation) and touches no file
    summaries = {n: (r / "summary.json").stat().st_mtime_ns for n, r in runs.items()}
    evals = {n: (r / "eval.json").stat().st_mtime_ns for n, r in runs.items()}
    code, text = invoke(*args)
    assert code == 0, text
    assert "(0 trained, 0 resumed, 2 skipped)" in text and "finished earlier, skipped" in text
    assert {n: (r / "summary.json").stat().st_mtime_ns for n, r in runs.items()} == summaries
    assert {n: (r / "eval.json").stat().st_mtime_ns for n, r in runs.items()} == evals

    # an interrupted run (checkpoints, no summary) is resumed; a new seed is trained
    (runs["RoPE-SM-seed0"] / "summary.json").unlink()
    code, text = invoke(*args[:5], "0,1", *args[6:])
    assert code == 0, text
    assert "(2 trained, 1 resumed, 1 skipped)" in text
    assert (out / "RoPE-SM-seed1" / "summary.json").is_file()
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["resumed", "skipped", "trained", "trained"]


def test_sweep_refuses_a_run_dir_of_another_experiment(experiment, tmp_path, assert_one_sentence):
    out = tmp_path / "sweep"
    base = Experiment.load(experiment)
    _, runs = plan_sweep(base, parse_variants(["NoPE"]), [0], out=out)
    run = runs[0]
    run.dir.mkdir(parents=True)
    other = yaml.safe_load(run.experiment.config.model_dump_json())
    other["train"]["weight_decay"] = 0.5  # not a resumable setting
    (run.dir / "config.yaml").write_text(yaml.safe_dump(other))
    (run.dir / "summary.json").write_text("{}")
    with pytest.raises(SweepError, match=r"1 of 1 runs failed \(NoPE seed 0\)") as info:
        run_sweep(base, [run.variant], [0], out=out, progress=False, log=lambda m: None)
    assert_one_sentence(str(info.value))
    manifest = json.loads((out / "sweep.json").read_text())
    assert manifest["runs"][0]["status"] == "failed"
    assert "already holds a different experiment" in manifest["runs"][0]["error"]
    assert json.loads((run.dir / "summary.json").read_text()) == {}  # left alone


def test_sweep_extends_every_run_with_each_method_into_one_table(experiment, tmp_path):
    from ropelm.extend import parse_methods
    from ropelm.sweep import SweepExtension

    out = tmp_path / "ext-sweep"
    extension = SweepExtension(
        "2x", tuple(parse_methods(["none,yarn"])), steps=2, overrides=("train.warmup_steps=1",)
    )
    sweep_dir, runs = run_sweep(
        Experiment.load(experiment), parse_variants(["RoPE-SM"]), [0], out=out,
        lengths=["1x"], progress=False, log=lambda m: None, extension=extension,
    )  # fmt: skip
    assert [r.dir.name for r in runs] == [
        "RoPE-SM-seed0", "RoPE-SM-seed0-extend-none-64", "RoPE-SM-seed0-extend-yarn-64",
    ]  # fmt: skip
    assert all(r.status == "trained" and r.evaluated == "yes" for r in runs)
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    assert [(r["extension"], r["parent"]) for r in manifest["runs"]] == [
        (None, None), ("none", "RoPE-SM-seed0"), ("yarn", "RoPE-SM-seed0"),
    ]  # fmt: skip
    yarn = yaml.safe_load((runs[2].dir / "config.yaml").read_text())
    assert yarn["model"]["att_options"]["scaling"] == "yarn"
    assert yarn["model"]["att_options"]["n_kv_head"] == 1  # the parent's own options stay
    assert yarn["train"]["warmup_steps"] == 1  # --extend-set reaches the extension runs only
    base = yaml.safe_load((runs[0].dir / "config.yaml").read_text())
    assert base["train"]["warmup_steps"] == 0
    table = (sweep_dir / "comparison.md").read_text()
    # extended runs get their own rows, and lengths line up by tokens across block sizes
    assert "RoPE-SM:n_kv_head=1 extended (yarn, 64)" in table
    assert "RoPE-SM:n_kv_head=1 extended (none, 64)" in table
    assert "| T=32 " in table and "| T=64 " in table and "1x (" not in table  # 1x differs


def test_sweep_refuses_an_extension_the_variant_lacks_before_training(experiment, tmp_path):
    from ropelm.extend import parse_methods
    from ropelm.sweep import SweepExtension

    extension = SweepExtension("2x", tuple(parse_methods(["yarn"])))
    with pytest.raises(ConfigError, match="'ALiBi' has no RoPE"):
        run_sweep(
            Experiment.load(experiment), parse_variants(["RoPE-SM,ALiBi"]), [0],
            out=tmp_path / "s", progress=False, log=lambda m: None, extension=extension,
        )  # fmt: skip
    assert not (tmp_path / "s" / "RoPE-SM-seed0").exists()  # nothing trained


def test_ctrl_c_stops_the_whole_sweep_resumably(experiment, tmp_path, assert_one_sentence):
    import signal
    import subprocess
    import sys
    import time

    raw = yaml.safe_load(experiment.read_text())
    raw["train"].update(max_steps=100_000, eval_every=100_000, log_every=50)
    experiment.write_text(yaml.safe_dump(raw))
    out = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "ropelm.cli", "sweep", str(experiment), "--variants",
         "RoPE-SM,NoPE", "--out", str(out), "--no-eval", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = out / "RoPE-SM-seed0"
    deadline = time.monotonic() + 120
    while not (first / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "Traceback" not in err
    message = err.strip().splitlines()[-1].removeprefix("Error: ")
    assert message.startswith("Sweep stopped during RoPE-SM seed 0 (0 of 2 runs done")
    assert_one_sentence(message)
    manifest = json.loads((out / "sweep.json").read_text())
    assert [r["status"] for r in manifest["runs"]] == ["interrupted", "pending"]
    assert (first / "checkpoints" / "last.json").is_file()  # resumable by the same command
    assert not (out / "NoPE-seed0").exists()  # the next variant never started
