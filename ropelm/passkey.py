"""Passkey retrieval: can the model copy a 5-digit key it read far back in its context?

The test of Mohtashami & Jaggi (2023, "Landmark Attention", https://arxiv.org/abs/2305.16300),
used by the position-interpolation and YaRN papers to judge context extension. Each trial
at length L is one prompt of exactly L - :data:`ANSWER_TOKENS` tokens, so that the prompt
and the decoded answer fit in L positions (at ``1x`` the model never leaves its training
context; a variant without extrapolation runs at 1x). The prompt is built in token ids (so
no re-tokenization can change its length)::

    <|endoftext|>  FILLER[:cut]  KEY_SENTENCE  FILLER[cut:n]  QUESTION

* ``FILLER`` is :data:`FILLER` ("The grass is green. ...") repeated, tokenized once and cut
  to the ``n`` tokens the prompt has room for (``n = prompt length - 1 - len(KEY_SENTENCE)
  - len(QUESTION)``, the 1 being ``<|endoftext|>``, the token every training document
  follows; a tokenizer without it gets no first token and one more filler token);
* ``KEY_SENTENCE`` is :data:`KEY_TEMPLATE` with the key, inserted after
  ``cut = floor(depth * n + 0.5)`` filler tokens: depth 0 puts the key first, depth 1 right
  before the question;
* ``QUESTION`` is :data:`QUESTION`, ending "The pass key is".

The model greedily decodes :data:`ANSWER_TOKENS` tokens (10, as in the YaRN evaluation),
which are decoded to text. **Digit extraction**: the answer is the first maximal run of
ASCII digits ``[0-9]+`` in that text, wherever it starts; the trial succeeds when that run
equals the key's five digits exactly (``" 12345."`` and ``"key is 12345"`` succeed,
``" 1234"``, ``" 123456"`` and an answer without digits fail). Keys are uniform over
10000..99999 (:func:`draw_keys`, from ``random.Random(seed).random()``, the one stream
Python keeps the same across versions), so guessing succeeds with probability
:data:`CHANCE` = 1/90000; the same ``trials`` keys are used at every length and depth, so
cells are paired comparisons.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from ropelm.errors import ConfigError
from ropelm.model import TransformerLM

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_TEMPLATE = "\nThe pass key is {key}. Remember it. {key} is the pass key.\n"
QUESTION = "\nWhat is the pass key? The pass key is"
BOS = "<|endoftext|>"
KEY_LOW, KEY_HIGH = 10_000, 99_999  # five digits, no leading zero
CHANCE = 1 / (KEY_HIGH - KEY_LOW + 1)
ANSWER_TOKENS = 10
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)
DEFAULT_TRIALS = 50
NA = "n/a"
_DIGITS = re.compile(r"[0-9]+")


DOCUMENTS = 20_000  # passkey training documents when data.max_documents is not given


def passkey_documents(count: int, max_filler_words: int, seed: int = 0) -> Iterable[str]:
    """``count`` training documents in the format of the test, answer included::

        FILLER[:cut]  KEY_SENTENCE  FILLER[cut:n]  QUESTION " NNNNN."

    ``n`` filler words (uniform in 0..``max_filler_words``, the filler text's words in
    order), the key sentence after ``cut`` of them (a uniform depth), a key uniform over
    10000..99999. The keys come from their own stream (seeded with a string): the keys
    of the evaluation (:func:`draw_keys`) do not follow them.
    """
    rng = random.Random(f"passkey-documents-{seed}")
    words = FILLER.split()
    for _ in range(count):
        key = KEY_LOW + int(rng.random() * (KEY_HIGH - KEY_LOW + 1))
        n = rng.randint(0, max_filler_words)
        cut = math.floor(rng.random() * n + 0.5)
        filler = [words[i % len(words)] for i in range(n)]
        before = " ".join(filler[:cut])
        after = "".join(f" {word}" for word in filler[cut:])
        yield before + KEY_TEMPLATE.format(key=key) + after + QUESTION + f" {key}."


@dataclass(frozen=True)
class PasskeySettings:
    """What to test: key depths (fractions of the filler), trials per cell, the key seed.

    Raises:
        ConfigError: a depth outside [0, 1], fewer than one trial, or no answer tokens.
    """

    depths: tuple[float, ...] = DEFAULT_DEPTHS
    trials: int = DEFAULT_TRIALS
    seed: int = 0
    answer_tokens: int = ANSWER_TOKENS

    def __post_init__(self) -> None:
        if not self.depths:
            raise ConfigError("No passkey depths given; pass e.g. --depths 0,0.25,0.5,0.75,1.")
        for depth in self.depths:
            if not 0.0 <= depth <= 1.0:  # also false for nan
                raise ConfigError(
                    f"Passkey depth {depth} is outside [0, 1]; give fractions of the filler "
                    "before the key, e.g. --depths 0,0.25,0.5,0.75,1."
                )
        if self.trials < 1:
            raise ConfigError(f"--trials is {self.trials}; give at least 1 trial per cell.")
        if self.answer_tokens < 1:
            raise ConfigError(f"answer_tokens is {self.answer_tokens}; decode at least 1 token.")


def parse_depths(spec: str | Iterable[str | float]) -> tuple[float, ...]:
    """``"0,0.5,1"`` (or a list of such parts) -> ``(0.0, 0.5, 1.0)``, duplicates dropped.

    Raises:
        ConfigError: a part is not a number (range checks are :class:`PasskeySettings`').
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    depths: list[float] = []
    for item in (p.strip() for part in parts for p in str(part).split(",")):
        if not item:
            continue
        try:
            depth = float(item)
        except ValueError:
            raise ConfigError(
                f"Passkey depth '{item}' is not a number; give fractions in [0, 1] such as "
                "--depths 0,0.25,0.5,0.75,1."
            ) from None
        if depth not in depths:
            depths.append(depth)
    return tuple(depths)


def draw_keys(trials: int, seed: int) -> list[int]:
    """``trials`` keys, uniform over 10000..99999, reproducible from ``seed``."""
    rng = random.Random(seed)
    span = KEY_HIGH - KEY_LOW + 1
    return [KEY_LOW + int(rng.random() * span) for _ in range(trials)]


def extract_digits(text: str) -> str | None:
    """The first maximal run of ASCII digits in ``text`` (None when there is none)."""
    match = _DIGITS.search(text)
    return match.group() if match else None


def is_correct(answer: str, key: int) -> bool:
    """Whether the decoded ``answer`` retrieves ``key`` (its first digit run equals the key)."""
    return extract_digits(answer) == str(key)


@dataclass(frozen=True)
class PasskeyPrompt:
    """One trial: the prompt's token ids, its key and where the key sentence starts."""

    ids: list[int]
    key: int
    depth: float
    key_start: int  # index in ids of the key sentence's first token
    filler_tokens: int  # filler tokens in the prompt (before and after the key)


class PromptBuilder:
    """Builds passkey prompts of an exact token length with one tokenizer.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` (``encode(text).ids`` and ``decode``);
    the token ``<|endoftext|>`` starts every prompt when the tokenizer has it.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        bos = tokenizer.token_to_id(BOS)
        self.prefix: list[int] = [] if bos is None else [bos]
        self.question: list[int] = self._encode(QUESTION)
        self._filler: list[int] = []
        self._repeats = 2

    def _encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text).ids)

    def key_ids(self, key: int) -> list[int]:
        """The key sentence of ``key`` in tokens."""
        return self._encode(KEY_TEMPLATE.format(key=key))

    def min_length(self, keys: Iterable[int]) -> int:
        """The shortest prompt that holds every key's sentence and the question (no filler)."""
        longest = max(len(self.key_ids(key)) for key in keys)
        return len(self.prefix) + longest + len(self.question)

    def filler(self, n: int) -> list[int]:
        """The first ``n`` tokens of the repeated filler text."""
        while len(self._filler) < n:  # tokenize twice as many repetitions as last time
            self._repeats *= 2
            self._filler = self._encode(" ".join([FILLER] * self._repeats))
        return self._filler[:n]

    def build(self, key: int, length: int, depth: float) -> PasskeyPrompt:
        """The prompt of exactly ``length`` tokens with ``key`` at ``depth`` of the filler.

        Raises:
            ConfigError: ``length`` cannot hold the key sentence and the question.
        """
        key_ids = self.key_ids(key)
        n = length - len(self.prefix) - len(key_ids) - len(self.question)
        if n < 0:
            raise ConfigError(
                f"A passkey prompt of {length} tokens is shorter than the prompt template "
                f"({length - n} tokens with key {key}, without filler); use lengths of at "
                f"least {length - n} tokens."
            )
        filler = self.filler(n)
        cut = math.floor(depth * n + 0.5)
        ids = self.prefix + filler[:cut] + key_ids + filler[cut:] + self.question
        return PasskeyPrompt(ids, key, depth, len(self.prefix) + cut, n)

    def check_lengths(
        self, lengths: Mapping[str, int], keys: Sequence[int], answer_tokens: int = 0
    ) -> None:
        """Raise a ConfigError naming the minimum when a length cannot hold the template
        (and ``answer_tokens`` decoded tokens)."""
        minimum = self.min_length(keys) + answer_tokens
        for label, length in lengths.items():
            if length < minimum:
                raise ConfigError(
                    f"Passkey length {label} ({length} tokens) is shorter than the prompt "
                    f"template, which needs at least {minimum} tokens with this tokenizer "
                    f"(key sentence, question and {answer_tokens} answer tokens, no filler); "
                    "give longer --lengths."
                )

    def decode(self, ids: Sequence[int]) -> str:
        """Generated token ids as text."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@torch.no_grad()
def greedy_decode(
    model: TransformerLM,
    prompts: torch.Tensor,
    new_tokens: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    *,
    use_cache: bool = True,
) -> torch.Tensor:
    """The ``new_tokens`` tokens (B, new_tokens) greedy decoding appends to ``prompts`` (B, T).

    With the variant's KV cache (and ``use_cache``) the prompts are processed once and
    each new token costs one position; without, every step runs the whole sequence.
    The model sees the whole sequence either way (no block_size window: that is the test).
    """
    model.eval()
    B, T = prompts.shape
    out = torch.empty(B, new_tokens, dtype=torch.long, device=prompts.device)
    cached = use_cache and model.spec.capabilities.kv_cache
    state = model.init_decode_state(B, T + new_tokens) if cached else None
    seq, step_input = prompts, prompts  # (B, T) the first step sees the whole prompt
    for i in range(new_tokens):
        with autocast():
            logits, _ = model(step_input, state=state)  # (B, t, V)
        out[:, i] = logits[:, -1, :].float().argmax(dim=-1)
        nxt = out[:, i : i + 1]  # (B, 1)
        if cached:
            step_input = nxt
        else:
            seq = torch.cat([seq, nxt], dim=1)  # (B, T + i + 1)
            step_input = seq
    return out


@dataclass
class PasskeyRunner:
    """Scores passkey cells (one length, every depth) with one tokenizer and settings."""

    builder: PromptBuilder
    settings: PasskeySettings
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    batch_tokens: int = 4096  # prompt tokens per forward pass

    @property
    def keys(self) -> list[int]:
        return draw_keys(self.settings.trials, self.settings.seed)

    def cell(self, model: TransformerLM, length: int, bar: tqdm | None = None) -> dict[str, Any]:
        """Accuracy at each depth at ``length`` (prompts of ``length - answer_tokens`` tokens,
        the same keys at each depth)."""
        keys, depths = self.keys, self.settings.depths
        size = length - self.settings.answer_tokens
        prompts = [self.builder.build(key, size, depth) for depth in depths for key in keys]
        batch = max(1, self.batch_tokens // length)
        answers: list[str] = []
        for start in range(0, len(prompts), batch):
            chunk = prompts[start : start + batch]
            ids = torch.tensor([p.ids for p in chunk], device=self.device)  # (b, length)
            new = greedy_decode(model, ids, self.settings.answer_tokens, self.autocast)
            answers += [self.builder.decode(row) for row in new.tolist()]
            if bar is not None:
                bar.update(len(chunk))
        hits = [is_correct(a, p.key) for a, p in zip(answers, prompts, strict=True)]
        n = len(keys)
        correct = [sum(hits[i * n : (i + 1) * n]) for i in range(len(depths))]
        return {
            "length": length,
            "prompt_tokens": size,
            "correct": correct,
            "accuracy": [c / n for c in correct],
            "mean_accuracy": sum(correct) / len(prompts),
            # the first trial at each depth, to see what the model answers
            "examples": [
                {"depth": depths[i], "key": keys[0], "answer": answers[i * n]}
                for i in range(len(depths))
            ],
        }

    def run(
        self,
        lengths: Mapping[str, int],
        model_at: Callable[[str], TransformerLM | str],
        *,
        progress: bool = False,
    ) -> dict[str, Any]:
        """The ``passkey`` section of eval.json for every length.

        ``model_at(label)`` returns the model for that length, or the reason (text) why the
        variant cannot run there, which becomes an n/a cell. Every length is checked against
        the template before any model runs.
        """
        self.builder.check_lengths(lengths, self.keys, self.settings.answer_tokens)
        settings = self.settings
        total = len(lengths) * len(settings.depths) * settings.trials
        results: dict[str, Any] = {}
        with tqdm(total=total, desc="passkey", unit=" prompts", disable=not progress) as bar:
            for label, length in lengths.items():
                model = model_at(label)
                if isinstance(model, str):
                    results[label] = {"length": length, "status": NA, "reason": model}
                    bar.update(len(settings.depths) * settings.trials)
                else:
                    results[label] = self.cell(model, length, bar)
        return {
            "depths": list(settings.depths),
            "trials": settings.trials,
            "seed": settings.seed,
            "answer_tokens": settings.answer_tokens,
            "chance": CHANCE,
            "results": results,
        }
