"""Learned-APE: learned absolute position embeddings (GPT-2 style) + causal softmax.

Radford et al., 2019, "Language Models are Unsupervised Multitask Learners"
(https://cdn.openai.com/better-language-models/language_models_are_unsupervised_multitask_learners.pdf);
learned position embeddings go back to Gehring et al., 2017 (https://arxiv.org/abs/1705.03122).

A table ``nn.Embedding(block_size, C)`` adds one trained vector per position to
the token embeddings at the model input (through ``AttentionSpec.position_embedding``;
the state-dict key is ``pos_emb.weight``). Attention itself carries no position
(NoPE-style SelfAttention). Positions >= block_size have no embedding, so the
variant does not extrapolate: asking for one raises a ``ConfigError`` instead of
an index error (or a device-side assert on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

import ropelm
from ropelm.attention import SoftmaxOptions
from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.self_attention import SelfAttention


class LearnedPositionEmbedding(nn.Embedding):
    """Positions start..start+T-1 -> (T, C) from a trained table of ``block_size`` rows."""

    def forward(self, start: int, length: int) -> torch.Tensor:
        """Embeddings (length, C) of positions start..start+length-1 (a slice: no host sync)."""
        size = self.num_embeddings
        if start < 0 or start + length > size:
            raise ConfigError(
                f"Learned-APE has position embeddings for positions 0..{size - 1} "
                f"(model.block_size = {size}) but was asked for position "
                f"{start + length - 1 if start >= 0 else start}; keep sequences within "
                "block_size or use a variant that extrapolates (e.g. Sinusoidal-APE, ALiBi, "
                "RoPE-SM)."
            )
        return self.weight[start : start + length]  # (T, C)


def build(config: ModelConfig, options: SoftmaxOptions) -> SelfAttention:
    return SelfAttention(config, n_kv_head=options.n_kv_head, softcap=options.softcap)


def build_position_embedding(
    config: ModelConfig, options: SoftmaxOptions
) -> LearnedPositionEmbedding:
    return LearnedPositionEmbedding(config.block_size, config.n_embd)


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(
        ropelm.AttentionSpec(
            name="Learned-APE",
            description="Learned absolute position embeddings at the input (GPT-2) + softmax.",
            reference="https://cdn.openai.com/better-language-models/"
            "language_models_are_unsupervised_multitask_learners.pdf",
            factory=build,
            options=SoftmaxOptions,
            capabilities=ropelm.Capabilities(
                causal=True,
                kv_cache=True,
                extrapolates=False,
                input_position_embedding=True,
                document_mask=True,
            ),
            position_embedding=build_position_embedding,
        )
    )
