"""The plugin tutorial's example (examples/my_attention.py), followed as the README says.

Two ways in, as in the README: named by an experiment YAML under ``plugins:``,
and installed as a package with a ``ropelm`` entry point (a throwaway
distribution pip-installs into a private ``--target`` directory, so no other
test or session ever sees it). Either way the variant passes the conformance
checks (``ropelm.testing.run_all``) and trains.
"""

from __future__ import annotations

import importlib
import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from ropelm import ModelConfig, Registry
from ropelm.cli import main
from ropelm.errors import ConfigError
from ropelm.experiment import Experiment
from ropelm.pipeline import run_experiment
from ropelm.testing import run_all

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "my_attention.py"

# the pyproject.toml of the README's tutorial, word for word
PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "my-attention"
version = "0.1.0"
dependencies = ["ropelm"]

[project.entry-points.ropelm]
xpos = "my_attention"

[tool.setuptools]
py-modules = ["my_attention"]
"""


def tiny_experiment(tmp_path: Path, plugins: list[str]) -> Path:
    raw = {
        "name": "xpos",
        "plugins": plugins,
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32,
                  "att_type": "xPos", "att_options": {"scale_base": 64}},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "log_every": 3},
        "eval": {"max_batches": 2},
    }  # fmt: skip
    path = tmp_path / "xpos.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_yaml_plugin_registers_passes_conformance_and_trains(tmp_path):
    registry = Registry.default([str(EXAMPLE)])
    variant = registry.variant("xPos")
    assert variant.source == f"module {EXAMPLE}"
    assert variant.spec.capabilities.extrapolates and variant.spec.capabilities.kv_cache
    results = run_all(variant.spec)
    assert [r.outcome for r in results] == ["passed"] * len(results)

    experiment = tiny_experiment(tmp_path, [str(EXAMPLE)])
    summary = run_experiment(Experiment.load(experiment), out_dir=tmp_path / "run", progress=False)
    assert summary["att_type"] == "xPos" and summary["att_options"] == {"scale_base": 64}
    assert summary["best_val_loss"] < 7.0  # trained (log 512 = 6.24 is the uniform guess)


def test_yaml_relative_plugin_path_and_bad_option(tmp_path, assert_one_sentence):
    shutil.copy(EXAMPLE, tmp_path / "my_attention.py")
    experiment = tiny_experiment(tmp_path, ["my_attention.py"])  # next to the YAML
    assert Experiment.load(experiment).attention.name == "xPos"
    with pytest.raises(ConfigError) as info:
        Experiment.load(experiment, ["model.att_options.scale_bse=3"])
    assert "did you mean 'scale_base'" in str(info.value)
    with pytest.raises(ConfigError, match="scale_base must be > 0"):
        Experiment.load(experiment, ["model.att_options.scale_base=0"])
    result = CliRunner().invoke(main, ["plugins", "--plugin", str(tmp_path / "my_attention.py")])
    assert result.exit_code == 0 and "xPos" in result.output


@pytest.fixture()
def installed(tmp_path: Path) -> Iterator[Path]:
    """The README's package (pyproject + the example) pip-installed into a private dir."""
    source = tmp_path / "my-attention"
    source.mkdir()
    (source / "pyproject.toml").write_text(PYPROJECT)
    shutil.copy(EXAMPLE, source / "my_attention.py")
    site = tmp_path / "site"
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
               "--no-index", "--disable-pip-version-check", "--quiet", "--target", str(site),
               str(source)]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(site))
    importlib.invalidate_caches()
    try:
        yield site
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("my_attention", None)
        importlib.invalidate_caches()


def test_entry_point_plugin_registers_passes_conformance_and_trains(installed, tmp_path):
    variant = Registry.default().variant("xPos")
    assert variant.source == "my-attention 0.1.0 (entry point 'xpos' = my_attention)"
    assert variant.version == "0.1.0"
    results = run_all(variant.spec)
    assert all(r.outcome == "passed" for r in results), results

    experiment = tiny_experiment(tmp_path, [])  # no plugins: the entry point is enough
    summary = run_experiment(Experiment.load(experiment), out_dir=tmp_path / "run", progress=False)
    assert summary["att_type"] == "xPos"
    assert summary["versions"]["plugin"]["source"] == variant.source
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["plugins"]["xPos"]["version"] == "0.1.0"


def test_xpos_scores_decay_with_distance():
    """The property the paper is after: same q and k, farther apart -> smaller score."""
    registry = Registry.default([str(EXAMPLE)])
    config = ModelConfig(
        block_size=64,
        n_layer=1,
        n_head=1,
        n_embd=8,
        att_type="xPos",
        att_options={"scale_base": 16},
    )
    layer = registry.resolve(config).build_layer(config)
    q_cos, q_sin, k_cos, k_sin = layer.tables.get(0, 64, torch.device("cpu"), torch.float32)
    # the rotation cancels for q_n . k_m when the angles are equal; the scales leave zeta^(n-m)
    scale_q = torch.sqrt(q_cos**2 + q_sin**2)  # (64, hs/2)
    scale_k = torch.sqrt(k_cos**2 + k_sin**2)
    decay = scale_q[40] * scale_k[40 - torch.arange(1, 30)]  # (29, hs/2): distances 1..29
    assert torch.all(decay[1:] < decay[:-1])  # strictly decreasing with distance
    assert torch.allclose(scale_q[10] * scale_k[10], torch.ones(4))  # distance 0: no decay
