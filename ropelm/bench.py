"""``ropelm-exp bench``: throughput, peak memory and MFU of every variant, side by side.

For each device (the CPU; CUDA when present) and sequence length T, one model
per variant (the same shape, ``block_size`` = the longest T, dropout 0, seed 0)
is timed on the same random batch (B, T):

* forward: ``model(x)`` under ``torch.no_grad()``;
* forward+backward: ``loss.backward()`` of the training loss (gradients are
  cleared between steps, the optimizer step is not included).

Variants are interleaved round by round, in alternating order (ABBA...), so
drift of a shared machine hits all alike; a time is the median over rounds, and
``*_ratio_vs_ref`` is the median of the per-round ratios of the reference
variant's time (RoPE-SM) to this variant's: tokens/s relative to the reference.
On CUDA the model runs under bf16 autocast (as training does) and every timed
step is synchronised.

Peak memory (``*_peak_mb``): the most memory allocated *during* one step above
what was allocated before it (activations, gradients, temporaries). Memory held
before the step is not counted: parameters (``param_mb`` gives them) and caches
that earlier steps built and keep (RoPE tables, ALiBi's bias masks, sliding-window
masks), which every timed round reuses:

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()``
  around the step, after ``reset_peak_memory_stats()``;
* CPU: the allocation and free events of the PyTorch CPU allocator recorded by
  ``torch.profiler`` (``profile_memory=True``) during one step, summed in time
  order; the peak of that running sum. This counts every tensor and kernel
  workspace the step allocates through PyTorch, and is independent of the
  process's history (unlike the RSS high-water mark, which never goes down and
  includes the allocator's cached pages and the Python heap).

MFU (CUDA only, or with ``peak_tflops`` given) uses one formula for every
variant, PaLM's (Chowdhery et al., 2022, appendix B,
https://arxiv.org/abs/2204.02311): a forward+backward pass costs per token::

    6 N + 12 L H Q T   FLOPs

with N the parameters of the matrix multiplications (every parameter except the
token and position embedding tables, which are lookups; the untied LM head is
included), L layers, H heads, Q head size and T the sequence length; the
forward pass alone is a third of it (2 N + 4 L H Q T). MFU = tokens/s x FLOPs
per token / peak FLOP/s of the device (bf16 dense, :data:`PEAK_TFLOPS`). The
attention term is that of dense causal-free attention for every variant, so for
sliding-window or linear attention MFU is "dense-equivalent" utilisation.

The measuring itself (models, batch, timed rounds, peak memory) is in
:mod:`ropelm.bench_timing`; this module turns it into result rows and the table.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch

from ropelm.bench_timing import Candidate, Steps, Timings, peak_step_memory, time_rounds
from ropelm.config import ModelConfig
from ropelm.model import TransformerLM
from ropelm.recipe import Precision, resolve_precision
from ropelm.registry import Registry
from ropelm.variants import VariantChoice

__all__ = [
    "MB",
    "PEAK_TFLOPS",
    "REFERENCE",
    "bench_variants",
    "device_name",
    "flops_per_token",
    "format_bench_table",
    "matmul_params",
    "peak_flops",
    "peak_step_memory",
]

REFERENCE = "RoPE-SM"
MB = 2**20

#: Peak dense bf16 tensor throughput (TFLOP/s) by GPU name fragment, from vendor data sheets.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,
    "A100": 312.0,
    "A10G": 125.0,
    "A10": 125.0,
    "L40S": 362.0,
    "L4": 121.0,
    "V100": 125.0,
    "RTX 4090": 165.0,
    "RTX 3090": 71.0,
}


def matmul_params(model: TransformerLM) -> int:
    """N of the FLOP formula: all parameters except the embedding tables (lookups, no FLOPs)."""
    skip = {id(p) for p in model.tok_emb.parameters()}
    if model.pos_emb is not None:
        skip |= {id(p) for p in model.pos_emb.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def flops_per_token(config: ModelConfig, n_matmul: int, seq_len: int, backward: bool) -> float:
    """PaLM appendix B: 6 N + 12 L H Q T per token for forward+backward; a third for forward."""
    per_token = 6 * n_matmul + 12 * config.n_layer * config.n_head * config.head_size * seq_len
    return float(per_token if backward else per_token / 3)


def peak_flops(device: torch.device, peak_tflops: float | None = None) -> float | None:
    """Peak FLOP/s of ``device``: ``peak_tflops`` if given, else the table for known GPUs."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for fragment, tflops in PEAK_TFLOPS.items():  # longer fragments first where it matters
        if fragment in name:
            return tflops * 1e12
    return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_variants(
    variants: Sequence[VariantChoice],
    lengths: Sequence[int],
    registry: Registry,
    *,
    model: ModelConfig,
    batch_size: int = 4,
    devices: Sequence[str] = ("cpu",),
    rounds: int = 5,
    warmup: int = 2,
    memory: bool = True,
    peak_tflops: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Measure every variant at every length on every device; return the bench JSON dict.

    Unknown variants and bad options raise before any timing; a variant that
    cannot build a model of this shape gets rows of n/a with the reason.
    """
    import ropelm

    lengths = sorted(set(lengths))
    config = model.model_copy(update={"block_size": max(lengths), "dropout": 0.0})
    candidates = [Candidate.resolve(v, config, registry) for v in variants]
    reference = next((v.label for v in variants if v.label == REFERENCE), None)
    results: list[dict[str, Any]] = []
    names: dict[str, str] = {}
    for device_str in devices:
        device = torch.device(device_str)
        names[device_str] = device_name(device)
        precision = resolve_precision("auto", device)  # bf16 autocast on CUDA, as training
        for candidate in candidates:
            candidate.build_on(device)
        for length in lengths:
            log(f"bench {device_str} T={length}")
            rows = _measure_length(
                candidates, length, batch_size, device, rounds, warmup, memory, precision,
                reference, peak_flops(device, peak_tflops), config,
            )  # fmt: skip
            results += rows
        for candidate in candidates:
            candidate.model = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "ropelm": ropelm.__version__,
        "torch": torch.__version__,
        "device_name": "; ".join(f"{d}: {n}" for d, n in names.items()),
        "threads": torch.get_num_threads(),
        "model": config.model_dump(mode="json"),
        "batch_size": batch_size,
        "rounds": rounds,
        "warmup": warmup,
        "reference": reference,
        "precision": {"cpu": "fp32", "cuda": "bf16 autocast"},
        "flop_formula": "PaLM appendix B: 6N + 12*L*H*Q*T per token (fwd+bwd), 1/3 of it (fwd); "
        "N = parameters except embedding tables",
        "memory_method": "peak bytes allocated during one step above the allocation before it: "
        "CUDA max_memory_allocated; CPU torch.profiler allocator events",
        "results": results,
    }


def _measure_length(
    candidates: list[Candidate],
    length: int,
    batch_size: int,
    device: torch.device,
    rounds: int,
    warmup: int,
    memory: bool,
    precision: Precision,
    reference: str | None,
    peak: float | None,
    config: ModelConfig,
) -> list[dict[str, Any]]:
    """One result row per candidate at length T: all timed together, then each described."""
    steps = Steps.make(config, batch_size, length, device, precision)  # x, y: (B, T)
    timings = time_rounds(candidates, steps, rounds, warmup)
    ref = reference if reference is not None and reference not in timings.failed else None
    return [_result_row(c, steps, timings, ref, peak, memory) for c in candidates]


def _result_row(
    c: Candidate,
    steps: Steps,
    timings: Timings,
    ref: str | None,
    peak: float | None,
    memory: bool,
) -> dict[str, Any]:
    """Throughput, ratios vs ``ref``, MFU (``peak`` FLOP/s given) and peak memory, or n/a."""
    label, length, batch_size = c.choice.label, steps.length, steps.batch_size
    row: dict[str, Any] = {
        "variant": label,
        "att_type": c.choice.name,
        "att_options": c.choice.options_dict,
        "device": str(steps.device),
        "T": length,
        "batch_size": batch_size,
    }
    if label in timings.failed or c.model is None:
        return {**row, "status": "n/a", "reason": timings.failed.get(label, c.reason)}
    fwd, fwd_bwd, model = timings.fwd, timings.fwd_bwd, c.model
    tokens = batch_size * length
    n_matmul = matmul_params(model)
    fwd_s, fwd_bwd_s = statistics.median(fwd[label]), statistics.median(fwd_bwd[label])
    row |= {
        "status": "ok",
        "fwd_backend": timings.backends[label]["fwd"],
        "fwd_bwd_backend": timings.backends[label]["fwd_bwd"],
        "fwd_ms": fwd_s * 1e3,
        "fwd_bwd_ms": fwd_bwd_s * 1e3,
        "fwd_tokens_per_s": tokens / fwd_s,
        "fwd_bwd_tokens_per_s": tokens / fwd_bwd_s,
        "n_params": model.num_parameters(),
        "param_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
        "flops_per_token_fwd_bwd": flops_per_token(model.config, n_matmul, length, True),
    }
    if ref is not None:
        for kind, times in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
            row[f"{kind}_ratio_vs_ref"] = statistics.median(
                r / t for r, t in zip(times[ref], times[label], strict=True)
            )
    if peak is not None:
        row["mfu"] = row["fwd_bwd_tokens_per_s"] * row["flops_per_token_fwd_bwd"] / peak
        row["mfu_fwd"] = (
            row["fwd_tokens_per_s"] * flops_per_token(model.config, n_matmul, length, False) / peak
        )
    if memory:
        for kind, step in (("fwd", steps.forward), ("fwd_bwd", steps.forward_backward)):
            row[f"{kind}_peak_mb"] = peak_step_memory(partial(step, model), steps.device) / MB
        model.zero_grad(set_to_none=True)
    return row


def format_bench_table(bench: dict[str, Any]) -> str:
    """The bench results as a table: one row per device x T x variant."""
    from tabulate import tabulate

    rows = []
    for r in bench["results"]:
        if r["status"] != "ok":
            rows.append([r["device"], r["T"], r["variant"], "", "n/a", "", "", "", "", "",
                         r["reason"]])  # fmt: skip
            continue
        backends = {r.get("fwd_backend", ""), r.get("fwd_bwd_backend", "")} - {""}
        rows.append([
            r["device"], r["T"], r["variant"], "/".join(sorted(backends)),
            f"{r['fwd_tokens_per_s']:,.0f}",
            f"{r['fwd_ratio_vs_ref']:.2f}" if "fwd_ratio_vs_ref" in r else "",
            f"{r['fwd_bwd_tokens_per_s']:,.0f}",
            f"{r['fwd_bwd_ratio_vs_ref']:.2f}" if "fwd_bwd_ratio_vs_ref" in r else "",
            f"{r['fwd_bwd_peak_mb']:.1f}" if "fwd_bwd_peak_mb" in r else "",
            f"{r['mfu']:.1%}" if "mfu" in r else "", "",
        ])  # fmt: skip
    ref = bench.get("reference") or "ref"
    headers = ["device", "T", "variant", "backend", "fwd tok/s", f"fwd vs {ref}",
               "fwd+bwd tok/s", f"fwd+bwd vs {ref}", "fwd+bwd peak MB", "MFU", "note"]  # fmt: skip
    return tabulate(rows, headers=headers, tablefmt="simple", disable_numparse=True)
