"""Data-parallel training under torchrun (2 CPU processes, gloo) matches one process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ropelm.distributed import DistributedContext, context_from_env, resolve_device
from ropelm.errors import ConfigError

# Two processes each with batch_size 2 see exactly the windows one process with
# batch_size 4 sees; only the order of the floating-point gradient reduction
# differs, so the losses agree to float32 round-off amplified over a few steps.
LOSS_TOLERANCE = 1e-4


def _experiment(cache_dir: Path, batch_size: int) -> dict:
    return {
        "name": "ddp",
        "model": {
            "block_size": 32,
            "vocab_size": 512,
            "n_layer": 2,
            "n_head": 2,
            "n_embd": 32,
            "dropout": 0.0,
        },
        "tokenizer": {"max_documents": 300},
        "data": {"source": "wiki-sample", "max_documents": 400, "cache_dir": str(cache_dir)},
        "train": {
            "max_steps": 8,
            "batch_size": batch_size,
            "learning_rate": 3e-3,
            "log_every": 1,
            "eval_every": 4,
        },
        "eval": {"max_batches": 4},
    }


def _losses(run_dir: Path, key: str) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row[key] for row in rows if key in row]


def test_env_without_torchrun_is_a_single_process(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert context_from_env() == DistributedContext(0, 0, 1)
    assert context_from_env().is_main and not context_from_env().enabled


@pytest.mark.slow
def test_two_cpu_processes_match_one_process_with_the_same_global_batch(tmp_path):
    cache = tmp_path / "cache"
    single = tmp_path / "single.yaml"
    single.write_text(yaml.safe_dump(_experiment(cache, batch_size=4)))
    double = tmp_path / "double.yaml"
    double.write_text(yaml.safe_dump(_experiment(cache, batch_size=2)))

    subprocess.run(
        [sys.executable, "-m", "ropelm.cli", "run", str(single), "--out", str(tmp_path / "one"),
         "--quiet"], check=True, capture_output=True,
    )  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "ropelm.cli", "run", str(double), "--out", str(tmp_path / "two"), "--quiet"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]

    one, two = _losses(tmp_path / "one", "train_loss"), _losses(tmp_path / "two", "train_loss")
    assert len(one) == len(two) == 8
    assert max(abs(a - b) for a, b in zip(one, two, strict=True)) <= LOSS_TOLERANCE
    val_one, val_two = _losses(tmp_path / "one", "val_loss"), _losses(tmp_path / "two", "val_loss")
    assert max(abs(a - b) for a, b in zip(val_one, val_two, strict=True)) <= LOSS_TOLERANCE
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["tokens_seen"] == 8 * 4 * 32  # the global batch, counted once


def test_torchrun_with_one_process_is_launched_but_alone(monkeypatch):
    monkeypatch.setenv("RANK", "0"), monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    ctx = context_from_env()
    assert ctx.launched and not ctx.enabled  # a process group of one: FSDP can run, no DDP


@pytest.mark.parametrize(
    ("name", "message"),
    [("tpu:0", "not a device name"), ("gpu", "not a device name"),
     ("cuda", "this machine has no CUDA device"), ("cuda:1", "this machine has no CUDA device")],
)  # fmt: skip
def test_impossible_devices_are_one_sentence(monkeypatch, name, message, assert_one_sentence):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=message) as info:
        resolve_device(name)
    assert_one_sentence(str(info.value))


def test_each_torchrun_process_takes_its_own_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    ctx = DistributedContext(rank=3, local_rank=1, world_size=4, launched=True)
    assert resolve_device("auto", ctx) == torch.device("cuda", 1)
    assert resolve_device("cuda", ctx) == torch.device("cuda", 1)
    assert resolve_device("cpu", ctx) == torch.device("cpu")
    with pytest.raises(ConfigError, match="would put every torchrun process on GPU 0"):
        resolve_device("cuda:0", ctx)
    assert resolve_device("cuda:0", DistributedContext()) == torch.device("cuda", 0)


def test_auto_is_the_cpu_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto", DistributedContext()) == torch.device("cpu")
