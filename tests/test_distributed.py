"""The torchrun environment and device placement (training under torchrun: test_parallel.py)."""

from __future__ import annotations

import pytest
import torch

from ropelm.distributed import DistributedContext, context_from_env, resolve_device
from ropelm.errors import ConfigError


def test_env_without_torchrun_is_a_single_process(monkeypatch):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    assert context_from_env() == DistributedContext(0, 0, 1)
    assert context_from_env().is_main and not context_from_env().enabled


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
