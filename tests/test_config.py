"""The experiment schema at the boundary: what YAML may and may not say."""

from __future__ import annotations

import pytest

from ropelm.config import load_experiment, validate
from ropelm.errors import ConfigError


@pytest.mark.parametrize(
    ("raw", "path"),
    [({"train": {"batch_size": True}}, "train.batch_size"),
     ({"model": {"n_layer": False}}, "model.n_layer"),
     ({"train": {"learning_rate": True}}, "train.learning_rate")],
)  # fmt: skip
def test_a_boolean_is_not_a_number(raw, path, assert_one_sentence):
    """YAML's true would otherwise train at batch size 1."""
    with pytest.raises(ConfigError, match=rf"^{path}: expected a number") as info:
        validate(raw)
    assert_one_sentence(str(info.value))


def test_booleans_stay_booleans_where_meant():
    config = validate({"train": {"compile": True, "document_mask": True}, "model": {"bias": False}})
    assert config.train.compile is True and config.model.bias is False


def test_a_key_written_twice_is_refused_with_its_line(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("name: first\ntrain:\n  batch_size: 4\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match=r"line 4, column 3: key 'batch_size' appears twice"):
        load_experiment(path)


@pytest.mark.parametrize("name", ["../x", "/tmp/abs", "", ".", "..", "a/b", "run name"])
def test_run_names_are_one_path_component(name, assert_one_sentence):
    with pytest.raises(ConfigError, match=r"^name: use letters, digits") as info:
        validate({"name": name})
    assert_one_sentence(str(info.value))
