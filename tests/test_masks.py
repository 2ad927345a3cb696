"""Mask and score functions: causality, windows, documents, the soft-cap."""

from __future__ import annotations

import torch

from ropelm.masks import and_masks, causal, document_ids, document_mask, sliding_window, softcapped


def grid(mask_mod, T: int, b: int = 0) -> torch.Tensor:
    """The (T, T) truth table of a mask_mod for batch row b, head 0."""
    q, kv = torch.arange(T)[:, None], torch.arange(T)[None, :]
    return mask_mod(torch.tensor(b), torch.tensor(0), q, kv)


def test_causal_and_sliding_window_truth_tables():
    assert torch.equal(grid(causal, 4), torch.ones(4, 4, dtype=torch.bool).tril())
    band = grid(and_masks(causal, sliding_window(2)), 5)
    want = torch.tensor([[i - 2 < j <= i for j in range(5)] for i in range(5)])
    assert torch.equal(band, want)


def test_document_ids_close_each_document_with_its_end_of_text():
    eot = 0
    tokens = torch.tensor([[5, 6, 0, 7, 0, 0, 8], [9, 9, 9, 9, 9, 9, 0]])
    # the end-of-text token belongs to the document it ends; a row may start mid-document
    assert document_ids(tokens, eot).tolist() == [[0, 0, 0, 1, 1, 2, 3], [0, 0, 0, 0, 0, 0, 0]]
    assert document_ids(tokens, eot).dtype == torch.int32


def test_document_mask_is_block_causal_per_row():
    ids = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 0, 0, 0]])
    mask = and_masks(causal, document_mask(ids))
    first = grid(mask, 5, b=0)
    assert first.tolist() == [
        [True, False, False, False, False],
        [True, True, False, False, False],
        [False, False, True, False, False],
        [False, False, True, True, False],
        [False, False, True, True, True],
    ]
    assert torch.equal(grid(mask, 5, b=1), torch.ones(5, 5, dtype=torch.bool).tril())


def test_softcap_bounds_scores_and_keeps_small_ones():
    capped = softcapped(None, 5.0)
    index = torch.tensor(0)
    scores = torch.tensor([-100.0, -0.5, 0.0, 0.01, 100.0])
    out = capped(scores, index, index, index, index)
    assert out.abs().max() <= 5.0 and out[0] < 0 < out[-1]  # (tanh(20) rounds to 1)
    assert torch.allclose(out[1:4], scores[1:4], atol=0.01)

    def plus_one(score, b, h, q_idx, kv_idx):
        return score + 1.0

    assert capped(torch.tensor(0.0), *[index] * 4) == 0  # cap after the variant's score_mod
    assert softcapped(plus_one, 5.0)(torch.tensor(0.0), *[index] * 4) == 5.0 * torch.tanh(
        torch.tensor(0.2)
    )
