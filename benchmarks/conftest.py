"""Shared pieces of the benchmark suites (run with ``pytest benchmarks/ --benchmark-only``).

Benchmarks that compare two implementations side by side put one row per size in
the ``ratio_rows`` fixture; a table of those rows is printed at the end of the
session, after pytest-benchmark's own table (whose absolute times are noisy on
shared machines: read the ratios).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
from tabulate import tabulate

_ROWS = pytest.StashKey[dict[str, list[dict[str, Any]]]]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_ROWS] = {}


@pytest.fixture
def ratio_rows(request: pytest.FixtureRequest) -> dict[str, list[dict[str, Any]]]:
    """Title -> list of table rows (dicts with the same keys), printed at session end."""
    return request.config.stash[_ROWS]


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for title, rows in config.stash.get(_ROWS, {}).items():
        if rows:
            terminalreporter.section(title)
            terminalreporter.write_line(tabulate(rows, headers="keys", floatfmt=".3f"))


def interleaved_times(
    benchmark: Any, steps: dict[str, Callable[[], None]], rounds: int, warmup_rounds: int
) -> dict[str, list[float]]:
    """Time every step once per round, in alternating order (ABBA...), under pytest-benchmark.

    Returns the seconds of each step per measured round (warm-up rounds dropped),
    so ratios can be taken round by round: drift of a shared machine then hits
    every step alike.
    """
    times: dict[str, list[float]] = {name: [] for name in steps}
    calls = 0

    def one_round() -> None:
        nonlocal calls
        order = list(steps) if calls % 2 == 0 else list(reversed(steps))
        calls += 1
        for name in order:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)

    benchmark.pedantic(one_round, rounds=rounds, warmup_rounds=warmup_rounds, iterations=1)
    return {name: samples[-rounds:] for name, samples in times.items()}


@pytest.fixture
def interleave() -> Callable[..., dict[str, list[float]]]:
    """:func:`interleaved_times`, for benchmarks that compare steps side by side."""
    return interleaved_times


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, restoring the previous count afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@pytest.fixture
def threads() -> Callable[[int], contextlib.AbstractContextManager]:
    """:func:`torch_threads`, for benchmarks that pin the thread count."""
    return torch_threads
