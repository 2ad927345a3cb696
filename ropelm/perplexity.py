"""Evaluation: validation loss, perplexity, and perplexity at other sequence lengths.

:func:`evaluate_loss` is the engine's validation loss (non-overlapping windows of
``block_size`` tokens). :func:`length_perplexity` scores a trained model on
windows of any length L (length extrapolation) with one of two methods:

* ``nonoverlapping`` -- disjoint windows of L tokens, every target scored. Tokens
  early in a window have little context, so this is pessimistic.
* ``strided`` -- windows of L tokens moved by a stride S (default L/2); each
  window scores only the targets no earlier window scored, so every token but
  those of the first window is predicted with at least L - S tokens of context
  (the "perplexity of fixed-length models" method of the Hugging Face docs,
  https://huggingface.co/docs/transformers/perplexity).

Both methods score the same targets: those of the first ``max_windows``
non-overlapping windows (tokens 1 .. n L of the split), so their numbers differ
only by the context each token gets; with S = L the strided method *is* the
non-overlapping one. Evaluation lengths are written relative to the training
block size (``"2x"``) or in tokens (``"2048"``): see :func:`parse_length`.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ropelm.distributed import DistributedContext
from ropelm.errors import ConfigError
from ropelm.masks import document_ids

METHODS = ("nonoverlapping", "strided")


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
    eot_id: int | None = None,
) -> float:
    """Mean next-token cross-entropy over the evaluation windows of ``token_file``.

    Windows are non-overlapping and cover the split once (up to ``max_batches``
    batches). As in training, ``batch_size`` is per process: under torchrun the
    processes split global batches of ``batch_size * world_size`` windows and the
    sums are reduced, so N processes with batch_size b evaluate exactly the
    windows one process with batch_size N*b does. With ``eot_id`` (a run trained
    with ``train.document_mask``) attention stays within documents, as in training.
    """
    dist_ctx = dist_ctx or DistributedContext()
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, tokens)
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    lo, hi = dist_ctx.rank * batch_size, (dist_ctx.rank + 1) * batch_size
    global_batch = batch_size * dist_ctx.world_size
    for x, y in token_file.eval_batches(global_batch, block_size, max_batches):
        x, y = x[lo:hi].to(device), y[lo:hi].to(device)
        if x.numel() == 0:  # the last, partial batch may not reach every process
            continue
        with autocast():
            _, loss = model(x, y, document_ids=_documents(x, eot_id))
        # the loss ignores padding targets: weigh the batch by the targets it scored
        scored = (y != pad).sum() if pad is not None else torch.tensor(y.numel(), device=device)
        # an all-padding batch has no loss (the model returns nan): it counts for nothing;
        # everything stays on the device, read once at the end
        total[0] += torch.where(scored > 0, loss.double() * scored, 0.0)
        total[1] += scored
    model.train(was_training)
    loss_sum, tokens = dist_ctx.all_reduce_sum(total).tolist()  # the one read from the device
    return loss_sum / tokens if tokens else float("nan")


def _documents(x: torch.Tensor, eot_id: int | None) -> torch.Tensor | None:
    return document_ids(x, eot_id) if eot_id is not None else None


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay finite in JSON."""
    return math.exp(min(loss, 700.0))


class LengthSpecError(ConfigError):
    """An evaluation length or stride is written wrongly (e.g. ``"3y"``)."""


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*[xX]\s*$")
_ABSOLUTE = re.compile(r"^\s*\d+\s*$")


def parse_length(spec: str | int, block_size: int) -> int:
    """An evaluation length in tokens: ``"2x"`` -> 2 * block_size, ``"2048"`` -> 2048.

    Relative lengths may be fractional (``"0.5x"``) and are rounded to the nearest token.

    Raises:
        LengthSpecError: not of the form ``Nx`` or ``N``, or not a positive length.
    """
    text = str(spec)
    if match := _RELATIVE.match(text):
        length = round(float(match.group(1)) * block_size)
    elif _ABSOLUTE.match(text):
        length = int(text)
    else:
        raise LengthSpecError(
            f"Evaluation length '{text}' is not understood; write it relative to the "
            "training block size (e.g. 1x, 2x, 0.5x) or in tokens (e.g. 2048)."
        )
    if length < 1:
        raise LengthSpecError(f"Evaluation length '{text}' is {length} tokens; use at least 1.")
    return length


def split_specs(specs: str | list[str] | tuple[str, ...]) -> list[str]:
    """``"1x,2x"`` or ``["1x", "2x,4x"]`` -> ``["1x", "2x", "4x"]`` (duplicates dropped)."""
    parts = [specs] if isinstance(specs, str) else list(specs)
    out: list[str] = []
    for part in parts:
        for item in str(part).split(","):
            item = item.strip()
            if item and item not in out:
                out.append(item)
    return out


def parse_stride(spec: str | float | int, length: int) -> int:
    """The stride in tokens for windows of ``length``: a fraction (``"0.5"``) or tokens (``"64"``).

    A fraction f in (0, 1] gives round(f * length) (at least 1); a whole number of
    tokens is capped at ``length``.

    Raises:
        LengthSpecError: not a fraction in (0, 1] nor a positive whole number.
    """
    text = str(spec).strip()
    try:
        if re.fullmatch(r"\d+", text):
            tokens = int(text)
            if tokens < 1:
                raise ValueError
            return min(tokens, length)
        fraction = float(text)
        if not 0.0 < fraction <= 1.0:
            raise ValueError
    except ValueError:
        raise LengthSpecError(
            f"Stride '{text}' is not understood; give a fraction of the window length in "
            "(0, 1] (e.g. 0.5) or a whole number of tokens (e.g. 64)."
        ) from None
    return max(1, min(length, round(fraction * length)))


@dataclass(frozen=True)
class WindowPlan:
    """Windows of ``length`` tokens and, for each, the first target index it scores.

    Window k reads inputs ``tokens[starts[k] : starts[k] + length]`` and predicts
    targets ``tokens[starts[k] + 1 : starts[k] + length + 1]``; it scores target
    indices ``first_scored[k] .. length - 1``. Together the windows score targets
    1 .. ``span`` of the split exactly once.
    """

    length: int
    stride: int
    starts: np.ndarray  # (K,) int64, ascending
    first_scored: np.ndarray  # (K,) int64, 0 for the first window

    @property
    def span(self) -> int:
        """How many targets are scored (``n * length`` for n non-overlapping windows)."""
        return int(self.starts[-1]) + self.length if len(self.starts) else 0

    @property
    def num_windows(self) -> int:
        return len(self.starts)


def window_plan(
    num_tokens: int,
    length: int,
    stride: int,
    max_windows: int | None,
    max_tokens: int | None = None,
) -> WindowPlan:
    """The strided windows that score the targets of the first ``n`` non-overlapping windows.

    ``n = min((num_tokens - 1) // length, max_windows, max_tokens // length)``: a
    token cap that is a multiple of every length makes every length score the
    very same targets. Windows start at
    0, S, 2 S, ... and a last one ends exactly at target ``n * length``; window
    k > 0 scores the targets after those of window k - 1, so each of them has at
    least ``length - stride`` tokens of context. ``stride == length`` gives the
    ``n`` non-overlapping windows, each scored fully.
    """
    if not 1 <= stride <= length:
        raise ValueError(f"stride must be in [1, {length}], got {stride}")
    n = (num_tokens - 1) // length
    if max_windows is not None:
        n = min(n, max_windows)
    if max_tokens is not None:
        n = min(n, max_tokens // length)
    if n < 1:
        empty = np.zeros(0, dtype=np.int64)
        return WindowPlan(length, stride, empty, empty)
    last = n * length - length
    starts = np.arange(0, last + 1, stride, dtype=np.int64)
    if starts[-1] != last:
        starts = np.append(starts, last)
    first = np.zeros_like(starts)
    first[1:] = starts[:-1] + length - starts[1:]  # targets already scored by the previous one
    return WindowPlan(length, stride, starts, first)


def _plan_batches(
    tokens: np.ndarray, plan: WindowPlan, batch_size: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Inputs, targets (B, L) int64 and the scored-target mask (B, L) bool, batch by batch."""
    offsets = np.arange(plan.length + 1, dtype=np.int64)  # (L + 1,)
    positions = torch.arange(plan.length)  # (L,)
    for lo in range(0, plan.num_windows, batch_size):
        starts = plan.starts[lo : lo + batch_size]
        window = torch.from_numpy(tokens[starts[:, None] + offsets].astype(np.int64))  # (B, L+1)
        first = torch.from_numpy(plan.first_scored[lo : lo + batch_size])  # (B,)
        scored = positions[None, :] >= first[:, None]  # (B, L)
        yield window[:, :-1], window[:, 1:], scored


@dataclass(frozen=True)
class LengthResult:
    """Mean next-token loss over the scored targets of a :class:`WindowPlan`."""

    loss: float
    tokens: int  # targets scored (padding targets excluded)
    windows: int  # forward passes of ``length`` tokens

    @property
    def ppl(self) -> float:
        return perplexity(self.loss)


@torch.no_grad()
def length_perplexity(
    model: torch.nn.Module,
    token_file: Any,
    *,
    length: int,
    stride: int | None = None,
    batch_size: int = 8,
    max_windows: int | None = None,
    max_tokens: int | None = None,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ignore_index: int | None = None,
    eot_id: int | None = None,
) -> LengthResult:
    """Loss and perplexity of ``model`` on windows of ``length`` tokens of ``token_file``.

    ``stride=None`` (or ``length``) is the non-overlapping method; a smaller
    stride is the strided method (see the module docstring). Both score the
    targets of the first ``n`` non-overlapping windows, n capped by
    ``max_windows`` and by ``max_tokens // length``. ``batch_size`` counts
    windows per forward pass. Targets equal to ``ignore_index`` (the padding
    id) are not scored, as in training; with ``eot_id``, attention stays within
    documents (runs trained with ``train.document_mask``).

    Raises:
        ropelm.DataError: the split has fewer than ``length + 1`` tokens.
        LengthSpecError: ``max_tokens`` is smaller than one window.
    """
    token_file.num_eval_windows(length)  # one window must fit, else a DataError
    if max_tokens is not None and max_tokens < length:
        raise LengthSpecError(
            f"A cap of {max_tokens} tokens is less than one window of {length} tokens; "
            "raise --max-tokens or leave it out."
        )
    plan = window_plan(len(token_file), length, stride or length, max_windows, max_tokens)
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (nll sum, targets scored)
    try:
        for x, y, scored in _plan_batches(token_file.tokens, plan, batch_size):
            x, y, scored = x.to(device), y.to(device), scored.to(device)
            with autocast():
                logits, _ = model(x, document_ids=_documents(x, eot_id))  # (B, L, V)
            nll = F.cross_entropy(
                logits.float().flatten(0, 1), y.flatten(), reduction="none"
            ).view_as(y)  # (B, L)
            if ignore_index is not None:
                scored = scored & (y != ignore_index)
            total[0] += torch.where(scored, nll.double(), 0.0).sum()
            total[1] += scored.sum()
    finally:
        model.train(was_training)
    nll_sum, count = total.tolist()  # the one read from the device
    loss = nll_sum / count if count else float("nan")
    return LengthResult(loss=loss, tokens=int(count), windows=plan.num_windows)
