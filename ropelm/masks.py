"""Attention masks and score modifications as small functions with FlexAttention's signatures.

A variant that changes which keys a query sees, or how a score becomes a
weight, is described by up to two functions of *scalar* index tensors (as in
``torch.nn.attention.flex_attention`` and attention-gym)::

    score_mod(score, b, h, q_idx, kv_idx) -> score'   # add a bias, cap, ...
    mask_mod(b, h, q_idx, kv_idx) -> bool            # may query q_idx see key kv_idx?

``b`` is the batch index, ``h`` the query head, ``q_idx`` and ``kv_idx`` the
absolute positions of the query and the key. The same functions run in the
compiled FlexAttention kernel, in the dense reference (evaluated over the whole
index grid with ``torch.vmap``) and in the tests, so there is one definition of
each variant's maths. Rules for writing them:

* no Python control flow on the index tensors (use ``torch.where``), so they
  trace under FlexAttention and batch under ``vmap``;
* a variant's functions must not depend on ``b``: the document mask
  (:func:`document_mask`) is the only batch-dependent mask, and the core adds it;
* a score_mod adds to the score (``score + f(b, h, q_idx, kv_idx)``): that is
  what lets the dense backend pass it to SDPA as a bias. Non-additive changes
  (the logit soft-cap) are the core's, not a variant's;
* a variant's mask_mod says only what it adds to causality: the core always
  combines it with :func:`causal`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

ScoreMod = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor], Tensor]
MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def causal(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
    """A query sees itself and every earlier key."""
    return q_idx >= kv_idx


def sliding_window(window: int) -> MaskMod:
    """The last ``window`` positions, the query's own included (combined with causality).

    Query i sees key j iff i - j < window (Longformer, https://arxiv.org/abs/2004.05150;
    Mistral 7B, https://arxiv.org/abs/2310.06825).
    """

    def in_window(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return q_idx - kv_idx < window

    return in_window


def document_ids(tokens: Tensor, eot_id: int) -> Tensor:
    """Which document each position belongs to, (B, T) int32, from token ids (B, T).

    Token files hold ``doc1 EOT doc2 EOT ...``: the end-of-text token closes its
    document, so a new document starts right after it. Ids count from 0 within
    each row (a training window that starts mid-document starts in document 0).
    """
    ends = (tokens == eot_id).to(torch.int32)
    return (torch.cumsum(ends, dim=1) - ends).to(torch.int32)  # EOTs strictly before t


def document_mask(ids: Tensor) -> MaskMod:
    """Block-causal attention within documents: a query sees only keys of its own document.

    ``ids`` (B, T) from :func:`document_ids`; combined with causality by the core.
    """

    def same_document(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        return ids[b, q_idx] == ids[b, kv_idx]

    return same_document


def and_masks(*mods: MaskMod) -> MaskMod:
    """The conjunction of several mask_mods (a key is seen only if every mod allows it)."""

    def combined(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        allowed = mods[0](b, h, q_idx, kv_idx)
        for mod in mods[1:]:
            allowed = allowed & mod(b, h, q_idx, kv_idx)
        return allowed

    return combined


def softcapped(score_mod: ScoreMod | None, cap: float) -> ScoreMod:
    """``cap * tanh(s / cap)`` of the (modified) score: logit soft-capping (Gemma 2,
    https://arxiv.org/abs/2408.00118), which keeps every score in (-cap, cap)."""

    def capped(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        if score_mod is not None:
            score = score_mod(score, b, h, q_idx, kv_idx)
        return cap * torch.tanh(score / cap)

    return capped
