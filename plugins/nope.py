"""NoPE: causal softmax attention without any position information.

The Impact of Positional Encoding on Length Generalization in Transformers,
Kazemnejad et al., 2023. https://arxiv.org/abs/2305.19466

A decoder-only transformer can infer positions from the causal mask alone (the
first layer can count how many tokens a query sees), so no position embedding is
added anywhere. The attention is :class:`ropelm.SelfAttention` without parts:
fused QKV, causal SDPA, a KV cache for decoding. Nothing ties it to a maximum
length, so it runs beyond ``block_size`` (whether it *generalises* there is what
the paper measures).
"""

from __future__ import annotations

import ropelm
from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.self_attention import SelfAttention


def build(config: ModelConfig, options: SoftmaxOptions) -> SelfAttention:
    return SelfAttention(config, n_kv_head=options.n_kv_head, softcap=options.softcap)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="NoPE",
            description="No position encoding: causal softmax attention only (SDPA).",
            reference="https://arxiv.org/abs/2305.19466",
            factory=build,
            options=SoftmaxOptions,
            capabilities=ropelm.Capabilities(
                causal=True, kv_cache=True, extrapolates=True, document_mask=True
            ),
        )
    )
