"""``ropelm-exp plugins`` and ``ropelm-exp validate``, run in process with click's CliRunner."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner, Result

from ropelm import Registry
from ropelm.cli import main

PLUGIN = textwrap.dedent(
    """\
    import ropelm

    @ropelm.hookimpl
    def ropelm_register_attention(register):
        register(ropelm.AttentionSpec(
            name="Cli-NoPE", description="NoPE from a file", reference="https://example.invalid",
            factory=lambda config, options: ropelm.SelfAttention(config),
            capabilities=ropelm.Capabilities(kv_cache=False),
        ))
    """
)
GOOD = {
    "name": "cli-test",
    "model": {"n_layer": 2, "n_head": 4, "n_embd": 32, "vocab_size": 512, "block_size": 32},
    "train": {"batch_size": 2, "max_steps": 1},
}


def invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def write_yaml(path: Path, content: dict | str) -> Path:
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    return path


def assert_one_line_error(result: Result, *fragments: str) -> None:
    """Exit status 1, nothing on stdout, and one 'Error: ...' line on stderr, no traceback."""
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# -- plugins ----------------------------------------------------------------------------------


def test_plugins_table_lists_every_variant_with_source_and_capabilities():
    result = invoke("plugins")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["name", "description", "source", "capabilities"]
    registry = Registry.default()
    for variant in registry:
        row = next(line for line in lines if line.startswith(variant.spec.name + " "))
        # long sources and capability lists wrap, so compare the first words only
        assert variant.source.split()[0] in row
        assert variant.spec.capabilities.labels()[0] in row
    rope = next(line for line in lines if line.startswith("RoPE-SM "))
    assert "builtin (ropelm.plugins.rope_sm)" in rope


def test_plugins_json_has_name_description_source_capabilities():
    result = invoke("plugins", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    registry = Registry.default()
    assert [row["name"] for row in rows] == registry.names()
    for row in rows:
        variant = registry.variant(row["name"])
        assert {"name", "description", "source", "capabilities"} <= set(row)
        assert row["description"] == variant.spec.description
        assert row["source"] == variant.source
        assert row["capabilities"] == variant.spec.capabilities.as_dict()
    rope = next(row for row in rows if row["name"] == "RoPE-SM")
    assert rope["capabilities"] == {
        "causal": True,
        "kv_cache": True,
        "extrapolates": True,
        "input_position_embedding": False,
        "document_mask": True,
    }


def test_plugins_loads_plugin_files_and_experiment_plugins(tmp_path):
    plugin = tmp_path / "cli_nope.py"
    plugin.write_text(PLUGIN)
    result = invoke("plugins", "--json", "--plugin", str(plugin))
    assert result.exit_code == 0, result.output
    row = next(row for row in json.loads(result.stdout) if row["name"] == "Cli-NoPE")
    assert row["source"] == f"module {plugin}"
    assert row["capabilities"]["kv_cache"] is False

    experiment = write_yaml(tmp_path / "x.yaml", {"plugins": ["cli_nope.py"]})
    result = invoke("plugins", "--experiment", str(experiment))
    assert result.exit_code == 0, result.output
    assert any(line.startswith("Cli-NoPE ") for line in result.stdout.splitlines())


def test_plugins_with_a_broken_plugin_is_one_line_error(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("raise ImportError('missing dependency')\n")
    assert_one_line_error(
        invoke("plugins", "--plugin", str(broken)),
        f"Plugin module '{broken}' failed to import (ImportError: missing dependency)",
    )


# -- validate ---------------------------------------------------------------------------------


def test_validate_good_yaml(tmp_path):
    path = write_yaml(tmp_path / "good.yaml", GOOD)
    result = invoke("validate", str(path))
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{path}: OK (att_type RoPE-SM, name 'cli-test')\n"
    assert result.stderr == ""


def test_validate_show_prints_the_resolved_config_with_overrides(tmp_path):
    path = write_yaml(tmp_path / "good.yaml", GOOD)
    result = invoke("validate", str(path), "--show", "--set", "model.n_layer=3")
    assert result.exit_code == 0, result.output
    resolved = yaml.safe_load(result.stdout)
    assert resolved["model"]["n_layer"] == 3
    assert resolved["model"]["dropout"] == 0.1  # defaults are filled in
    assert resolved["train"]["batch_size"] == 2


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (
            {"model": {"n_haed": 4}},
            ["model.n_haed: unknown key (did you mean 'n_head'?)"],
        ),
        (
            {"model": {"att_type": "RoPE-MS"}},
            ["Unknown attention type 'RoPE-MS' (did you mean 'RoPE-SM'?)"],
        ),
        ({"train": {"batch_size": -1}}, ["train.batch_size: Input should be greater than 0"]),
        ({"model": {"n_embd": 36, "n_head": 4}}, ["needs an even head size"]),
        ("model:\n  n_layer: [1\n", ["at line 3", "fix the YAML syntax there"]),
        ({"plugins": ["missing.py"]}, ["Plugin module", "missing.py' failed to import"]),
    ],
    ids=["unknown-key", "unknown-att-type", "bad-value", "odd-head-size", "syntax", "plugin"],
)
def test_validate_bad_yaml_is_one_line_error(tmp_path, content, fragments):
    path = write_yaml(tmp_path / "bad.yaml", content)
    assert_one_line_error(invoke("validate", str(path)), *fragments)


def test_validate_missing_file_is_one_line_error(tmp_path):
    missing = tmp_path / "nope.yaml"
    assert_one_line_error(invoke("validate", str(missing)), f"{missing} does not exist")


def test_validate_bad_override_is_one_line_error(tmp_path):
    path = write_yaml(tmp_path / "good.yaml", GOOD)
    assert_one_line_error(
        invoke("validate", str(path), "--set", "model.n_layer"), "write overrides as key.path=value"
    )


WRONG_SHAPE_PLUGIN = """
import torch
import ropelm


class HalfWidth(torch.nn.Module):
    def __init__(self, config, options):
        super().__init__()
        self.proj = torch.nn.Linear(config.n_embd, config.n_embd // 2)

    def forward(self, x, cache=None, document_ids=None):
        return self.proj(x)  # (B, T, C/2): the residual stream cannot take it


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(ropelm.AttentionSpec(
        name="Half-Width", description="wrong output shape", reference="https://example.org",
        factory=HalfWidth, capabilities=ropelm.Capabilities(kv_cache=False, document_mask=False),
    ))
"""


def test_validate_runs_the_plugin_once_and_checks_the_vocabulary(tmp_path):
    (tmp_path / "half.py").write_text(WRONG_SHAPE_PLUGIN)
    path = write_yaml(
        tmp_path / "half.yaml",
        {**GOOD, "plugins": ["half.py"], "model": {**GOOD["model"], "att_type": "Half-Width"}},
    )
    assert_one_line_error(
        invoke("validate", str(path)), "Attention 'Half-Width'", "fails a forward pass on"
    )
    good = write_yaml(tmp_path / "good.yaml", GOOD)
    assert_one_line_error(
        invoke("validate", str(good), "--set", "model.vocab_size=100"),
        "model.vocab_size (100) is smaller than the byte alphabet",
    )


def test_ctrl_c_outside_training_is_one_sentence_and_status_130(tmp_path, monkeypatch):
    """Ctrl-C in tokenizer training or data preparation (KeyboardInterrupt from Python code
    such as the document stream) ends the command at once with one sentence, no traceback."""
    import ropelm.tokenizer

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ropelm.tokenizer, "train_tokenizer", interrupted)
    result = invoke("prepare", str(write_yaml(tmp_path / "good.yaml", GOOD)))
    assert result.exit_code == 130
    assert result.stderr.strip().startswith("Interrupted: finished caches and checkpoints")
    assert "Traceback" not in result.output
