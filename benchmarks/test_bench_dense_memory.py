"""Memory the ``dense`` backend keeps between calls: the materialized masks and biases.

Run with::

    .venv/bin/python -m pytest benchmarks/test_bench_dense_memory.py --benchmark-only

The seed shape's attention (12 layers, 12 heads, T = 1024; n_embd 96 to keep the
weights small, which the plans do not depend on) runs one inference forward; the
bytes the model then holds in its :class:`ropelm.dense_attention.DensePlans` are
compared with what one layer's plan takes times the number of layers (the cost
of a cache per layer, measured in the same run from a standalone layer). ALiBi
and a sliding window are the same in every layer: one copy, ratio 1/12. T5's
learned tables differ per layer: one plan each, ratio 1.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ropelm import ModelConfig, Registry, TransformerLM
from ropelm.dense_attention import DensePlans

T, N_LAYER = 1024, 12
TABLE = f"Dense backend: plan memory held after a forward, T={T}, {N_LAYER} layers, 12 heads"
CASES = [("ALiBi", {}), ("RoPE-Sliding", {"window": 256}), ("T5-Bias", {})]


def plan_bytes(plans: DensePlans) -> int:
    """Bytes of the distinct tensors ``plans`` holds."""
    storages = {}
    for _, runs in plans._latest.values():
        for run in runs:
            for tensor in (run.allowed, run.bias, run.attn_mask):
                if tensor is not None:
                    storage = tensor.untyped_storage()
                    storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


@pytest.mark.parametrize(("att_type", "options"), CASES, ids=[name for name, _ in CASES])
def test_dense_plan_memory(benchmark: Any, ratio_rows: dict, att_type: str, options: dict) -> None:
    config = ModelConfig(block_size=T, vocab_size=256, n_layer=N_LAYER, n_head=12, n_embd=96,
                         dropout=0.0, att_type=att_type, att_options=options,
                         attention_backend="dense")  # fmt: skip
    registry = Registry.default()
    torch.manual_seed(0)
    model = TransformerLM(config, registry.resolve(config)).eval()
    one_layer = registry.resolve(config).build_layer(config).eval()
    x = torch.randint(0, 256, (1, T))

    def forward() -> None:
        with torch.no_grad():
            model(x)

    benchmark.pedantic(forward, rounds=1, iterations=1)
    with torch.no_grad():
        one_layer(torch.randn(1, T, 96))
    plans = model.blocks[0].attn._dense.plans
    held, per_layer = plan_bytes(plans), plan_bytes(one_layer._dense.plans) * N_LAYER
    row = {"variant": att_type, "held_MiB": held / 2**20, "cache_per_layer_MiB": per_layer / 2**20,
           "ratio": held / per_layer, "distinct_plans": len(plans)}  # fmt: skip
    benchmark.extra_info.update(row)
    ratio_rows.setdefault(TABLE, []).append(row)
