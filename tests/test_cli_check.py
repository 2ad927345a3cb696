"""``ropelm-exp check``: the conformance table for one plugin, and its exit status."""

from __future__ import annotations

from click.testing import CliRunner

from ropelm.cli import main

LEAKY_PLUGIN = '''
"""A broken variant: softmax attention that also sees the future."""
import torch
import torch.nn.functional as F

import ropelm


class Leaky(torch.nn.Module):
    def __init__(self, config, options):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = torch.nn.Linear(config.n_embd, 3 * config.n_embd)
        self.out = torch.nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cache=None, document_ids=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_head, -1).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=False)  # (B, nh, T, hs)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(ropelm.AttentionSpec(
        name="Leaky", description="sees the future", reference="https://example.org",
        factory=Leaky, capabilities=ropelm.Capabilities(kv_cache=False, document_mask=False),
    ))
'''


def test_check_prints_a_table_and_fails_on_a_leaky_plugin(tmp_path):
    plugin = tmp_path / "leaky.py"
    plugin.write_text(LEAKY_PLUGIN)
    result = CliRunner().invoke(main, ["check", str(plugin)])
    assert result.exit_code == 1, result.output
    rows = {
        line.split("|")[1].strip(): line.split("|")[2].strip()
        for line in result.output.splitlines()
        if line.startswith("| ") and "outcome" not in line
    }
    assert rows["causality"] == "failed"  # the future leaks into the past
    assert rows["output_shape_and_dtype"] == "passed"
    assert rows["kv_cache_matches_full_forward"] == "not applicable"
    assert result.output.startswith("Leaky: ")


def test_check_an_unknown_name_is_one_sentence():
    result = CliRunner().invoke(main, ["check", "RoPE-XX"])
    assert result.exit_code == 1
    assert "Unknown attention type 'RoPE-XX'" in result.output
