"""Batches from a token file: training windows, evaluation windows, too-small splits."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from ropelm.errors import DataError
from ropelm.tokenfile import TokenFile


def token_file(tmp_path, n: int, dtype: str = "uint16", name: str = "val") -> TokenFile:
    path = tmp_path / f"{name}.bin"
    (np.arange(n) % 60000).astype(dtype).tofile(path)
    return TokenFile(path, dtype, name=name)


def test_length_and_memory_map(tmp_path):
    tf = token_file(tmp_path, 1000)
    assert len(tf) == 1000 and tf.dtype == np.dtype("uint16")
    assert isinstance(tf.tokens, np.memmap) and not tf.tokens.flags.writeable


def test_sample_starts_are_uniform_over_valid_starts_and_deterministic(tmp_path):
    tf = token_file(tmp_path, 20)
    starts = tf.sample_starts(3000, 4, torch.Generator().manual_seed(0))
    assert starts.dtype == torch.int64 and starts.shape == (3000,)
    assert set(starts.tolist()) == set(range(16))  # 0 .. len - block_size - 1, all reachable
    counts = torch.bincount(starts, minlength=16).float()
    assert counts.min() > 0.6 * counts.mean()
    again = tf.sample_starts(3000, 4, torch.Generator().manual_seed(0))
    assert torch.equal(starts, again)
    assert not torch.equal(starts, tf.sample_starts(3000, 4, torch.Generator().manual_seed(1)))


def test_global_batch_slices_equal_the_whole(tmp_path):
    """Ranks that read their slice of one global batch see what one process would."""
    tf = token_file(tmp_path, 5000)
    starts = tf.sample_starts(8, 32, torch.Generator().manual_seed(3))
    x, y = tf.windows(starts, 32)
    x0, y0 = tf.windows(starts[:4], 32)
    x1, y1 = tf.windows(starts[4:], 32)
    assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_windows_are_shifted_by_one(tmp_path):
    tf = token_file(tmp_path, 500, dtype="uint32")
    starts = torch.tensor([0, 7, 500 - 17])
    x, y = tf.windows(starts, 16)
    assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (3, 16)
    for row, s in enumerate(starts.tolist()):
        assert x[row].tolist() == list(range(s, s + 16))
        assert y[row].tolist() == list(range(s + 1, s + 17))
    with pytest.raises(IndexError):
        tf.windows(torch.tensor([500 - 16]), 16)
    with pytest.raises(IndexError):
        tf.windows(torch.tensor([-1]), 16)


def test_eval_batches_cover_the_split_once(tmp_path):
    tf = token_file(tmp_path, 1000)
    assert tf.num_eval_windows(64) == 999 // 64 == 15
    batches = list(tf.eval_batches(4, 64))
    assert [x.shape[0] for x, _ in batches] == [4, 4, 4, 3]
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert x.tolist() == list(range(15 * 64))  # non-overlapping, in order
    assert y.tolist() == list(range(1, 15 * 64 + 1))
    assert len(list(tf.eval_batches(4, 64, max_batches=2))) == 2
    assert len(list(tf.eval_batches(100, 64, max_batches=2))) == 1


def test_a_split_too_small_for_one_window(tmp_path):
    tf = token_file(tmp_path, 10, name="val")
    tf.windows(torch.tensor([0]), 9)  # exactly block_size + 1 tokens is enough
    message = r"The val split has 10 tokens.*block_size \+ 1 = 11.*smaller model\.block_size"
    with pytest.raises(DataError, match=message):
        tf.sample_starts(1, 10, torch.Generator())
    with pytest.raises(DataError, match=message):
        tf.eval_batches(2, 10)  # raised at once, not on first iteration
    with pytest.raises(DataError, match="has 0 tokens"):
        token_file(tmp_path, 0, name="train").num_eval_windows(1)


def test_pickles_by_path(tmp_path):
    tf = token_file(tmp_path, 300)
    clone = pickle.loads(pickle.dumps(tf))
    assert len(pickle.dumps(tf)) < 500  # the tokens are not copied into the pickle
    assert len(clone) == 300 and torch.equal(
        clone.windows(torch.tensor([5]), 8)[0], tf.windows(torch.tensor([5]), 8)[0]
    )


def test_a_truncated_file_is_reported(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(DataError, match="not a whole number of uint16 tokens"):
        TokenFile(path, "uint16")
