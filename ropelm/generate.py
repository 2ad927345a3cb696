"""Text generation with a KV cache: temperature, top-k and top-p (nucleus) sampling.

With the cache, the prompt is processed once and every new token costs one
position. The context is limited to ``block_size`` tokens exactly as without a
cache: once the sequence is longer, the model sees its last ``block_size``
tokens (the cache is then rebuilt from that window), so cached and uncached
decoding pick the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ropelm.model import TransformerLM

EOT = "<|endoftext|>"


def sample_next(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token ids (B, 1) from logits (B, V).

    ``temperature == 0`` is greedy decoding. ``top_k`` keeps the k most likely
    tokens; ``top_p`` keeps the smallest set whose probability reaches p (the most
    likely token always stays).
    """
    if temperature < 0:
        raise ValueError("temperature must be >= 0 (0 means greedy decoding).")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError("top_p must be in (0, 1].")
    if top_k is not None and top_k < 1:
        raise ValueError("top_k must be at least 1.")
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        remove = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


@torch.no_grad()
def generate_tokens(
    model: TransformerLM,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_id: int | None = None,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` token ids continuing ``prompt_ids``, one at a time."""
    if not prompt_ids:
        raise ValueError("The prompt must hold at least one token.")
    model.eval()
    device = next(model.parameters()).device
    block_size = model.config.block_size
    use_cache = use_cache and model.spec.capabilities.kv_cache
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    tokens = list(prompt_ids)
    state = None
    for _ in range(max_new_tokens):
        if not use_cache:
            idx = torch.tensor([tokens[-block_size:]], device=device)
            logits, _ = model(idx)
        else:
            if state is None or state.position >= block_size:
                state = model.init_decode_state(1, block_size, device)
                idx = torch.tensor([tokens[-block_size:]], device=device)  # (1, T) prefill
            else:
                idx = torch.tensor([tokens[-1:]], device=device)  # (1, 1)
            logits, _ = model(idx, state=state)
        next_id = sample_next(
            logits[:, -1, :], temperature=temperature, top_k=top_k, top_p=top_p,
            generator=generator,
        ).item()  # fmt: skip
        tokens.append(next_id)
        yield next_id
        if stop_id is not None and next_id == stop_id:
            return


def generate_text(
    model: TransformerLM,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    **sampling: Any,
) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated (a ``tokenizers.Tokenizer``).

    An empty prompt starts a new document (the end-of-text token). Pieces are
    emitted only once they decode to whole characters, so multi-byte characters
    split across tokens are never printed half.
    """
    prompt_ids = tokenizer.encode(prompt).ids if prompt else [tokenizer.token_to_id(EOT)]
    new_ids: list[int] = []
    printed = ""
    for token in generate_tokens(model, prompt_ids, max_new_tokens, **sampling):
        new_ids.append(token)
        text = tokenizer.decode(new_ids, skip_special_tokens=False)
        if not text.endswith("\ufffd") and len(text) > len(printed):
            yield text[len(printed) :]
            printed = text
    text = tokenizer.decode(new_ids, skip_special_tokens=False)
    if len(text) > len(printed):
        yield text[len(printed) :]
