"""Text generation with a KV cache: temperature, top-k and top-p (nucleus) sampling.

With the cache, the prompt is processed once and every new token costs one
position. The context is limited to ``block_size`` tokens exactly as without a
cache: once the sequence is longer, the model sees its last ``block_size``
tokens (the cache is then rebuilt from that window), so cached and uncached
decoding pick the same tokens.

As in ``transformers``, a sample ends at the end-of-text token by default
(``stop_at_eos=False`` continues past it). :func:`generate_tokens` and
:func:`generate_text` stream one sequence; :func:`generate_batch` and
:func:`generate_texts` decode many prompts, and several samples of each, as
batches. Prompts are batched by equal token length rather than left-padded:
the decode state holds one position for the whole batch (``DecodeState.position``,
``KVCache.length``), which every position variant (a rotation, a score bias, a
position table, a window) reads as a Python int, so rows of equal length share
their positions exactly and a batch decodes the same tokens as one prompt at a
time, for every variant, without a padding mask.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ropelm.errors import ConfigError, DataError
from ropelm.model import TransformerLM

EOT = "<|endoftext|>"


def check_sampling(
    temperature: float, top_k: int | None = None, top_p: float | None = None
) -> None:
    """Refuse sampling settings that cannot pick a token (one sentence, a ConfigError).

    Raises:
        ConfigError: a negative or non-finite temperature, top_k below 1, top_p outside (0, 1].
    """
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(
            f"temperature must be a finite number >= 0 (0 means greedy decoding), got "
            f"{temperature}."
        )
    if top_p is not None and not 0.0 < top_p <= 1.0:  # also refuses nan
        raise ConfigError(f"top_p must be in (0, 1], got {top_p}.")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"top_k must be at least 1, got {top_k}.")


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
    check_sampling(temperature, top_k, top_p)
    return _sample(logits, temperature, top_k, top_p, generator)


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """:func:`sample_next` on settings already checked (the decoding loop checks them once)."""
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


def _generator(model: TransformerLM, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=next(model.parameters()).device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


@torch.no_grad()
def _decode(
    model: TransformerLM,
    rows: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    sampling: dict[str, Any],
    generator: torch.Generator,
    use_cache: bool,
) -> Iterator[list[int]]:
    """Yield the next token of every row (equal lengths), ``max_new_tokens`` times."""
    model.eval()
    device = next(model.parameters()).device
    block_size = model.config.block_size
    use_cache = use_cache and model.spec.capabilities.kv_cache
    window = torch.tensor([list(r) for r in rows], device=device)[:, -block_size:]  # (B, T)
    state = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits, _ = model(window)
        else:
            if state is None or state.position >= block_size:
                state = model.init_decode_state(window.size(0), block_size, device)
                idx = window  # (B, T) prefill of the last block_size tokens
            else:
                idx = window[:, -1:]  # (B, 1)
            logits, _ = model(idx, state=state)
        next_ids = _sample(logits[:, -1, :], generator=generator, **sampling)  # (B, 1)
        window = torch.cat([window, next_ids], dim=1)[:, -block_size:]
        yield next_ids.squeeze(1).tolist()


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
    """Yield up to ``max_new_tokens`` token ids continuing ``prompt_ids``, one at a time
    (``stop_id``, when generated, is the last one)."""
    if not prompt_ids:
        raise ValueError("The prompt must hold at least one token.")
    check_sampling(temperature, top_k, top_p)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    for (next_id,) in _decode(
        model, [prompt_ids], max_new_tokens, sampling=sampling,
        generator=_generator(model, seed), use_cache=use_cache,
    ):  # fmt: skip
        yield next_id
        if stop_id is not None and next_id == stop_id:
            return


def generate_batch(
    model: TransformerLM,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    use_cache: bool = True,
    stop_id: int | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> list[list[list[int]]]:
    """New token ids of ``num_samples`` samples of every prompt: ``result[i][j]`` continues
    ``prompts[i]`` (ending with ``stop_id`` when it was generated).

    Rows (prompt x sample) of equal prompt length decode together, up to
    ``batch_size`` rows at a time, until every row has stopped. ``progress`` shows a
    bar of decoding steps (on a terminal).
    """
    if num_samples < 1 or batch_size < 1:
        raise ValueError("num_samples and batch_size must be at least 1.")
    if any(not p for p in prompts):
        raise ValueError("Every prompt must hold at least one token.")
    check_sampling(temperature, top_k, top_p)
    sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
    by_length: dict[int, list[tuple[int, int]]] = {}
    for i, prompt in enumerate(prompts):
        by_length.setdefault(len(prompt), []).extend((i, j) for j in range(num_samples))
    chunks = [rows[s : s + batch_size] for rows in by_length.values()
              for s in range(0, len(rows), batch_size)]  # fmt: skip
    results: list[list[list[int]]] = [[[] for _ in range(num_samples)] for _ in prompts]
    generator = _generator(model, seed)
    with tqdm(total=len(chunks) * max_new_tokens, disable=None if progress else True,
              desc="generate", unit="step", leave=False) as bar:  # fmt: skip
        for chunk in chunks:
            outputs = [results[i][j] for i, j in chunk]
            steps = _decode(
                model, [prompts[i] for i, _ in chunk], max_new_tokens, sampling=sampling,
                generator=generator, use_cache=use_cache,
            )  # fmt: skip
            done = [False] * len(chunk)
            for taken, next_ids in enumerate(steps, start=1):
                for row, token in enumerate(next_ids):
                    if not done[row]:
                        outputs[row].append(token)
                        done[row] = token == stop_id
                bar.update(1)
                if all(done):
                    bar.update(max_new_tokens - taken)
                    break
    return results


def eos_id(tokenizer: Any) -> int | None:
    """The id of the end-of-text token (None for a tokenizer without one)."""
    return tokenizer.token_to_id(EOT)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of ``prompt``; an empty prompt starts a new document (the end-of-text token)."""
    if prompt:
        return tokenizer.encode(prompt).ids
    eot = eos_id(tokenizer)
    if eot is None:
        raise ConfigError(f"The tokenizer has no {EOT} token to start from; give a prompt.")
    return [eot]


def generate_text(
    model: TransformerLM,
    tokenizer: Any,
    prompt: str,
    max_new_tokens: int,
    *,
    stop_at_eos: bool = True,
    **sampling: Any,
) -> Iterator[str]:
    """Yield decoded text pieces as tokens are generated (a ``tokenizers.Tokenizer``).

    An empty prompt starts a new document (the end-of-text token). With
    ``stop_at_eos`` the text ends before the first end-of-text token; without, the
    token is written as ``<|endoftext|>`` and generation goes on. Pieces are
    emitted only once they decode to whole characters, so multi-byte characters
    split across tokens are never printed half. ``sampling``: the keywords of
    :func:`generate_tokens`.
    """
    stop = eos_id(tokenizer) if stop_at_eos else None
    new_ids: list[int] = []
    printed = ""
    for token in generate_tokens(
        model, prompt_ids(tokenizer, prompt), max_new_tokens, stop_id=stop, **sampling
    ):
        if stop is not None and token == stop:
            break
        new_ids.append(token)
        text = tokenizer.decode(new_ids, skip_special_tokens=False)
        if not text.endswith("\ufffd") and len(text) > len(printed):
            yield text[len(printed) :]
            printed = text
    text = tokenizer.decode(new_ids, skip_special_tokens=False)
    if len(text) > len(printed):
        yield text[len(printed) :]


def generate_texts(
    model: TransformerLM,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int,
    *,
    num_samples: int = 1,
    stop_at_eos: bool = True,
    **sampling: Any,
) -> list[list[str]]:
    """The continuations (without the prompt) of ``num_samples`` samples of every prompt, as
    batches: ``result[i][j]`` continues ``prompts[i]``. ``sampling``: the keywords of
    :func:`generate_batch` (temperature, top_k, top_p, seed, use_cache, batch_size, ...)."""
    stop = eos_id(tokenizer) if stop_at_eos else None
    ids = [prompt_ids(tokenizer, prompt) for prompt in prompts]
    new = generate_batch(
        model, ids, max_new_tokens, num_samples=num_samples, stop_id=stop, **sampling
    )
    return [
        [tokenizer.decode(_until(out, stop), skip_special_tokens=False) for out in samples]
        for samples in new
    ]


def _until(tokens: list[int], stop: int | None) -> list[int]:
    return tokens[:-1] if stop is not None and tokens and tokens[-1] == stop else tokens


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of a UTF-8 text file, one per line (line ends removed, blank lines skipped).

    Raises:
        DataError: the file cannot be read, is not UTF-8, or holds no prompt.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"Prompt file {path} cannot be read ({err.strerror or err}).") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark is not part of the first prompt
    except UnicodeDecodeError as err:
        raise DataError(
            f"Prompt file {path} is not UTF-8 text (byte {err.start} cannot be decoded); save "
            "it as UTF-8."
        ) from None
    prompts = [line.removesuffix("\r") for line in text.split("\n") if line.strip()]
    if not prompts:
        raise DataError(f"Prompt file {path} holds no prompt; write one prompt per line.")
    return prompts
