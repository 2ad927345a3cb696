"""The plugin tutorial's example (examples/my_attention.py, a score_mod variant), followed as
the README says, and the second example (examples/xpos.py, a rotation).

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

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "my_attention.py"
XPOS = EXAMPLES / "xpos.py"

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
kerple_power = "my_attention"

[tool.setuptools]
py-modules = ["my_attention"]
"""


def tiny_experiment(tmp_path: Path, plugins: list[str]) -> Path:
    raw = {
        "name": "kerple-power",
        "plugins": plugins,
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32,
                  "att_type": "KERPLE-Power", "att_options": {"eps": 0.05}},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 3, "batch_size": 4, "eval_every": 3, "log_every": 3},
        "eval": {"max_batches": 2},
    }  # fmt: skip
    path = tmp_path / "kerple-power.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_yaml_plugin_registers_passes_conformance_and_trains(tmp_path, assert_conforms):
    registry = Registry.default([str(EXAMPLE)])
    variant = registry.variant("KERPLE-Power")
    assert variant.source == f"module {EXAMPLE}"
    assert variant.spec.capabilities.extrapolates and variant.spec.capabilities.kv_cache
    results = run_all(variant.spec)
    assert_conforms(results)
    assert {r.check: r.outcome for r in results}["check_backends_agree"] == "passed"

    experiment = tiny_experiment(tmp_path, [str(EXAMPLE)])
    summary = run_experiment(Experiment.load(experiment), out_dir=tmp_path / "run", progress=False)
    assert summary["att_type"] == "KERPLE-Power" and summary["att_options"] == {"eps": 0.05}
    assert summary["best_val_loss"] < 7.0  # trained (log 512 = 6.24 is the uniform guess)


def test_yaml_relative_plugin_path_and_bad_option(tmp_path, assert_one_sentence):
    shutil.copy(EXAMPLE, tmp_path / "my_attention.py")
    experiment = tiny_experiment(tmp_path, ["my_attention.py"])  # next to the YAML
    assert Experiment.load(experiment).attention.name == "KERPLE-Power"
    with pytest.raises(ConfigError) as info:
        Experiment.load(experiment, ["model.att_options.epss=3"])
    assert "did you mean 'eps'" in str(info.value)
    assert_one_sentence(str(info.value))
    with pytest.raises(ConfigError, match=r"eps must be in \(0, 2\)"):
        Experiment.load(experiment, ["model.att_options.eps=0"])
    result = CliRunner().invoke(main, ["plugins", "--plugin", str(tmp_path / "my_attention.py")])
    assert result.exit_code == 0 and "KERPLE-Power" in result.output


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


def test_entry_point_plugin_registers_passes_conformance_and_trains(
    installed, tmp_path, assert_conforms
):
    variant = Registry.default().variant("KERPLE-Power")
    assert variant.source == "my-attention 0.1.0 (entry point 'kerple_power' = my_attention)"
    assert variant.version == "0.1.0"
    results = run_all(variant.spec)
    assert_conforms(results)

    experiment = tiny_experiment(tmp_path, [])  # no plugins: the entry point is enough
    summary = run_experiment(Experiment.load(experiment), out_dir=tmp_path / "run", progress=False)
    assert summary["att_type"] == "KERPLE-Power"
    assert summary["versions"]["plugin"]["source"] == variant.source
    env = json.loads((tmp_path / "run" / "environment.json").read_text())
    assert env["plugins"]["KERPLE-Power"]["version"] == "0.1.0"


def test_power_bias_is_the_papers_kernel():
    """-r1 |i - j| ** r2 per head, with r1 and r2 clamped into the kernel's valid range."""
    registry = Registry.default([str(EXAMPLE)])
    config = ModelConfig(block_size=16, n_layer=1, n_head=2, n_embd=8, att_type="KERPLE-Power")
    bias = registry.resolve(config).build_layer(config).score_mod
    with torch.no_grad():
        bias.r1.copy_(torch.tensor([0.5, -3.0]))  # -3: clamped to eps
        bias.r2.copy_(torch.tensor([1.5, 7.0]))  # 7: clamped to 2
    zero = torch.zeros(())
    for h, (r1, r2) in enumerate([(0.5, 1.5), (0.01, 2.0)]):
        for i, j in [(0, 0), (5, 5), (5, 4), (9, 2), (15, 0)]:
            got = bias(zero, torch.tensor(0), torch.tensor(h), torch.tensor(i), torch.tensor(j))
            assert got.item() == pytest.approx(-r1 * abs(i - j) ** r2, rel=1e-5, abs=1e-7)


def test_xpos_example_conforms_and_its_scores_decay_with_distance(assert_conforms):
    """The property the paper is after: same q and k, farther apart -> smaller score."""
    registry = Registry.default([str(XPOS)])
    assert_conforms(run_all(registry.get("xPos")))
    config = ModelConfig(
        block_size=64,
        n_layer=1,
        n_head=1,
        n_embd=8,
        att_type="xPos",
        att_options={"scale_base": 16},
    )
    layer = registry.resolve(config).build_layer(config)
    q_cos, q_sin, k_cos, k_sin = layer.rotation.tables.get(
        0, 64, torch.device("cpu"), torch.float32
    )
    # the rotation cancels for q_n . k_m when the angles are equal; the scales leave zeta^(n-m)
    scale_q = torch.sqrt(q_cos**2 + q_sin**2)  # (64, hs/2)
    scale_k = torch.sqrt(k_cos**2 + k_sin**2)
    decay = scale_q[40] * scale_k[40 - torch.arange(1, 30)]  # (29, hs/2): distances 1..29
    assert torch.all(decay[1:] < decay[:-1])  # strictly decreasing with distance
    assert torch.allclose(scale_q[10] * scale_k[10], torch.ones(4))  # distance 0: no decay
