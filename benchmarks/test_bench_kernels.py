"""Attention kernels on the CPU: score and mask variants against RoPE-SM's fused causal SDPA.

Run with::

    .venv/bin/python -m pytest benchmarks/test_bench_kernels.py --benchmark-only

Forward passes (inference, ``torch.no_grad``) at T = 2048 of the quickstart
shape (n_embd 128, 4 heads, head size 32, batch 2, float32, 1 thread), for one
attention layer and for the whole 4-layer model (vocabulary 4096). Every case
runs side by side with RoPE-SM on ``sdpa`` in the same rounds (alternating
order), and the ratio is the median over rounds of RoPE-SM's time over the
case's: its tokens/s relative to RoPE-SM.

Cases: ALiBi, T5-Bias and KERPLE-Log (score_mods) and RoPE-Sliding with window
256 (a mask_mod), each on ``dense`` (what ``auto`` picks on the CPU) and on
compiled ``flex``. Targets (the kernels issue; printed, not asserted):
ALiBi >= 0.9x RoPE-SM, sliding window 256 >= 2x.
"""

from __future__ import annotations

import functools
import os
import statistics
from typing import Any

import pytest
import torch

from ropelm import ModelConfig, Registry, TransformerLM

T, BATCH = 2048, 2
WARMUP_ROUNDS, ROUNDS = 2, 7
THREADS = int(os.environ.get("ROPELM_BENCH_THREADS", "1"))
TABLE = f"Kernels: forward tokens/s vs RoPE-SM on sdpa, T={T}, quickstart shape, CPU float32"
CASES = [
    ("RoPE-SM", {}, "sdpa"),
    ("ALiBi", {}, "dense"),
    ("ALiBi", {}, "flex"),
    ("RoPE-Sliding", {"window": 256}, "dense"),
    ("RoPE-Sliding", {"window": 256}, "flex"),
    ("T5-Bias", {}, "dense"),
    ("T5-Bias", {}, "flex"),
    ("KERPLE-Log", {}, "dense"),
    ("KERPLE-Log", {}, "flex"),
]
TARGETS = {("ALiBi", "dense"): 0.9, ("ALiBi", "flex"): 0.9, ("RoPE-Sliding", "dense"): 2.0,
           ("RoPE-Sliding", "flex"): 2.0}  # fmt: skip


def build(level: str) -> dict[str, Any]:
    registry = Registry.default()
    base = ModelConfig(block_size=T, vocab_size=4096, n_layer=4, n_head=4, n_embd=128, dropout=0.0)
    modules = {}
    for name, options, backend in CASES:
        config = base.model_copy(
            update={"att_type": name, "att_options": options, "attention_backend": backend}
        )
        torch.manual_seed(0)
        attention = registry.resolve(config)
        module = (
            attention.build_layer(config) if level == "layer" else TransformerLM(config, attention)
        )
        modules[f"{name}:{backend}"] = module.eval()
    return modules


def run(module: Any, x: torch.Tensor) -> None:
    with torch.no_grad():
        module(x)


@pytest.mark.parametrize("level", ["layer", "model"])
def test_kernel_forward(benchmark: Any, ratio_rows: dict, interleave: Any, threads: Any,
                        level: str) -> None:  # fmt: skip
    with threads(THREADS):
        modules = build(level)
        generator = torch.Generator().manual_seed(0)
        if level == "layer":
            x = torch.randn(BATCH, T, 128, generator=generator)
        else:
            x = torch.randint(0, 4096, (BATCH, T), generator=generator)
        steps = {label: functools.partial(run, module, x) for label, module in modules.items()}
        measured = interleave(benchmark, steps, ROUNDS, WARMUP_ROUNDS)
        n_threads = torch.get_num_threads()
    reference = measured["RoPE-SM:sdpa"]
    for label, samples in measured.items():
        name, backend = label.split(":")
        ran = modules[label]
        ran = ran.last_backend if level == "layer" else ran.attention_backend()
        ratio = statistics.median(r / s for r, s in zip(reference, samples, strict=True))
        row = {"level": level, "variant": name, "backend": ran,
               "ms": statistics.median(samples) * 1e3, "ratio_vs_rope_sm": ratio,
               "threads": n_threads}  # fmt: skip
        target = TARGETS.get((name, backend))
        if target is not None:
            row["target"] = f">= {target}"
            row["met"] = ratio >= target
        benchmark.extra_info[label] = row
        ratio_rows.setdefault(TABLE, []).append(row)
