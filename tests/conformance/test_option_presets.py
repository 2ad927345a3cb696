"""The conformance checks on variants configured with their options, not just defaults.

Grouped-query / multi-query attention (``n_kv_head``), RoPE context-extension
scaling and a small sliding window each change the computation enough to
deserve the full suite: a KV cache that stores the wrong number of heads, or
scaled tables that differ between the cached and the full path, would pass
the default-options run.
"""

from __future__ import annotations

from typing import Any

import pytest

from ropelm import Registry
from ropelm.testing import CHECKS, NotApplicable, build_layer, conformance_config

PRESETS: list[tuple[str, dict[str, Any]]] = [
    ("RoPE-SM", {"n_kv_head": 2}),  # grouped-query attention (4 query heads)
    ("RoPE-SM", {"n_kv_head": 1}),  # multi-query attention
    ("RoPE-SM", {"scaling": "linear", "scale_factor": 2.0}),
    ("RoPE-SM", {"scaling": "ntk", "scale_factor": 4.0}),
    ("RoPE-SM", {"scaling": "yarn", "scale_factor": 4.0}),
    ("RoPE-SM-complex", {"n_kv_head": 2, "scaling": "yarn", "scale_factor": 2.0}),
    ("RoPE-Sliding", {"window": 5}),
    ("RoPE-Sliding", {"window": 8, "n_kv_head": 1}),
    ("ALiBi", {"n_kv_head": 2}),
    ("ALiBi", {"softcap": 5.0}),  # a cap low enough to bend the conformance scores
    ("NoPE", {"n_kv_head": 1}),
    ("T5-Bias", {"num_buckets": 8, "max_distance": 16, "n_kv_head": 2}),
]


def preset_id(preset: tuple[str, dict[str, Any]]) -> str:
    name, options = preset
    return name + "[" + ",".join(f"{k}={v}" for k, v in options.items()) + "]"


@pytest.mark.parametrize("preset", PRESETS, ids=[preset_id(p) for p in PRESETS])
@pytest.mark.parametrize("check", CHECKS, ids=[c.__name__.removeprefix("check_") for c in CHECKS])
def test_variant_with_options_conforms(registry: Registry, preset, check) -> None:
    name, options = preset
    spec = registry.get(name)
    config = conformance_config(spec, att_options=options)
    try:
        check(spec, config)
    except NotApplicable as err:
        pytest.skip(str(err))


def test_presets_reach_the_layers_the_checks_build(registry: Registry) -> None:
    """Guard: the options are really applied (a cache of n_kv_head heads, scaled tables)."""
    spec = registry.get("RoPE-SM")
    mqa = build_layer(spec, conformance_config(spec, att_options={"n_kv_head": 1}))
    cache = mqa.init_cache(2, 16, mqa.c_attn.weight.device, mqa.c_attn.weight.dtype)
    assert cache.k.shape == (2, 1, 16, 8)
    plain = build_layer(spec, conformance_config(spec))
    yarn = build_layer(
        spec, conformance_config(spec, att_options={"scaling": "yarn", "scale_factor": 4.0})
    )
    cpu = plain.c_attn.weight.device
    plain_cos, _ = plain.rotation.tables.get(0, 32, cpu, plain.c_attn.weight.dtype)
    yarn_cos, _ = yarn.rotation.tables.get(0, 32, cpu, yarn.c_attn.weight.dtype)
    assert (plain_cos - yarn_cos).abs().max() > 1e-3
