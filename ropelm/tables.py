"""Per-position tables (RoPE's cos/sin, sinusoids, ...) cached per device and grown on demand.

Position-dependent constants are derived state: they must not be module buffers
(``Module.to(torch.bfloat16)`` would round them, and checkpoints would hold
them), and recomputing them on every forward pass wastes time. A
:class:`PositionTables` keeps one set of tables per (device, dtype), computed by
a function of the length, and grows it by doubling when a longer sequence asks
for more positions, so a run that decodes token by token recomputes it
O(log T) times, not T times.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# make(length, device, dtype) -> tensors whose first dimension is the position
TableMaker = Callable[[int, torch.device, torch.dtype], tuple[torch.Tensor, ...]]


def table_dtype(x_dtype: torch.dtype) -> torch.dtype:
    """The precision tables are kept in: float64 for float64 inputs, else float32.

    A bf16 or fp16 table would lose the angle at large positions, so half-precision
    inputs get float32 tables (the computation upcasts).
    """
    return torch.float64 if x_dtype == torch.float64 else torch.float32


class PositionTables:
    """Tables for positions 0, 1, 2, ... built by ``make`` and kept per (device, dtype).

    ``make(length, device, dtype)`` returns a tuple of tensors of shape (length, ...).
    :meth:`get` returns the rows ``start:end`` of each.
    """

    def __init__(self, make: TableMaker) -> None:
        self._make = make
        self._tables: dict[tuple[torch.device, torch.dtype], tuple[torch.Tensor, ...]] = {}

    def get(
        self, start: int, end: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, ...]:
        """Rows ``start:end`` of every table, on ``device`` in ``dtype``."""
        key = (torch.device(device), dtype)
        tables = self._tables.get(key)
        if tables is None or tables[0].size(0) < end:
            length = max(end, 2 * tables[0].size(0) if tables is not None else end)
            tables = tuple(self._make(length, key[0], dtype))
            self._tables[key] = tables
        return tuple(t[start:end] for t in tables)
