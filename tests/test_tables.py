"""PositionTables: per-(device, dtype) tables grown by doubling, sliced by position."""

from __future__ import annotations

import torch

from ropelm.tables import PositionTables, table_dtype

CPU = torch.device("cpu")


def test_tables_are_sliced_by_position_and_grown_by_doubling():
    lengths: list[int] = []

    def make(length: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
        lengths.append(length)
        positions = torch.arange(length, dtype=dtype, device=device)
        return positions, -positions

    tables = PositionTables(make)
    first, negative = tables.get(3, 7, CPU, torch.float32)
    assert first.tolist() == [3, 4, 5, 6] and negative.tolist() == [-3, -4, -5, -6]
    for end in range(8, 200):  # decoding one token at a time
        (row, _) = tables.get(end - 1, end, CPU, torch.float32)
        assert row.tolist() == [end - 1]
    assert lengths == [7, 14, 28, 56, 112, 224]  # O(log T) rebuilds, not T
    tables.get(0, 5, CPU, torch.float64)  # another dtype: its own table
    assert lengths[-1] == 5 and tables.get(0, 5, CPU, torch.float64)[0].dtype == torch.float64


def test_table_precision_never_drops_below_float32():
    assert table_dtype(torch.bfloat16) == table_dtype(torch.float16) == torch.float32
    assert table_dtype(torch.float32) == torch.float32
    assert table_dtype(torch.float64) == torch.float64
