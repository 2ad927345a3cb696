"""Evaluation: validation loss and perplexity over non-overlapping windows."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch

from ropelm.distributed import DistributedContext


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    token_file: Any,
    *,
    batch_size: int,
    block_size: int,
    max_batches: int | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    dist_ctx: DistributedContext | None = None,
) -> float:
    """Mean next-token cross-entropy over the evaluation windows of ``token_file``.

    Windows are non-overlapping and cover the split once (up to ``max_batches``
    batches). As in training, ``batch_size`` is per process: under torchrun the
    processes split global batches of ``batch_size * world_size`` windows and the
    sums are reduced, so N processes with batch_size b evaluate exactly the
    windows one process with batch_size N*b does.
    """
    dist_ctx = dist_ctx or DistributedContext()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    lo, hi = dist_ctx.rank * batch_size, (dist_ctx.rank + 1) * batch_size
    global_batch = batch_size * dist_ctx.world_size
    for x, y in token_file.eval_batches(global_batch, block_size, max_batches):
        x, y = x[lo:hi].to(device), y[lo:hi].to(device)
        if x.numel() == 0:  # the last, partial batch may not reach every process
            continue
        with autocast():
            _, loss = model(x, y)
        n = y.numel()
        total[0] += loss.double() * n
        total[1] += n
    model.train(was_training)
    total = dist_ctx.all_reduce_sum(total)
    if total[1] == 0:
        return float("nan")
    return (total[0] / total[1]).item()


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay finite in JSON."""
    return math.exp(min(loss, 700.0))
