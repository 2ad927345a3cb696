"""The run directory: one writer at a time, foreign folders refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ropelm.config import validate
from ropelm.errors import ConfigError
from ropelm.runs import DirectoryBusyError, RunDir, exclusive_writer


def test_a_held_directory_names_its_holder(tmp_path, assert_one_sentence):
    busy = pytest.raises(DirectoryBusyError, match=rf"PID {os.getpid()}\) is writing")
    with exclusive_writer(tmp_path / "run"), busy as info, exclusive_writer(tmp_path / "run"):
        pass
    assert_one_sentence(str(info.value))
    with exclusive_writer(tmp_path / "run"):  # released: free again
        pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from ropelm.runs import exclusive_writer\n"
         f"with exclusive_writer(Path({str(tmp_path)!r})):\n"
         "    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryBusyError, match=f"PID {holder.pid}"), exclusive_writer(tmp_path):
        pass
    holder.kill()
    holder.wait()
    with exclusive_writer(tmp_path):  # the OS dropped the dead process's lock
        pass


def test_a_directory_with_foreign_files_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="is not a ropelm run directory"):
        RunDir(tmp_path).claim(validate({}), resume=False)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def experiment(cache: Path) -> dict:
    return {
        "name": "race",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300, "cache_dir": str(cache)},
        "train": {"max_steps": 60, "batch_size": 4, "eval_every": 20, "log_every": 5},
        "eval": {"max_batches": 2},
    }


@pytest.mark.slow
def test_two_runs_into_one_directory_one_wins(tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(experiment(tmp_path / "cache")))
    cli = [sys.executable, "-m", "ropelm.cli"]
    subprocess.run([*cli, "prepare", config], check=True, capture_output=True)
    run_dir = tmp_path / "run"
    procs = [
        subprocess.Popen([*cli, "run", config, "--out", run_dir, "--quiet"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert loser.count("\n") == 1 and (
        "is writing the run in" in loser or "already holds a run of this experiment" in loser
    ), loser
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "train_loss" in row]
    assert steps == sorted(set(steps)) and steps[-1] == 60  # each row once, in order
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60 and (run_dir / "config.yaml").is_file()


def test_a_run_written_before_a_setting_existed_still_resumes(tmp_path):
    """config.yaml of an older ropelm lacks newer sections; at their defaults it is the same run."""
    config = validate({"name": "old", "model": {"block_size": 32}})
    run = RunDir(tmp_path / "old")
    run.claim(config, resume=False)
    saved = yaml.safe_load(run.config_path.read_text())
    del saved["init"]  # as written before init.from_run existed
    run.config_path.write_text(yaml.safe_dump(saved))
    run.claim(config, resume=True)  # no difference reported
    changed = validate({"name": "old", "model": {"block_size": 32}, "init": {"method": "x"}})
    with pytest.raises(ConfigError, match=r"init\.method"):
        run.claim(changed, resume=True)  # a non-default value still differs
