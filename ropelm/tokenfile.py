"""Batches from a flat token file: random training windows and evaluation windows.

A :class:`TokenFile` is a read-only memory map of one split (see
:mod:`ropelm.data` for the layout), so only the pages a batch touches are read
and memory does not grow with the corpus. A window is ``block_size + 1``
consecutive tokens starting at ``start``; its inputs are the first
``block_size`` tokens and its targets the last ``block_size`` (shifted by one).

Training draws starts uniformly over ``[0, len - block_size - 1]`` with a
caller-owned ``torch.Generator`` (:meth:`TokenFile.sample_starts`) and then
reads them (:meth:`TokenFile.windows`); keeping the two apart lets every
distributed rank draw the same global batch and read only its own slice.
Evaluation (:meth:`TokenFile.eval_batches`) walks the non-overlapping windows
starting at ``0, block_size, 2 * block_size, ...``: every target position
``1 .. n * block_size`` is scored exactly once, where
``n = (len - 1) // block_size`` (the last partial window is left out).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ropelm.errors import DataError

__all__ = ["TokenFile"]


class TokenFile:
    """A read-only ``np.memmap`` of a flat token file, with batch helpers."""

    def __init__(self, path: str | Path, dtype: np.dtype | str, *, name: str | None = None):
        self.path = Path(path)
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.name = name or self.path.stem
        try:
            size = self.path.stat().st_size
        except OSError as err:
            raise DataError(f"Token file {self.path} cannot be opened ({err}).") from None
        if size % self.dtype.itemsize:
            raise DataError(
                f"Token file {self.path} has {size} bytes, not a whole number of "
                f"{self.dtype.name} tokens; rebuild it with `ropelm-exp prepare --force`."
            )
        # np.memmap cannot map an empty file; an empty split simply has no windows.
        self._tokens = (
            np.memmap(self.path, dtype=self.dtype, mode="r") if size else np.zeros(0, self.dtype)
        )

    def __len__(self) -> int:
        """The number of tokens."""
        return int(self._tokens.shape[0])

    def __repr__(self) -> str:
        return f"TokenFile({str(self.path)!r}, {self.dtype.name}, {len(self):,} tokens)"

    def __getstate__(self) -> dict[str, Any]:  # pickle the path, not the mapped tokens
        return {"path": self.path, "dtype": self.dtype.str, "name": self.name}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["dtype"], name=state["name"])  # type: ignore[misc]

    @property
    def tokens(self) -> np.ndarray:
        """The whole split as a read-only array (memory-mapped, not loaded)."""
        return self._tokens

    def _require_window(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be positive, not {block_size}")
        if len(self) < block_size + 1:
            raise DataError(
                f"The {self.name} split has {len(self)} tokens, fewer than one window of "
                f"block_size + 1 = {block_size + 1}; use a smaller model.block_size or more data."
            )

    def sample_starts(self, n: int, block_size: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` window starts drawn uniformly from the valid ones, as an int64 tensor.

        Deterministic given the generator's state (a CPU ``torch.Generator``),
        which it advances.
        """
        self._require_window(block_size)
        high = len(self) - block_size  # starts 0 .. len - block_size - 1
        return torch.randint(0, high, (n,), generator=generator, dtype=torch.int64)

    def windows(self, starts: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of the windows at ``starts``: two int64 ``(n, block_size)`` tensors.

        ``y[i, t] == x[i, t + 1]`` for ``t < block_size - 1``: targets are the
        inputs shifted by one token.
        """
        self._require_window(block_size)
        idx = starts.detach().to("cpu", torch.int64).numpy().reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() > len(self) - block_size - 1):
            raise IndexError(
                f"window starts must lie in [0, {len(self) - block_size - 1}] for the "
                f"{self.name} split with block_size {block_size}"
            )
        chunk = np.empty((idx.size, block_size + 1), dtype=np.int64)
        for row, start in enumerate(idx.tolist()):
            chunk[row] = self._tokens[start : start + block_size + 1]
        tokens = torch.from_numpy(chunk)
        return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    def num_eval_windows(self, block_size: int) -> int:
        """The number of non-overlapping evaluation windows: ``(len - 1) // block_size``."""
        self._require_window(block_size)
        return (len(self) - 1) // block_size

    def eval_batches(
        self, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of the non-overlapping windows that cover the split once, in order.

        At most ``max_batches`` batches; the last batch may be smaller than
        ``batch_size``. Raises at once (not on first iteration) when the split
        is too small for one window.
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be positive, not {batch_size}")
        count = self.num_eval_windows(block_size)
        if max_batches is not None:
            count = min(count, max_batches * batch_size)
        return self._eval_batches(count, batch_size, block_size)

    def _eval_batches(
        self, count: int, batch_size: int, block_size: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for lo in range(0, count, batch_size):
            n = min(batch_size, count - lo)
            # Consecutive windows share their boundary token: read the span once.
            span = self._tokens[lo * block_size : (lo + n) * block_size + 1].astype(np.int64)
            tokens = torch.from_numpy(span)
            yield tokens[:-1].reshape(n, block_size).clone(), tokens[1:].reshape(n, block_size)
