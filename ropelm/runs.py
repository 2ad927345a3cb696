"""The run directory: everything needed to reproduce and compare a run.

::

    runs/NAME/
      config.yaml       the resolved experiment (after --set overrides)
      environment.json  python, torch, ropelm and plugin versions, device
      metrics.jsonl     one JSON object per logged training step / evaluation
      summary.json      the final figures (written at the end)
      checkpoints/      see ropelm.checkpoint
      .lock             held (fcntl.flock) by the one process writing the run

One process writes a run directory at a time: :meth:`RunDir.writing` takes the
lock for the whole command (run, train, eval into the run) and a second
process gets one sentence naming the holder's PID. The operating system drops
the lock when the holder exits, however it exits, so a killed run never leaves
a stale lock behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

from ropelm.atomic import atomic_write_json, atomic_write_text, json_text, storage_error
from ropelm.config import ExperimentConfig, to_yaml
from ropelm.errors import ConfigError
from ropelm.registry import Registry

LOCK_FILE = ".lock"
HISTORY_FILE = "config_history.jsonl"

#: Settings a resumed run may change (``--resume RUN --set train.learning_rate=...``): the
#: optimisation schedule and the loop's cadence. Everything else defines the model, the
#: data or their order, and stays as the run began.
RESUMABLE = (
    "train.learning_rate", "train.min_lr_ratio", "train.warmup_steps", "train.max_grad_norm",
    "train.max_steps", "train.num_epochs", "train.eval_every", "train.save_every",
    "train.log_every", "train.device", "train.compile", "train.loggers", "train.threads",
)  # fmt: skip


class DirectoryBusyError(ConfigError):
    """Another process is writing the run (or sweep) directory."""


@contextlib.contextmanager
def exclusive_writer(directory: Path, what: str = "run") -> Iterator[None]:
    """Hold ``DIRECTORY/.lock`` (created with the directory if needed) for a block.

    Raises:
        DirectoryBusyError: another live process holds it (one sentence with its PID).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: nothing is locked
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / LOCK_FILE, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise DirectoryBusyError(
                f"Another ropelm process (PID {holder}) is writing the {what} in {directory}; "
                "wait for it to finish, or choose another --out."
            ) from None
        handle.seek(0), handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class RunDir:
    """Paths and small files of one run directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def summary_path(self) -> Path:
        return self.path / "summary.json"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @contextlib.contextmanager
    def writing(self, enabled: bool = True) -> Iterator[None]:
        """Be the one writer of this run for a block (a no-op when not ``enabled``: the
        other torchrun ranks, which write nothing).

        A directory this block created is removed again if the block fails before
        the run's first checkpoint, so rerunning after a fix starts clean.
        """
        if not enabled:
            yield
            return
        created = not self.path.exists()
        with exclusive_writer(self.path):  # a busy directory raises here, before any cleanup
            try:
                yield
            except BaseException:
                if created and not (self.checkpoints / "last.json").exists():
                    shutil.rmtree(self.path, ignore_errors=True)
                raise

    def claim(self, config: ExperimentConfig, *, resume: bool) -> None:
        """Create the directory for ``config``, or check that it holds this same experiment.

        Raises:
            ConfigError: the directory holds a different experiment, or holds this one
                and ``resume`` is false (so nothing gets overwritten by accident).
        """
        text = to_yaml(config)
        if self.config_path.is_file():
            saved = _with_defaults(yaml.safe_load(self.config_path.read_text()) or {})
            new = yaml.safe_load(text)
            changes = _differences(saved, new)
            fixed = [path for path in changes if path not in RESUMABLE]
            if fixed or (changes and not resume):
                where = min(fixed) if fixed else min(changes)  # name what blocks the resume
                difference = f"{where}: {changes[where][0]!r} there, {changes[where][1]!r} now"
                allowed = " (a resume may change only " + ", ".join(RESUMABLE) + ")"
                raise ConfigError(
                    f"{self.path} already holds a different experiment ({difference})"
                    f"{allowed if resume else ''}; choose another directory with --out, or "
                    "delete that one."
                )
            if not resume:
                raise ConfigError(
                    f"{self.path} already holds a run of this experiment; continue it with "
                    f"--resume {self.path}, or start a new one with --out DIR."
                )
            if changes:
                self._record_changes(changes, text)
            return
        if resume:
            raise ConfigError(f"Cannot resume {self.path}: it holds no run (no config.yaml).")
        if self.path.exists() and any(p.name != LOCK_FILE for p in self.path.iterdir()):
            raise ConfigError(
                f"{self.path} exists and is not a ropelm run directory; choose another --out."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, text)

    def _record_changes(self, changes: dict[str, tuple[Any, Any]], text: str) -> None:
        """Append a resume's changed settings to the history; config.yaml becomes the new one."""
        last = self.checkpoints / "last.json"
        step = json.loads(last.read_text()).get("step") if last.is_file() else None
        row = {"resumed_at_step": step, "changed": {k: list(v) for k, v in changes.items()}}
        try:
            with (self.path / HISTORY_FILE).open("a", encoding="utf-8") as f:
                f.write(json_text(row, indent=None) + "\n")
        except OSError as err:
            raise storage_error(self.path / HISTORY_FILE, err) from None
        atomic_write_text(self.config_path, text)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no config.yaml).")
        try:
            return yaml.safe_load(self.config_path.read_text()) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{self.config_path} is not valid YAML ({err}).") from None

    def append_metrics(self, row: dict[str, Any]) -> None:
        try:
            with self.metrics_path.open("a", encoding="utf-8") as f:
                f.write(json_text(row, indent=None) + "\n")
        except OSError as err:
            raise storage_error(self.metrics_path, err) from None

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        rows = []
        for line in self.metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a killed run
        return rows

    def truncate_metrics(self, after_step: int) -> None:
        """Drop rows logged after ``after_step`` (they are recomputed on resume)."""
        rows = [r for r in self.read_metrics() if r.get("step", 0) <= after_step]
        atomic_write_text(
            self.metrics_path, "".join(json_text(r, indent=None) + "\n" for r in rows)
        )

    def write_summary(self, summary: dict[str, Any]) -> None:
        atomic_write_json(self.summary_path, summary)

    def write_environment(self, registry: Registry, device: torch.device) -> None:
        atomic_write_json(self.path / "environment.json", environment(registry, device))


def environment(registry: Registry, device: torch.device) -> dict[str, Any]:
    """Versions and hardware that produced a run."""
    import ropelm

    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "ropelm": ropelm.__version__,
        "device": str(device),
        "cuda_device": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "plugins": {v.spec.name: {"source": v.source, "version": v.version} for v in registry},
    }


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with the settings it lacks at their defaults.

    A run written before a setting existed holds no value for it; it is the
    same experiment when the new setting is at its default (so it still resumes).
    """
    return _merge(saved, yaml.safe_load(to_yaml(ExperimentConfig())))


def _merge(saved: Any, defaults: Any) -> Any:
    if not (isinstance(saved, dict) and isinstance(defaults, dict)):
        return saved
    merged = {key: _merge(value, defaults.get(key)) for key, value in saved.items()}
    return {key: value for key, value in defaults.items() if key not in saved} | merged


def _differences(saved: Any, new: Any, path: str = "") -> dict[str, tuple[Any, Any]]:
    """Every dotted path whose value differs: path -> (saved, new)."""
    if isinstance(saved, dict) and isinstance(new, dict):
        found: dict[str, tuple[Any, Any]] = {}
        for key in set(saved) | set(new):
            where = f"{path}.{key}" if path else str(key)
            found |= _differences(saved.get(key), new.get(key), where)
        return found
    return {} if saved == new else {path: (saved, new)}
