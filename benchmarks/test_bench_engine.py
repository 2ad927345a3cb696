"""Engine overhead: ``ropelm.engine.train`` tokens/s against a bare training loop.

Run with::

    .venv/bin/python -m pytest benchmarks/test_bench_engine.py --benchmark-only

Both sides train the same model (same seed and initial weights) on the same
batches of the wiki sample for the same number of steps, in float32 on the
CPU. The bare loop is the minimum: sample the windows, forward, backward,
AdamW step. The engine adds its schedule, gradient clipping, loss checks,
progress bar and metrics log; its figure is ``summary["train_tokens_per_s"]``
(training steps only: the final evaluation and checkpoint are outside it).
Rounds alternate the order (ABBA) so machine drift hits both alike; the ratio
is the median of the per-round ratios. Target: >= 0.95.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import torch

from ropelm import TransformerLM
from ropelm.config import validate
from ropelm.data import prepare_data
from ropelm.engine import train
from ropelm.recipe import build_optimizer, resolve_model_config
from ropelm.runs import RunDir
from ropelm.tokenizer import train_tokenizer

STEPS, ROUNDS = 30, 3
TARGET = 0.95
TABLE = "Engine tokens/s ÷ bare loop tokens/s (target >= 0.95)"


def experiment(cache: Path):
    return validate({
        "name": "bench-engine",
        "model": {"block_size": 128, "vocab_size": 4096, "n_layer": 4, "n_head": 4,
                  "n_embd": 256, "dropout": 0.0},
        "tokenizer": {"max_documents": 3000},
        "data": {"cache_dir": str(cache)},
        "train": {"max_steps": STEPS, "batch_size": 8, "log_every": 10},
        "eval": {"max_batches": 1},
    })  # fmt: skip


def bare_loop(config: Any, data: Any, tokenizer: Any) -> float:
    """Tokens/s of forward, backward and AdamW steps on the engine's batches."""
    torch.manual_seed(config.train.seed)
    model_config = resolve_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
    model = TransformerLM(model_config, config.registry()).train()
    optimizer = build_optimizer(model, config.train, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.train.seed)
    batch, block = config.train.batch_size, model_config.block_size
    start = time.perf_counter()
    for _ in range(STEPS):
        x, y = data.train.windows(data.train.sample_starts(batch, block, generator), block)
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return STEPS * batch * block / (time.perf_counter() - start)


def test_engine_overhead(benchmark: Any, ratio_rows: dict, tmp_path: Path) -> None:
    config = experiment(tmp_path / "cache")
    tokenizer = train_tokenizer(config, progress=False)
    data = prepare_data(config, tokenizer, progress=False)
    rates: dict[str, list[float]] = {"engine": [], "bare": []}
    calls = 0

    def engine() -> float:
        run = RunDir(tmp_path / f"run-{calls}")
        run.claim(config, resume=False)
        summary = train(config, data, tokenizer, run, progress=False, log=lambda _: None)
        return summary["train_tokens_per_s"]

    def one_round() -> None:
        nonlocal calls
        order = ["engine", "bare"] if calls % 2 == 0 else ["bare", "engine"]
        for name in order:
            rates[name].append(engine() if name == "engine" else bare_loop(config, data, tokenizer))
        calls += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    engine_rates, bare_rates = rates["engine"][-ROUNDS:], rates["bare"][-ROUNDS:]
    ratio = statistics.median(e / b for e, b in zip(engine_rates, bare_rates, strict=True))
    row = {
        "engine_tok_s": statistics.median(engine_rates),
        "bare_tok_s": statistics.median(bare_rates),
        "ratio": ratio,
        "rounds": ROUNDS,
        "threads": torch.get_num_threads(),
        "within_target": ratio >= TARGET,
    }
    benchmark.extra_info.update(row)
    ratio_rows.setdefault(TABLE, []).append(row)
