"""``ropelm-exp extend``: the extended run's config, its starting weights, and refusals."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file

from ropelm.checkpoint import resolve_checkpoint
from ropelm.cli import main
from ropelm.config import validate
from ropelm.engine import Trainer
from ropelm.errors import ConfigError, RopelmError
from ropelm.experiment import Experiment
from ropelm.extend import (
    ExtensionMethod,
    parse_block_size,
    parse_methods,
    plan_extension,
    scaled_options,
)
from ropelm.pipeline import cached_stages, run_experiment
from ropelm.runs import RunDir


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_tiny_runs) -> dict[str, Path]:
    """Tiny trained runs sharing one data cache."""
    return train_tiny_runs(tmp_path_factory.mktemp("extend-runs"),
                           ("RoPE-SM", "ALiBi", "Learned-APE"), name="extendtiny")  # fmt: skip


def _tree_digest(path: Path) -> dict[str, str]:
    return {
        str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


# -- parsing and options (no training) -----------------------------------------------------------


@pytest.mark.parametrize(("text", "size"), [("4x", 512), ("512", 512), ("1.5x", 192)])
def test_block_size_as_multiple_or_tokens(text, size):
    assert parse_block_size(text, 128) == size


@pytest.mark.parametrize("text", ["1x", "128", "64", "0.5x", "four", "1.3x"])
def test_block_size_must_grow_and_be_whole(text, assert_one_sentence):
    with pytest.raises(ConfigError) as info:
        parse_block_size(text, 128)
    assert_one_sentence(str(info.value))


def test_methods_parse_with_options_and_reject_unknown(assert_one_sentence):
    methods = parse_methods(["none,yarn", "abf:new_base=500000", "yarn"])
    assert [m.label for m in methods] == ["none", "yarn", "abf-new_base500000"]
    assert methods[2].options == (("new_base", 500000),)
    with pytest.raises(ConfigError, match="Unknown extension method 'rope'") as info:
        ExtensionMethod.parse("rope")
    assert_one_sentence(str(info.value))


def test_scaled_options_write_the_method_and_the_original_length():
    old = {"n_kv_head": 1, "scaling": "ntk", "scale_factor": 2.0}
    yarn = scaled_options(old, ExtensionMethod("yarn"), 128, 512, None)
    assert yarn == {
        "n_kv_head": 1,
        "scaling": "yarn",
        "scale_factor": 4.0,
        "original_max_position_embeddings": 128,
    }
    linear = scaled_options({}, ExtensionMethod("linear"), 128, 512, 8.0)
    assert linear == {"scaling": "linear", "scale_factor": 8.0}  # PI reads no original length
    abf = scaled_options({}, ExtensionMethod("abf", (("new_base", 5e5),)), 128, 512, None)
    assert abf == {"scaling": "abf", "new_base": 5e5}  # abf stretches through the base alone
    assert scaled_options(old, ExtensionMethod("none"), 128, 512, None) == {"n_kv_head": 1}
    with pytest.raises(ConfigError, match="below 1"):
        scaled_options({}, ExtensionMethod("ntk"), 128, 512, 0.5)


# -- extending trained runs ----------------------------------------------------------------------


def test_extend_writes_a_run_that_records_its_parent_and_leaves_the_parent_alone(runs):
    parent = runs["RoPE-SM"]
    before = _tree_digest(parent)
    result = CliRunner().invoke(
        main,
        ["extend", str(parent), "--block-size", "2x", "--scaling", "yarn", "--steps", "2",
         "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    child = parent.parent / "RoPE-SM-extend-yarn-64"
    config = yaml.safe_load((child / "config.yaml").read_text())
    assert config["model"]["block_size"] == 64
    assert config["model"]["att_options"] == {
        "scaling": "yarn",
        "scale_factor": 2.0,
        "original_max_position_embeddings": 32,
    }
    assert config["init"] == {"from_run": str(parent.resolve()), "method": "yarn"}
    assert config["train"]["max_steps"] == 2
    assert (child / "summary.json").is_file() and resolve_checkpoint(child).is_dir()
    assert _tree_digest(parent) == before  # only read
    again = CliRunner().invoke(
        main, ["extend", str(parent), "--block-size", "2x", "--scaling", "yarn", "--steps", "2"]
    )
    assert again.exit_code == 1 and "--resume" in again.output  # never overwritten silently


def test_extended_model_starts_from_the_parent_best_weights(runs, tmp_path):
    parent = runs["RoPE-SM"]
    experiment = plan_extension(parent, ExtensionMethod("ntk"), block_size="4x", steps=1)
    tokenizer, data = cached_stages(experiment.config)
    trainer = Trainer.build(experiment, data, tokenizer, RunDir(tmp_path / "child"))
    saved = load_file(str(resolve_checkpoint(parent) / "model.safetensors"))
    state = trainer.model.state_dict()
    assert saved.keys() == state.keys()
    for name, tensor in saved.items():
        assert state[name].equal(tensor), name


def test_variant_without_rope_accepts_only_the_block_size(runs, assert_one_sentence):
    with pytest.raises(ConfigError, match="has no RoPE") as info:
        plan_extension(runs["ALiBi"], ExtensionMethod("yarn"), block_size="2x")
    assert_one_sentence(str(info.value))
    experiment = plan_extension(runs["ALiBi"], ExtensionMethod("none"), block_size="2x")
    assert experiment.config.model.block_size == 64


def test_learned_positions_cannot_be_extended(runs, assert_one_sentence):
    with pytest.raises(ConfigError, match="cannot be extended") as info:
        plan_extension(runs["Learned-APE"], ExtensionMethod("none"), block_size="2x")
    assert_one_sentence(str(info.value))


def test_a_parent_without_a_best_checkpoint_is_one_sentence(runs, tmp_path, assert_one_sentence):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((runs["RoPE-SM"] / "config.yaml").read_text())
    with pytest.raises(RopelmError, match="No 'best' checkpoint") as info:
        plan_extension(unfinished, ExtensionMethod("yarn"), block_size="2x")
    assert_one_sentence(str(info.value))
    result = CliRunner().invoke(main, ["extend", str(tmp_path), "--block-size", "2x"])
    assert result.exit_code == 1 and "not a run directory" in result.output


def test_an_extension_on_other_data_reads_it_with_the_parent_tokenizer(runs, tmp_path):
    """Fine-tuning at the new length on other documents (here: other Wikipedia documents,
    as long-document fine-tuning would be) tokenizes them with the parent's tokenizer,
    never one trained on them: the weights' ids must keep meaning the same pieces."""
    from ropelm.checkpoint import TOKENIZER
    from ropelm.eval_run import evaluate_run
    from ropelm.pipeline import inherited_tokenizer
    from ropelm.registry import Registry

    parent = runs["RoPE-SM"]
    parent_tokenizer = (resolve_checkpoint(parent) / TOKENIZER).read_bytes()
    child = tmp_path / "child"
    result = CliRunner().invoke(
        main,
        ["extend", str(parent), "--block-size", "2x", "--scaling", "ntk", "--steps", "2",
         "--set", "data.max_documents=120", "--set", "data.split_seed=7", "--out", str(child),
         "--quiet"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (resolve_checkpoint(child) / TOKENIZER).read_bytes() == parent_tokenizer
    config = RunDir(child).read_config()
    assert config["data"]["max_documents"] == 120
    experiment = Experiment.bind(validate(config), Registry.default())
    tokenizer = inherited_tokenizer(experiment.config)
    assert tokenizer is not None and tokenizer.path.read_bytes() == parent_tokenizer
    with pytest.raises(RopelmError, match="No tokenizer"):  # its data keys no tokenizer of its own
        cached_stages(experiment.config)
    report = evaluate_run(child, Registry.default(), lengths=["1x"], max_windows=1)
    assert report["results"]["1x"]["nonoverlapping"]["ppl"] > 1.0  # its own data, scored

    # sweep's path (every stage, run_experiment) inherits the tokenizer the same way
    again = tmp_path / "again"
    run_experiment(experiment, out_dir=again, progress=False)
    assert (resolve_checkpoint(again) / TOKENIZER).read_bytes() == parent_tokenizer
