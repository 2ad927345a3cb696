"""train.loggers: a real tiny run, logged to TensorBoard, W&B (offline) and MLflow (a local
file store), read back with each tool's own reader and compared with metrics.jsonl."""

from __future__ import annotations

import importlib.util
import json
import math
import struct
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ropelm.cli import main
from ropelm.config import load_experiment, validate
from ropelm.errors import ConfigError, RopelmError
from ropelm.experiment import Experiment
from ropelm.loggers import flat_config, open_loggers, scalar_name
from ropelm.pipeline import run_experiment

HAS_TENSORBOARD = importlib.util.find_spec("tensorboard") is not None
HAS_WANDB = importlib.util.find_spec("wandb") is not None
HAS_MLFLOW = importlib.util.find_spec("mlflow") is not None
LOGGERS = ["tensorboard"] * HAS_TENSORBOARD + ["wandb"] * HAS_WANDB + ["mlflow"] * HAS_MLFLOW
STEPS, MORE_STEPS = 8, 12  # the run, then resumed to MORE_STEPS
JUNK = 1234.5  # a loss an interrupted session "logged" past the checkpoint


def experiment(cache_dir: Path, **train: object) -> dict:
    return {
        "name": "logged",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "tokenizer": {"max_documents": 200},
        "data": {"source": "wiki-sample", "max_documents": 300, "cache_dir": str(cache_dir)},
        "train": {"max_steps": STEPS, "batch_size": 4, "eval_every": 4, "log_every": 2, **train},
        "eval": {"max_batches": 2},
    }


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory) -> Path:
    """A run logged to every installed backend: STEPS steps, a TensorBoard event past the
    checkpoint (as an interrupted session leaves), then resumed to MORE_STEPS."""
    root = tmp_path_factory.mktemp("logged")
    yaml_path = root / "logged.yaml"
    yaml_path.write_text(yaml.safe_dump(experiment(root / "cache", loggers=LOGGERS)))
    with pytest.MonkeyPatch.context() as env:
        env.setenv("WANDB_MODE", "offline")
        env.setenv("WANDB_SILENT", "true")
        env.setenv("WANDB_DIR", str(root))
        # MLflow's file store: a fresh sqlite store costs ~9 s of migrations per test session
        env.setenv("MLFLOW_TRACKING_URI", (root / "mlruns").as_uri())
        env.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        run_experiment(Experiment.load(yaml_path), out_dir=root / "run", progress=False)
        if HAS_TENSORBOARD:
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(root / "run" / "tensorboard")) as writer:
                writer.add_scalar("train/loss", JUNK, STEPS + 2)
        resumed = Experiment.load(yaml_path, [f"train.max_steps={MORE_STEPS}"])
        run_experiment(resumed, out_dir=root / "run", resume=True, progress=False)
    return root / "run"


def jsonl_series(run_dir: Path, key: str) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {row["step"]: row[key] for row in rows if key in row}


def assert_same_series(logged: dict[int, float], expected: dict[int, float], what: str) -> None:
    assert sorted(logged) == sorted(expected), what
    for step, value in expected.items():
        assert math.isclose(logged[step], value, rel_tol=1e-6), (what, step)  # float32 storage


KEYS = ("train_loss", "lr", "tokens_per_s", "grad_norm", "val_loss", "val_ppl")


def test_metrics_jsonl_holds_every_scalar_of_both_sessions(logged_run):
    losses = jsonl_series(logged_run, "train_loss")
    assert sorted(losses) == list(range(2, MORE_STEPS + 1, 2))
    assert sorted(jsonl_series(logged_run, "val_loss")) == [0, 4, 8, 12]
    norms = jsonl_series(logged_run, "grad_norm")
    assert sorted(norms) == sorted(losses) and all(0 < v < math.inf for v in norms.values())


def test_tensorboard_events_match_metrics_jsonl_and_resume_purges(logged_run):
    reader = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    events = reader.EventAccumulator(str(logged_run / "tensorboard"))
    events.Reload()
    for key in KEYS:
        logged = {e.step: e.value for e in events.Scalars(scalar_name(key))}
        assert_same_series(logged, jsonl_series(logged_run, key), key)
    assert JUNK not in [e.value for e in events.Scalars("train/loss")]  # purged on resume
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "max_steps: 8" in config and "tensorboard" in config


def read_wandb_records(path: Path) -> list:
    """The protobuf records of a ``.wandb`` file (a LevelDB-style log of 32 KiB blocks after a
    7-byte ':W&B' header; records may span blocks: FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data, records, parts, pos = path.read_bytes(), [], [], 7
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        parts.append(data[pos + 7 : pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            records.append(record)
            parts = []
        elif kind == 0:
            break
    return records


@pytest.mark.skipif(not HAS_WANDB, reason="wandb is not installed (pip install 'ropelm[wandb]')")
def test_wandb_offline_history_matches_metrics_jsonl_in_one_run(logged_run):
    run_id = json.loads((logged_run / "loggers.json").read_text())["wandb"]["id"]
    files = sorted(logged_run.parent.glob(f"wandb/offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert len(files) == 2  # both sessions continue the same W&B run
    history: dict[str, dict[int, float]] = {}
    config = {}
    for record in (r for f in files for r in read_wandb_records(f)):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row = {
                i.key or "/".join(i.nested_key): json.loads(i.value_json)
                for i in record.history.item
            }
            for key, value in row.items():
                history.setdefault(key, {})[row["_step"]] = value
        elif kind in ("run", "config"):  # the configuration, at init or updated later
            items = (record.run.config if kind == "run" else record.config).update
            config |= {i.key: json.loads(i.value_json) for i in items}
    for key in KEYS:
        assert_same_series(history[scalar_name(key)], jsonl_series(logged_run, key), key)
    assert config["train"]["max_steps"] == MORE_STEPS  # the resumed session updated it


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'ropelm[mlflow]')")
def test_mlflow_history_matches_metrics_jsonl_in_one_run(logged_run):
    from mlflow.tracking import MlflowClient

    run_id = json.loads((logged_run / "loggers.json").read_text())["mlflow"]["run_id"]
    client = MlflowClient((logged_run.parent / "mlruns").as_uri())
    for key in KEYS:
        history = client.get_metric_history(run_id, scalar_name(key))
        logged = {m.step: m.value for m in history}
        assert len(history) == len(logged)  # nothing logged twice
        assert_same_series(logged, jsonl_series(logged_run, key), key)
    run = client.get_run(run_id)
    assert run.data.params["train.max_steps"] == str(STEPS)  # the first session's value ...
    assert run.data.tags["resumed.train.max_steps"] == str(MORE_STEPS)  # ... and the change
    assert run.info.status == "FINISHED" and run.info.run_name == "run"


def test_loggers_default_to_jsonl_which_is_always_on(tmp_path):
    assert validate({}).train.loggers == ["jsonl"]
    assert validate({"train": {"loggers": ["tensorboard"]}}).train.loggers == [
        "jsonl",
        "tensorboard",
    ]
    assert open_loggers(["jsonl"], tmp_path).loggers == []
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("loggers", "fragment"),
    [
        (["tensorbord"], "train.loggers.0: Input should be 'jsonl', 'tensorboard'"),
        (["wandb", "wandb"], "train.loggers: 'wandb' is listed twice"),
    ],
)
def test_bad_logger_lists_are_one_sentence(loggers, fragment, assert_one_sentence):
    with pytest.raises(ConfigError) as err:
        validate({"train": {"loggers": loggers}})
    assert fragment in str(err.value)
    assert_one_sentence(str(err.value))


def test_a_missing_logger_package_is_one_sentence_naming_the_extra(
    tmp_path, monkeypatch, assert_one_sentence
):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if it were not installed
    path = tmp_path / "x.yaml"
    path.write_text(yaml.safe_dump(experiment(tmp_path / "cache", loggers=["mlflow"])))
    with pytest.raises(ConfigError) as err:
        load_experiment(path)
    message = str(err.value)
    assert 'pip install "ropelm[mlflow]"' in message
    assert_one_sentence(message)
    # the CLI says it before any tokenizer or training work
    result = CliRunner().invoke(main, ["run", str(path), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.output == f"Error: {message}\n"
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
    # a saved run's config is read without asking for the package
    assert validate(yaml.safe_load(path.read_text())).train.loggers == ["jsonl", "mlflow"]


def test_scalar_names_and_flat_config():
    assert [scalar_name(k) for k in ("train_loss", "val_ppl", "lr", "grad_norm")] == [
        "train/loss",
        "val/ppl",
        "train/lr",
        "train/grad_norm",
    ]
    nested = {"train": {"lr": 0.1, "betas": [0.9, 0.95], "max_steps": None}, "name": "x"}
    assert flat_config(nested) == {
        "train.lr": 0.1,
        "train.betas": "[0.9, 0.95]",
        "train.max_steps": "null",
        "name": "x",
    }


@pytest.mark.skipif(not HAS_MLFLOW, reason="mlflow is not installed (pip install 'ropelm[mlflow]')")
def test_a_backend_that_cannot_start_is_one_sentence(tmp_path, monkeypatch, assert_one_sentence):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "nosuchscheme://nowhere")
    with pytest.raises(RopelmError) as err:
        open_loggers(["tensorboard", "mlflow"], tmp_path)
    assert "mlflow could not start a run" in str(err.value)
    assert "MLFLOW_TRACKING_URI" in str(err.value)
    assert_one_sentence(str(err.value))
