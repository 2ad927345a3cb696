"""Transformers directories loaded by ``load_model``: ropelm exports (round trip) and models
built by transformers itself with the same structure; everything else is one sentence."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from tokenizers import pre_tokenizers, trainers

from ropelm import ModelConfig, Registry, RopelmError, TransformerLM
from ropelm.checkpoint import checkpoint_registry, load_model, resolve_checkpoint, save_checkpoint
from ropelm.cli import main
from ropelm.hf_export import export_hf
from ropelm.hf_import import is_hf_dir
from ropelm.tokenizer import SPECIAL_TOKENS, new_tokenizer

transformers = pytest.importorskip("transformers")

VOCAB = 300


@pytest.fixture(scope="module")
def tokenizer_file(tmp_path_factory) -> Path:
    tokenizer = new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tokenizer.train_from_iterator(["Ünïcode text, 東京, 🚀 and plain words."] * 5, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def random_run(root: Path, tokenizer: Path, **model) -> tuple[Path, TransformerLM]:
    """A run directory holding a model with random weights and biases (zero LM-head bias)."""
    config = ModelConfig(
        **{"block_size": 16, "vocab_size": VOCAB, "n_layer": 2, "n_head": 2, "n_embd": 16,
           "dropout": 0.0} | model
    )  # fmt: skip
    torch.manual_seed(0)
    net = TransformerLM.from_config(config).eval()
    with torch.no_grad():
        for param in net.parameters():
            param.normal_(0.0, 0.3)
        if config.bias:
            net.lm_head.bias.zero_()
    save_checkpoint(
        root / "checkpoints", weights=dict(net.state_dict()), model_config=config, plugins=[],
        trainer_state={}, step=3, val_loss=2.0, tokenizer_path=tokenizer, pointers=("best",),
    )  # fmt: skip
    return root, net


ROUND_TRIPS = {
    "rope-sm-complex-ntk-no-bias": {"att_type": "RoPE-SM-complex", "bias": False,
                                    "att_options": {"scaling": "ntk", "scale_factor": 2.0}},
    "rope-sm-yarn": {"att_type": "RoPE-SM",
                     "att_options": {"scaling": "yarn", "scale_factor": 2.0}},
    "learned-ape-no-bias": {"att_type": "Learned-APE", "bias": False},
    "learned-ape": {"att_type": "Learned-APE"},
}  # fmt: skip


@pytest.mark.parametrize("case", ROUND_TRIPS)
def test_export_import_export_gives_identical_tensors(tmp_path, tokenizer_file, case):
    run, net = random_run(tmp_path / "run", tokenizer_file, **ROUND_TRIPS[case])
    export_hf(run, tmp_path / "first")
    assert is_hf_dir(tmp_path / "first") and not is_hf_dir(run)
    assert resolve_checkpoint(tmp_path / "first") == tmp_path / "first"
    back = load_model(tmp_path / "first", checkpoint_registry(tmp_path / "first"))
    assert back.config == net.config  # RoPE-SM-complex, ntk and bias: false come back as they were
    mine = net.state_dict()
    assert all(torch.equal(tensor, mine[name]) for name, tensor in back.state_dict().items())

    export_hf(tmp_path / "first", tmp_path / "second")  # from the transformers directory
    first = load_file(str(tmp_path / "first" / "model.safetensors"))
    second = load_file(str(tmp_path / "second" / "model.safetensors"))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    configs = [json.loads((tmp_path / d / "config.json").read_text()) for d in ("first", "second")]
    assert configs[0] == configs[1]


def randomized(model: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(4)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.3)
    return model.eval()


def test_models_built_by_transformers_import_with_the_same_logits(tmp_path):
    """Not exported by ropelm: transformers 5's own names (``lm_head``), a tied GPT-2 head,
    GPT-NeoX with YaRN written as transformers writes it."""
    neox = transformers.GPTNeoXConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=64, hidden_act="gelu", use_parallel_residual=False, rotary_pct=1.0,
        max_position_embeddings=16,
        rope_parameters={"rope_type": "yarn", "factor": 2.0, "rope_theta": 1000.0,
                         "original_max_position_embeddings": 16, "partial_rotary_factor": 1.0},
    )  # fmt: skip
    gpt2 = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=16,
        activation_function="gelu",
    )  # fmt: skip
    torch.manual_seed(5)
    idx = torch.randint(0, VOCAB, (2, 16))
    for name, model in {
        "neox": transformers.GPTNeoXForCausalLM(neox),
        "gpt2": transformers.GPT2LMHeadModel(gpt2),
    }.items():
        randomized(model).save_pretrained(tmp_path / name)
        ours = load_model(tmp_path / name, Registry.default())
        assert ours.config.att_type == ("RoPE-SM" if name == "neox" else "Learned-APE")
        with torch.no_grad():
            torch.testing.assert_close(ours(idx)[0], model(idx).logits, atol=1e-4, rtol=0)


def test_generate_runs_on_an_exported_directory(tmp_path, tokenizer_file):
    run, _ = random_run(tmp_path / "run", tokenizer_file, att_type="RoPE-SM")
    export_hf(run, tmp_path / "hf")
    result = CliRunner().invoke(
        main, ["generate", str(tmp_path / "hf"), "--prompt", "plain", "--temperature", "0",
               "--max-new-tokens", "5"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert result.output.startswith("plain")


def write_config(directory: Path, **config) -> Path:
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps(config))
    return directory


NEOX_OK = {
    "architectures": ["GPTNeoXForCausalLM"], "vocab_size": VOCAB, "hidden_size": 16,
    "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64,
    "hidden_act": "gelu", "use_parallel_residual": False, "rotary_pct": 1.0,
    "max_position_embeddings": 16,
}  # fmt: skip


@pytest.mark.parametrize(
    ("config", "says"),
    [
        ({"architectures": ["LlamaForCausalLM"]}, "holds a LlamaForCausalLM model"),
        (NEOX_OK | {"use_parallel_residual": True}, "a sequential residual"),
        (NEOX_OK | {"rotary_pct": 0.25}, "full rotary"),
        (NEOX_OK | {"hidden_act": "gelu_new"}, "the exact GELU"),
        (NEOX_OK | {"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, "'longrope'"),
        ({"architectures": ["GPT2LMHeadModel"], "n_embd": 16, "n_layer": 1, "n_head": 2},
         "activation_function: \"gelu_new\""),
        (NEOX_OK, "never unpickles pytorch_model.bin"),
    ],
    ids=["llama", "parallel", "partial-rotary", "tanh-gelu", "longrope", "gpt2-gelu-new",
         "pickle"],
)  # fmt: skip
def test_unsupported_directories_are_one_sentence(tmp_path, config, says, assert_one_sentence):
    directory = write_config(tmp_path / "model", **config)
    (directory / "pytorch_model.bin").write_bytes(b"never read")
    with pytest.raises(RopelmError) as err:
        load_model(directory, Registry.default())
    assert says in str(err.value)
    assert_one_sentence(str(err.value))


def test_a_bias_ropelm_cannot_hold_is_refused(tmp_path, tokenizer_file, assert_one_sentence):
    run, _ = random_run(tmp_path / "run", tokenizer_file, att_type="RoPE-SM", bias=False)
    export_hf(run, tmp_path / "hf")
    weights = load_file(str(tmp_path / "hf" / "model.safetensors"))
    weights["gpt_neox.layers.0.mlp.dense_h_to_4h.bias"] += 0.1  # trained on in transformers
    save_file(weights, str(tmp_path / "hf" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RopelmError, match=r"dense_h_to_4h\.bias is not zero") as err:
        load_model(tmp_path / "hf", Registry.default())
    assert_one_sentence(str(err.value))
