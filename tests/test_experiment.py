"""Binding an experiment: one registry per command, attention options parsed once, early errors."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ropelm import ModelConfig, Registry, SoftmaxOptions, TransformerLM
from ropelm.attention import AttentionSpec
from ropelm.cli import main
from ropelm.config import validate
from ropelm.errors import ConfigError, UnknownAttentionError, UnsupportedModelError
from ropelm.experiment import Experiment
from ropelm.rope import RoPEOptions


@pytest.fixture()
def calls(monkeypatch: pytest.MonkeyPatch) -> Counter:
    """Counts of Registry.default and AttentionSpec.parse_options calls while a test runs."""
    counter: Counter = Counter()
    build, parse = Registry.default.__func__, AttentionSpec.parse_options

    def counting_default(cls, *args, **kwargs):
        counter["registry"] += 1
        return build(cls, *args, **kwargs)

    def counting_parse(self, raw):
        counter[f"parse {self.name} {sorted((raw or {}).items())}"] += 1
        return parse(self, raw)

    monkeypatch.setattr(Registry, "default", classmethod(counting_default))
    monkeypatch.setattr(AttentionSpec, "parse_options", counting_parse)
    return counter


def write_experiment(tmp_path: Path, **model: object) -> Path:
    raw = {
        "name": "bind",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32,
                  **model},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300,
                 "cache_dir": str(tmp_path / "cache")},
        "train": {"max_steps": 2, "batch_size": 4, "eval_every": 2, "log_every": 2},
        "eval": {"max_batches": 1, "lengths": ["1x"]},
    }  # fmt: skip
    path = tmp_path / "bind.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_run_and_eval_each_build_one_registry_and_parse_each_option_set_once(tmp_path, calls):
    experiment = write_experiment(tmp_path, att_options={"n_kv_head": 1})
    code, out = invoke("run", experiment, "--out", tmp_path / "run", "--quiet")
    assert code == 0, out
    assert calls == {"registry": 1, "parse RoPE-SM [('n_kv_head', 1)]": 1}

    calls.clear()
    code, out = invoke(
        "eval", tmp_path / "run", "--lengths", "1x,2x", "--max-windows", "1",
        "--att-option", "scaling=ntk", "--att-option", "scale_factor=auto",
    )  # fmt: skip
    assert code == 0, out
    # two option sets (factor 1 at 1x, 2 at 2x), each parsed once, from one registry
    assert calls["registry"] == 1
    parses = {key: n for key, n in calls.items() if key.startswith("parse")}
    assert sorted(parses.values()) == [1, 1] and len(parses) == 2


def test_sweep_builds_one_registry_for_every_run(tmp_path, calls):
    experiment = write_experiment(tmp_path)
    code, out = invoke(
        "sweep", experiment, "--variants", "NoPE,ALiBi", "--seeds", "0,1", "--no-eval",
        "--out", tmp_path / "sweep", "--quiet",
    )  # fmt: skip
    assert code == 0, out
    assert calls["registry"] == 1
    assert calls["parse NoPE []"] == 2 and calls["parse ALiBi []"] == 2  # once per run


def test_validate_and_tokenizer_build_what_they_need(tmp_path, calls):
    experiment = write_experiment(tmp_path)
    assert invoke("validate", experiment)[0] == 0
    assert calls == {"registry": 1, "parse RoPE-SM []": 1}
    calls.clear()
    assert invoke("tokenizer", experiment, "--quiet")[0] == 0
    assert calls == {}  # the data path needs no plugins


def test_bind_fails_early_with_the_variant_error(tmp_path):
    config = validate({"model": {"att_type": "ALibi"}})  # the schema alone accepts any name
    with pytest.raises(UnknownAttentionError, match="did you mean 'ALiBi'"):
        Experiment.bind(config)
    with pytest.raises(ConfigError, match=r"model\.att_options\.windw: unknown option"):
        Experiment.bind(validate({"model": {"att_type": "RoPE-Sliding",
                                            "att_options": {"windw": 3}}}))  # fmt: skip


def test_a_shape_the_variant_rejects_is_its_own_error(registry):
    odd = ModelConfig(n_embd=36, n_head=4)  # head size 9: RoPE pairs features
    with pytest.raises(UnsupportedModelError, match="needs an even head size"):
        registry.resolve(odd)
    assert registry.resolve(odd.model_copy(update={"att_type": "NoPE"})).name == "NoPE"


def test_factories_always_get_a_parsed_options_instance(registry):
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8)
    for variant in registry:
        if variant.spec.options is None:
            continue
        resolved = registry.resolve(config.model_copy(update={"att_type": variant.spec.name}))
        assert isinstance(resolved.options, variant.spec.options), variant.spec.name
    nope = registry.resolve(config.model_copy(update={"att_type": "NoPE"}))
    assert nope.options == SoftmaxOptions() and nope.source == "builtin (ropelm.plugins.nope)"
    assert isinstance(registry.resolve(config).options, RoPEOptions)


def test_a_model_is_built_from_the_attention_resolved_for_its_config(registry):
    config = ModelConfig(n_layer=1, n_head=2, n_embd=16, vocab_size=32, block_size=8)
    attention = registry.resolve(config)
    model = TransformerLM(config, attention)
    assert model.spec is attention.spec and model.attention is attention
    with pytest.raises(ValueError, match="another att_type"):
        TransformerLM(config.model_copy(update={"att_type": "NoPE"}), attention)


def test_document_mask_needs_a_variant_that_declares_it(tmp_path):
    plugin = tmp_path / "no_documents.py"
    plugin.write_text(
        "import ropelm\n"
        "@ropelm.hookimpl\n"
        "def ropelm_register_attention(register):\n"
        "    register(ropelm.AttentionSpec(name='No-Docs', description='', reference='',\n"
        "        factory=lambda config, options: ropelm.SelfAttention(config)))\n"
    )
    config = validate({"plugins": [str(plugin)], "model": {"att_type": "No-Docs"},
                       "train": {"document_mask": True}})  # fmt: skip
    with pytest.raises(ConfigError, match=r"train\.document_mask: attention 'No-Docs'"):
        Experiment.bind(config)
    Experiment.bind(config.model_copy(update={"train": config.train.model_copy(
        update={"document_mask": False})}))  # fmt: skip
