import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from ropelm import CheckpointError, ModelConfig, Registry, TransformerLM
from ropelm.checkpoint import (
    checkpoint_registry,
    load_model,
    load_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
)
from ropelm.cli import main

CONFIG = ModelConfig(block_size=16, vocab_size=40, n_layer=1, n_head=2, n_embd=16, dropout=0.0)


def _save(root, model, step, val_loss, pointers=("last",)):
    return save_checkpoint(
        root,
        weights={k: v.detach().clone() for k, v in model.state_dict().items()},
        model_config=CONFIG,
        plugins=[],
        trainer_state={"step": step, "rng": torch.get_rng_state(), "note": [1, 2.5, None]},
        step=step,
        val_loss=val_loss,
        tokenizer_path=None,
        pointers=pointers,
    )


def test_saved_model_reloads_with_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = TransformerLM.from_config(CONFIG).eval()
    _save(tmp_path / "checkpoints", model, step=3, val_loss=1.5, pointers=("last", "best"))
    reloaded = load_model(tmp_path, Registry.default())
    idx = torch.randint(0, 40, (2, 10))
    torch.testing.assert_close(reloaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert not reloaded.training
    state = load_trainer_state(resolve_checkpoint(tmp_path, "last"))
    assert state["step"] == 3 and state["note"] == [1, 2.5, None]


def test_pointers_keep_best_and_last_and_old_checkpoints_are_removed(tmp_path):
    root = tmp_path / "checkpoints"
    model = TransformerLM.from_config(CONFIG)
    _save(root, model, 1, 2.0, ("last", "best"))
    _save(root, model, 2, 3.0, ("last",))
    _save(root, model, 3, 4.0, ("last",))
    assert resolve_checkpoint(tmp_path, "best").name == "step-00000001"
    assert resolve_checkpoint(tmp_path, "last").name == "step-00000003"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == [
        "step-00000001",
        "step-00000003",
    ]


def test_corrupt_weights_are_detected_with_one_sentence(tmp_path):
    model = TransformerLM.from_config(CONFIG)
    ckpt = _save(tmp_path / "checkpoints", model, 1, 1.0, ("best",))
    weights = ckpt.dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"corrupt: model\.safetensors does not match"):
        load_model(tmp_path, Registry.default())


def test_incomplete_checkpoint_and_missing_run_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="No 'best' checkpoint"):
        load_model(tmp_path, Registry.default())
    half = tmp_path / "step-00000009"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        verify_checkpoint(half)


def test_mismatched_checkpoint_names_the_mismatch(tmp_path):
    ckpt = _save(tmp_path / "checkpoints", TransformerLM.from_config(CONFIG), 1, 1.0, ("best",))
    blob = json.loads((ckpt.dir / "model_config.json").read_text())
    blob["model"]["n_embd"] = 32
    (ckpt.dir / "model_config.json").write_text(json.dumps(blob))
    with pytest.raises(CheckpointError, match="does not match the model"):
        load_model(ckpt.dir, Registry.default(), verify=False)


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    """A real write failure (file-size limit, like a full disk) mid-save loses nothing."""
    script = textwrap.dedent(
        f"""
        import resource, signal, sys, torch
        from ropelm import ModelConfig, TransformerLM, CheckpointError
        from ropelm.checkpoint import save_checkpoint
        config = ModelConfig(**{CONFIG.model_dump()!r})
        model = TransformerLM.from_config(config)
        root = __import__("pathlib").Path({str(tmp_path)!r}) / "checkpoints"
        kw = dict(weights=model.state_dict(), model_config=config, plugins=[], trainer_state={{}},
                  tokenizer_path=None, pointers=("last", "best"))
        save_checkpoint(root, step=1, val_loss=1.0, **kw)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
        try:
            save_checkpoint(root, step=2, val_loss=0.5, **kw)
        except CheckpointError as err:
            print("ERROR:", err)
            sys.exit(3)
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == 3, proc.stderr
    assert "Could not save the checkpoint of step 2" in proc.stdout
    assert "previous checkpoints are intact" in proc.stdout
    assert resolve_checkpoint(tmp_path, "last").name == "step-00000001"
    assert resolve_checkpoint(tmp_path, "best").name == "step-00000001"
    verify_checkpoint(resolve_checkpoint(tmp_path, "best"))
    leftovers = [p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    assert leftovers == []


MARKER_PLUGIN = """
import pathlib
import ropelm

pathlib.Path(__file__).with_suffix(".imported").touch()  # the code a checkpoint would run


@ropelm.hookimpl
def ropelm_register_attention(register):
    register(ropelm.AttentionSpec(
        name="Marker", description="test", reference="",
        factory=lambda config, options: ropelm.SelfAttention(config),
    ))
"""


@pytest.fixture
def plugin_checkpoint(tmp_path):
    """A checkpoint whose model_config.json names a plugin file that leaves a marker."""
    plugin = tmp_path / "marker_plugin.py"
    plugin.write_text(MARKER_PLUGIN)
    config = CONFIG.model_copy(update={"att_type": "NoPE"})
    model = TransformerLM.from_config(config)
    marker_config = config.model_copy(update={"att_type": "Marker"})  # NoPE's weights
    save_checkpoint(
        tmp_path / "checkpoints", weights=model.state_dict(), model_config=marker_config,
        plugins=[str(plugin)], trainer_state={}, step=1, val_loss=1.0, tokenizer_path=None,
        pointers=("last", "best"),
    )  # fmt: skip
    (tmp_path / "config.yaml").write_text("name: marker\n")  # a run directory
    return tmp_path, plugin.with_suffix(".imported")


def test_plugins_named_by_a_checkpoint_are_not_imported_without_trust(plugin_checkpoint):
    run_dir, marker = plugin_checkpoint
    with pytest.raises(CheckpointError, match=r"marker_plugin.py, and loading them would run"):
        checkpoint_registry(run_dir)
    for command in (["generate", run_dir], ["eval", run_dir, "--lengths", "1x"]):
        result = CliRunner().invoke(main, [str(part) for part in command])
        assert result.exit_code == 1 and "pass --trust-plugins" in result.output
    assert not marker.exists()
    registry = checkpoint_registry(run_dir, trust_plugins=True)
    assert marker.exists() and "Marker" in registry.names()


def test_a_plugin_the_user_names_serves_the_checkpoint_without_trusting_it(
    plugin_checkpoint, tmp_path
):
    run_dir, marker = plugin_checkpoint
    own = tmp_path / "my_copy.py"  # the user's own copy of the plugin, named on the command line
    own.write_text(MARKER_PLUGIN)
    registry = checkpoint_registry(run_dir, plugins=[own])
    assert "Marker" in registry.names() and not marker.exists()  # the checkpoint's file unread
    assert registry.variant("Marker").version.startswith("sha256:")  # a file plugin's version
    result = CliRunner().invoke(
        main, ["eval", str(run_dir), "--lengths", "1x", "--plugin", str(own)]
    )
    assert "--trust-plugins" not in result.output
    assert result.exit_code == 1 and "No tokenizer" in result.output  # past the plugin check


def test_a_full_disk_while_pointing_at_the_checkpoint_is_one_sentence(
    tmp_path, monkeypatch, assert_one_sentence
):
    """ENOSPC on last.json / best.json (written atomically) names the cause once, not a
    sentence nested inside another."""
    import errno

    import ropelm.atomic

    model = TransformerLM.from_config(CONFIG)
    kw = dict(weights=model.state_dict(), model_config=CONFIG, plugins=[], trainer_state={},
              tokenizer_path=None, pointers=("last",))  # fmt: skip

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ropelm.atomic.os, "replace", full)
    with pytest.raises(CheckpointError, match=r"step 1 in .* \(the disk is full\); free") as info:
        save_checkpoint(tmp_path / "checkpoints", step=1, val_loss=1.0, **kw)
    assert_one_sentence(str(info.value))
    assert "Could not write" not in str(info.value)
