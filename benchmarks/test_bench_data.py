"""The data pipeline: preparation throughput against raw tokenization, and bounded memory.

Run with::

    .venv/bin/python -m pytest benchmarks/test_bench_data.py --benchmark-only

``test_prepare_throughput``
    ``prepare_data`` (read the source, split, tokenize, write token files and
    checksums) against one raw ``Tokenizer.encode_batch`` call on the same
    documents, already in memory, with the same tokenizer (vocab 4096).
    Both count the documents' own tokens (the EOT separators are left out), and
    run interleaved round by round in alternating order (ABBA), so drift of a
    shared machine hits both alike. Ratio: the median of the per-round ratios
    (prepare tokens/s ÷ encode_batch tokens/s). Target: >= 0.8. Two sources:
    the wiki sample (JSON read directly) and the same documents as a local
    ``.jsonl`` file (read through ``datasets``).

``test_prepare_memory``
    Peak resident memory while preparing ~200 MB of local ``.jsonl`` text ÷
    the same for ~20 MB. Target: <= 1.2, i.e. memory does not grow with the
    corpus. Each preparation runs in a fresh subprocess, which imports
    everything, resets its peak-RSS counter (``/proc/self/clear_refs``), runs
    ``prepare_data`` and reports ``VmHWM`` (the peak since the reset, which
    includes the resident imports). ``growth_ratio`` compares the peaks above
    the RSS before preparation; ``ru_maxrss_ratio`` the whole-process peaks
    (dominated by the imports). The corpora are made in a temporary directory
    from shuffled, numbered wiki-sample documents.
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from ropelm.config import validate
from ropelm.data import prepare_data
from ropelm.sources import DocumentSource
from ropelm.tokenizer import load_tokenizer, train_tokenizer

VOCAB_SIZE = 4096
WARMUP_ROUNDS, ROUNDS = 1, 5
THROUGHPUT_TARGET, MEMORY_TARGET = 0.8, 1.2
SMALL_MB, LARGE_MB = 20, 200
THROUGHPUT_TABLE = "Preparation tokens/s ÷ raw encode_batch tokens/s (target >= 0.8)"
MEMORY_TABLE = "Peak RSS preparing 200 MB ÷ preparing 20 MB of text (target <= 1.2)"


def experiment(cache: Path, **data: Any):
    return validate({
        "model": {"vocab_size": VOCAB_SIZE, "n_embd": 64, "n_head": 4},
        "tokenizer": {"max_documents": 2000},
        "data": {"cache_dir": str(cache), **data},
    })  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tokenizer trained on the wiki sample, its documents, and a jsonl copy of them."""
    root = tmp_path_factory.mktemp("bench-data")
    info = train_tokenizer(experiment(root / "cache"), progress=False)
    texts = list(DocumentSource(experiment(root / "cache").data))
    jsonl = root / "wiki.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return {"root": root, "info": info, "texts": texts, "jsonl": jsonl}


@pytest.mark.parametrize("source", ["wiki-sample", "files"])
def test_prepare_throughput(benchmark: Any, ratio_rows: dict, workdir: dict, source: str) -> None:
    info, texts = workdir["info"], workdir["texts"]
    data = {"source": source, "paths": [str(workdir["jsonl"])]} if source == "files" else {}
    config = experiment(workdir["root"] / "cache", **data)
    tokenizer = load_tokenizer(info.path)
    rates: dict[str, list[float]] = {"prepare": [], "encode_batch": []}
    calls = 0

    def prepare() -> float:
        start = time.perf_counter()
        prepared = prepare_data(config, info, force=True, progress=False)
        seconds = time.perf_counter() - start
        meta = prepared.meta["splits"]
        return sum(m["tokens"] - m["documents"] for m in meta.values()) / seconds

    def encode_batch() -> float:
        start = time.perf_counter()
        encodings = tokenizer.encode_batch(texts)
        seconds = time.perf_counter() - start
        return sum(len(e.ids) for e in encodings) / seconds

    def one_round() -> None:
        nonlocal calls
        order = [prepare, encode_batch] if calls % 2 == 0 else [encode_batch, prepare]
        calls += 1
        for fn in order:
            rates[fn.__name__].append(fn())

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    measured = {name: r[-ROUNDS:] for name, r in rates.items()}
    ratios = [p / e for p, e in zip(measured["prepare"], measured["encode_batch"], strict=True)]
    row = {
        "source": source,
        "prepare_tok_s": statistics.median(measured["prepare"]),
        "encode_batch_tok_s": statistics.median(measured["encode_batch"]),
        "ratio": statistics.median(ratios),
        "rounds": len(ratios),
    }
    benchmark.extra_info.update(row)
    ratio_rows.setdefault(THROUGHPUT_TABLE, []).append(
        {**row, "within_target": row["ratio"] >= THROUGHPUT_TARGET}
    )


CHILD = """
import json, resource, sys
import datasets  # imported lazily by the files source; count it in the RSS before preparing
from ropelm.config import validate
from ropelm.data import prepare_data
from ropelm.tokenizer import tokenizer_info


def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


config = validate(json.loads(sys.argv[1]))
tokenizer = tokenizer_info(sys.argv[2])
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset the peak (VmHWM) to the current RSS
    f.write("5")
prepared = prepare_data(config, tokenizer, force=True, progress=False)
print(json.dumps({
    "rss_before_kb": before,
    "peak_kb": status("VmHWM"),
    "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    "tokens": sum(m["tokens"] for m in prepared.meta["splits"].values()),
}))
"""


def make_corpus(path: Path, texts: list[str], megabytes: int) -> int:
    """Write ~``megabytes`` MB of jsonl documents (shuffled, numbered wiki-sample copies)."""
    rng, size, copy = random.Random(0), 0, 0
    with path.open("w", encoding="utf-8") as f:
        while size < megabytes * 1_000_000:
            for text in rng.sample(texts, len(texts)):
                line = json.dumps({"text": f"[{copy}] {text}"}, ensure_ascii=False) + "\n"
                f.write(line)
                size += len(line.encode("utf-8"))
                if size >= megabytes * 1_000_000:
                    break
            copy += 1
    return size


def run_child(script: Path, *args: str) -> dict[str, Any]:
    out = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, timeout=1800
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_prepare_memory(benchmark: Any, ratio_rows: dict, workdir: dict) -> None:
    root, info = workdir["root"], workdir["info"]
    script = root / "child.py"
    script.write_text(CHILD)
    sizes = {}
    for mb in (SMALL_MB, LARGE_MB):
        sizes[mb] = make_corpus(root / f"corpus-{mb}mb.jsonl", workdir["texts"], mb)
    results: dict[str, dict[str, Any]] = {}

    def measure() -> None:
        for mb in (SMALL_MB, LARGE_MB):
            config = experiment(root / "cache", source="files",
                                paths=[str(root / f"corpus-{mb}mb.jsonl")])  # fmt: skip
            results[mb] = run_child(script, json.dumps(config.model_dump(mode="json")),
                                    str(info.path))  # fmt: skip

    try:
        benchmark.pedantic(measure, rounds=1, iterations=1)
    finally:  # ~220 MB of text and tokens: do not leave them in the temp directory
        for path in [*root.glob("corpus-*.jsonl"), *(root / "cache").glob("tokens-*/*.bin")]:
            path.unlink()

    small, large = results[SMALL_MB], results[LARGE_MB]

    def pair(key: str, scale: float = 1024) -> str:
        return f"{small[key] / scale:,.0f} / {large[key] / scale:,.0f}"

    row = {
        "text_mb": f"{sizes[SMALL_MB] / 1e6:.0f} / {sizes[LARGE_MB] / 1e6:.0f}",
        "tokens": pair("tokens", 1),
        "rss_before_mb": pair("rss_before_kb"),
        "peak_rss_mb": pair("peak_kb"),
        "ratio": large["peak_kb"] / small["peak_kb"],
        "growth_ratio": (large["peak_kb"] - large["rss_before_kb"])
        / max(small["peak_kb"] - small["rss_before_kb"], 1),
        "ru_maxrss_ratio": large["ru_maxrss_kb"] / small["ru_maxrss_kb"],
    }
    benchmark.extra_info.update(row)
    ratio_rows.setdefault(MEMORY_TABLE, []).append(
        {**row, "within_target": row["ratio"] <= MEMORY_TARGET}
    )
