"""ropelm: train transformer language models and compare attention variants fairly.

Public API::

    from ropelm import ModelConfig, TransformerLM, Registry, AttentionSpec, hookimpl
"""

from ropelm.attention import AttentionSpec, Capabilities, KVCache, SelfAttention
from ropelm.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    PluginError,
    RopelmError,
    UnknownAttentionError,
)
from ropelm.hookspecs import hookimpl
from ropelm.model import DecodeState, ModelConfig, TransformerLM
from ropelm.registry import Registry
from ropelm.rope import apply_rotary_emb, build_rope_cache

__version__ = "0.1.0"

__all__ = [
    "AttentionSpec",
    "Capabilities",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "DecodeState",
    "KVCache",
    "ModelConfig",
    "PluginError",
    "Registry",
    "RopelmError",
    "SelfAttention",
    "TransformerLM",
    "UnknownAttentionError",
    "apply_rotary_emb",
    "build_rope_cache",
    "hookimpl",
]
