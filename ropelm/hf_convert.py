"""ropelm models in Hugging Face transformers' layouts, both ways: weight names, tensors, RoPE.

Two transformers architectures compute exactly what a ropelm model computes:

* ``RoPE-SM`` and ``RoPE-SM-complex`` -> ``GPTNeoXForCausalLM`` with a sequential residual
  (``use_parallel_residual: false``), the rotation on the whole head (``rotary_pct: 1``)
  and the exact GELU (``hidden_act: "gelu"``);
* ``Learned-APE`` -> ``GPT2LMHeadModel`` with the exact GELU (``activation_function:
  "gelu"``; GPT-2's own ``gelu_new`` is the tanh approximation) and an untied head.

Both have pre-LayerNorm blocks (eps 1e-5, torch's default that ropelm uses), a C -> 4C -> C
MLP, a final LayerNorm and an LM head without a bias. A ropelm model without biases
(``model.bias: false``) is written with zero biases where the transformers module always
has one. Weight names are those transformers 4.x writes (``embed_out`` for GPT-NeoX's head,
which transformers 5 renames to ``lm_head`` when loading); reading accepts both.

This module is pure tensor and dictionary work: it imports neither transformers nor files.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.rope_scaling import ntk_base, yarn_attention_factor

NEOX = "GPTNeoXForCausalLM"
GPT2 = "GPT2LMHeadModel"
#: the variants that can be exported, and the transformers architecture of each
ARCHITECTURE_OF = {"RoPE-SM": NEOX, "RoPE-SM-complex": NEOX, "Learned-APE": GPT2}
LAYER_NORM_EPS = 1e-5

# (ropelm module, transformers module) inside block i: "{}" is the block's prefix
_BLOCK_MODULES = {
    NEOX: (
        ("ln_1", "input_layernorm"),
        ("attn.c_attn", "attention.query_key_value"),
        ("attn.c_proj", "attention.dense"),
        ("ln_2", "post_attention_layernorm"),
        ("mlp.c_fc", "mlp.dense_h_to_4h"),
        ("mlp.c_proj", "mlp.dense_4h_to_h"),
    ),
    GPT2: tuple(
        (name, name)
        for name in ("ln_1", "attn.c_attn", "attn.c_proj", "ln_2", "mlp.c_fc", "mlp.c_proj")
    ),
}
_BLOCK_PREFIX = {NEOX: "gpt_neox.layers.{}.", GPT2: "transformer.h.{}."}
_OUTER_MODULES = {
    NEOX: (("tok_emb", "gpt_neox.embed_in"), ("ln_f", "gpt_neox.final_layer_norm"),
           ("lm_head", "embed_out")),
    GPT2: (("tok_emb", "transformer.wte"), ("pos_emb", "transformer.wpe"),
           ("ln_f", "transformer.ln_f"), ("lm_head", "lm_head")),
}  # fmt: skip
#: the names transformers 5 may have written for a head whose 4.x name is the key
HEAD_ALIASES = {"embed_out.weight": ("lm_head.weight",)}
_NO_BIAS = ("tok_emb", "pos_emb", "lm_head")  # no bias in transformers' modules
_GPT2_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # (in, out) weights


def module_pairs(architecture: str, n_layer: int) -> list[tuple[str, str]]:
    """(ropelm module name, transformers module name) of every module with parameters."""
    pairs = []
    for i in range(n_layer):
        prefix = _BLOCK_PREFIX[architecture].format(i)
        pairs += [(f"blocks.{i}.{ours}", prefix + theirs)
                  for ours, theirs in _BLOCK_MODULES[architecture]]  # fmt: skip
    return pairs + list(_OUTER_MODULES[architecture])


def hf_has_bias(architecture: str, ours: str, attention_bias: bool) -> bool:
    """Whether transformers' module for ropelm's module ``ours`` has a bias."""
    if ours in _NO_BIAS:
        return False
    if architecture == NEOX and ".attn." in ours:
        return attention_bias  # GPT-NeoX's attention_bias; its LayerNorms and MLP always have one
    return True


def ropelm_has_bias(ours: str, bias: bool) -> bool:
    """Whether ropelm's module ``ours`` has a bias in a model with ``model.bias = bias``."""
    return bias and ours not in ("tok_emb", "pos_emb")


def neox_pair_order(head_size: int) -> torch.Tensor:
    """The feature order (hs,) that turns ropelm's rotation pairs into GPT-NeoX's.

    ropelm rotates consecutive pairs (x_0, x_1), (x_2, x_3), ... by theta_0, theta_1, ...
    (:mod:`ropelm.rope`); GPT-NeoX rotates the halves (x_i, x_{i + hs/2}) by theta_i
    (``rotate_half``). With the even features first and the odd ones second -- new feature
    j is old feature order[j], order = [0, 2, ..., hs - 2, 1, 3, ..., hs - 1] -- ropelm's
    pair i = (2i, 2i + 1) lands on GPT-NeoX's pair (i, i + hs/2) with the same angle.
    The query and key rows of every head (and their biases) are permuted by this order;
    a score q . k sums over the features, so it is unchanged, and values keep their order.
    """
    return torch.cat([torch.arange(0, head_size, 2), torch.arange(1, head_size, 2)])


def _qkv_to_neox(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """ropelm's fused rows [q heads | k heads | v heads] (3C, ...) -> GPT-NeoX's per-head
    [q_h k_h v_h] for h = 0 .. nh - 1, with q and k rows in GPT-NeoX's pair order."""
    q, k, v = tensor.unflatten(0, (3, n_head, -1)).unbind(0)  # each (nh, hs, ...)
    order = neox_pair_order(q.size(1))
    return torch.stack([q[:, order], k[:, order], v], dim=1).flatten(0, 2)  # (3C, ...)


def _qkv_from_neox(tensor: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`_qkv_to_neox`."""
    q, k, v = tensor.unflatten(0, (n_head, 3, -1)).unbind(1)  # each (nh, hs, ...)
    inverse = torch.argsort(neox_pair_order(q.size(1)))
    return torch.stack([q[:, inverse], k[:, inverse], v], dim=0).flatten(0, 2)  # (3C, ...)


def to_hf_state(
    state: dict[str, torch.Tensor], config: ModelConfig, architecture: str
) -> dict[str, torch.Tensor]:
    """ropelm's state dict -> transformers' (contiguous tensors, zeros for absent biases).

    The LM head's bias, if the model has one, is left out: transformers' head has none
    (callers check that it is zero first).
    """
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in module_pairs(architecture, config.n_layer):
        weight = state[f"{ours}.weight"]
        out[f"{theirs}.weight"] = _weight_to_hf(weight, ours, architecture, config.n_head)
        if hf_has_bias(architecture, ours, config.bias):
            bias = state.get(f"{ours}.bias")
            if bias is None:  # a model without biases: transformers' module has one, at zero
                bias = weight.new_zeros(weight.size(0))  # (out,) of a Linear, (C,) of a LayerNorm
            out[f"{theirs}.bias"] = _bias_to_hf(bias, ours, architecture, config.n_head)
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _weight_to_hf(weight: torch.Tensor, ours: str, architecture: str, n_head: int) -> torch.Tensor:
    if architecture == NEOX and ours.endswith("attn.c_attn"):
        return _qkv_to_neox(weight, n_head)  # (3C, C)
    if architecture == GPT2 and ours.endswith(_GPT2_CONV1D):
        return weight.t()  # GPT-2's Conv1D stores (in, out), nn.Linear (out, in)
    return weight


def _bias_to_hf(bias: torch.Tensor, ours: str, architecture: str, n_head: int) -> torch.Tensor:
    if architecture == NEOX and ours.endswith("attn.c_attn"):
        return _qkv_to_neox(bias, n_head)  # (3C,)
    return bias


def from_hf_state(
    hf_state: dict[str, torch.Tensor], config: ModelConfig, architecture: str, *, tied: bool
) -> dict[str, torch.Tensor]:
    """transformers' state dict -> ropelm's, for a model with ``config`` (the inverse of
    :func:`to_hf_state`; the head is the input embedding when ``tied`` and none is stored).

    Raises:
        ConfigError: a weight is missing, or a bias that ropelm's model cannot hold
            (``model.bias: false``) is not zero.
    """
    out: dict[str, torch.Tensor] = {}
    for ours, theirs in module_pairs(architecture, config.n_layer):
        weight = _find(hf_state, f"{theirs}.weight", architecture, tied)
        weight = out[f"{ours}.weight"] = _weight_from_hf(weight, ours, architecture, config.n_head)
        bias = hf_state.get(f"{theirs}.bias")
        if ropelm_has_bias(ours, config.bias):
            if bias is None:  # (out,) of a Linear, (C,) of a LayerNorm
                bias = weight.new_zeros(weight.size(0))
            elif architecture == NEOX and ours.endswith("attn.c_attn"):
                bias = _qkv_from_neox(bias, config.n_head)
            out[f"{ours}.bias"] = bias
        elif bias is not None and bool(bias.any()):
            raise ConfigError(
                f"{theirs}.bias is not zero, and a ropelm model without attention biases has "
                "no bias there; only models with the structure ropelm exports can be imported."
            )
    return {name: tensor.contiguous() for name, tensor in out.items()}


def _find(hf_state: dict[str, torch.Tensor], name: str, architecture: str, tied: bool):
    for candidate in (name, *HEAD_ALIASES.get(name, ())):
        if candidate in hf_state:
            return hf_state[candidate]
    if tied and name in ("embed_out.weight", "lm_head.weight"):
        return hf_state[_OUTER_MODULES[architecture][0][1] + ".weight"]  # the input embedding
    raise ConfigError(
        f"The weights have no '{name}'; the directory does not hold a complete {architecture}."
    )


def _weight_from_hf(
    weight: torch.Tensor, ours: str, architecture: str, n_head: int
) -> torch.Tensor:
    if architecture == NEOX and ours.endswith("attn.c_attn"):
        return _qkv_from_neox(weight, n_head)
    if architecture == GPT2 and ours.endswith(_GPT2_CONV1D):
        return weight.t()
    return weight


# -- RoPE: ropelm's att_options <-> transformers' rope_parameters ---------------------------


def rope_parameters(config: ModelConfig, options: Any) -> tuple[dict[str, Any], int]:
    """transformers' ``rope_parameters`` for a RoPE model, and its ``max_position_embeddings``.

    Every ropelm scaling has a transformers counterpart: ``ntk`` and ``abf`` change only the
    base (``default`` with that ``rope_theta``); ``linear``, ``dynamic``, ``yarn`` and
    ``llama3`` are transformers' rope types of the same names and formulas.

    ``dynamic`` and ``yarn`` get the original (training) length L as
    ``max_position_embeddings`` and YaRN no ``original_max_position_embeddings``: transformers
    4.44-4.50 read L from ``max_position_embeddings`` alone, 4.53 recomputes the factor as
    ``max_position_embeddings / original_max_position_embeddings`` when the latter is given,
    and 4.57 and 5 take L from ``max_position_embeddings`` when it is not; so every version
    computes the same frequencies (checked with 4.46 and 5.24).
    """
    kind, factor = options.scaling, float(options.scale_factor)
    original = options.original_max_position_embeddings or config.block_size
    theta = float(config.rope_theta)
    if kind == "ntk":
        theta = ntk_base(theta, config.head_size, factor)
    elif kind == "abf":
        theta = float(options.new_base)
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": theta}
    max_positions = config.block_size
    if kind in ("linear", "dynamic", "yarn", "llama3"):
        params.update(rope_type=kind, factor=factor)
    if kind in ("dynamic", "yarn"):
        max_positions = original
    if kind == "yarn":
        params.update(beta_fast=float(options.beta_fast), beta_slow=float(options.beta_slow))
    elif kind == "llama3":
        params.update(original_max_position_embeddings=original,
                      low_freq_factor=float(options.low_freq_factor),
                      high_freq_factor=float(options.high_freq_factor))  # fmt: skip
    return params | {"partial_rotary_factor": 1.0}, max_positions


def rope_options(params: dict[str, Any], max_positions: int) -> tuple[float, dict[str, Any]]:
    """``rope_theta`` and ``att_options`` of a transformers ``rope_parameters`` (the inverse
    of :func:`rope_parameters`, with ``ntk`` and ``abf`` read back as a plain base).

    Raises:
        ConfigError: a rope type or option that ropelm does not compute.
    """
    kind = params.get("rope_type", params.get("type", "default"))
    theta = float(params["rope_theta"])
    if kind == "default":
        return theta, {}
    if kind not in ("linear", "dynamic", "yarn", "llama3"):
        raise ConfigError(
            f"RoPE type '{kind}' has no ropelm counterpart; ropelm imports the rope types "
            "default, linear, dynamic, yarn and llama3."
        )
    options: dict[str, Any] = {"scaling": kind, "scale_factor": float(params["factor"])}
    original = int(params.get("original_max_position_embeddings") or max_positions)
    if kind == "dynamic":
        options["original_max_position_embeddings"] = max_positions
    elif kind == "yarn":
        _check_plain_yarn(params)
        options.update(original_max_position_embeddings=original,
                       beta_fast=float(params.get("beta_fast") or 32.0),
                       beta_slow=float(params.get("beta_slow") or 1.0))  # fmt: skip
    elif kind == "llama3":
        options.update(original_max_position_embeddings=original,
                       low_freq_factor=float(params["low_freq_factor"]),
                       high_freq_factor=float(params["high_freq_factor"]))  # fmt: skip
    return theta, options


def _check_plain_yarn(params: dict[str, Any]) -> None:
    """YaRN as ropelm computes it: the paper's attention factor and a truncated ramp."""
    factor = float(params["factor"])
    attention = params.get("attention_factor")
    custom = attention is not None and not math.isclose(attention, yarn_attention_factor(factor))
    if (
        custom
        or params.get("mscale")
        or params.get("mscale_all_dim")
        or not params.get("truncate", True)
    ):
        raise ConfigError(
            "This YaRN configuration sets attention_factor, mscale or truncate: false, which "
            "ropelm does not compute; only YaRN with its default attention factor imports."
        )
