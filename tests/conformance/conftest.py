"""Parametrize the conformance suite: every registered variant x every check.

The variants come from :meth:`ropelm.Registry.default` at collection time, so a
new built-in or installed plugin is tested without touching this directory.
Test ids read ``test_variant_conforms[<variant>-<check>]``; tests take the
fixtures ``variant_name`` and ``conformance_check``.
"""

from __future__ import annotations

import pytest

from ropelm import Registry
from ropelm.testing import CHECKS


def check_id(check: object) -> str:
    """``check_kv_cache_matches_full_forward`` -> ``kv_cache_matches_full_forward``."""
    return getattr(check, "__name__", str(check)).removeprefix("check_")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "variant_name" in metafunc.fixturenames:
        names = Registry.default().names()
        metafunc.parametrize("variant_name", names, ids=names)
    if "conformance_check" in metafunc.fixturenames:
        metafunc.parametrize("conformance_check", CHECKS, ids=[check_id(c) for c in CHECKS])
