"""Passkey retrieval: prompts, keys, digit extraction, decoding, eval.json, compare, and a model
trained on the task that passes it while an untrained one does not.

The tokenizer is the project's byte-level BPE recipe trained in a fraction of a second on
passkey-format text, so words are single tokens and the digits of a key are one or two
characters per token.
"""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner
from tokenizers import pre_tokenizers, trainers

from ropelm.cli import main
from ropelm.config import ModelConfig
from ropelm.errors import ConfigError
from ropelm.model import TransformerLM
from ropelm.passkey import (
    ANSWER_TOKENS,
    CHANCE,
    FILLER,
    KEY_TEMPLATE,
    QUESTION,
    PasskeyRunner,
    PasskeySettings,
    PromptBuilder,
    draw_keys,
    extract_digits,
    greedy_decode,
    is_correct,
    parse_depths,
)
from ropelm.tokenizer import SPECIAL_TOKENS, new_tokenizer

EOT_ID = 0  # <|endoftext|> is the first special token of the ropelm recipe


def passkey_tokenizer(vocab_size: int = 350, special_tokens=SPECIAL_TOKENS):
    """The ropelm BPE recipe trained on passkey-format text (no network, ~0.1 s)."""
    texts = [
        " ".join([FILLER] * 3) + KEY_TEMPLATE.format(key=key) + QUESTION + f" {key}."
        for key in draw_keys(500, seed=123)
    ]
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return passkey_tokenizer()


@pytest.fixture(scope="module")
def builder(tokenizer) -> PromptBuilder:
    return PromptBuilder(tokenizer)


# -- prompts -----------------------------------------------------------------------------------


def filler_characters(text: str) -> int:
    """Characters of filler in a decoded stretch of prompt (everything but the newlines)."""
    return len(text.replace("\n", ""))


@pytest.mark.parametrize("length", [64, 97, 256, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_prompt_has_the_exact_length_and_the_key_at_its_depth(builder, tokenizer, length, depth):
    key = 40719
    prompt = builder.build(key, length, depth)
    assert len(prompt.ids) == length and prompt.key == key
    key_ids = tokenizer.encode(KEY_TEMPLATE.format(key=key)).ids
    question_ids = tokenizer.encode(QUESTION).ids
    assert prompt.ids[0] == EOT_ID
    assert prompt.ids[prompt.key_start : prompt.key_start + len(key_ids)] == key_ids
    assert prompt.ids[-len(question_ids) :] == question_ids
    assert prompt.filler_tokens == length - 1 - len(key_ids) - len(question_ids)

    # the text, read independently: the key's sentence sits at `depth` of the filler text
    text = tokenizer.decode(prompt.ids, skip_special_tokens=False)
    assert text.startswith("<|endoftext|>") and text.endswith(QUESTION)
    before, sentence, after = text.removeprefix("<|endoftext|>").partition(
        KEY_TEMPLATE.format(key=key)
    )
    assert sentence, "the key sentence is in the prompt, in one piece"
    after = after.removesuffix(QUESTION)
    total = filler_characters(before) + filler_characters(after)
    # filler tokens are at most 8 characters ("ĠThere" ...): the cut is within half a token
    assert filler_characters(before) == pytest.approx(depth * total, abs=8)
    filler_text = " ".join([FILLER] * (length // 10 + 2))
    assert filler_text.startswith(before)  # the filler text, in order, around the key
    assert (before + after) == filler_text[: len(before + after)]
    assert re.findall(r"[0-9]+", text) == [str(key), str(key)]  # no other digits anywhere


def test_key_position_counts_filler_tokens_rounded_half_up(builder):
    prompt = builder.build(55555, 200, 0.5)
    n = prompt.filler_tokens
    assert prompt.key_start == 1 + math.floor(0.5 * n + 0.5)
    assert builder.build(55555, 200, 0.0).key_start == 1  # right after <|endoftext|>
    last = builder.build(55555, 200, 1.0)
    assert last.key_start == 1 + n  # all the filler before it: the question follows


def test_too_short_a_length_names_the_minimum(builder, assert_one_sentence):
    keys = draw_keys(50, 0)
    minimum = builder.min_length(keys)
    assert 20 < minimum < 64
    builder.check_lengths({"1x": minimum}, keys)
    widest = max(keys, key=lambda k: len(builder.key_ids(k)))
    assert builder.build(widest, minimum, 0.5).filler_tokens == 0
    with pytest.raises(ConfigError) as err:
        builder.check_lengths({"2x": 2 * minimum, "0.5x": minimum - 1}, keys)
    message = str(err.value)
    assert_one_sentence(message)
    assert f"at least {minimum} tokens" in message and "0.5x" in message


def test_a_tokenizer_without_endoftext_starts_with_filler():
    plain = PromptBuilder(passkey_tokenizer(special_tokens=()))
    assert plain.prefix == []
    prompt = plain.build(12345, 80, 0.0)
    assert len(prompt.ids) == 80 and prompt.key_start == 0
    assert plain.decode(prompt.ids).startswith(KEY_TEMPLATE.format(key=12345))


# -- keys, digits, settings --------------------------------------------------------------------


def test_keys_are_reproducible_five_digit_numbers():
    keys = draw_keys(2000, seed=0)
    assert keys == draw_keys(2000, seed=0) != draw_keys(2000, seed=1)
    assert all(10_000 <= k <= 99_999 for k in keys)
    # Python guarantees random.Random(seed).random() across versions: the keys are frozen
    rng = random.Random(7)
    assert draw_keys(3, seed=7) == [10_000 + int(rng.random() * 90_000) for _ in range(3)]
    first_digits = [str(k)[0] for k in keys]
    for digit in "123456789":  # uniform: each leading digit about 1/9 of the keys
        assert first_digits.count(digit) == pytest.approx(2000 / 9, rel=0.25)
    assert pytest.approx(1 / 90_000) == CHANCE


@pytest.mark.parametrize(
    ("answer", "correct"),
    [
        (" 12345.", True),
        ("12345", True),
        (" 12345 is the pass key", True),
        ("\nkey: 12345abc", True),  # the first digit run, wherever it starts
        (" 1234", False),
        (" 123456", False),  # one digit too many is wrong, not a prefix match
        (" 12 345", False),  # the first run is "12"
        (" 54321", False),
        ("", False),
        (" no digits at all", False),
        (" \u0661\u0662\u0663\u0664\u0665", False),  # Arabic-Indic digits are not ASCII digits
    ],
)
def test_digit_extraction_and_scoring(answer, correct):
    assert is_correct(answer, 12345) is correct


def test_extract_digits_returns_the_first_run():
    assert extract_digits("a 12 b 345") == "12"
    assert extract_digits("none") is None


def test_bad_settings_are_one_sentence(assert_one_sentence):
    assert parse_depths("0, 0.5,1,0.5") == (0.0, 0.5, 1.0)
    assert parse_depths(["0,0.25", "1"]) == (0.0, 0.25, 1.0)
    cases = [
        lambda: PasskeySettings(depths=(0.0, 1.5)),
        lambda: PasskeySettings(depths=(-0.25,)),
        lambda: PasskeySettings(depths=(float("nan"),)),
        lambda: PasskeySettings(depths=()),
        lambda: PasskeySettings(trials=0),
        lambda: parse_depths("0,half"),
    ]
    for make in cases:
        with pytest.raises(ConfigError) as err:
            make()
        assert_one_sentence(str(err.value))
    with pytest.raises(ConfigError, match=r"1\.5 is outside \[0, 1\]"):
        PasskeySettings(depths=(0.0, 1.5))


# -- decoding ----------------------------------------------------------------------------------


def naive_greedy(model: TransformerLM, ids: list[int], steps: int) -> list[int]:
    """Reference: run the whole sequence every step, no cache, no batching."""
    seq = list(ids)
    for _ in range(steps):
        logits, _ = model(torch.tensor([seq]))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(ids) :]


@pytest.mark.parametrize(
    ("att_type", "use_cache"), [("RoPE-SM", True), ("RoPE-SM", False), ("ALiBi", True)]
)
def test_batched_greedy_decoding_matches_the_naive_loop(registry, att_type, use_cache):
    torch.manual_seed(0)
    config = ModelConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32,
                         dropout=0.0, att_type=att_type)  # fmt: skip
    model = TransformerLM(config, registry.resolve(config)).eval()
    prompts = torch.randint(0, 64, (3, 40))  # beyond the block size, as at 2x and more
    with torch.no_grad():
        batched = greedy_decode(model, prompts, 6, use_cache=use_cache)
        expected = [naive_greedy(model, row, 6) for row in prompts.tolist()]
    assert batched.tolist() == expected


# -- `ropelm-exp eval --passkey` on trained runs -----------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_tiny_runs) -> dict[str, Path]:
    """Two tiny trained runs (2 steps) sharing one data cache: RoPE-SM and Learned-APE."""
    return train_tiny_runs(
        tmp_path_factory.mktemp("passkey-runs"), ("RoPE-SM", "Learned-APE"), name="passkeytiny",
        model={"block_size": 96}, train={"max_steps": 2},
        eval={"max_batches": 2, "lengths": ["1x", "2x"]},
    )  # fmt: skip


SMALL = PasskeySettings(depths=(0.0, 0.5, 1.0), trials=4, seed=3)


def test_passkey_goes_into_eval_json_beside_the_perplexity(registry, runs):
    from ropelm.eval_run import evaluate_run

    run = runs["RoPE-SM"]
    (run / "eval.json").unlink(missing_ok=True)
    report = evaluate_run(run, registry, lengths=["1x", "2x"], passkey=SMALL)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == {k: v for k, v in report.items() if k != "path"}
    section = saved["passkey"]
    assert saved["results"] == {} and saved["att_type"] == "RoPE-SM"
    assert {k: section[k] for k in ("depths", "trials", "seed")} == {
        "depths": [0.0, 0.5, 1.0], "trials": 4, "seed": 3}  # fmt: skip
    assert section["chance"] == pytest.approx(1 / 90_000)
    for label, length in (("1x", 96), ("2x", 192)):
        entry = section["results"][label]
        assert entry["length"] == length and len(entry["accuracy"]) == 3
        assert entry["accuracy"] == [c / 4 for c in entry["correct"]]
        assert [e["key"] for e in entry["examples"]] == [draw_keys(4, 3)[0]] * 3

    # perplexity afterwards keeps the passkey result of the same checkpoint, and vice versa
    evaluate_run(run, registry, lengths=["1x"], max_windows=1)
    both = json.loads((run / "eval.json").read_text())
    assert both["passkey"] == section and "ppl" in both["results"]["1x"]["nonoverlapping"]
    evaluate_run(run, registry, lengths=["1x"], passkey=SMALL)
    again = json.loads((run / "eval.json").read_text())
    assert again["results"] == both["results"] and list(again["passkey"]["results"]) == ["1x"]


def test_passkey_beyond_the_block_of_learned_ape_is_na(registry, runs):
    from ropelm.eval_run import evaluate_run

    report = evaluate_run(runs["Learned-APE"], registry, lengths=["1x", "2x"], passkey=SMALL,
                          out=runs["Learned-APE"] / "pk.json")  # fmt: skip
    results = report["passkey"]["results"]
    assert "accuracy" in results["1x"]
    assert results["2x"]["status"] == "n/a" and "block size of 96" in results["2x"]["reason"]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_eval_passkey_prints_the_accuracy_table(runs):
    run = runs["Learned-APE"]
    code, out = invoke("eval", run, "--passkey", "--lengths", "1x,2x", "--depths", "0,1",
                       "--trials", "3", "--out", run / "cli.json")  # fmt: skip
    assert code == 0, out
    assert "Passkey retrieval accuracy (%), 3 trials per cell" in out
    assert "depth 0" in out and "depth 1" in out
    assert "n/a: Learned-APE does not run beyond its block size of 96 tokens" in out
    assert json.loads((run / "cli.json").read_text())["passkey"]["depths"] == [0.0, 1.0]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--passkey", "--lengths", "1x", "--depths", "0,1.5"], "1.5 is outside [0, 1]"),
        (["--passkey", "--lengths", "1x", "--trials", "0"], "give at least 1 trial"),
        (["--passkey", "--lengths", "10"], "is shorter than the prompt template"),
        (["--lengths", "1x", "--depths", "0"], "--depths only apply to --passkey"),
        (["--passkey", "--max-windows", "2"], "--max-windows only apply to perplexity"),
    ],
)
def test_cli_eval_passkey_bad_input_is_one_line_and_writes_nothing(
    runs, tmp_path, args, message, assert_one_sentence
):
    out = tmp_path / "never.json"
    code, text = invoke("eval", runs["RoPE-SM"], *args, "--out", out)
    assert code == 1 and message in text, text
    assert text.count("\n") == 1 and text.startswith("Error: ")
    assert_one_sentence(text.removeprefix("Error: ").strip())
    assert not out.exists()


# -- `ropelm-exp compare`: the accuracy table and the heatmap ---------------------------------


def passkey_section(accuracies: dict[str, list[float] | None], trials: int = 4) -> dict:
    """A passkey section as `eval --passkey` writes it (depths 0, 0.5, 1; None: n/a)."""
    results = {}
    for label, accuracy in accuracies.items():
        length = 32 * int(label.removesuffix("x"))
        if accuracy is None:
            results[label] = {"length": length, "status": "n/a", "reason": "cannot"}
            continue
        correct = [round(a * trials) for a in accuracy]
        results[label] = {"length": length, "correct": correct, "accuracy": accuracy,
                          "mean_accuracy": sum(correct) / (3 * trials)}  # fmt: skip
    return {"depths": [0.0, 0.5, 1.0], "trials": trials, "seed": 0, "answer_tokens": 10,
            "chance": CHANCE, "results": results}  # fmt: skip


def write_run(root: Path, att_type: str, seed: int, passkey: dict, with_ppl: bool) -> Path:
    run = root / f"{att_type}-seed{seed}"
    run.mkdir(parents=True)
    summary = {"att_type": att_type, "att_options": {}, "n_params": 1000, "final_val_ppl": 9.0}
    (run / "summary.json").write_text(json.dumps(summary))
    config = {"model": {"block_size": 32, "att_type": att_type}, "train": {"seed": seed}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.jsonl").write_text(json.dumps({"step": 2, "tokens": 64, "val_loss": 2.0}))
    results = {"1x": {"length": 32, "nonoverlapping": {"ppl": 9.0}}} if with_ppl else {}
    report = {"att_type": att_type, "att_option_overrides": {}, "results": results,
              "passkey": passkey}  # fmt: skip
    (run / "eval.json").write_text(json.dumps(report))
    return run


@pytest.fixture()
def sweep(tmp_path: Path) -> Path:
    root = tmp_path / "sweep"
    write_run(root, "RoPE-SM", 0, passkey_section({"1x": [1.0, 1.0, 0.5], "2x": [0.5, 0.0, 0.0]}),
              with_ppl=True)  # fmt: skip
    write_run(root, "RoPE-SM", 1, passkey_section({"1x": [1.0, 0.5, 0.5], "2x": [0.0, 0.0, 0.0]}),
              with_ppl=False)  # fmt: skip
    write_run(root, "Learned-APE", 0, passkey_section({"1x": [0.25, 0.0, 0.0], "2x": None}),
              with_ppl=False)  # fmt: skip
    return root


def test_compare_table_is_the_mean_over_seeds_per_length_and_depth(sweep):
    from ropelm.report import compare

    comparison = compare([sweep])
    table = next(t for t in comparison.tables if t.name == "passkey")
    assert table.headers == ["variant", "seeds", "length", "depth 0", "depth 0.5", "depth 1",
                             "mean"]  # fmt: skip
    rows = {(r[0], r[2]): r for r in table.rows}
    rope_1x = rows[("RoPE-SM", "1x (32)")]
    assert rope_1x[1] == 2
    assert [c.mean for c in rope_1x[3:]] == pytest.approx([100, 75, 50, 75])
    assert rope_1x[4].std == pytest.approx(statistics_stdev([100, 50]))
    assert rows[("Learned-APE", "2x (64)")][3:] == [None] * 4  # n/a
    assert rows[("Learned-APE", "1x (32)")][3].mean == pytest.approx(25)
    text = comparison.text
    assert "Passkey retrieval accuracy (%)" in text and "75.0 ± 35.4" in text
    # a passkey-only evaluation adds no empty row to the perplexity tables
    ppl = next(t for t in comparison.tables if t.name == "nonoverlapping")
    assert [r[0] for r in ppl.rows] == ["RoPE-SM"] and ppl.rows[0][1] == 1


def statistics_stdev(values: list[float]) -> float:
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def test_heatmap_shows_the_mean_accuracy_of_each_cell(sweep):
    from ropelm.passkey_report import plot_passkey_heatmap
    from ropelm.report import find_runs, load_run

    records = [load_run(p) for p in find_runs([sweep])]
    fig = plot_passkey_heatmap(records)
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_images()}
    assert sorted(panels) == ["Learned-APE (1 seed)", "RoPE-SM (2 seeds)"]
    grid = panels["RoPE-SM (2 seeds)"].get_images()[0].get_array()
    assert grid.tolist() == [[100.0, 75.0, 50.0], [25.0, 0.0, 0.0]]  # rows 1x, 2x
    ape_panel = panels["Learned-APE (1 seed)"]
    assert [t.get_text() for t in ape_panel.get_yticklabels()] == ["1x (32)", "2x (64)"]
    assert [t.get_text() for t in ape_panel.get_xticklabels()] == ["0", "0.5", "1"]
    ape = np.ma.filled(ape_panel.get_images()[0].get_array().astype(float), np.nan)
    assert ape[0].tolist() == [25.0, 0.0, 0.0] and np.isnan(ape[1]).all()  # 2x: n/a


def test_cli_compare_writes_the_passkey_csv_and_heatmap(sweep, tmp_path):
    out = tmp_path / "docs"
    result = CliRunner().invoke(main, ["compare", str(sweep), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "| RoPE-SM " in result.output and "depth 0.5" in result.output
    png = (out / "passkey_accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and 5_000 < len(png) < 300_000
    rows = (out / "passkey.csv").read_text().splitlines()
    assert rows[0].startswith("variant,seeds,length,depth_0_mean,depth_0_std,")
    rope = next(r.split(",") for r in rows if r.startswith("RoPE-SM,2,1x (32),"))
    # per seed the mean over depths is 250/3 and 200/3 %: their mean 75, std 11.79
    assert [float(v) for v in rope[3:]] == pytest.approx(
        [100, 0, 75, statistics_stdev([100, 50]), 50, 0, 75, statistics_stdev([250 / 3, 200 / 3])]
    )
    assert "Learned-APE,1,2x (64),,,,,,,," in rows  # n/a: empty cells


# -- the harness can succeed: a model trained on passkey prompts passes, an untrained one not --

TRAIN_BLOCK = 64  # "1x": prompts of 54 tokens (17 of them filler), answers inside the block
SHORTEST_PROMPT = 38  # a curriculum: the longest training prompt grows from 38 to 54 tokens
INTRO = KEY_TEMPLATE.split(" {key}")[0]  # "\nThe pass key is", before the key's first copy


def passkey_example(
    builder: PromptBuilder, rng: random.Random, longest: int
) -> tuple[list[int], list[int]]:
    """One training sequence and its targets: a prompt (random key, depth, and length up to
    ``longest``) then
    " NNNNN.", the loss on what can be copied from context: the key sentence but for the
    key's first occurrence (random digits), and the answer. Targets are -100 elsewhere."""
    key = 10_000 + int(rng.random() * 90_000)
    length = rng.randint(SHORTEST_PROMPT, longest)
    prompt = builder.build(key, length, rng.random())
    encode = builder.tokenizer.encode
    sentence, intro, digits = (builder.key_ids(key), encode(INTRO).ids, encode(f" {key}").ids)
    assert sentence[: len(intro) + len(digits)] == intro + digits  # BPE keeps the pieces
    first_key = range(prompt.key_start + len(intro), prompt.key_start + len(intro) + len(digits))
    sentence_span = range(prompt.key_start + 1, prompt.key_start + len(sentence))
    sequence = prompt.ids + encode(f" {key}.").ids
    copyable = [(i in sentence_span and i not in first_key) or i >= len(prompt.ids)
                for i in range(1, len(sequence))]  # fmt: skip
    targets = [t if keep else -100 for t, keep in zip(sequence[1:], copyable, strict=True)]
    return sequence[:-1], targets


def passkey_batch(builder: PromptBuilder, rng: random.Random, size: int, longest: int):
    """``size`` training examples, right-padded (input 1, target -100)."""
    rows = [passkey_example(builder, rng, longest) for _ in range(size)]
    width = max(len(x) for x, _ in rows)
    x = torch.tensor([ids + [1] * (width - len(ids)) for ids, _ in rows])  # (B, T) pad: 1
    y = torch.tensor([t + [-100] * (width - len(t)) for _, t in rows])  # (B, T)
    return x, y


def train_on_passkeys(model: TransformerLM, builder: PromptBuilder, steps: int) -> float:
    """Plain AdamW with warmup and cosine decay to a tenth; returns the last loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=TRAIN_LR, weight_decay=0.0)
    rng = random.Random(1)  # training keys: another stream than the evaluation's seed 0
    model.train()
    for step in range(steps):
        lr = TRAIN_LR * min(1.0, (step + 1) / 30) * (0.55 + 0.45 * math.cos(math.pi * step / steps))
        for group in optimizer.param_groups:
            group["lr"] = lr
        growth = min(1.0, 2 * step / steps)  # full-length prompts from half-way
        longest = SHORTEST_PROMPT + int(growth * (TRAIN_BLOCK - ANSWER_TOKENS - SHORTEST_PROMPT))
        x, y = passkey_batch(builder, rng, TRAIN_BATCH, longest)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    return loss.item()


def count_correct_naively(model: TransformerLM, builder: PromptBuilder, keys, depth) -> int:
    """Independent scoring: no batching, no cache, a regex on the decoded text."""
    correct = 0
    for key in keys:
        ids = builder.build(key, TRAIN_BLOCK - ANSWER_TOKENS, depth).ids
        with torch.no_grad():
            text = builder.decode(naive_greedy(model, ids, ANSWER_TOKENS))
        digits = re.search(r"[0-9]+", text)
        correct += digits is not None and digits.group() == str(key)
    return correct


TRAIN_STEPS, TRAIN_BATCH, TRAIN_LR = 2000, 16, 3e-3


@pytest.mark.slow
def test_a_model_trained_on_passkeys_retrieves_them_and_an_untrained_one_does_not(registry):
    """The harness can tell a model that retrieves keys from one that cannot.

    A 2-layer RoPE-SM model (n_embd 64) with tied input and output embeddings (copying a
    token is then the identity map an induction head needs) trains with plain AdamW on
    passkey prompts at random depths, the loss on what context determines (the key's
    second copy in its sentence, and the answer), the prompts growing from 38 to 54
    tokens in the first half. Untrained it scores 0; after 2000 steps of 16 prompts
    (about 40 s on one thread) it retrieves every key at 1x.

    What made the difference: most keys have a repeated digit (" 8", "5", "9", "9", "7"),
    which a one-token induction head cannot copy (it needs the two tokens before each
    digit). With the answer as the only loss and 400 steps of 32 the model stopped at a
    third of the keys; with twice the copy signal per prompt, smaller steps and the
    curriculum, each of 8 torch seeds tried reached 99-100 % (without the curriculum one seed
    in 7 stalled at 85 %; answer-only loss at 54 tokens: 0-100 % by seed).
    """
    torch.manual_seed(0)
    tokenizer = passkey_tokenizer()
    builder = PromptBuilder(tokenizer)
    config = ModelConfig(block_size=TRAIN_BLOCK, vocab_size=tokenizer.get_vocab_size(),
                         n_layer=2, n_head=4, n_embd=64, dropout=0.0,
                         att_type="RoPE-SM")  # fmt: skip
    model = TransformerLM(config, registry.resolve(config))
    model.lm_head.weight = model.tok_emb.weight  # tied embeddings
    settings = PasskeySettings(depths=(0.0, 0.25, 0.5, 0.75, 1.0), trials=20, seed=0)
    runner = PasskeyRunner(builder, settings, torch.device("cpu"))

    untrained = runner.run({"1x": TRAIN_BLOCK}, lambda _: model)["results"]["1x"]
    assert untrained["mean_accuracy"] <= 0.02  # chance is 1/90000

    loss = train_on_passkeys(model, builder, TRAIN_STEPS)
    trained = runner.run({"1x": TRAIN_BLOCK}, lambda _: model)["results"]["1x"]
    print(f"loss {loss:.3f}, accuracy per depth {trained['accuracy']}")
    assert trained["mean_accuracy"] >= 0.9, trained  # 1.0 with these seeds (deterministic)
    assert min(trained["accuracy"]) >= 0.8, trained  # at every depth, not only near the end
    # the batched, cached runner counts what a naive loop and a regex count
    keys = draw_keys(settings.trials, settings.seed)
    assert trained["correct"][2] == count_correct_naively(model, builder, keys, 0.5)
