"""Training batches: the global batch split over processes, and a prefetch that resumes."""

from __future__ import annotations

import numpy as np
import torch

from ropelm.batches import TrainBatches
from ropelm.distributed import DistributedContext
from ropelm.tokenfile import TokenFile


def split(tmp_path) -> TokenFile:
    np.arange(5000, dtype=np.uint16).tofile(tmp_path / "train.bin")
    return TokenFile(tmp_path / "train.bin", np.uint16)


def batches(tmp_path, rank: int = 0, world: int = 1, batch_size: int = 4) -> TrainBatches:
    return TrainBatches(
        split(tmp_path), batch_size=batch_size, block_size=8,
        generator=torch.Generator().manual_seed(0), device=torch.device("cpu"),
        dist=DistributedContext(rank=rank, world_size=world),
    )  # fmt: skip


def test_processes_share_the_global_batch(tmp_path):
    whole = [next(batches(tmp_path, batch_size=4))[0]]
    halves = [next(batches(tmp_path, rank=r, world=2, batch_size=2))[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), whole[0])
    x, y = next(batches(tmp_path))
    assert torch.equal(y[:, :-1], x[:, 1:])  # targets are the inputs shifted by one


def test_the_saved_state_reproduces_the_next_batch_despite_the_prefetch(tmp_path):
    stream = batches(tmp_path)
    next(stream)  # one batch handed out, the next one already prefetched
    state = stream.state()
    expected = [next(stream)[0] for _ in range(3)]
    resumed = batches(tmp_path)
    resumed.set_state(state)
    assert all(torch.equal(next(resumed)[0], x) for x in expected)
