"""The plugin registry: lookup errors, duplicates, broken plugins, YAML plugins, entry points."""

from __future__ import annotations

import importlib.metadata
import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from ropelm import (
    ConfigError,
    ModelConfig,
    PluginError,
    Registry,
    RopelmError,
    SelfAttention,
    TransformerLM,
    UnknownAttentionError,
)
from ropelm.config import load_experiment, validate
from ropelm.experiment import Experiment
from ropelm.registry import ENTRY_POINT_GROUP
from ropelm.testing import run_all

BUILTINS = ("RoPE-SM", "RoPE-SM-complex")
SMALL_MODEL = {
    "block_size": 32,
    "vocab_size": 64,
    "n_layer": 2,
    "n_head": 4,
    "n_embd": 32,
    "dropout": 0.0,
}


def write_plugin(path: Path, body: str) -> Path:
    """Write a plugin module: ``body`` goes inside ``ropelm_register_attention(register)``."""
    path.write_text(
        textwrap.dedent(
            """\
            import ropelm

            def build(config, options):
                return ropelm.SelfAttention(config)

            def spec(name):
                return ropelm.AttentionSpec(
                    name=name, description="test", reference="https://example.invalid",
                    factory=build,
                )

            @ropelm.hookimpl
            def ropelm_register_attention(register):
            """
        )
        + textwrap.indent(textwrap.dedent(body), "    ")
    )
    return path


# -- lookup -----------------------------------------------------------------------------------


def test_builtins_are_registered_with_their_source():
    registry = Registry.default()
    for name in BUILTINS:
        variant = registry.variant(name)
        assert variant.spec.name == name
        assert variant.source == f"builtin (ropelm.plugins.{name.lower().replace('-', '_')})"


@pytest.mark.parametrize(("typo", "match"), [("RoPE-MS", "RoPE-SM"), ("rope_sm", "RoPE-SM")])
def test_unknown_att_type_is_one_sentence_with_names_and_closest_match(
    typo, match, assert_one_sentence
):
    registry = Registry.default()
    with pytest.raises(UnknownAttentionError) as info:
        registry.get(typo)
    message = str(info.value)
    assert_one_sentence(message)
    assert f"'{typo}' (did you mean '{match}'?)" in message
    assert f"registered types are {', '.join(registry.names())}." in message


def test_unknown_att_type_without_close_match_lists_names_only():
    with pytest.raises(UnknownAttentionError) as info:
        Registry.default().get("Performer")
    assert "did you mean" not in str(info.value)
    assert all(name in str(info.value) for name in BUILTINS)


def test_unknown_att_type_surfaces_through_model_and_config():
    with pytest.raises(UnknownAttentionError, match=r"did you mean 'RoPE-SM'\?"):
        TransformerLM.from_config(ModelConfig(**SMALL_MODEL, att_type="RoPE-SN"))
    with pytest.raises(RopelmError, match=r"'RoPE-SN' \(did you mean 'RoPE-SM'\?\)"):
        Experiment.bind(validate({"model": {"att_type": "RoPE-SN"}}))


# -- duplicates and broken plugins ------------------------------------------------------------


def test_duplicate_name_across_plugins_names_both_sources(tmp_path, assert_one_sentence):
    first = write_plugin(tmp_path / "first.py", 'register(spec("Twin"))')
    second = write_plugin(tmp_path / "second.py", 'register(spec("Twin"))')
    registry = Registry()
    registry.load_module(first)
    with pytest.raises(PluginError) as info:
        registry.load_module(second)
    message = str(info.value)
    assert f"'Twin' is registered twice, by module {first} and by module {second}" in message
    assert_one_sentence(message)


def test_duplicate_of_a_builtin_names_the_builtin(tmp_path):
    clash = write_plugin(tmp_path / "clash.py", 'register(spec("RoPE-SM"))')
    with pytest.raises(PluginError, match=r"by builtin \(ropelm\.plugins\.rope_sm\) and by module"):
        Registry.default([clash])


def test_register_with_something_else_than_a_spec_names_the_plugin(tmp_path, assert_one_sentence):
    bad = write_plugin(tmp_path / "not_a_spec.py", 'register({"name": "Dict-Attn"})')
    with pytest.raises(PluginError) as info:
        Registry().load_module(bad)
    message = str(info.value)
    assert f"Plugin module {bad} called register() with dict, not a ropelm.AttentionSpec" in message
    assert_one_sentence(message)


def test_spec_with_bad_fields_names_the_plugin_and_the_fields(tmp_path):
    bad = write_plugin(
        tmp_path / "bad_fields.py",
        """\
        register(ropelm.AttentionSpec(
            name=" padded ", description="x", reference="https://example.invalid", factory=None,
        ))
        """,
    )
    with pytest.raises(PluginError) as info:
        Registry().load_module(bad)
    message = str(info.value)
    assert f"Plugin module {bad} failed while registering attention variants" in message
    assert "name must be a non-empty string without surrounding spaces" in message
    assert "factory must be callable" in message


def test_hook_with_wrong_signature_names_the_plugin(tmp_path):
    bad = tmp_path / "wrong_signature.py"
    bad.write_text(
        "import ropelm\n\n@ropelm.hookimpl\ndef ropelm_register_attention(reg):\n    pass\n"
    )
    with pytest.raises(PluginError, match=rf"Plugin module {re.escape(str(bad))} could not be"):
        Registry().load_module(bad)


def test_plugin_file_that_fails_to_import_names_the_file(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import ropelm\nraise RuntimeError('boom')\n")
    with pytest.raises(PluginError) as info:
        Registry().load_module(broken)
    message = str(info.value)
    assert f"Plugin module '{broken}' failed to import (RuntimeError: boom)" in message
    assert "plugins:" in message  # says where to look
    assert "ropelm_user_plugin_broken" not in "".join(sys.modules)  # no half-imported module


def test_plugin_module_that_is_not_installed_names_the_module():
    with pytest.raises(
        PluginError, match=r"Plugin module 'no_such_ropelm_plugin' failed to import"
    ):
        Registry().load_module("no_such_ropelm_plugin")


def test_entry_point_that_fails_to_import_names_the_entry_point(monkeypatch):
    broken = importlib.metadata.EntryPoint(
        name="broken", value="no_such_ropelm_plugin", group=ENTRY_POINT_GROUP
    )

    def entry_points(group=None):
        return [broken] if group == ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    with pytest.raises(PluginError) as info:
        Registry.default()
    message = str(info.value)
    assert "entry point 'broken' = no_such_ropelm_plugin" in message
    assert "failed to import (ModuleNotFoundError" in message


def test_same_module_named_twice_registers_once(tmp_path):
    plugin = write_plugin(tmp_path / "once.py", 'register(spec("Once"))')
    registry = Registry.default([plugin, plugin])
    assert registry.variant("Once").source == f"module {plugin}"


# -- plugins named in an experiment YAML ------------------------------------------------------

YAML_PLUGIN = '''\
"""A plugin shipped next to an experiment YAML: NoPE attention with a logit temperature."""

import dataclasses

import ropelm


@dataclasses.dataclass(frozen=True)
class Options:
    temperature: float = 1.0

    def __post_init__(self):
        if self.temperature <= 0:
            raise ValueError("temperature must be positive")


class TemperatureAttention(ropelm.SelfAttention):
    def __init__(self, config, temperature):
        super().__init__(config)
        self.temperature = temperature

    def position_qk(self, q, k, start):
        return q / self.temperature, k


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="Tmp-Temperature",
            description="NoPE with a logit temperature (test plugin from a YAML).",
            reference="https://example.invalid",
            factory=lambda config, options: TemperatureAttention(config, options.temperature),
            options=Options,
        )
    )
'''


def write_experiment(tmp_path: Path, att_options: dict) -> Path:
    (tmp_path / "temperature_attention.py").write_text(YAML_PLUGIN)
    experiment = {
        "name": "yaml-plugin",
        "plugins": ["temperature_attention.py"],  # relative to the YAML's folder
        "model": {**SMALL_MODEL, "att_type": "Tmp-Temperature", "att_options": att_options},
    }
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(experiment))
    return path


def test_plugin_file_named_in_yaml_builds_a_conforming_model(
    tmp_path, monkeypatch, assert_conforms
):
    path = write_experiment(tmp_path, {"temperature": 2.0})
    monkeypatch.chdir(tmp_path.parent)  # the plugin path resolves against the YAML, not cwd
    config = load_experiment(path)
    plugin_file = str((tmp_path / "temperature_attention.py").resolve())
    assert config.plugins == [plugin_file]

    registry = Registry.default(config.plugins)
    variant = registry.variant("Tmp-Temperature")
    assert variant.source == f"module {plugin_file}"
    model = TransformerLM.from_config(config.model, registry)
    assert all(block.attn.temperature == 2.0 for block in model.blocks)
    assert isinstance(model.blocks[0].attn, SelfAttention)
    logits, _ = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, SMALL_MODEL["vocab_size"])
    assert_conforms(run_all(variant.spec, config=config.model))


def test_yaml_plugin_options_are_validated_by_the_plugin(tmp_path):
    with pytest.raises(ConfigError) as info:
        Experiment.load(write_experiment(tmp_path, {"temprature": 2.0}))
    assert str(info.value).startswith(
        "model.att_options.temprature: unknown option for attention 'Tmp-Temperature' "
        "(did you mean 'temperature'?)"
    )
    with pytest.raises(ConfigError, match="temperature must be positive"):
        Experiment.load(write_experiment(tmp_path, {"temperature": -1.0}))


def test_missing_plugin_file_in_yaml_is_a_plugin_error(tmp_path):
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump({"plugins": ["missing.py"]}))
    with pytest.raises(PluginError, match=r"Plugin module '.*missing\.py' failed to import"):
        Experiment.load(path)


# -- a real package with an entry point -------------------------------------------------------


def test_installed_entry_point_is_found_in_process(demo_plugin, assert_conforms):
    registry = Registry.default()
    variant = registry.variant(demo_plugin.variant)
    assert variant.source == demo_plugin.source
    assert variant.version == demo_plugin.version
    model = TransformerLM.from_config(
        ModelConfig(**SMALL_MODEL, att_type=demo_plugin.variant), registry
    )
    assert isinstance(model.blocks[0].attn, SelfAttention)
    assert type(model.blocks[0].attn).__module__ == "ropelm_demo_plugin"
    assert_conforms(run_all(variant.spec))


def test_installed_entry_point_is_listed_by_the_cli(demo_plugin):
    cli = Path(sys.executable).parent / "ropelm-exp"
    result = subprocess.run(
        [str(cli), "plugins", "--json"],
        capture_output=True,
        text=True,
        env=demo_plugin.env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    demo = rows[demo_plugin.variant]
    assert demo["source"] == demo_plugin.source
    assert demo["version"] == demo_plugin.version
    assert demo["capabilities"]["kv_cache"] is True
    assert rows["RoPE-SM"]["source"] == "builtin (ropelm.plugins.rope_sm)"


def test_a_plugin_that_exits_on_import_is_a_failed_plugin(tmp_path, assert_one_sentence):
    from ropelm.errors import PluginError

    plugin = tmp_path / "exits.py"
    plugin.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(PluginError, match=r"exits.py' failed to import \(SystemExit: 3\)") as info:
        Registry.default([plugin])
    assert_one_sentence(str(info.value))


def test_a_file_plugin_records_its_content_hash(tmp_path):
    import hashlib

    plugin = tmp_path / "demo.py"
    plugin.write_text((Path(__file__).parents[1] / "examples" / "my_attention.py").read_text())
    registry = Registry.default([plugin])
    digest = hashlib.sha256(plugin.read_bytes()).hexdigest()[:12]
    assert {v.version for v in registry if v.source == f"module {plugin}"} == {f"sha256:{digest}"}
