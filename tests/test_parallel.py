"""DDP and FSDP2 under torchrun (2 CPU processes, gloo): same optimisation, exact resume.

One process with batch_size 4, two DDP processes and two FSDP processes with
batch_size 2 each (dropout 0) see the same global batches, so their losses agree
up to float32 round-off in the gradient reductions. A run killed with SIGKILL
and resumed ends with the weights of the uninterrupted run (dropout 0.1, so
every rank's random state must come back), and a two-process FSDP checkpoint
resumes in one process (the shards are re-partitioned).
"""

from __future__ import annotations

import contextlib
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

from ropelm.checkpoint import resolve_checkpoint

LOSS_TOLERANCE = 1e-4  # different reduction orders, amplified over 20 steps
RESUME_TOLERANCE = 1e-6  # the same processes resuming: the same arithmetic
STEPS = 20

pytestmark = pytest.mark.slow


def experiment(cache: Path, batch_size: int, parallel: str, dropout: float) -> dict:
    return {
        "name": "parallel",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 2, "n_head": 2, "n_embd": 32,
                  "dropout": dropout},
        "tokenizer": {"max_documents": 300},
        "data": {"source": "wiki-sample", "max_documents": 400, "cache_dir": str(cache)},
        # 128 tokens = 4 windows a step, whatever the number of processes
        "train": {"max_steps": STEPS, "batch_size": batch_size, "tokens_per_step": 128,
                  "learning_rate": 3e-3, "log_every": 1, "eval_every": 10, "save_every": 5,
                  "parallel": parallel},
        "eval": {"max_batches": 4},
    }  # fmt: skip


def torchrun(nproc: int, *args: object) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "ropelm.cli", *map(str, args)]  # fmt: skip


def run(command: list[str]) -> None:
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


def metric(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def losses(run_dir: Path) -> list[float]:
    return metric(run_dir, "train_loss")


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run_dir, "last") / "model.safetensors"))


def last_step(run_dir: Path) -> int:
    try:
        return json.loads((run_dir / "checkpoints" / "last.json").read_text())["step"]
    except (OSError, ValueError):
        return 0


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (torchrun starts its workers in sessions of their
    own, so killing the launcher's process group would leave them running)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:  # "pid (comm) state ppid ...": comm may hold spaces, so split after the ')'
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, stack = [], [pid]
    while stack:
        found.extend(kids := children.get(stack.pop(), []))
        stack.extend(kids)
    return found


def kill_midway(command: list[str], run_dir: Path, at_step: int) -> int:
    """Start ``command``; once a checkpoint of ``at_step`` or later exists, SIGKILL it and
    every process it started at once (a machine failing); the step it was killed at."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while last_step(run_dir) < at_step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid in [*descendants(proc.pid), proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    return last_step(run_dir)


def train_runs(root: Path, dropout: float, setups: tuple) -> dict[str, Path]:
    out = {}
    for name, nproc, batch_size, parallel in setups:
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(experiment(root / "cache", batch_size, parallel, dropout)))
        out[name] = root / name
        run([*torchrun(nproc, "run"), path, "--out", out[name], "--quiet"])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Without dropout: one process (batch 4), two DDP and two FSDP processes (batch 2)."""
    setups = (("one", 1, 4, "ddp"), ("ddp", 2, 2, "ddp"), ("fsdp", 2, 2, "fsdp"))
    return train_runs(tmp_path_factory.mktemp("parallel"), 0.0, setups)


@pytest.fixture(scope="module")
def dropout_runs(runs) -> dict[str, Path]:
    """With dropout 0.1 (the same data cache): two DDP and two FSDP processes."""
    setups = (("ddp-dropout", 2, 2, "ddp"), ("fsdp-dropout", 2, 2, "fsdp"))
    return train_runs(runs["one"].parent, 0.1, setups)


def test_one_process_ddp_and_fsdp_train_the_same_model(runs):
    for key, count in (("train_loss", STEPS), ("val_loss", STEPS // 10 + 1)):
        one, ddp, fsdp = (metric(runs[name], key) for name in ("one", "ddp", "fsdp"))
        assert len(one) == len(ddp) == len(fsdp) == count
        assert max(abs(a - b) for a, b in zip(one, ddp, strict=True)) <= LOSS_TOLERANCE
        assert max(abs(a - b) for a, b in zip(ddp, fsdp, strict=True)) <= LOSS_TOLERANCE
    summary = json.loads((runs["fsdp"] / "summary.json").read_text())
    assert summary["parallel"] == "fsdp" and summary["world_size"] == 2
    assert summary["tokens_seen"] == STEPS * 4 * 32  # the global batch, counted once
    checkpoint = resolve_checkpoint(runs["fsdp"], "last")
    assert (checkpoint / "sharded" / ".metadata").is_file()  # torch.distributed.checkpoint
    full = weights(runs["fsdp"])  # and the whole model in one safetensors file
    assert full.keys() == weights(runs["ddp"]).keys()


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_sigkill_then_resume_equals_the_uninterrupted_run(dropout_runs, tmp_path, parallel):
    uninterrupted = dropout_runs[f"{parallel}-dropout"]
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(experiment(uninterrupted.parent / "cache", 2, parallel, 0.1)))
    killed = tmp_path / "killed"
    at = kill_midway(torchrun(2, "run", config, "--out", killed, "--quiet"), killed, 5)
    assert 5 <= at < STEPS, "the run must be killed midway"
    if parallel == "fsdp":  # the same checkpoint, resumed on one process below
        shutil.copytree(killed, tmp_path / "single")
    run(torchrun(2, "run", config, "--resume", killed, "--quiet"))
    full, resumed = weights(uninterrupted), weights(killed)
    for name in full:
        assert (full[name] - resumed[name]).abs().max() <= RESUME_TOLERANCE, name
    if parallel == "fsdp":  # one process, two micro-batches a step: the same optimisation,
        run(torchrun(1, "run", config, "--resume", tmp_path / "single", "--quiet"))
        after = losses(tmp_path / "single")
        assert len(after) == STEPS
        summary = json.loads((tmp_path / "single" / "summary.json").read_text())
        assert summary["world_size"] == 1 and summary["tokens_seen"] == STEPS * 128
        # but the second process's dropout masks cannot come back: close, not equal
        assert max(abs(a - b) for a, b in zip(after, losses(uninterrupted), strict=True)) < 0.05


def test_fsdp_without_torchrun_is_one_sentence(runs, tmp_path):
    config = tmp_path / "exp.yaml"
    config.write_text(yaml.safe_dump(experiment(runs["one"].parent / "cache", 2, "fsdp", 0.0)))
    command = [sys.executable, "-m", "ropelm.cli", "run", config, "--out", tmp_path / "r"]
    proc = subprocess.run(command, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("Error: train.parallel: fsdp shards the model over torchrun")
    assert proc.stderr.count("\n") == 1
