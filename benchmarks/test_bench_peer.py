"""ropelm's training step against nanoGPT's model.py, side by side on the CPU.

Run with a local copy of karpathy/nanoGPT (its code is never part of ropelm)::

    git clone https://github.com/karpathy/nanoGPT /tmp/nanoGPT
    ROPELM_NANOGPT=/tmp/nanoGPT/model.py \\
        .venv/bin/python -m pytest benchmarks/test_bench_peer.py --benchmark-only

Both sides have GPT-2 small's dimensions (12 layers, 12 heads, n_embd 768,
vocab 32768, bias, dropout 0.1) and train on the same batches (B = 4, T = 128:
GPT-2's width at a length the CPU runs in seconds) with the rope_base recipe
(AdamW, clipping at 1.0), float32 and eager on the CPU, as ``ropelm-exp run``
would there. ropelm's side is the engine's own step (:class:`ropelm.throughput.
EngineStep`); nanoGPT's is its model with the same optimizer (ropelm's fused
AdamW) and clipping (:class:`ropelm.throughput.PeerStep`): only the model code
differs. ropelm's LM head is untied (nanoGPT ties it to the token embedding),
so its optimizer updates 23 % more parameters (135 M against 110 M). Rounds alternate the order; the
ratio is the median of per-round ratios. Target (the GPU issue): >= 1.0.
The GPU figure comes from ``benchmarks/gpu/check.sh``.
"""

from __future__ import annotations

import os
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from ropelm.config import load_experiment
from ropelm.experiment import Experiment
from ropelm.throughput import (
    NANOGPT_ENV,
    NANOGPT_HINT,
    EngineStep,
    PeerStep,
    load_nanogpt,
    synthetic_data,
)

ROUNDS, STEPS_PER_ROUND = 5, 2
TARGET = 1.0
TABLE = "ropelm step tokens/s ÷ nanoGPT step tokens/s, GPT-2 small dims (target >= 1.0)"
ROPE_BASE = Path(__file__).resolve().parents[1] / "experiments" / "rope_base.yaml"
SHAPE = ("model.block_size=128", "train.batch_size=4", "train.device=cpu")


def test_engine_step_vs_nanogpt(
    benchmark: Any, ratio_rows: dict, interleave: Any, tmp_path: Path
) -> None:
    path = os.environ.get(NANOGPT_ENV)
    if not path:
        pytest.skip(f"{NANOGPT_ENV} is not set: {NANOGPT_HINT}")
    experiment = Experiment.bind(load_experiment(ROPE_BASE, SHAPE))
    model = experiment.config.model
    data = synthetic_data(tmp_path / "tokens", model.vocab_size, 64 * model.block_size)
    engine = EngineStep.build(experiment, data, tmp_path)
    peer = PeerStep.build(load_nanogpt(path), engine)

    def rounds(step: Any) -> Any:
        return lambda: [step() for _ in range(STEPS_PER_ROUND)]

    times = interleave(
        benchmark, {"ropelm": rounds(engine), "nanogpt": rounds(peer)}, ROUNDS, warmup_rounds=1
    )
    tokens = STEPS_PER_ROUND * engine.tokens_per_step
    ratio = statistics.median(n / r for r, n in zip(times["ropelm"], times["nanogpt"], strict=True))
    row = {
        "shape": f"12x12x768 T={model.block_size} B={experiment.config.train.batch_size}",
        "ropelm_tok_s": tokens / statistics.median(times["ropelm"]),
        "nanogpt_tok_s": tokens / statistics.median(times["nanogpt"]),
        "ratio": ratio,
        "rounds": ROUNDS,
        "threads": torch.get_num_threads(),
        "within_target": ratio >= TARGET,
    }
    benchmark.extra_info.update(row)
    ratio_rows.setdefault(TABLE, []).append(row)
