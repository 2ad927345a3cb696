import math
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner

from ropelm import ModelConfig, TransformerLM
from ropelm.checkpoint import load_model, resolve_checkpoint
from ropelm.cli import main
from ropelm.errors import ConfigError, DataError
from ropelm.experiment import Experiment
from ropelm.generate import (
    EOT,
    generate_batch,
    generate_text,
    generate_texts,
    generate_tokens,
    read_prompts,
    sample_next,
)
from ropelm.pipeline import run_experiment
from ropelm.tokenizer import load_tokenizer


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


# -- batches, stopping, prompt files and the command (a real tiny run) ------------------------


def greedy_reference(model: TransformerLM, prompt: list[int], new_tokens: int) -> list[int]:
    """Greedy decoding written out: the full forward pass over the last block_size tokens."""
    tokens = list(prompt)
    with torch.no_grad():
        for _ in range(new_tokens):
            window = torch.tensor([tokens[-model.config.block_size :]])
            tokens.append(int(model(window)[0][0, -1].argmax()))
    return tokens[len(prompt) :]


@pytest.mark.parametrize("use_cache", [True, False])
def test_batches_of_prompts_and_samples_decode_as_one_prompt_at_a_time(tiny_model, use_cache):
    prompts = [[3, 7, 11], [5, 1, 9], [4, 4], [8] * 20]  # two of equal length; one > block_size
    new = generate_batch(
        tiny_model, prompts, 20, num_samples=2, temperature=0, use_cache=use_cache, batch_size=3
    )
    for prompt, samples in zip(prompts, new, strict=True):
        assert samples == [greedy_reference(tiny_model, prompt, 20)] * 2


def test_each_row_of_a_batch_stops_at_the_stop_token(tiny_model):
    prompts = [[3, 7, 11], [5, 1, 9]]
    first, second = (greedy_reference(tiny_model, p, 12) for p in prompts)
    stop = second[3]
    assert stop not in first[:3]  # a stop token the first row reaches later, if at all
    new = generate_batch(tiny_model, prompts, 12, temperature=0, stop_id=stop)
    cut = first.index(stop) + 1 if stop in first else len(first)
    assert new == [[first[:cut]], [second[: second.index(stop) + 1]]]


def test_seeded_samples_are_reproducible_and_differ_from_each_other(tiny_model):
    runs = [
        generate_batch(tiny_model, [[1, 2]], 15, num_samples=4, temperature=1.0, seed=5)
        for _ in range(2)
    ]
    assert runs[0] == runs[1]
    assert len({tuple(sample) for sample in runs[0][0]}) > 1


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        ({"temperature": math.nan}, "temperature must be a finite number >= 0"),
        ({"temperature": math.inf}, "temperature must be a finite number >= 0"),
        ({"temperature": 1.0, "top_p": math.nan}, "top_p must be in (0, 1]"),
    ],
)
def test_sampling_settings_that_pick_no_token_are_one_sentence(
    tiny_model, settings, fragment, assert_one_sentence
):
    with pytest.raises(ConfigError) as err:
        generate_batch(tiny_model, [[1, 2]], 3, **settings)
    assert fragment in str(err.value)
    assert_one_sentence(str(err.value))


def test_prompt_files_one_prompt_per_line(tmp_path, assert_one_sentence):
    path = tmp_path / "prompts.txt"
    path.write_bytes("\ufeffThe city\r\n\n  \nÉcole of \nlast".encode())
    assert read_prompts(path) == ["The city", "École of ", "last"]  # BOM, CRLF, blanks
    path.write_bytes(b"caf\xe9\n")  # Latin-1, not UTF-8
    with pytest.raises(DataError, match="is not UTF-8 text") as err:
        read_prompts(path)
    assert_one_sentence(str(err.value))
    path.write_text("\n \n")
    with pytest.raises(DataError, match="holds no prompt") as err:
        read_prompts(path)
    assert_one_sentence(str(err.value))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny trained run (real tokenizer with <|endoftext|>, real checkpoint)."""
    root = tmp_path_factory.mktemp("gen")
    raw = {
        "name": "gen",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300, "cache_dir": str(root / "c")},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 4, "log_every": 2},
        "eval": {"max_batches": 1},
    }
    (root / "gen.yaml").write_text(yaml.safe_dump(raw))
    run_experiment(Experiment.load(root / "gen.yaml"), out_dir=root / "run", progress=False)
    return root / "run"


def test_text_stops_at_the_end_of_text_token_unless_asked_not_to(trained_run, registry):
    directory = resolve_checkpoint(trained_run, "best")
    model = load_model(directory, registry)
    tokenizer = load_tokenizer(directory / "tokenizer.json")
    with torch.no_grad():  # make <|endoftext|> the model's every greedy choice
        model.lm_head.bias[tokenizer.token_to_id(EOT)] = 1e4
    assert "".join(generate_text(model, tokenizer, "The city", 5, temperature=0)) == ""
    text = "".join(generate_text(model, tokenizer, "The", 3, temperature=0, stop_at_eos=False))
    assert text == EOT * 3
    assert generate_texts(model, tokenizer, ["The", "A b"], 4, num_samples=2, temperature=0) == [
        ["", ""],
        ["", ""],
    ]
    long = generate_texts(model, tokenizer, ["The"], 2, temperature=0, stop_at_eos=False)
    assert long == [[EOT * 2]]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["generate", *map(str, args)])
    return result.exit_code, result.output


def test_cli_batches_a_prompt_file_as_it_streams_one_prompt_at_a_time(trained_run, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("The city\nThe river\nIn 1900, the\n")
    args = ["--prompt-file", prompts, "--num-samples", "2", "--temperature", "0"]
    code, batched = invoke(trained_run, *args, "--max-new-tokens", "6")
    assert code == 0, batched
    blocks = batched.split("=== ")[1:]
    assert [b.split(" ===")[0] for b in blocks] == [
        f"prompt {i}, sample {j}" for i in (1, 2, 3) for j in (1, 2)
    ]
    assert blocks[0].split("\n", 1)[1].startswith("The city")
    assert blocks[0].split("\n", 1)[1] == blocks[1].split("\n", 1)[1]  # greedy: same samples
    code, streamed = invoke(trained_run, *args, "--max-new-tokens", "6", "--stream")
    assert (code, streamed) == (0, batched)
    code, one = invoke(trained_run, "--prompt", "The river", "--temperature", "0",
                       "--max-new-tokens", "6")  # fmt: skip
    assert code == 0 and "===" not in one and one == blocks[2].split("\n", 1)[1]


def test_cli_bad_generation_input_is_one_line(trained_run, tmp_path):
    latin = tmp_path / "latin.txt"
    latin.write_bytes(b"caf\xe9\n")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    for args, fragment in [
        (["--temperature", "nan"], "temperature must be a finite number >= 0"),
        (["--top-p", "nan"], "top_p must be in (0, 1]"),
        (["--prompt-file", latin], "is not UTF-8 text"),
        (["--prompt-file", empty], "holds no prompt"),
        (["--prompt", "a", "--prompt-file", empty], "Give --prompt or --prompt-file, not both."),
    ]:
        code, out = invoke(trained_run, *args)
        assert code == 1 and out.startswith("Error: ") and fragment in out, (args, out)
        assert out.count("\n") == 1


def test_cli_loads_a_plugin_module_the_user_names(trained_run, tmp_path):
    plugin = tmp_path / "my_plugin.py"
    plugin.write_text(
        "import pathlib, ropelm\n"
        "pathlib.Path(__file__).with_suffix('.imported').touch()\n"
        "@ropelm.hookimpl\n"
        "def ropelm_register_attention(register):\n"
        "    register(ropelm.AttentionSpec(name='Mine', description='', reference='',\n"
        "             factory=lambda config, options: ropelm.SelfAttention(config)))\n"
    )
    code, out = invoke(trained_run, "--plugin", plugin, "--max-new-tokens", "2")
    assert code == 0, out
    assert plugin.with_suffix(".imported").exists()
