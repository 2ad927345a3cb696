"""End-to-end training: summary, checkpoints, exact resume after SIGKILL, failures."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from ropelm.checkpoint import load_model, resolve_checkpoint
from ropelm.engine import TrainingError
from ropelm.errors import ConfigError, DataError
from ropelm.eval_run import evaluate_run
from ropelm.experiment import Experiment
from ropelm.pipeline import run_experiment
from ropelm.runs import RunDir

CLI = [sys.executable, "-m", "ropelm.cli"]


def tiny_experiment(cache_dir: Path, **train: object) -> dict:
    return {
        "name": "tiny",
        "model": {
            "block_size": 32,
            "vocab_size": 512,
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "dropout": 0.1,
        },
        "tokenizer": {"max_documents": 300},
        "data": {"source": "wiki-sample", "max_documents": 400, "cache_dir": str(cache_dir)},
        "train": {
            "max_steps": 24,
            "batch_size": 4,
            "learning_rate": 3e-3,
            "warmup_steps": 2,
            "eval_every": 8,
            "log_every": 4,
            **train,
        },
        "eval": {"max_batches": 4},
    }


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """Tokenizer and token files shared by the tests of this module (built once)."""
    return tmp_path_factory.mktemp("data_cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache_dir) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("run")
    config = Experiment.load(write_yaml(root / "tiny.yaml", tiny_experiment(cache_dir)))
    summary = run_experiment(config, out_dir=root / "run", progress=False)
    return root / "run", summary


def test_run_writes_summary_metrics_and_checkpoints(finished_run):
    run_dir, summary = finished_run
    saved = json.loads((run_dir / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    for key in ("att_type", "n_params", "tokens_seen", "best_val_loss", "final_val_ppl",
                "train_tokens_per_s", "train_time_s", "wall_time_s", "versions"):  # fmt: skip
        assert key in saved
    assert saved["att_type"] == "RoPE-SM"
    assert saved["tokens_seen"] == 24 * 4 * 32
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [0, 8, 16, 24]  # step 0: the untrained baseline
    assert saved["initial_val_loss"] == evals[0]["val_loss"]
    assert saved["best_val_loss"] == min(r["val_loss"] for r in evals[1:])
    assert evals[-1]["val_loss"] < evals[1]["val_loss"] < evals[0]["val_loss"]
    assert (run_dir / "config.yaml").is_file() and (run_dir / "environment.json").is_file()
    best = resolve_checkpoint(run_dir, "best")
    assert {p.name for p in best.iterdir()} >= {
        "model.safetensors", "tokenizer.json", "trainer.pt", "checkpoint.json",
    }  # fmt: skip


def test_best_checkpoint_reproduces_the_reported_validation_loss(finished_run, registry):
    run_dir, summary = finished_run
    model = load_model(run_dir, registry)
    assert model.config.pad_token_id is not None
    assert model.num_parameters() == summary["n_params"]


def test_rerunning_into_the_same_directory_is_refused(finished_run, cache_dir, tmp_path):
    run_dir, _ = finished_run
    same = Experiment.load(write_yaml(tmp_path / "a.yaml", tiny_experiment(cache_dir)))
    with pytest.raises(ConfigError, match="already holds a run of this experiment"):
        run_experiment(same, out_dir=run_dir, progress=False)
    other = Experiment.load(
        write_yaml(tmp_path / "b.yaml", tiny_experiment(cache_dir, batch_size=8))
    )
    with pytest.raises(ConfigError, match=r"different experiment \(train\.batch_size"):
        run_experiment(other, out_dir=run_dir, progress=False)


def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run_dir, "last") / "model.safetensors"))


def _last_step(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "last.json"
    try:
        return json.loads(pointer.read_text())["step"]
    except (OSError, ValueError):
        return 0


def test_resume_after_sigkill_matches_an_uninterrupted_run_bitwise(tmp_path, cache_dir):
    raw = tiny_experiment(cache_dir, max_steps=120, save_every=5, eval_every=40)
    raw["model"].update(n_embd=64, n_head=4)  # slow enough to be killed midway
    config_path = write_yaml(tmp_path / "exp.yaml", raw)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    subprocess.run([*CLI, "run", str(config_path), "--out", str(tmp_path / "full"), "--quiet"],
                   check=True, env=env, capture_output=True)  # fmt: skip

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [*CLI, "run", str(config_path), "--out", str(killed), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while _last_step(killed) < 10 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _last_step(killed)
    assert 10 <= killed_at < 120, "the run must be killed midway"
    assert not (killed / "summary.json").exists()

    subprocess.run([*CLI, "run", str(config_path), "--resume", str(killed), "--quiet"],
                   check=True, env=env, capture_output=True)  # fmt: skip
    full, resumed = _final_weights(tmp_path / "full"), _final_weights(killed)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name
    steps = [json.loads(r)["step"] for r in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), "metrics logged after the checkpoint were not duplicated"


@pytest.mark.slow
def test_ten_random_sigkills_then_resume_match_an_uninterrupted_run(tmp_path, cache_dir):
    """kill -9 at ten random moments of a 60-step run (a checkpoint every step), resuming after
    each: the final weights equal an uninterrupted run's bit for bit."""
    import random

    raw = tiny_experiment(cache_dir, max_steps=60, save_every=1, eval_every=20)
    config_path = write_yaml(tmp_path / "exp.yaml", raw)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run([*CLI, "run", str(config_path), "--out", str(tmp_path / "full"), "--quiet"],
                   check=True, env=env, capture_output=True)  # fmt: skip

    rng = random.Random(1234)
    killed = tmp_path / "killed"
    for target in sorted(rng.sample(range(1, 58), 10)):
        resume = ["--resume", str(killed)] if _last_step(killed) > 0 else ["--out", str(killed)]
        proc = subprocess.Popen(
            [*CLI, "run", str(config_path), *resume, "--quiet"],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 120
        while _last_step(killed) < target and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.03))  # anywhere in the step: mid-write included
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (killed / "summary.json").exists(), "killed after the run had finished"
    subprocess.run([*CLI, "run", str(config_path), "--resume", str(killed), "--quiet"],
                   check=True, env=env, capture_output=True)  # fmt: skip
    full, resumed = _final_weights(tmp_path / "full"), _final_weights(killed)
    assert full.keys() == resumed.keys()
    for name in full:
        assert torch.equal(full[name], resumed[name]), name


NAN_PLUGIN = '''
import torch
import ropelm


class NaNAfterTenCalls(ropelm.SelfAttention):
    """RoPE-SM that starts emitting NaN in training after a few forward passes."""

    def forward(self, x, cache=None):
        self.calls = getattr(self, "calls", 0) + self.training
        y = super().forward(x, cache)
        return y * float("nan") if self.calls > 10 else y


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(ropelm.AttentionSpec(
        name="NaN-After-10", description="test", reference="",
        factory=lambda config, options: NaNAfterTenCalls(
            config, rotation=ropelm.RotaryEmbedding(config.head_size)
        ),
    ))
'''


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, cache_dir):
    (tmp_path / "nan_plugin.py").write_text(NAN_PLUGIN)
    raw = tiny_experiment(cache_dir, max_steps=30, eval_every=5)
    raw["plugins"] = ["nan_plugin.py"]
    raw["model"]["att_type"] = "NaN-After-10"
    config = Experiment.load(write_yaml(tmp_path / "nan.yaml", raw))
    with pytest.raises(
        TrainingError, match=r"became non-finite at step 11; stopped without saving"
    ):
        run_experiment(config, out_dir=tmp_path / "run", progress=False)
    last = resolve_checkpoint(tmp_path / "run", "last")
    assert json.loads((last / "checkpoint.json").read_text())["step"] == 10
    weights = load_file(str(last / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in weights.values())


OOM_PLUGIN = NAN_PLUGIN.replace("NaN-After-10", "OOM-After-10").replace(
    'return y * float("nan") if self.calls > 10 else y',
    'if self.calls > 10:\n            raise torch.OutOfMemoryError("CUDA out of memory.")\n'
    "        return y",
)


def test_out_of_memory_is_one_sentence_and_keeps_the_last_checkpoint(
    tmp_path, cache_dir, assert_one_sentence
):
    (tmp_path / "oom_plugin.py").write_text(OOM_PLUGIN)
    raw = tiny_experiment(cache_dir, max_steps=30, eval_every=5)
    raw["plugins"] = ["oom_plugin.py"]
    raw["model"]["att_type"] = "OOM-After-10"
    config = Experiment.load(write_yaml(tmp_path / "oom.yaml", raw))
    with pytest.raises(TrainingError, match="ran out of memory at step 11") as info:
        run_experiment(config, out_dir=tmp_path / "run", progress=False)
    assert "lower train.batch_size" in str(info.value)
    assert_one_sentence(str(info.value))
    last = resolve_checkpoint(tmp_path / "run", "last")
    assert json.loads((last / "checkpoint.json").read_text())["step"] == 10


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_stop_signal_saves_a_resumable_checkpoint(tmp_path, cache_dir, signum):
    raw = tiny_experiment(cache_dir, max_steps=400, eval_every=1000)
    raw["model"].update(n_embd=64, n_head=4)
    config_path = write_yaml(tmp_path / "exp.yaml", raw)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(
        [*CLI, "run", str(config_path), "--out", str(run_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (run_dir / "metrics.jsonl").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in err
    assert f"continue with --resume {run_dir}" in err
    step = _last_step(run_dir)
    assert 0 < step < 400
    manifest = json.loads((resolve_checkpoint(run_dir, "last") / "checkpoint.json").read_text())
    assert manifest["val_loss"] is None  # not evaluated at that step: no stale value recorded


def test_block_size_beyond_the_data_fails_before_training(tmp_path, cache_dir):
    raw = tiny_experiment(cache_dir)
    raw["model"]["block_size"] = 200_000
    config = Experiment.load(write_yaml(tmp_path / "big.yaml", raw))
    with pytest.raises(DataError, match=r"split has \d+ tokens, fewer than one window"):
        run_experiment(config, out_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_compiled_training_matches_eager(tmp_path, cache_dir):
    """torch.compile (inductor on the CPU) trains the same model to float round-off."""
    losses = {}
    for compile_ in (False, True):
        raw = tiny_experiment(cache_dir, max_steps=4, log_every=1, eval_every=4, compile=compile_)
        raw["model"].update(n_layer=1, dropout=0.0)
        config = Experiment.load(write_yaml(tmp_path / f"c{compile_}.yaml", raw))
        run_experiment(config, out_dir=tmp_path / f"run-{compile_}", progress=False)
        rows = (tmp_path / f"run-{compile_}" / "metrics.jsonl").read_text().splitlines()
        losses[compile_] = [json.loads(r)["train_loss"] for r in rows if "train_loss" in r]
    assert len(losses[True]) == 4
    assert max(abs(a - b) for a, b in zip(losses[False], losses[True], strict=True)) < 1e-4
    weights = _final_weights(tmp_path / "run-True")
    assert not any(name.startswith("_orig_mod") for name in weights)


def test_resuming_a_run_without_checkpoint_says_to_restart(tmp_path, cache_dir):
    config = Experiment.load(write_yaml(tmp_path / "exp.yaml", tiny_experiment(cache_dir)))
    run_dir = tmp_path / "run"
    RunDir(run_dir).claim(config.config, resume=False)  # a run killed before its first checkpoint
    with pytest.raises(TrainingError, match="stopped before its first checkpoint"):
        run_experiment(config, out_dir=run_dir, resume=True, progress=False)


def test_document_mask_trains_and_evaluates_within_documents(tmp_path, cache_dir, registry):
    summaries = {}
    for masked in (False, True):
        raw = tiny_experiment(cache_dir, max_steps=4, eval_every=4, document_mask=masked)
        raw["model"]["att_type"] = "ALiBi"
        experiment = Experiment.load(write_yaml(tmp_path / f"doc{masked}.yaml", raw))
        summaries[masked] = run_experiment(
            experiment, out_dir=tmp_path / f"run{masked}", progress=False
        )
    # the same seed and weights at step 0: only the mask makes the losses differ
    assert summaries[True]["initial_val_loss"] != summaries[False]["initial_val_loss"]
    report = evaluate_run(tmp_path / "runTrue", registry, lengths=["1x"], max_windows=2)
    assert report["document_mask"] is True
    cell = report["results"]["1x"]["nonoverlapping"]
    assert cell["backend"] == "dense"  # a document mask is a mask: not sdpa


def test_flex_for_cpu_training_is_refused_before_any_step(tmp_path, cache_dir, assert_one_sentence):
    raw = tiny_experiment(cache_dir, max_steps=2)
    raw["model"].update(att_type="ALiBi", attention_backend="flex", dropout=0.0)
    experiment = Experiment.load(write_yaml(tmp_path / "flex.yaml", raw))
    with pytest.raises(ConfigError, match="flex has no backward on the CPU") as info:
        run_experiment(experiment, out_dir=tmp_path / "run", progress=False)
    assert "attention_backend: dense or auto" in str(info.value)
    assert_one_sentence(str(info.value))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_divergence_before_any_checkpoint_leaves_nothing_and_says_restart(tmp_path, cache_dir):
    raw = tiny_experiment(cache_dir, learning_rate=1e6, warmup_steps=0, max_steps=40,
                          eval_every=20, log_every=2)  # fmt: skip
    config = Experiment.load(write_yaml(tmp_path / "diverge.yaml", raw))
    with pytest.raises(TrainingError, match="became non-finite at step") as info:
        run_experiment(config, out_dir=tmp_path / "run", progress=False)
    assert "stopped before writing any checkpoint" in str(info.value)
    assert "start the run again" in str(info.value)
    assert not (tmp_path / "run").exists()  # so starting again with a fix just works


def test_resume_may_change_the_schedule_but_not_the_model(finished_run, tmp_path, cache_dir):
    run_dir, _ = finished_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    path = write_yaml(tmp_path / "exp.yaml", tiny_experiment(cache_dir))
    changed = Experiment.load(path, ["train.learning_rate=1e-3", "train.max_steps=28"])
    summary = run_experiment(changed, out_dir=copy, resume=True, progress=False)
    assert summary["steps"] == 28
    history = [
        json.loads(line) for line in (copy / "config_history.jsonl").read_text().splitlines()
    ]
    assert history == [{"resumed_at_step": 24, "changed": {
        "train.learning_rate": [0.003, 0.001], "train.max_steps": [24, 28]}}]  # fmt: skip
    assert yaml.safe_load((copy / "config.yaml").read_text())["train"]["max_steps"] == 28
    other_model = Experiment.load(path, ["model.n_layer=3"])
    with pytest.raises(ConfigError, match=r"model.n_layer: 2 there, 3 now\) \(a resume may"):
        run_experiment(other_model, out_dir=copy, resume=True, progress=False)


EVAL_NAN_PLUGIN = (
    NAN_PLUGIN.replace("NaN-After-10", "Eval-NaN")
    .replace(
        'self.calls = getattr(self, "calls", 0) + self.training',
        'self.calls = getattr(self, "calls", 0) + (not self.training)',
    )
    .replace("if self.calls > 10", "if self.calls > 8")
)  # the third evaluation (4 batches each)


def test_a_nan_validation_loss_never_becomes_a_checkpoint(tmp_path, cache_dir):
    (tmp_path / "eval_nan.py").write_text(EVAL_NAN_PLUGIN)
    raw = tiny_experiment(cache_dir, max_steps=30, eval_every=5)
    raw["plugins"] = ["eval_nan.py"]
    raw["model"]["att_type"] = "Eval-NaN"
    config = Experiment.load(write_yaml(tmp_path / "nan.yaml", raw))
    with pytest.raises(TrainingError, match=r"validation loss became non-finite at step 10"):
        run_experiment(config, out_dir=tmp_path / "run", progress=False)
    pointer = json.loads((tmp_path / "run" / "checkpoints" / "last.json").read_text())
    assert pointer["step"] == 5 and pointer["val_loss"] is not None
    for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} is not JSON"))
