"""A Hugging Face transformers model directory read as a ropelm model (GPT-NeoX and GPT-2).

:func:`ropelm.checkpoint.load_model` (and so ``ropelm-exp generate``) hands a directory
whose ``config.json`` names ``architectures`` to :func:`read_hf_model`, which returns the
:class:`ModelConfig` and the ropelm state dict of the same model:

* ``GPTNeoXForCausalLM`` with a sequential residual, the rotation on the whole head, the
  exact GELU, a 4C MLP and LayerNorm eps 1e-5 -> ``RoPE-SM`` (transformers' rope types
  default, linear, dynamic, yarn and llama3 become ropelm's scalings);
* ``GPT2LMHeadModel`` with the exact GELU (``activation_function: "gelu"``) -> ``Learned-APE``.

A directory that ropelm exported carries its ``ModelConfig`` under ``"ropelm"`` in
``config.json``; it is used whenever it describes the same network as the rest of the file
(so ``RoPE-SM-complex``, ``ntk`` scaling and ``model.bias: false`` come back as they were,
and export -> import -> export gives identical tensors). Anything else -- another
architecture, a parallel residual, partial rotary, the tanh GELU, pickled weights -- is one
sentence. Only safetensors weights are read (never unpickled); transformers is not imported.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ropelm.config import ModelConfig
from ropelm.errors import CheckpointError, ConfigError, RopelmError
from ropelm.hf_convert import (
    ARCHITECTURE_OF,
    GPT2,
    LAYER_NORM_EPS,
    NEOX,
    from_hf_state,
    rope_options,
    rope_parameters,
)
from ropelm.rope import RoPEOptions

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"
SUPPORTED = f"{NEOX} (sequential residual, full rotary, exact GELU) and {GPT2} (exact GELU)"


def is_hf_dir(path: str | Path) -> bool:
    """Whether ``path`` is a transformers model directory: ``config.json`` naming architectures."""
    file = Path(path) / HF_CONFIG
    if not file.is_file():
        return False
    try:
        return isinstance(json.loads(file.read_text(encoding="utf-8")).get("architectures"), list)
    except (OSError, ValueError, AttributeError):
        return False


def read_hf_model(directory: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """The ropelm :class:`ModelConfig` and state dict of a transformers model directory.

    Raises:
        ConfigError: an architecture or setting ropelm's model does not compute.
        CheckpointError: an unreadable ``config.json`` or missing safetensors weights.
    """
    directory = Path(directory)
    hf = read_hf_config(directory)
    architecture = hf["architectures"][0] if hf["architectures"] else None
    if len(hf["architectures"]) != 1 or architecture not in (NEOX, GPT2):
        raise ConfigError(
            f"{directory} holds a {'/'.join(map(str, hf['architectures'])) or 'nameless'} "
            f"model; ropelm imports {SUPPORTED}, the architectures it exports."
        )
    *saved, derived = model_configs_from_hf(hf, architecture, where=directory)
    hf_state = read_hf_weights(directory)
    tied = bool(hf.get("tie_word_embeddings", architecture == GPT2))  # transformers' defaults
    for config in saved:  # a ropelm export's own config, unless its biases were trained since
        try:
            return config, from_hf_state(hf_state, config, architecture, tied=tied)
        except ConfigError:
            pass
    return derived, from_hf_state(hf_state, derived, architecture, tied=tied)


def read_hf_config(directory: Path) -> dict[str, Any]:
    """``config.json`` as a dictionary."""
    try:
        hf = json.loads((directory / HF_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{directory / HF_CONFIG} cannot be read ({err}).") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("architectures"), list):
        raise CheckpointError(f"{directory / HF_CONFIG} names no architectures.")
    return hf


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` (or of the shards its index names), on the CPU."""
    if (directory / HF_WEIGHTS).is_file():
        files = [directory / HF_WEIGHTS]
    elif (directory / HF_WEIGHTS_INDEX).is_file():
        try:
            index = json.loads((directory / HF_WEIGHTS_INDEX).read_text(encoding="utf-8"))
            files = [directory / name for name in sorted(set(index["weight_map"].values()))]
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise CheckpointError(f"{directory / HF_WEIGHTS_INDEX} is corrupt ({err}).") from None
    else:
        raise CheckpointError(
            f"{directory} has no {HF_WEIGHTS}; ropelm reads safetensors weights only (it never "
            "unpickles pytorch_model.bin), so save the model with save_pretrained first."
        )
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file), device="cpu"))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"Cannot read weights from {file} ({err}).") from None
    return state


def model_configs_from_hf(
    hf: dict[str, Any], architecture: str, *, where: Path
) -> list[ModelConfig]:
    """The ropelm configurations of a transformers ``config.json``, checked to be computable:
    the ``"ropelm"`` entry of a ropelm export when it describes the same network, then the
    one read from the transformers settings alone (always last)."""
    try:
        derived = ModelConfig(**_derived_fields(hf, architecture, where))
    except ConfigError as err:
        reason = str(err).rstrip(".")
        raise ConfigError(f"{where / HF_CONFIG} gives no valid ropelm model ({reason}).") from None
    entry = hf.get("ropelm")
    saved = entry.get("model") if isinstance(entry, dict) else None
    try:
        own = ModelConfig(**saved) if isinstance(saved, dict) else None
    except (RopelmError, TypeError):
        own = None
    same = own is not None and ARCHITECTURE_OF.get(own.att_type) == architecture
    return [own, derived] if same and _network(own) == _network(derived) else [derived]


def _network(config: ModelConfig) -> tuple[Any, ...]:
    """What fixes the function a model computes from its weights (for comparing two configs)."""
    shape = (config.vocab_size, config.n_layer, config.n_head, config.n_embd)
    if config.att_type == "Learned-APE":
        return (*shape, config.block_size)
    try:
        return (*shape, rope_parameters(config, RoPEOptions(**config.att_options)))
    except (TypeError, ValueError):
        return ()


def _derived_fields(hf: dict[str, Any], architecture: str, where: Path) -> dict[str, Any]:
    def need(key: str, default: Any, wanted: Any, what: str) -> None:
        value = hf.get(key, default)
        same = math.isclose(value, wanted) if isinstance(wanted, float) else value == wanted
        if not same:
            raise ConfigError(
                f"{where / HF_CONFIG} sets {key}: {json.dumps(value)}, and ropelm's model "
                f"computes {what} ({key}: {json.dumps(wanted)}); ropelm imports {SUPPORTED}."
            )

    if architecture == NEOX:
        n_embd = hf.get("hidden_size", 6144)
        need("use_parallel_residual", True, False, "a sequential residual")
        need("hidden_act", "gelu", "gelu", "the exact GELU")
        need("intermediate_size", 24576, 4 * n_embd, "an MLP of 4 x hidden_size")
        need("layer_norm_eps", 1e-5, LAYER_NORM_EPS, "LayerNorm with eps 1e-5")
        params = _neox_rope(hf)
        need("partial_rotary_factor", params.get("partial_rotary_factor"), 1.0, "full rotary")
        max_positions = int(hf.get("max_position_embeddings", 2048))
        theta, att_options = rope_options(params, max_positions)
        block_size = int(att_options.get("original_max_position_embeddings", max_positions))
        return {
            "vocab_size": hf.get("vocab_size", 50432), "n_layer": hf.get("num_hidden_layers", 44),
            "n_head": hf.get("num_attention_heads", 64), "n_embd": n_embd,
            "block_size": block_size, "dropout": float(hf.get("hidden_dropout", 0.0)),
            "bias": bool(hf.get("attention_bias", True)), "att_type": "RoPE-SM",
            "rope_theta": theta, "att_options": att_options,
        }  # fmt: skip
    n_embd = hf.get("n_embd", 768)
    need("activation_function", "gelu_new", "gelu", "the exact GELU")
    need("n_inner", None, None if hf.get("n_inner") is None else 4 * n_embd, "a 4C MLP")
    need("layer_norm_epsilon", 1e-5, LAYER_NORM_EPS, "LayerNorm with eps 1e-5")
    need("scale_attn_weights", True, True, "attention scaled by 1 / sqrt(head size)")
    need("scale_attn_by_inverse_layer_idx", False, False, "the same scale in every layer")
    return {
        "vocab_size": hf.get("vocab_size", 50257), "n_layer": hf.get("n_layer", 12),
        "n_head": hf.get("n_head", 12), "n_embd": n_embd, "block_size": hf.get("n_positions", 1024),
        "dropout": float(hf.get("resid_pdrop", 0.0)), "bias": True, "att_type": "Learned-APE",
    }  # fmt: skip


def _neox_rope(hf: dict[str, Any]) -> dict[str, Any]:
    """GPT-NeoX's RoPE settings in transformers 5's ``rope_parameters`` form, from either
    that key or transformers 4's ``rope_scaling``, ``rotary_emb_base`` and ``rotary_pct``."""
    params = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    params.setdefault("rope_theta", hf.get("rope_theta", hf.get("rotary_emb_base", 10000.0)))
    params.setdefault("partial_rotary_factor", hf.get("rotary_pct", 0.25))  # GPT-NeoX's default
    params.setdefault("rope_type", params.get("type", "default"))
    return params
