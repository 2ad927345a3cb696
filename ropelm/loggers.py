"""Metric loggers: the training scalars of ``metrics.jsonl``, also in TensorBoard, W&B or MLflow.

``train.loggers`` lists where a run's scalars go. ``jsonl`` (the run directory's
``metrics.jsonl``) is always written: ``compare``, reports and ``--resume`` read
it. The others are optional extras, each imported only when a run asks for it::

    pip install "ropelm[tensorboard]"   # events in RUN_DIR/tensorboard/
    pip install "ropelm[wandb]"         # a Weights & Biases run (WANDB_* variables apply)
    pip install "ropelm[mlflow]"        # an MLflow run (MLFLOW_* variables apply)

Every backend gets the same scalars under the same names (:func:`scalar_name`:
``train/loss``, ``train/lr``, ``train/tokens_per_s``, ``train/grad_norm``,
``val/loss``, ``val/ppl``, ...) at the optimizer step they belong to, and the
run's resolved configuration once. Only the main process logs (the engine opens
no logger on other torchrun ranks).

Resume: TensorBoard purges the events after the checkpoint's step (``purge_step``),
so a resumed run shows one curve; W&B and MLflow continue the same run (its id is
kept in ``RUN_DIR/loggers.json``). W&B drops the steps it has already seen; MLflow
appends them again (under an exact resume their losses are the same values).
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

from ropelm.atomic import atomic_write_json
from ropelm.errors import ConfigError, RopelmError

#: logger name -> the module it imports (the extra of the same name installs it)
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}
IDS_FILE = "loggers.json"  # the W&B / MLflow run ids of a run directory, for resume
DEFAULT_PROJECT = "ropelm"  # W&B project and MLflow experiment when the environment names none


class MetricLogger(Protocol):
    """What the engine calls on every logger of a run."""

    def log_config(self, config: Mapping[str, Any]) -> None:
        """Record the run's resolved configuration (a nested mapping of plain values)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Record scalars (``metrics.jsonl`` keys, without ``step``) of optimizer step ``step``."""

    def close(self, failed: bool = False) -> None:
        """Flush and release the backend; ``failed``: the run stopped with an error or a signal."""


def missing_package(name: str) -> str | None:
    """One sentence when logger ``name`` cannot be used here (its package is missing)."""
    package = PACKAGES.get(name)
    if package is None or importlib.util.find_spec(package) is not None:
        return None
    return (
        f"train.loggers: '{name}' needs the {package} package, which is not installed; "
        f'install it with pip install "ropelm[{name}]" or remove {name} from train.loggers.'
    )


def check_installed(names: Iterable[str]) -> None:
    """Raise the one-sentence :class:`ConfigError` of the first logger whose package is missing."""
    for name in names:
        problem = missing_package(name)
        if problem:
            raise ConfigError(problem)


def scalar_name(key: str) -> str:
    """The name a ``metrics.jsonl`` key gets in every backend: ``train_loss`` -> ``train/loss``,
    ``val_ppl`` -> ``val/ppl``, ``lr`` -> ``train/lr`` (grouped in the dashboards)."""
    for prefix in ("train_", "val_"):
        if key.startswith(prefix):
            return f"{prefix[:-1]}/{key[len(prefix) :]}"
    return f"train/{key}"


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"train": {"lr": 1}}`` -> ``{"train.lr": 1}``; lists and None become text (hparams and
    MLflow params hold scalars only)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat |= flat_config(value, f"{name}.")
        elif isinstance(value, bool | int | float | str):
            flat[name] = value
        else:
            flat[name] = json.dumps(value)
    return flat


class MetricLoggers:
    """The loggers of one run, called together; a no-op when empty (``[jsonl]``, other ranks)."""

    def __init__(self, loggers: Iterable[MetricLogger] = ()) -> None:
        self.loggers = list(loggers)

    def log_config(self, config: Mapping[str, Any]) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def log_metrics(self, step: int, row: Mapping[str, Any]) -> None:
        """Log a ``metrics.jsonl`` row: its numbers other than ``step``."""
        metrics = {k: float(v) for k, v in row.items() if k != "step" and _is_number(v)}
        for logger in self.loggers:
            logger.log_metrics(step, metrics)

    def close(self, failed: bool = False) -> None:
        for logger in self.loggers:
            logger.close(failed)


def open_loggers(
    names: Iterable[str], run_dir: Path, *, resume_step: int | None = None
) -> MetricLoggers:
    """Start the loggers ``names`` for ``run_dir`` (``jsonl`` is the run directory's own file).

    ``resume_step``: the step a resumed run continues from (None for a new run).

    Raises:
        ConfigError: a logger's package is missing.
        RopelmError: a backend cannot start (W&B not logged in, an unreachable MLflow server).
    """
    names = [n for n in names if n != "jsonl"]
    check_installed(names)
    classes = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger, "mlflow": MlflowLogger}
    opened: list[MetricLogger] = []
    try:
        for name in names:
            opened.append(classes[name](run_dir, resume_step=resume_step))
    except BaseException:
        MetricLoggers(opened).close(failed=True)
        raise
    return MetricLoggers(opened)


class TensorBoardLogger:
    """Event files in ``RUN_DIR/tensorboard/`` (``tensorboard --logdir runs`` shows every run)."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        # on resume, events after the checkpoint (from the interrupted session) are hidden
        purge = None if resume_step is None else resume_step + 1
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=purge)

    def log_config(self, config: Mapping[str, Any]) -> None:
        import yaml
        from torch.utils.tensorboard.summary import hparams

        text = yaml.safe_dump(dict(config), sort_keys=False)
        self.writer.add_text("config", "```yaml\n" + text + "```")
        # the HPARAMS tab: this run's settings beside its validation loss
        metrics = {scalar_name("val_loss"): math.nan, scalar_name("val_ppl"): math.nan}
        for summary in hparams(flat_config(config), metrics):
            self.writer.file_writer.add_summary(summary)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(scalar_name(key), value, global_step=step)
        self.writer.flush()

    def close(self, failed: bool = False) -> None:
        self.writer.close()


class WandbLogger:
    """A Weights & Biases run named after the run directory; ``WANDB_PROJECT``, ``WANDB_ENTITY``,
    ``WANDB_MODE`` (``offline``), ``WANDB_DIR`` apply (default directory: the run directory)."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        import wandb

        ids = _read_ids(run_dir)
        run_id = ids.get("wandb", {}).get("id") if resume_step is not None else None
        run_id = run_id or uuid.uuid4().hex[:12]
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", DEFAULT_PROJECT),
                name=run_dir.resolve().name, id=run_id, resume="allow",
                dir=None if os.environ.get("WANDB_DIR") else str(run_dir),
            )  # fmt: skip
        except Exception as err:
            raise RopelmError(
                f"train.loggers: wandb could not start a run ({_first_line(err)}); run "
                "`wandb login`, or set WANDB_MODE=offline and sync later with `wandb sync`."
            ) from None
        _write_ids(run_dir, {**ids, "wandb": {"id": run_id}})

    def log_config(self, config: Mapping[str, Any]) -> None:
        self.run.config.update(dict(config), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        self.run.log({scalar_name(k): v for k, v in metrics.items()}, step=step)

    def close(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


class MlflowLogger:
    """An MLflow run named after the run directory, in the experiment ``MLFLOW_EXPERIMENT_NAME``
    (default ``ropelm``) of ``MLFLOW_TRACKING_URI`` (default: MLflow's, ``sqlite:///mlflow.db``)."""

    def __init__(self, run_dir: Path, *, resume_step: int | None = None) -> None:
        from mlflow.tracking import MlflowClient

        ids = _read_ids(run_dir)
        run_id = ids.get("mlflow", {}).get("run_id") if resume_step is not None else None
        self.resumed = run_id is not None
        try:
            self.client = MlflowClient()
            if run_id is None:
                name = os.environ.get("MLFLOW_EXPERIMENT_NAME", DEFAULT_PROJECT)
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = (
                    experiment.experiment_id if experiment else self.client.create_experiment(name)
                )
                run_name = run_dir.resolve().name
                run_id = self.client.create_run(experiment_id, run_name=run_name).info.run_id
            else:
                self.client.update_run(run_id, status="RUNNING")
        except Exception as err:
            raise RopelmError(
                f"train.loggers: mlflow could not start a run ({_first_line(err)}); check "
                "MLFLOW_TRACKING_URI."
            ) from None
        self.run_id = run_id
        _write_ids(run_dir, {**ids, "mlflow": {"run_id": run_id}})

    def log_config(self, config: Mapping[str, Any]) -> None:
        from mlflow.entities import Param, RunTag

        params = {k: str(v) for k, v in flat_config(config).items()}
        tags = []
        if self.resumed:  # MLflow keeps a parameter's first value: changes become tags
            before = self.client.get_run(self.run_id).data.params
            tags = [RunTag(f"resumed.{k}", v) for k, v in params.items() if before.get(k, v) != v]
            params = {k: v for k, v in params.items() if k not in before}
        items = [Param(k, v[:6000]) for k, v in params.items()]
        for start in range(0, max(len(items), 1), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100], tags=tags)
            tags = []

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(scalar_name(k), v, now, step) for k, v in metrics.items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def close(self, failed: bool = False) -> None:
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


def _read_ids(run_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((run_dir / IDS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_ids(run_dir: Path, ids: dict[str, Any]) -> None:
    atomic_write_json(run_dir / IDS_FILE, ids)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _first_line(err: BaseException) -> str:
    """The first sentence of an error from a backend, to quote inside ours."""
    text = str(err).strip()
    first = re.split(r"(?<=[.!?])\s", text.splitlines()[0], maxsplit=1)[0] if text else ""
    return (first[:200] or type(err).__name__).rstrip(".")
