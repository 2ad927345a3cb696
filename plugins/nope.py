"""NoPE: causal softmax attention without any position information.

The Impact of Positional Encoding on Length Generalization in Transformers,
Kazemnejad et al., 2023. https://arxiv.org/abs/2305.19466

A decoder-only transformer can infer positions from the causal mask alone (the
first layer can count how many tokens a query sees), so no position embedding is
added anywhere. The attention is :class:`ropelm.attention.SelfAttention` as is:
fused QKV, causal SDPA, a KV cache for decoding. Nothing ties it to a maximum
length, so it runs beyond ``block_size`` (whether it *generalises* there is what
the paper measures).
"""

from __future__ import annotations

import dataclasses

import ropelm
from ropelm.attention import SelfAttention, check_n_kv_head
from ropelm.model import ModelConfig


@dataclasses.dataclass(frozen=True)
class NoPEOptions:
    """``model.att_options`` of NoPE.

    Attributes:
        n_kv_head: key/value heads for grouped-query attention (None: n_head).
    """

    n_kv_head: int | None = None

    def __post_init__(self) -> None:
        check_n_kv_head(self.n_kv_head)


def build(config: ModelConfig, options: NoPEOptions | None) -> SelfAttention:
    options = options if options is not None else NoPEOptions()
    return SelfAttention(config, n_kv_head=options.n_kv_head)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="NoPE",
            description="No position encoding: causal softmax attention only (SDPA).",
            reference="https://arxiv.org/abs/2305.19466",
            factory=build,
            options=NoPEOptions,
            capabilities=ropelm.Capabilities(causal=True, kv_cache=True, extrapolates=True),
        )
    )
