"""Checkpoints: safetensors weights, config, tokenizer and trainer state, written atomically.

Layout inside a run directory::

    checkpoints/
      step-00000200/           one complete checkpoint
        model.safetensors      weights (never pickled)
        model_config.json      ModelConfig + plugin modules needed to rebuild the model
        tokenizer.json         the tokenizer the model was trained with
        trainer.pt             optimizer, scaler, RNG states, data position (weights_only)
        sharded/               FSDP runs: model and optimizer shards (torch.distributed.checkpoint)
        checkpoint.json        step, validation loss, sha256 of every file; written last
      last.json                pointer: {"dir": "step-00000200", ...}
      best.json                pointer to the lowest validation loss so far

A checkpoint directory is assembled under a temporary name (where, under FSDP,
every process first writes its shards) and renamed into place; the pointers are
replaced atomically afterwards; unreferenced directories are removed last. A
crash at any moment leaves the previous pointers and the directories they name
intact.
"""

from __future__ import annotations

import errno
import json
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ropelm.atomic import (
    atomic_write_json,
    file_sha256,
    fsync_dir,
    fsync_file,
    json_text,
    storage_reason,
)
from ropelm.config import ModelConfig
from ropelm.errors import CheckpointError, RopelmError
from ropelm.hf_import import is_hf_dir, read_hf_model
from ropelm.model import TransformerLM
from ropelm.registry import Registry

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MODEL_CONFIG = "model_config.json"
TOKENIZER = "tokenizer.json"
TRAINER_STATE = "trainer.pt"
MANIFEST = "checkpoint.json"


@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint directory and its manifest."""

    dir: Path
    manifest: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.manifest["step"])

    @property
    def val_loss(self) -> float | None:
        return self.manifest.get("val_loss")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def checkpoint_complete(checkpoints_dir: Path, step: int) -> bool:
    """Whether the checkpoint of ``step`` is already written (only pointers then change)."""
    return (checkpoints_dir / checkpoint_name(step) / MANIFEST).is_file()


def staging_dir(checkpoints_dir: Path, step: int) -> Path:
    """Where the checkpoint of ``step`` is assembled before it is renamed into place."""
    return checkpoints_dir / f".tmp-{checkpoint_name(step)}"


def start_staging(checkpoints_dir: Path, step: int) -> Path:
    """An empty :func:`staging_dir` (what a killed save left there is removed)."""
    tmp = staging_dir(checkpoints_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save_checkpoint(
    checkpoints_dir: Path,
    *,
    weights: dict[str, torch.Tensor],
    model_config: ModelConfig,
    plugins: list[str],
    trainer_state: dict[str, Any],
    step: int,
    val_loss: float | None,
    tokenizer_path: Path | None,
    pointers: tuple[str, ...] = ("last",),
    staged: bool = False,
) -> Checkpoint:
    """Write a checkpoint for ``step`` and point ``pointers`` (``last``/``best``) at it.

    ``weights`` is the whole model's state dict. With ``staged``, other processes
    have already written files into :func:`staging_dir` (FSDP shards); they join
    the checkpoint and its manifest.
    """
    checkpoints_dir.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    final = checkpoints_dir / name
    try:
        if not (final / MANIFEST).is_file():
            tmp = (
                staging_dir(checkpoints_dir, step)
                if staged
                else start_staging(checkpoints_dir, step)
            )
            _write_checkpoint_dir(
                tmp, final, weights, model_config, plugins, trainer_state, step, val_loss,
                tokenizer_path,
            )  # fmt: skip
        manifest = _read_manifest(final)
        for pointer in pointers:
            atomic_write_json(
                checkpoints_dir / f"{pointer}.json",
                {"dir": name, "step": step, "val_loss": val_loss},
            )
    except (OSError, SafetensorError) as err:
        raise CheckpointError(
            f"Could not save the checkpoint of step {step} in {checkpoints_dir} "
            f"({storage_reason(err)}); "
            "free some space and resume with --resume, the previous checkpoints are intact."
        ) from err
    _remove_unreferenced(checkpoints_dir)
    return Checkpoint(final, manifest)


def _write_checkpoint_dir(
    tmp: Path,
    final: Path,
    weights: dict[str, torch.Tensor],
    model_config: ModelConfig,
    plugins: list[str],
    trainer_state: dict[str, Any],
    step: int,
    val_loss: float | None,
    tokenizer_path: Path | None,
) -> None:
    try:
        save_file(weights, str(tmp / WEIGHTS), metadata={"format": str(FORMAT_VERSION)})
        config_blob = {"model": model_config.model_dump(mode="json"), "plugins": list(plugins)}
        (tmp / MODEL_CONFIG).write_text(json_text(config_blob))
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / TOKENIZER)
        try:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        except RuntimeError as err:  # how torch reports a failed write (full disk, ulimit -f)
            raise OSError(errno.EIO, f"writing {TRAINER_STATE} failed") from err
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        manifest = {
            "format": FORMAT_VERSION,
            "step": step,
            "val_loss": val_loss,
            "sha256": {name: file_sha256(tmp / name) for name in files},
        }
        for name in files:
            fsync_file(tmp / name)
        atomic_write_json(tmp / MANIFEST, manifest)
        for directory in {tmp, *((tmp / name).parent for name in files)}:
            fsync_dir(directory)
        tmp.rename(final)
        fsync_dir(final.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_checkpoint(path: Path, which: str = "best") -> Path:
    """A run directory, its ``checkpoints/`` folder or a checkpoint directory -> checkpoint dir.

    A transformers model directory (:mod:`ropelm.hf_import`) is its own checkpoint.
    """
    path = Path(path)
    if (path / MANIFEST).is_file() or is_hf_dir(path):
        return path
    for checkpoints_dir in (path / "checkpoints", path):
        pointer = checkpoints_dir / f"{which}.json"
        if pointer.is_file():
            try:
                target = json.loads(pointer.read_text())["dir"]
            except (ValueError, KeyError, TypeError):
                raise CheckpointError(
                    f"Checkpoint pointer {pointer} is corrupt; point to a checkpoint directory "
                    "(checkpoints/step-*) instead."
                ) from None
            return checkpoints_dir / target
    raise CheckpointError(
        f"No '{which}' checkpoint under {path}; give a run directory that has finished at "
        "least one evaluation, or a checkpoint directory (checkpoints/step-*)."
    )


def verify_checkpoint(directory: Path) -> Checkpoint:
    """Check that every file of the checkpoint is present and matches its sha256."""
    manifest = _read_manifest(directory)
    for name, digest in manifest.get("sha256", {}).items():
        file = directory / name
        if not file.is_file():
            raise CheckpointError(f"Checkpoint {directory} is incomplete: {name} is missing.")
        if file_sha256(file) != digest:
            raise CheckpointError(
                f"Checkpoint {directory} is corrupt: {name} does not match its checksum; "
                "use another checkpoint (e.g. --which last) or retrain."
            )
    return Checkpoint(directory, manifest)


def read_model_config(directory: Path) -> tuple[ModelConfig, list[str]]:
    try:
        blob = json.loads((directory / MODEL_CONFIG).read_text())
        return ModelConfig(**blob["model"]), list(blob.get("plugins", []))
    except RopelmError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(
            f"Checkpoint {directory} has no readable {MODEL_CONFIG} ({err})."
        ) from None


def load_weights(
    model: torch.nn.Module,
    directory: Path,
    device: torch.device | str,
    state: dict[str, torch.Tensor] | None = None,
) -> None:
    """Load a checkpoint's ``model.safetensors`` (or a transformers directory's weights, or
    ``state`` read from it already) into ``model``; a shape or key mismatch is one sentence."""
    if state is None and is_hf_dir(directory):
        state = read_hf_model(directory)[1]
    if state is None:
        try:
            state = load_file(str(directory / WEIGHTS), device=str(device))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(
                f"Cannot read weights from {directory / WEIGHTS} ({err})."
            ) from None
    result = _load_state(model, {k: v.to(device) for k, v in state.items()})
    if result:
        raise CheckpointError(f"Checkpoint {directory} does not match the model: {result}.")


def _load_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> str:
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        return f"missing {missing[:3]}, unexpected {unexpected[:3]}"
    for key, tensor in state.items():
        if own[key].shape != tensor.shape:
            expected = tuple(own[key].shape)
            return f"{key} has shape {tuple(tensor.shape)}, the model expects {expected}"
    model.load_state_dict(state)
    return ""


def load_trainer_state(directory: Path) -> dict[str, Any]:
    """The trainer state, loaded with ``weights_only=True`` (no arbitrary unpickling)."""
    try:
        return torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"Cannot read trainer state {directory / TRAINER_STATE} ({type(err).__name__}); "
            "the checkpoint is damaged, resume from another one or retrain."
        ) from None


def checkpoint_registry(
    path: str | Path,
    which: str = "best",
    *,
    trust_plugins: bool = False,
    plugins: Iterable[str | Path] = (),
) -> Registry:
    """The registry a checkpoint's model needs: built-ins, installed entry points and the
    modules the user names (``plugins``, e.g. ``--plugin my_attention.py``), plus the
    plugin modules the checkpoint's ``model_config.json`` names -- only with ``trust_plugins``.

    Those modules (files or dotted names the training experiment listed) are code
    that importing would run; a run directory from elsewhere must not run code just
    by being evaluated or sampled from, so they are imported only when trusted (as
    transformers' ``trust_remote_code``), and are not needed when the variant is
    registered already (built in, installed, or from ``plugins``).

    Raises:
        CheckpointError: the variant is registered by none of those and the checkpoint's
            own modules are not trusted.
    """
    directory = resolve_checkpoint(Path(path), which)
    if is_hf_dir(directory):  # GPT-NeoX or GPT-2: built-in variants, no plugin modules
        return Registry.default(plugins)
    model_config, named = read_model_config(directory)
    if trust_plugins:
        return Registry.default([*plugins, *named])
    registry = Registry.default(plugins)
    if named and model_config.att_type not in registry:
        raise CheckpointError(
            f"Checkpoint {directory} needs attention '{model_config.att_type}' from the plugin "
            f"module(s) {', '.join(named)}, and loading them would run their code; name the "
            "module with --plugin FILE, or pass --trust-plugins if you trust this run."
        )
    return registry


def load_model(
    path: str | Path,
    registry: Registry,
    *,
    which: str = "best",
    device: torch.device | str = "cpu",
    verify: bool = True,
) -> TransformerLM:
    """Rebuild a trained model from a run directory or checkpoint directory, in eval mode.

    ``registry`` must hold the model's attention variant; for a run trained with
    plugin modules, :func:`checkpoint_registry` builds the registry it needs::

        model = load_model("runs/quickstart", Registry.default())

    ``path`` may also be a transformers model directory of the architectures ropelm
    exports (GPT-NeoX, GPT-2; see :mod:`ropelm.hf_import`).
    """
    directory = resolve_checkpoint(Path(path), which)
    state = None
    if is_hf_dir(directory):
        model_config, state = read_hf_model(directory)
    else:
        if verify:
            verify_checkpoint(directory)
        model_config, _ = read_model_config(directory)
    attention = registry.resolve(model_config)
    with torch.device(device):  # built where it runs: the weights cross to the device once
        model = TransformerLM(model_config, attention)
    load_weights(model, directory, device, state)
    return model.eval()


def _read_manifest(directory: Path) -> dict[str, Any]:
    file = directory / MANIFEST
    if not file.is_file():
        raise CheckpointError(
            f"{directory} is not a complete checkpoint ({MANIFEST} is missing); "
            "it was probably interrupted while saving, use another checkpoint."
        )
    try:
        manifest = json.loads(file.read_text())
    except ValueError:
        raise CheckpointError(f"Checkpoint manifest {file} is corrupt.") from None
    if manifest.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"Checkpoint {directory} has format {manifest.get('format')}, this ropelm reads "
            f"format {FORMAT_VERSION}; use the ropelm version that wrote it."
        )
    return manifest


def _remove_unreferenced(checkpoints_dir: Path) -> None:
    keep = set()
    for pointer in checkpoints_dir.glob("*.json"):
        try:
            keep.add(json.loads(pointer.read_text())["dir"])
        except (ValueError, KeyError, TypeError, OSError):
            return  # never delete anything while a pointer is unreadable
    for child in checkpoints_dir.iterdir():
        if child.is_dir() and child.name not in keep:
            shutil.rmtree(child, ignore_errors=True)
