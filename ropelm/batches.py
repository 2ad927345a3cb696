"""Training batches, assembled and sent to the device one micro-batch ahead of the step.

Every process draws the same *global* batch of window starts from one seeded
generator and keeps its own slice, so N processes with batch_size b see
exactly the windows one process with batch_size N*b sees. On CUDA the next
micro-batch is read, pinned and copied (``non_blocking``) while the GPU still
runs the current one: the host never waits for the device to hand it work.

Prefetching draws from the generator early, so the state a checkpoint saves is
the one from *before* the prefetched batch (:meth:`TrainBatches.state`);
restoring it reproduces the same batches, which keeps resumed runs exact.
"""

from __future__ import annotations

import torch

from ropelm.distributed import DistributedContext
from ropelm.tokenfile import TokenFile


class TrainBatches:
    """Micro-batches (x, y) of ``batch_size`` windows on ``device``, one prefetched."""

    def __init__(
        self,
        split: TokenFile,
        *,
        batch_size: int,
        block_size: int,
        generator: torch.Generator,
        device: torch.device,
        dist: DistributedContext,
    ) -> None:
        self.split, self.batch_size, self.block_size = split, batch_size, block_size
        self.generator, self.device, self.dist = generator, device, dist
        self._pin = device.type == "cuda"
        self._next: tuple[torch.Tensor, torch.Tensor] | None = None
        self._state_before_next: torch.Tensor | None = None

    def state(self) -> torch.Tensor:
        """The generator state that reproduces the next batch this object hands out."""
        return self._state_before_next if self._next is not None else self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        """Continue from a :meth:`state` (drops a prefetched batch)."""
        self.generator.set_state(state)
        self._next = self._state_before_next = None

    def __iter__(self) -> TrainBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self._next if self._next is not None else self._load()
        self._state_before_next = self.generator.get_state()
        self._next = self._load()  # the copy runs while the caller computes on ``batch``
        return batch

    def _load(self) -> tuple[torch.Tensor, torch.Tensor]:
        rank, world = self.dist.rank, self.dist.world_size
        starts = self.split.sample_starts(self.batch_size * world, self.block_size, self.generator)
        lo = rank * self.batch_size
        x, y = self.split.windows(starts[lo : lo + self.batch_size], self.block_size)  # (B, T)
        if self._pin:
            x, y = x.pin_memory(), y.pin_memory()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
