"""Throughput measurement: the FLOP formula, memory measurement, the bench JSON and CLI."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from ropelm.bench import (
    bench_variants,
    flops_per_token,
    matmul_params,
    peak_flops,
    peak_step_memory,
)
from ropelm.cli import main
from ropelm.model import ModelConfig, TransformerLM
from ropelm.variants import VariantChoice

TINY = ModelConfig(n_layer=2, n_head=2, n_embd=32, vocab_size=100, block_size=64)


def test_matmul_params_by_hand():
    # per block: ln_1 (2C) + c_attn (C*3C + 3C) + c_proj (C*C + C) + ln_2 (2C)
    #          + c_fc (C*4C + 4C) + mlp c_proj (4C*C + C); then ln_f (2C) + lm_head (C*V + V)
    C, V = 32, 100
    block = (
        2 * C + (3 * C * C + 3 * C) + (C * C + C) + 2 * C + (4 * C * C + 4 * C) + (4 * C * C + C)
    )
    expected = 2 * block + 2 * C + (C * V + V)
    model = TransformerLM.from_config(TINY.model_copy(update={"att_type": "RoPE-SM"}))
    assert matmul_params(model) == expected == model.num_parameters() - V * C  # minus tok_emb
    ape = TransformerLM.from_config(TINY.model_copy(update={"att_type": "Learned-APE"}))
    assert matmul_params(ape) == expected  # the position table is a lookup too


def test_palm_flops_formula_on_a_known_config():
    # 6N + 12 L H Q T per token: N = 1000, L = 2, H = 2, Q = 16, T = 64
    assert flops_per_token(TINY, 1000, 64, backward=True) == 6 * 1000 + 12 * 2 * 2 * 16 * 64
    assert flops_per_token(TINY, 1000, 64, backward=False) == (6000 + 12 * 2 * 2 * 16 * 64) / 3
    # GPT-2 small (85M non-embedding, 12 x 12 x 64) at T = 1024: attention is ~18 % of it
    gpt2 = ModelConfig(n_layer=12, n_head=12, n_embd=768)
    total = flops_per_token(gpt2, 85_000_000, 1024, backward=True)
    assert total == pytest.approx(6 * 85e6 + 12 * 12 * 12 * 64 * 1024)
    assert (12 * 12 * 12 * 64 * 1024) / total == pytest.approx(0.1818, abs=1e-3)


def test_peak_flops_table(monkeypatch):
    assert peak_flops(torch.device("cpu")) is None
    assert peak_flops(torch.device("cpu"), peak_tflops=2.5) == 2.5e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(torch.device("cuda", 0)) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_flops(torch.device("cuda", 0)) == 312e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Mystery GPU")
    assert peak_flops(torch.device("cuda", 0)) is None


def test_cpu_peak_memory_counts_live_allocations_of_the_step():
    n = 1 << 18  # 1 MiB of float32

    def step() -> None:
        a = torch.ones(n)
        b = a * 2  # two live MiB at the peak
        del a, b
        c = torch.ones(n)  # one MiB after both were freed: not a new peak
        del c

    peak = peak_step_memory(step, torch.device("cpu"))
    assert 2 * 2**20 <= peak < 2.2 * 2**20


def test_bench_rows_ratios_memory_and_mfu(registry):
    variants = [
        VariantChoice("RoPE-SM"), VariantChoice("NoPE"), VariantChoice("Learned-APE"),
        VariantChoice("ALiBi"),
    ]  # fmt: skip
    bench = bench_variants(
        variants, [32, 16], registry, model=TINY, batch_size=2, rounds=2, warmup=1, peak_tflops=1.0,
        log=lambda m: None,
    )  # fmt: skip
    assert bench["reference"] == "RoPE-SM" and bench["model"]["block_size"] == 32
    rows = bench["results"]
    assert [(r["T"], r["variant"]) for r in rows] == [
        (t, v.label) for t in (16, 32) for v in variants
    ]
    for row in rows:
        assert row["status"] == "ok" and row["device"] == "cpu"
        tokens = 2 * row["T"]
        assert row["fwd_bwd_tokens_per_s"] == pytest.approx(tokens / row["fwd_bwd_ms"] * 1e3)
        assert row["fwd_bwd_peak_mb"] > row["fwd_peak_mb"] > 0  # backward keeps activations
        model_config = TINY.model_copy(update={"att_type": row["att_type"]})
        model = TransformerLM.from_config(model_config, registry)
        flops = flops_per_token(TINY, matmul_params(model), row["T"], backward=True)
        assert row["flops_per_token_fwd_bwd"] == flops
        assert row["mfu"] == pytest.approx(row["fwd_bwd_tokens_per_s"] * flops / 1e12)
    backends = {(r["variant"], r["fwd_backend"], r["fwd_bwd_backend"]) for r in rows}
    assert ("RoPE-SM", "sdpa", "sdpa") in backends  # rows record the kernel auto chose:
    assert ("ALiBi", "dense", "dense") in backends  # a score_mod on the CPU runs dense
    reference = [r for r in rows if r["variant"] == "RoPE-SM"]
    assert all(r["fwd_bwd_ratio_vs_ref"] == 1.0 == r["fwd_ratio_vs_ref"] for r in reference)


def test_variant_that_cannot_be_built_is_na(registry):
    odd = TINY.model_copy(update={"n_embd": 30})  # head size 15: RoPE needs an even one
    bench = bench_variants(
        [VariantChoice("RoPE-SM"), VariantChoice("NoPE")], [16], registry, model=odd, rounds=1,
        warmup=0, memory=False, log=lambda m: None,
    )  # fmt: skip
    rope, nope = bench["results"]
    assert rope["status"] == "n/a" and "even head size" in rope["reason"]
    assert nope["status"] == "ok" and "fwd_bwd_ratio_vs_ref" not in nope  # no reference ran
    assert "fwd_bwd_peak_mb" not in nope and "mfu" not in nope  # no memory, CPU: no MFU


def test_cli_bench_writes_json_and_table(tmp_path):
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        main,
        ["bench", "--variants", "RoPE-SM,RoPE-Sliding:window=8", "--lengths", "16,32",
         "--batch-size", "1", "--rounds", "1", "--warmup", "0", "--threads", "1",
         "--no-memory", "--out", str(out)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    bench = json.loads(out.read_text())
    assert [r["variant"] for r in bench["results"]] == ["RoPE-SM", "RoPE-Sliding:window=8"] * 2
    assert bench["results"][1]["att_options"] == {"window": 8}
    assert "RoPE-Sliding:window=8" in result.output and "fwd+bwd vs RoPE-SM" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--variants", "Alibi"], "Unknown attention type 'Alibi' (did you mean 'ALiBi'?)"),
        (["--lengths", "1x"], "--lengths 1x: give whole numbers of tokens."),
        (["--set", "model.n_layer=1"], "--set needs --experiment"),
        (["--variants", "RoPE-Sliding:windw=3"], "model.att_options.windw: unknown option"),
    ],
)
def test_cli_bench_bad_input_is_one_line(tmp_path, args, message):
    result = CliRunner().invoke(main, ["bench", *args, "--out", str(tmp_path / "b.json")])
    assert result.exit_code == 1 and message in result.output
    assert result.output.count("\n") == 1 and not (tmp_path / "b.json").exists()
