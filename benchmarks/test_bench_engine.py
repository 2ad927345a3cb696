"""Engine overhead: ``ropelm.engine.train`` tokens/s against a bare training loop.

Run with::

    .venv/bin/python -m pytest benchmarks/test_bench_engine.py --benchmark-only

Both sides train the same model (same seed and initial weights) on the same
batches of the wiki sample for the same number of steps, in float32 on the
CPU. Two bare loops are measured: ``bare`` is the minimum (sample the windows,
forward, backward, AdamW step) and ``bare+clip`` adds the gradient-norm
clipping of the recipe (``max_grad_norm`` 1.0), which is arithmetic every
training run pays rather than engine overhead. The engine adds to that its
schedule, loss checks, progress bar and metrics log; its figure is
``summary["train_tokens_per_s"]`` (training steps only: the final evaluation
and checkpoint are outside it). Rounds rotate the order so machine drift hits
all alike; a ratio is the median of the per-round ratios. Target: >= 0.97.
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
from ropelm.experiment import Experiment
from ropelm.recipe import build_optimizer, resolve_model_config
from ropelm.runs import RunDir
from ropelm.tokenizer import train_tokenizer

STEPS, ROUNDS = 30, 4
TARGET = 0.97
TABLE = "Engine tokens/s ÷ bare loop tokens/s (target >= 0.97)"


def experiment(cache: Path) -> Experiment:
    return Experiment.bind(validate({
        "name": "bench-engine",
        "model": {"block_size": 128, "vocab_size": 4096, "n_layer": 4, "n_head": 4,
                  "n_embd": 256, "dropout": 0.0},
        "tokenizer": {"max_documents": 3000},
        "data": {"cache_dir": str(cache)},
        "train": {"max_steps": STEPS, "batch_size": 8, "log_every": 10},
        "eval": {"max_batches": 1},
    }))  # fmt: skip


def bare_loop(experiment: Experiment, data: Any, tokenizer: Any, clip: bool) -> float:
    """Tokens/s of forward, backward (clipping) and AdamW steps on the engine's batches."""
    config = experiment.config
    torch.manual_seed(config.train.seed)
    model_config = resolve_model_config(config, tokenizer.vocab_size, tokenizer.pad_id)
    model = TransformerLM(model_config, experiment.attention).train()
    optimizer = build_optimizer(model, config.train, torch.device("cpu"))
    generator = torch.Generator().manual_seed(config.train.seed)
    batch, block = config.train.batch_size, model_config.block_size
    start = time.perf_counter()
    for _ in range(STEPS):
        x, y = data.train.windows(data.train.sample_starts(batch, block, generator), block)
        _, loss = model(x, y)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.train.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return STEPS * batch * block / (time.perf_counter() - start)


def test_engine_overhead(benchmark: Any, ratio_rows: dict, tmp_path: Path) -> None:
    bound = experiment(tmp_path / "cache")
    config = bound.config
    tokenizer = train_tokenizer(config, progress=False)
    data = prepare_data(config, tokenizer, progress=False)
    rates: dict[str, list[float]] = {"engine": [], "bare": [], "bare+clip": []}
    calls = 0

    def engine() -> float:
        run = RunDir(tmp_path / f"run-{calls}")
        run.claim(config, resume=False)
        summary = train(bound, data, tokenizer, run, progress=False, log=lambda _: None)
        return summary["train_tokens_per_s"]

    def one_round() -> None:
        nonlocal calls
        names = list(rates)
        order = names[calls % 3 :] + names[: calls % 3]
        for name in order:
            if name == "engine":
                rates[name].append(engine())
            else:
                rates[name].append(bare_loop(bound, data, tokenizer, clip=name == "bare+clip"))
        calls += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=1, iterations=1)
    engine_rates = rates["engine"][-ROUNDS:]
    for reference in ("bare", "bare+clip"):
        bare_rates = rates[reference][-ROUNDS:]
        ratio = statistics.median(e / b for e, b in zip(engine_rates, bare_rates, strict=True))
        row = {
            "reference": reference,
            "engine_tok_s": statistics.median(engine_rates),
            "reference_tok_s": statistics.median(bare_rates),
            "ratio": ratio,
            "rounds": ROUNDS,
            "threads": torch.get_num_threads(),
            "within_target": ratio >= TARGET,
        }
        benchmark.extra_info[reference] = row
        ratio_rows.setdefault(TABLE, []).append(row)
