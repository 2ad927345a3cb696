import pytest
import torch

from ropelm import ModelConfig, TransformerLM
from ropelm.generate import generate_tokens, sample_next


@pytest.fixture(scope="module")
def tiny_model() -> TransformerLM:
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32, dropout=0.0)
    return TransformerLM.from_config(config).eval()


def test_temperature_zero_is_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 1.0]])
    assert sample_next(logits, temperature=0).tolist() == [[1], [0]]


def test_top_k_samples_only_the_k_most_likely():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, top_k=2, generator=gen).flatten()
    assert set(picks.tolist()) == {0, 1}


def test_top_p_keeps_the_smallest_set_reaching_p():
    # Cumulative mass: 0.5, 0.8, 0.95, 1.0 -> top_p=0.8 keeps tokens 0 and 1 only.
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    picks = sample_next(logits, top_p=0.8, generator=gen).flatten()
    assert set(picks.tolist()) == {0, 1}
    share_of_first = (picks == 0).float().mean().item()
    assert abs(share_of_first - 0.5 / 0.8) < 0.03  # renormalised over the kept set


def test_top_p_always_keeps_the_most_likely_token():
    logits = torch.log(torch.tensor([[0.9, 0.05, 0.05]]))
    picks = sample_next(logits.repeat(100, 1), top_p=0.1, generator=torch.Generator())
    assert picks.unique().tolist() == [0]


@pytest.mark.parametrize("new_tokens", [5, 40])  # 40 runs past block_size (16)
def test_greedy_decoding_with_cache_equals_without(tiny_model, new_tokens):
    prompt = [3, 7, 11, 2]
    cached = list(generate_tokens(tiny_model, prompt, new_tokens, temperature=0))
    uncached = list(generate_tokens(tiny_model, prompt, new_tokens, temperature=0, use_cache=False))
    assert cached == uncached
    assert len(cached) == new_tokens


def test_seeded_sampling_is_reproducible(tiny_model):
    runs = [
        list(generate_tokens(tiny_model, [1, 2], 20, temperature=1.0, top_k=10, seed=7))
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    other = list(generate_tokens(tiny_model, [1, 2], 20, temperature=1.0, top_k=10, seed=8))
    assert other != runs[0]


def test_generation_stops_at_stop_token(tiny_model):
    first = next(generate_tokens(tiny_model, [1, 2], 1, temperature=0))
    out = list(generate_tokens(tiny_model, [1, 2], 10, temperature=0, stop_id=first))
    assert out == [first]
