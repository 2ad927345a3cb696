"""``ropelm-exp export --format hf``: transformers loads the export and computes the same model.

transformers is the independent reference here: its GPT-NeoX and GPT-2 code, not ropelm's,
computes the logits compared with ropelm's own (float32, within 1e-4).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file
from tokenizers import Tokenizer, pre_tokenizers, trainers

from ropelm import ModelConfig, Registry, TransformerLM
from ropelm.checkpoint import load_model, save_checkpoint
from ropelm.cli import main
from ropelm.errors import CheckpointError, ConfigError
from ropelm.experiment import Experiment
from ropelm.generate import generate_tokens
from ropelm.hf_export import export_hf
from ropelm.pipeline import run_experiment
from ropelm.tokenizer import EOT, PAD, SPECIAL_TOKENS, load_tokenizer, new_tokenizer

transformers = pytest.importorskip("transformers")

MULTILINGUAL = [
    "The quick brown fox jumps over the lazy dog.",
    "Ça coûte 12,50 € — déjà vu, naïve façade, Ångström, Straße, ñandú.",
    "東京は日本の首都です。北京欢迎你！서울특별시",
    "Emoji: 🚀✨👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "Lines\nwith\r\ntabs\tand   spaces  \n\n<|endoftext|>next document",
    "Русский текст, ελληνικά, العربية, हिन्दी",
]


def small_tokenizer(path: Path) -> Path:
    """A byte-level BPE tokenizer with ropelm's recipe, trained on a few sentences."""
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(MULTILINGUAL * 3, trainer)
    tokenizer.save(str(path))
    return path


def random_run(root: Path, tokenizer: Path, head_bias: float = 0.0, **model) -> Path:
    """A run directory whose best checkpoint holds a model with every weight and bias random
    (normal, std 0.3, so a wrong layout cannot hide), except the LM-head bias: ``head_bias``
    (transformers' heads have none)."""
    config = ModelConfig(
        **{"block_size": 24, "vocab_size": Tokenizer.from_file(str(tokenizer)).get_vocab_size(),
           "n_layer": 2, "n_head": 2, "n_embd": 16, "dropout": 0.0} | model
    )  # fmt: skip
    torch.manual_seed(0)
    net = TransformerLM.from_config(config)
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.3)
        if config.bias:
            net.lm_head.bias.fill_(head_bias)
    root.mkdir(parents=True)
    save_checkpoint(
        root / "checkpoints", weights=dict(net.state_dict()), model_config=config, plugins=[],
        trainer_state={"step": 7}, step=7, val_loss=3.0, tokenizer_path=tokenizer,
        pointers=("last", "best"),
    )  # fmt: skip
    return root


def hf_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        directory, output_loading_info=True
    )
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert model.dtype == torch.float32
    with torch.no_grad():
        return model(idx).logits  # (B, T, V)


def ropelm_logits(run: Path, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return load_model(run, Registry.default())(idx)[0]


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    return small_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json")


CASES = {
    "rope-sm-bias": ({"att_type": "RoPE-SM", "bias": True}, "GPTNeoXForCausalLM"),
    "rope-sm-complex-no-bias": ({"att_type": "RoPE-SM-complex", "bias": False},
                                "GPTNeoXForCausalLM"),
    "learned-ape-bias": ({"att_type": "Learned-APE", "bias": True}, "GPT2LMHeadModel"),
    "learned-ape-no-bias": ({"att_type": "Learned-APE", "bias": False}, "GPT2LMHeadModel"),
}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_transformers_computes_the_same_logits_and_greedy_tokens(tmp_path, tokenizer_file, case):
    model, architecture = CASES[case]
    run = random_run(tmp_path / "run", tokenizer_file, **model)
    export_hf(run, tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == [architecture] and config["tie_word_embeddings"] is False
    torch.manual_seed(1)
    idx = torch.randint(0, 300, (3, 24))
    ours, theirs = ropelm_logits(run, idx), hf_logits(tmp_path / "hf", idx)
    assert ours.abs().max() > 1.0  # the logits are far from uniform: a wrong layout would show
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)

    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ropelm_model = load_model(run, Registry.default())
    for prompt in ([5, 17, 99], [0, 260, 3, 3, 42]):
        mine = list(generate_tokens(ropelm_model, prompt, 12, temperature=0, stop_id=0))
        out = hf_model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        assert out[0, len(prompt) :].tolist() == mine


@pytest.mark.parametrize(
    "options",
    [
        {"scaling": "linear", "scale_factor": 2.0},
        {"scaling": "ntk", "scale_factor": 4.0},
        {"scaling": "dynamic", "scale_factor": 2.0},  # past L = 24 the dynamic base moves
        {"scaling": "yarn", "scale_factor": 4.0, "beta_fast": 16.0, "beta_slow": 2.0},
        {"scaling": "llama3", "scale_factor": 8.0, "original_max_position_embeddings": 8},
        {"scaling": "abf", "new_base": 500000.0},
    ],
    ids=lambda options: options["scaling"],
)
def test_rope_scaling_maps_to_the_transformers_rope_type(tmp_path, tokenizer_file, options):
    run = random_run(
        tmp_path / "run", tokenizer_file, att_type="RoPE-SM", rope_theta=500.0,
        att_options=options,
    )  # fmt: skip
    export_hf(run, tmp_path / "hf")
    torch.manual_seed(2)
    idx = torch.randint(0, 300, (2, 48))  # twice the block size
    torch.testing.assert_close(hf_logits(tmp_path / "hf", idx), ropelm_logits(run, idx),
                               atol=1e-4, rtol=0)  # fmt: skip


def test_tokenizers_give_identical_ids_and_declare_their_special_tokens(tmp_path, tokenizer_file):
    run = random_run(tmp_path / "run", tokenizer_file, att_type="RoPE-SM")
    export_hf(run, tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    ours = load_tokenizer(tokenizer_file)
    for text in [*MULTILINGUAL, "".join(MULTILINGUAL)]:
        ids = ours.encode(text).ids
        assert theirs(text)["input_ids"] == ids
        assert theirs.decode(ids) == text
    assert (theirs.eos_token, theirs.pad_token) == (EOT, PAD)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (0, 1)
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation == {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}


# -- a trained run, through the command line ---------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("hf-run")
    raw = {
        "name": "hftiny",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32,
                  "att_type": "RoPE-SM", "bias": False},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300, "cache_dir": str(root / "cache")},
        "train": {"max_steps": 4, "batch_size": 4, "eval_every": 2, "log_every": 2},
        "eval": {"max_batches": 3},
    }  # fmt: skip
    (root / "hftiny.yaml").write_text(yaml.safe_dump(raw))
    run_experiment(Experiment.load(root / "hftiny.yaml"), out_dir=root / "run", progress=False)
    return root / "run"


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_trained_run_exports_from_the_command_line_with_a_model_card(tmp_path, trained_run):
    code, out = invoke("export", trained_run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, out
    assert "as GPTNeoXForCausalLM to" in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no staging directory left
    torch.manual_seed(3)
    idx = torch.randint(0, 512, (2, 32))
    torch.testing.assert_close(hf_logits(tmp_path / "hf", idx), ropelm_logits(trained_run, idx),
                               atol=1e-4, rtol=0)  # fmt: skip
    summary = json.loads((trained_run / "summary.json").read_text())
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "| tokens seen | 512 |" in card and "wiki-sample" in card
    assert f"| validation perplexity | {math.exp(summary['best_val_loss']):.2f} |" in card
    assert "att_type: RoPE-SM" in card and "library_name: transformers" in card
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    assert all(t.is_contiguous() and t.dtype == torch.float32 for t in weights.values())


def test_refusals_are_one_sentence_and_write_nothing(tmp_path, tokenizer_file,
                                                     assert_one_sentence):  # fmt: skip
    out = tmp_path / "hf"
    for name, model in {
        "alibi": {"att_type": "ALiBi"},
        "gqa": {"att_type": "RoPE-SM", "att_options": {"n_kv_head": 1}},
        "softcap": {"att_type": "Learned-APE", "att_options": {"softcap": 30.0}},
    }.items():
        run = random_run(tmp_path / name, tokenizer_file, **model)
        with pytest.raises(ConfigError) as err:
            export_hf(run, out)
        assert_one_sentence(str(err.value))
        assert "RoPE-SM and RoPE-SM-complex (as GPTNeoXForCausalLM)" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alibi", "gqa", "softcap"]

    biased = random_run(tmp_path / "biased", tokenizer_file, head_bias=0.5, att_type="RoPE-SM")
    code, text = invoke("export", biased, "--out", out)
    assert code == 1 and "model.bias: true" in text and not out.exists()

    still_training = tmp_path / "still-training"
    (still_training / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="No 'best' checkpoint") as err:
        export_hf(still_training, out)
    assert_one_sentence(str(err.value))
    assert not out.exists()


def test_existing_out_needs_force_and_force_replaces_only_an_export(tmp_path, tokenizer_file):
    run = random_run(tmp_path / "run", tokenizer_file, att_type="RoPE-SM")
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, text = invoke("export", run, "--out", out)
    assert code == 1 and "already exists; pass --force" in text
    code, text = invoke("export", run, "--out", out, "--force")
    assert code == 1 and "not a Hugging Face model directory" in text
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # untouched

    (out / "keep.txt").unlink()
    export_hf(run, out, force=True)  # an empty directory may be replaced
    (out / "stale.txt").write_text("from an older export")
    code, text = invoke("export", run, "--out", out, "--force")
    assert code == 0, text
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]
    code, text = invoke("export", run, "--out", run / "checkpoints", "--force")
    assert code == 1 and "not a Hugging Face model directory" in text


def test_missing_transformers_is_one_sentence_naming_the_extra(
    tmp_path, tokenizer_file, monkeypatch, assert_one_sentence
):
    run = random_run(tmp_path / "run", tokenizer_file, att_type="RoPE-SM")
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ConfigError, match=r"ropelm\[hf\]") as err:
        export_hf(run, tmp_path / "hf")
    assert_one_sentence(str(err.value))
    assert not (tmp_path / "hf").exists()


def test_eval_scores_a_transformers_directory_like_the_run_it_came_from(tmp_path, trained_run):
    """`eval HF_DIR --data EXP.yaml`: the experiment's validation split, tokenized with the
    exported tokenizer, gives the run's own perplexities (the same model and tokens)."""
    code, out = invoke("export", trained_run, "--format", "hf", "--out", tmp_path / "hf")
    assert code == 0, out
    experiment = trained_run.parent / "hftiny.yaml"
    args = ["--lengths", "1x,2x", "--max-windows", "6"]
    assert invoke("eval", trained_run, *args, "--out", tmp_path / "run.json")[0] == 0
    code, out = invoke("eval", tmp_path / "hf", *args, "--data", experiment)
    assert code == 0, out
    ours = json.loads((tmp_path / "run.json").read_text())["results"]
    theirs = json.loads((tmp_path / "hf" / "eval.json").read_text())["results"]
    for length in ("1x", "2x"):
        for method in ("nonoverlapping", "strided"):
            assert theirs[length][method]["tokens"] == ours[length][method]["tokens"]
            assert theirs[length][method]["ppl"] == pytest.approx(
                ours[length][method]["ppl"], rel=1e-5
            )
    code, out = invoke("eval", tmp_path / "hf", *args)
    assert code == 1 and "name the data to score with --data EXPERIMENT.yaml" in out
