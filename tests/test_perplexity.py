"""The evaluation maths: length specs, window plans, the two methods, the validation loss."""

from __future__ import annotations

import math
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ropelm.errors import ConfigError
from ropelm.model import ModelConfig, TransformerLM
from ropelm.perplexity import (
    LengthSpecError,
    evaluate_loss,
    length_perplexity,
    parse_length,
    parse_stride,
    split_specs,
    window_plan,
)
from ropelm.tokenfile import TokenFile

# -- length and stride specs -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "tokens"),
    [("1x", 32), ("2x", 64), (" 4X ", 128), ("0.5x", 16), ("1.5x", 48), ("2048", 2048), (7, 7)],
)
def test_parse_length(spec, tokens):
    assert parse_length(spec, block_size=32) == tokens


@pytest.mark.parametrize("spec", ["3y", "x", "2xx", "-1", "1e3", "", "0x", "0"])
def test_bad_length_is_one_sentence(spec, assert_one_sentence):
    with pytest.raises(LengthSpecError) as info:
        parse_length(spec, block_size=32)
    assert isinstance(info.value, ConfigError)
    assert_one_sentence(str(info.value))


def test_split_specs_flattens_and_dedupes():
    assert split_specs(["1x,2x", "2x", " 4x , "]) == ["1x", "2x", "4x"]
    assert split_specs("8x") == ["8x"]


@pytest.mark.parametrize(
    ("spec", "length", "stride"),
    [("0.5", 64, 32), ("1", 64, 1), ("1.0", 64, 64), ("16", 64, 16), ("999", 64, 64)],
)
def test_parse_stride(spec, length, stride):
    assert parse_stride(spec, length) == stride


@pytest.mark.parametrize("spec", ["0", "0.0", "1.5", "-2", "half"])
def test_bad_stride(spec, assert_one_sentence):
    with pytest.raises(LengthSpecError) as info:
        parse_stride(spec, 64)
    assert_one_sentence(str(info.value))


# -- window plans -----------------------------------------------------------------------------


@pytest.mark.parametrize(("length", "stride"), [(8, 8), (8, 4), (8, 3), (8, 1), (5, 2)])
def test_window_plan_scores_each_target_once_with_enough_context(length, stride):
    plan = window_plan(num_tokens=60, length=length, stride=stride, max_windows=None)
    n = 59 // length
    assert plan.span == n * length
    scored = []
    for start, first in zip(plan.starts, plan.first_scored, strict=True):
        assert start >= 0 and start + length + 1 <= 60  # every window is whole
        for i in range(first, length):
            scored.append(start + 1 + i)  # token index of target i
            if start > 0:  # past the first window: at least length - stride tokens before it
                assert i + 1 >= length - stride + 1
    assert sorted(scored) == list(range(1, n * length + 1))


def test_window_plan_with_stride_equal_length_is_non_overlapping():
    plan = window_plan(num_tokens=100, length=10, stride=10, max_windows=4)
    assert plan.starts.tolist() == [0, 10, 20, 30]
    assert plan.first_scored.tolist() == [0, 0, 0, 0]
    strided = window_plan(num_tokens=100, length=10, stride=5, max_windows=4)
    assert strided.span == plan.span == 40  # the cap counts non-overlapping windows
    assert strided.starts.tolist() == [0, 5, 10, 15, 20, 25, 30]


def test_token_cap_makes_every_length_score_the_same_targets():
    plans = [window_plan(1000, length, length // 2, None, max_tokens=256) for length in (16, 64)]
    assert [p.span for p in plans] == [256, 256]
    assert window_plan(1000, 100, 50, max_windows=9, max_tokens=256).span == 200


def test_window_plan_too_short():
    assert window_plan(num_tokens=5, length=8, stride=4, max_windows=None).num_windows == 0


# -- the methods on a token file --------------------------------------------------------------


@pytest.fixture(scope="module")
def token_file(tmp_path_factory) -> TokenFile:
    path = tmp_path_factory.mktemp("tokens") / "val.bin"
    rng = np.random.default_rng(0)
    # a repetitive stream (period 7 plus noise) so context matters to a trained model
    base = np.tile(rng.integers(0, 50, 7), 200)[:1300]
    noise = rng.random(1300) < 0.1
    base[noise] = rng.integers(0, 50, noise.sum())
    base.astype(np.uint16).tofile(path)
    return TokenFile(path, np.uint16, name="val")


@pytest.fixture(scope="module")
def model() -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(
        block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32, dropout=0.0, att_type="ALiBi"
    )
    model = TransformerLM.from_config(config)
    with torch.no_grad():  # large weights, so outputs depend strongly on context
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model.eval()


def test_one_block_equals_evaluate_loss_on_the_same_windows(model, token_file):
    reference = evaluate_loss(model, token_file, batch_size=4, block_size=16, max_batches=5)
    result = length_perplexity(model, token_file, length=16, batch_size=3, max_windows=20)
    assert result.windows == 20 and result.tokens == 20 * 16
    assert result.loss == pytest.approx(reference, rel=1e-6)
    assert result.ppl == pytest.approx(math.exp(reference), rel=1e-6)


def test_strided_with_stride_equal_length_equals_non_overlapping(model, token_file):
    plain = length_perplexity(model, token_file, length=32, max_windows=10)
    strided = length_perplexity(model, token_file, length=32, stride=32, max_windows=10)
    assert strided == plain


def test_strided_matches_a_window_by_window_reference(model, token_file):
    length, stride = 32, 12
    result = length_perplexity(
        model, token_file, length=length, stride=stride, batch_size=5, max_windows=6
    )
    # reference: HF-style loop, one window at a time, scoring targets after the previous end
    tokens = torch.from_numpy(token_file.tokens.astype(np.int64))
    span, prev_end, begin, nll, count = 6 * length, 0, 0, 0.0, 0
    while prev_end < span:
        begin = min(begin, span - length)
        window = tokens[begin : begin + length + 1]
        logits, _ = model(window[None, :-1])
        losses = F.cross_entropy(logits[0], window[1:], reduction="none")
        first = prev_end - begin  # targets 1..prev_end are done
        nll += losses[first:].double().sum().item()
        count += length - first
        prev_end, begin = begin + length, begin + stride
    assert result.tokens == count == span
    assert result.loss == pytest.approx(nll / count, rel=1e-6)
    plain = length_perplexity(model, token_file, length=length, max_windows=6)
    assert result.tokens == plain.tokens
    assert result.loss != pytest.approx(plain.loss, rel=1e-4)  # more context changes it


def test_batch_size_does_not_change_the_result(model, token_file):
    a = length_perplexity(model, token_file, length=24, stride=8, batch_size=1, max_windows=5)
    b = length_perplexity(model, token_file, length=24, stride=8, batch_size=7, max_windows=5)
    assert a.tokens == b.tokens and a.loss == pytest.approx(b.loss, rel=1e-6)


def test_padding_targets_are_not_scored(token_file):
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32,
                         pad_token_id=3, att_type="NoPE")  # fmt: skip
    model = TransformerLM.from_config(config).eval()
    result = length_perplexity(model, token_file, length=16, max_windows=10, ignore_index=3)
    targets = token_file.tokens[1 : 10 * 16 + 1]
    assert result.tokens == int((targets != 3).sum()) < 160


def test_evaluate_loss_weights_batches_by_their_non_padding_targets(tmp_path):
    """The mean is over scored tokens: padding targets count in neither sum nor count."""
    block, pad = 8, 1
    rng = np.random.default_rng(0)
    tokens = rng.integers(2, 50, size=4 * block + 1).astype(np.uint16)
    tokens[block + 1 : 2 * block + 1 - 2] = pad  # window 1 is mostly padding
    (tmp_path / "val.bin").write_bytes(tokens.tobytes())
    split = TokenFile(tmp_path / "val.bin", np.uint16)
    torch.manual_seed(0)
    config = ModelConfig(block_size=block, vocab_size=50, n_layer=1, n_head=2, n_embd=16,
                         dropout=0.0, pad_token_id=pad)  # fmt: skip
    model = TransformerLM.from_config(config).eval()
    got = evaluate_loss(model, split, batch_size=1, block_size=block)
    x, y = next(split.eval_batches(4, block))
    logits, _ = model(x)
    keep = y != pad
    expected = F.cross_entropy(logits[keep], y[keep]).item()
    assert got == pytest.approx(expected, rel=1e-5)


class HostReads:
    """Counts reads of tensor values into Python (each one a device sync on a GPU)."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.count = 0
        for name in self.METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._counting(getattr(torch.Tensor, name)))

    def _counting(self, method):
        def read(tensor, *args, **kwargs):
            self.count += 1
            return method(tensor, *args, **kwargs)

        return read


@pytest.mark.parametrize("variant", ["ALiBi", "RoPE-SM"])
def test_evaluation_reads_from_the_device_once(token_file, monkeypatch, variant):
    """No per-batch synchronisation: sums stay on the device until the end (the dense
    backend plans ALiBi's key spans once for the latest shape, in the warm-up calls)."""
    config = ModelConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=32,
                         dropout=0.0, att_type=variant)  # fmt: skip
    model = TransformerLM.from_config(config).eval()
    evaluate = partial(evaluate_loss, model, token_file, batch_size=4, block_size=16)
    extrapolate = partial(length_perplexity, model, token_file, length=32, batch_size=2)
    reads = HostReads(monkeypatch)
    for run, warm_up, measured in ((evaluate, {"max_batches": 1}, {"max_batches": 5}),
                                   (extrapolate, {"max_windows": 1},
                                    {"max_windows": 6, "stride": 16})):  # fmt: skip
        run(**warm_up)
        reads.count = 0
        run(**measured)
        assert reads.count == 1
