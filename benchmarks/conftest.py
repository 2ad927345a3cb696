"""Shared pieces of the benchmark suites (run with ``pytest benchmarks/ --benchmark-only``).

Benchmarks that compare two implementations side by side put one row per size in
the ``ratio_rows`` fixture; a table of those rows is printed at the end of the
session, after pytest-benchmark's own table (whose absolute times are noisy on
shared machines: read the ratios).
"""

from __future__ import annotations

from typing import Any

import pytest
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
