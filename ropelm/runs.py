"""The run directory: everything needed to reproduce and compare a run.

::

    runs/NAME/
      config.yaml       the resolved experiment (after --set overrides)
      environment.json  python, torch, ropelm and plugin versions, device
      metrics.jsonl     one JSON object per logged training step / evaluation
      summary.json      the final figures (written at the end)
      checkpoints/      see ropelm.checkpoint
"""

from __future__ import annotations

import json
import platform
import sys
from pathlib import Path
from typing import Any

import torch
import yaml

from ropelm.atomic import atomic_write_json, atomic_write_text
from ropelm.config import ExperimentConfig, to_yaml
from ropelm.errors import ConfigError
from ropelm.registry import Registry


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

    def claim(self, config: ExperimentConfig, *, resume: bool) -> None:
        """Create the directory for ``config``, or check that it holds this same experiment.

        Raises:
            ConfigError: the directory holds a different experiment, or holds this one
                and ``resume`` is false (so nothing gets overwritten by accident).
        """
        text = to_yaml(config)
        if self.config_path.is_file():
            saved = yaml.safe_load(self.config_path.read_text()) or {}
            difference = _first_difference(saved, yaml.safe_load(text))
            if difference:
                raise ConfigError(
                    f"{self.path} already holds a different experiment ({difference}); "
                    "choose another directory with --out, or delete that one."
                )
            if not resume:
                raise ConfigError(
                    f"{self.path} already holds a run of this experiment; continue it with "
                    f"--resume {self.path}, or start a new one with --out DIR."
                )
            return
        if resume:
            raise ConfigError(f"Cannot resume {self.path}: it holds no run (no config.yaml).")
        if self.path.exists() and any(self.path.iterdir()):
            raise ConfigError(
                f"{self.path} exists and is not a ropelm run directory; choose another --out."
            )
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.config_path, text)

    def read_config(self) -> dict[str, Any]:
        if not self.config_path.is_file():
            raise ConfigError(f"{self.path} is not a run directory (no config.yaml).")
        return yaml.safe_load(self.config_path.read_text()) or {}

    def append_metrics(self, row: dict[str, Any]) -> None:
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

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
        atomic_write_text(self.metrics_path, "".join(json.dumps(r) + "\n" for r in rows))

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


def _first_difference(saved: Any, new: Any, path: str = "") -> str:
    if isinstance(saved, dict) and isinstance(new, dict):
        for key in sorted(set(saved) | set(new), key=str):
            where = f"{path}.{key}" if path else str(key)
            if key not in saved or key not in new:
                return f"{where} is only in one of them"
            found = _first_difference(saved[key], new[key], where)
            if found:
                return found
        return ""
    return "" if saved == new else f"{path}: {saved!r} there, {new!r} now"
