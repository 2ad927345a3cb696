"""``ropelm-exp device-check``: its CPU code path end to end, and its refusals.

The GPU figures come from running ``benchmarks/gpu/check.sh`` on a CUDA machine;
here ``--device cpu --smoke`` runs every part at toy sizes. The peer is a small
stand-in written below with nanoGPT's interface (``GPTConfig``, ``GPT(config)``,
``forward(idx, targets) -> (logits, loss)``), so the
loading and timing path runs without nanoGPT's code in this repository.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ropelm.cli import main
from ropelm.device_check import NO_CUDA, CheckPlan, DeviceCheck
from ropelm.registry import Registry
from ropelm.throughput import load_nanogpt

PEER = '''
from dataclasses import dataclass
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    block_size: int = 64
    vocab_size: int = 512
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 64
    dropout: float = 0.0
    bias: bool = True


class GPT(nn.Module):
    """An MLP over token and position embeddings: enough to be trained and timed."""

    def __init__(self, config):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(),
                                 nn.Linear(4 * config.n_embd, config.vocab_size))
        print("number of parameters: many")

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1), device=idx.device))
        logits = self.mlp(x)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.flatten(0, 1), targets.flatten())
'''

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["device-check", *map(str, args)])
    return result.exit_code, result.output


@pytest.mark.slow
def test_smoke_check_runs_every_part_on_the_cpu(tmp_path):
    (tmp_path / "peer.py").write_text(PEER)
    out = tmp_path / "out"
    code, output = invoke("--device", "cpu", "--smoke", "--nanogpt", tmp_path / "peer.py",
                          "--experiments", EXPERIMENTS, "--out", out)  # fmt: skip
    assert code == 0, output
    report = json.loads((out / "device_check.json").read_text())
    assert [report[p]["status"] for p in ("conformance", "training", "bench", "quickstart")] == [
        "ok"
    ] * 4
    assert report["conformance"]["failed"] == 0
    checks = report["conformance"]["checks"]["ALiBi"]
    assert checks["device_bf16_matches_cpu_fp32"] == "passed"  # run on the given device
    assert checks["flex_matches_dense_on_cuda"].startswith("n/a")
    training = report["training"]
    assert training["micro_batch"] == 8 and training["precision"] == "fp32"
    assert training["ropelm_tokens_per_s"] > 0 and training["nanogpt_tokens_per_s"] > 0
    assert training["ropelm_vs_nanogpt"] > 0
    rows = report["bench"]["bench"]["results"]
    assert {row["T"] for row in rows} == {32, 64}
    assert {row["variant"] for row in rows} == set(Registry.default().names())
    assert set(report["quickstart"]["ppl_at_length"]) == {"1x", "2x"}
    summary = (out / "device_check.md").read_text()
    assert "ropelm" in summary and "x nanoGPT" in summary and "| " not in summary.splitlines()[0]


def test_a_failing_part_is_recorded_and_the_others_run(tmp_path):
    plan = CheckPlan.smoke(EXPERIMENTS, tmp_path / "cache")
    plan = plan.__class__(**{**plan.__dict__, "quickstart_experiment": tmp_path / "missing.yaml"})
    check = DeviceCheck(plan, torch.device("cpu"), Registry.default(), tmp_path, log=lambda m: None)
    report = check.run(tmp_path / "out", parts=("quickstart", "bench"))
    assert report["quickstart"]["status"] == "error"
    assert "missing.yaml" in report["quickstart"]["error"]
    assert report["bench"]["status"] == "ok" and "training" not in report
    summary = (tmp_path / "out" / "device_check.md").read_text()
    assert "**quickstart** (error" in summary and "**bench** (ok" in summary


def test_without_cuda_it_says_so_and_succeeds(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, output = invoke()
    assert code == 0 and output.strip() == NO_CUDA


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--device", "cpu"), "the device check measures a GPU; add --smoke"),
     (("--device", "cpu", "--smoke", "--nanogpt", "/nonexistent/model.py"), "no such file"),
     (("--device", "cpu", "--smoke", "--parts", "bench,speed"), "choose among conformance")],
)  # fmt: skip
def test_bad_options_are_one_line(args, message):
    code, output = invoke(*args, "--experiments", EXPERIMENTS)
    assert code == 1 and message in output and output.count("\n") == 1


def test_a_file_that_is_not_nanogpt_is_refused(tmp_path):
    (tmp_path / "model.py").write_text("x = 1\n")
    with pytest.raises(Exception, match="defines no GPT and GPTConfig"):
        load_nanogpt(tmp_path / "model.py")
