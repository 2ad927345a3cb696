"""Fixtures and settings shared across the test suite.

Tests run on one intra-op thread (``ROPELM_TEST_THREADS`` to change): their
models are tiny, so a second thread only adds synchronisation, and on a busy
2-core machine each small kernel then waits for a descheduled thread (the
conformance suite took 49 s with torch's default of 2 threads and 5 s with 1).

``assert_one_sentence`` checks the one-sentence rule of user-facing errors.

``demo_plugin`` installs the real third-party plugin package in
``tests/fixtures/ropelm_demo_plugin`` with pip, once per test session, so tests
can check that an installed ``ropelm`` entry point is found. pip installs it
into a session-private directory (``pip install --target``) that is put on
``sys.path`` (and on ``PYTHONPATH`` for subprocesses) instead of into the
shared virtualenv: other test sessions running at the same time, or later ones
after a crash, never see a stray ``Demo-NoPE``.
"""

from __future__ import annotations

import importlib
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ropelm import Registry

DEMO_PLUGIN_SOURCE = Path(__file__).parent / "fixtures" / "ropelm_demo_plugin"


def pytest_configure(config: pytest.Config) -> None:
    torch.set_num_threads(int(os.environ.get("ROPELM_TEST_THREADS", "1")))


#: Checks that may be not applicable to a plugin that passes everything else: no CUDA device
#: here, or a capability the plugin does not declare.
CAPABILITY_GATED = {
    "check_flex_matches_dense_on_cuda",
    "check_device_bf16_matches_cpu_fp32",
    "check_device_kv_cache_matches_full_forward",
    "check_document_mask_isolates_documents",
}


def _assert_conforms(results: list) -> None:
    """Every conformance check passed, apart from those gated by the device or a capability."""
    outcomes = {r.check: r.outcome for r in results}
    assert set(outcomes.values()) <= {"passed", "not applicable"}, outcomes
    not_applicable = {check for check, outcome in outcomes.items() if outcome != "passed"}
    assert not_applicable <= CAPABILITY_GATED, outcomes


@pytest.fixture
def assert_conforms():
    """:func:`_assert_conforms`: run_all's results are all passes (or device/capability gated)."""
    return _assert_conforms


@pytest.fixture(scope="session")
def registry() -> Registry:
    """The default registry (built-in variants and installed entry points), built once,
    as a command builds it once and passes it down."""
    return Registry.default()


@dataclass(frozen=True)
class InstalledPlugin:
    """The demo plugin package as pip installed it."""

    variant: str  # the attention variant the package registers
    distribution: str  # its name on PyPI-style metadata
    version: str
    entry_point: str  # "name = module" in the ropelm group
    site_dir: Path  # the directory pip installed into (on sys.path while the fixture lives)

    @property
    def source(self) -> str:
        """The source string the registry reports for the variant."""
        name, _, module = self.entry_point.partition(" = ")
        return f"{self.distribution} {self.version} (entry point '{name}' = {module})"

    def env(self) -> dict[str, str]:
        """Environment for a subprocess that should see the plugin."""
        paths = [str(self.site_dir), os.environ.get("PYTHONPATH", "")]
        return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


@pytest.fixture(scope="session")
def demo_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstalledPlugin]:
    """Install ``ropelm-demo-plugin`` with pip for this session; remove it afterwards.

    An install failure fails (never skips) every test that uses the fixture.
    """
    # Build from a private copy: setuptools writes build/ and *.egg-info next to the source.
    source = tmp_path_factory.mktemp("demo-plugin-src") / "ropelm_demo_plugin"
    shutil.copytree(
        DEMO_PLUGIN_SOURCE,
        source,
        ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"),
    )
    site_dir = tmp_path_factory.mktemp("demo-plugin-site")
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--no-deps",
        "--no-build-isolation",
        "--no-index",
        "--disable-pip-version-check",
        "--quiet",
        "--target",
        str(site_dir),
        str(source),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if result.returncode != 0:
        pytest.fail(
            f"pip could not install the demo plugin (exit {result.returncode}):\n"
            f"{result.stdout}\n{result.stderr}",
            pytrace=False,
        )
    sys.path.insert(0, str(site_dir))
    importlib.invalidate_caches()
    try:
        yield InstalledPlugin(
            variant="Demo-NoPE",
            distribution="ropelm-demo-plugin",
            version="0.1.0",
            entry_point="demo = ropelm_demo_plugin",
            site_dir=site_dir,
        )
    finally:
        sys.path.remove(str(site_dir))
        for name in [m for m in sys.modules if m.split(".")[0] == "ropelm_demo_plugin"]:
            del sys.modules[name]
        importlib.invalidate_caches()
        shutil.rmtree(site_dir, ignore_errors=True)


def _assert_one_sentence(message: str) -> None:
    """No line break and no sentence end before the final period (quoted names aside)."""
    unquoted = re.sub(r"'[^']*'", "''", message)
    assert "\n" not in message, message
    assert unquoted.endswith("."), message
    assert not re.search(r"[.?!]\s+[A-Z]", unquoted), f"more than one sentence: {message}"


@pytest.fixture
def assert_one_sentence() -> Callable[[str], None]:
    """Check that a user-facing error message is one sentence (the errors.py rule)."""
    return _assert_one_sentence


def _train_tiny_runs(
    root: Path, att_types: tuple[str, ...], *, name: str = "tiny", **sections: dict
) -> dict[str, Path]:
    """One tiny trained run per variant under ``root`` (1 layer, n_embd 32, block 32, four
    steps on 300 wiki-sample documents), sharing one data cache; ``sections`` update the
    YAML's sections (``train={"max_steps": 2}``)."""
    import yaml

    from ropelm.experiment import Experiment
    from ropelm.pipeline import run_experiment

    runs = {}
    for att_type in att_types:
        raw = {
            "name": name,
            "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2,
                      "n_embd": 32, "att_type": att_type},
            "tokenizer": {"max_documents": 200},
            "data": {"source": "wiki-sample", "max_documents": 300,
                     "cache_dir": str(root / "cache")},
            "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 2},
            "eval": {"max_batches": 2},
        }  # fmt: skip
        for section, values in sections.items():
            raw[section] |= values
        path = root / f"{att_type}.yaml"
        path.write_text(yaml.safe_dump(raw))
        runs[att_type] = root / att_type
        run_experiment(Experiment.load(path), out_dir=runs[att_type], progress=False)
    return runs


@pytest.fixture(scope="session")
def train_tiny_runs() -> Callable[..., dict[str, Path]]:
    """:func:`_train_tiny_runs`: the small trained runs that eval, extend and passkey tests
    read (each module trains its own, into its own directory)."""
    return _train_tiny_runs
