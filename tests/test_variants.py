"""Naming a variant on the command line: NAME:KEY=VALUE, labels, KEY=VALUE options."""

from __future__ import annotations

import pytest

from ropelm.errors import ConfigError
from ropelm.variants import VariantChoice, parse_att_options, parse_variants


def test_parse_variants_with_options():
    choices = parse_variants(["RoPE-SM,ALiBi", "RoPE-Sliding:window=32:n_kv_head=1"])
    assert [c.name for c in choices] == ["RoPE-SM", "ALiBi", "RoPE-Sliding"]
    sliding = choices[2]
    assert sliding.options_dict == {"window": 32, "n_kv_head": 1}  # YAML-typed values
    assert sliding.label == "RoPE-Sliding:window=32:n_kv_head=1"
    assert sliding.dir_label == "RoPE-Sliding_window32_n_kv_head1"
    assert VariantChoice("NoPE").dir_label == "NoPE"


@pytest.mark.parametrize(
    ("items", "message"),
    [
        (["RoPE-SM,RoPE-SM"], "names 'RoPE-SM' twice"),
        (["RoPE-Sliding:window"], "write options as NAME:KEY=VALUE"),
        ([":window=3"], "the variant name is missing"),
        ([" , "], "--variants is empty"),
    ],
)
def test_parse_variants_errors(items, message, assert_one_sentence):
    with pytest.raises(ConfigError, match=message) as info:
        parse_variants(items)
    assert_one_sentence(str(info.value))


def test_choices_are_equal_whatever_the_order_of_their_options():
    a = VariantChoice.parse("RoPE-SM:scaling=yarn:scale_factor=4")
    b = VariantChoice.of("RoPE-SM", {"scale_factor": 4, "scaling": "yarn"})
    assert a == b and hash(a) == hash(b)
    assert a.label == "RoPE-SM:scaling=yarn:scale_factor=4"  # as written
    assert a != VariantChoice.of("RoPE-SM", {"scale_factor": 2, "scaling": "yarn"})
    assert a != VariantChoice.of("RoPE-SM-complex", {"scale_factor": 4, "scaling": "yarn"})
    with pytest.raises(ConfigError, match="names 'RoPE-SM:scale_factor=4:scaling=yarn' twice"):
        parse_variants(["RoPE-SM:scaling=yarn:scale_factor=4,RoPE-SM:scale_factor=4:scaling=yarn"])


def test_att_options_are_yaml_typed_key_values(assert_one_sentence):
    assert parse_att_options(["scaling=yarn", "scale_factor=4", "window=null", "x=a:b"]) == {
        "scaling": "yarn", "scale_factor": 4, "window": None, "x": "a:b"
    }  # fmt: skip
    with pytest.raises(ConfigError) as info:
        parse_att_options(["=3"])
    assert (
        str(info.value)
        == "--att-option '=3': write it as KEY=VALUE, e.g. --att-option scaling=yarn."
    )
    assert_one_sentence(str(info.value))
