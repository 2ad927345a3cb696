"""``ropelm-exp eval`` on trained runs: eval.json, att_option overrides, n/a, and the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ropelm.checkpoint import load_model
from ropelm.cli import main
from ropelm.data import load_prepared
from ropelm.errors import CheckpointError, ConfigError, StorageError
from ropelm.eval_run import eval_file_name, evaluate_run
from ropelm.model import TransformerLM
from ropelm.perplexity import length_perplexity
from ropelm.variants import parse_att_options

# -- evaluate_run on a trained run ------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory, train_tiny_runs) -> dict[str, Path]:
    """Two tiny trained runs sharing one data cache: RoPE-SM and Learned-APE."""
    return train_tiny_runs(
        tmp_path_factory.mktemp("eval-runs"),
        ("RoPE-SM", "Learned-APE"),
        name="evaltiny",
        eval={"max_batches": 3, "lengths": ["1x", "2x"]},
    )


def test_eval_at_1x_reproduces_the_engine_final_validation_loss(registry, runs):
    run = runs["RoPE-SM"]
    summary = json.loads((run / "summary.json").read_text())
    report = evaluate_run(
        run, registry, lengths=["1x"], max_windows=3 * 4, methods=["nonoverlapping"]
    )
    cell = report["results"]["1x"]["nonoverlapping"]
    assert cell["windows"] == 12 and cell["tokens"] == 12 * 32
    assert cell["loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5)


def test_eval_json_layout_and_default_lengths(registry, runs):
    run = runs["RoPE-SM"]
    report = evaluate_run(run, registry, max_windows=4)
    saved = json.loads((run / "eval.json").read_text())
    assert saved == {k: v for k, v in report.items() if k != "path"}
    assert list(saved["results"]) == ["1x", "2x"]  # the run's eval.lengths
    two = saved["results"]["2x"]
    assert two["length"] == 64 and saved["block_size"] == 32
    assert (
        two["strided"]["stride"] == 32
        and two["strided"]["tokens"] == two["nonoverlapping"]["tokens"]
    )
    assert two["strided"]["windows"] == 2 * two["nonoverlapping"]["windows"] - 1
    assert saved["att_options"] == {} and saved["att_option_overrides"] == {}
    assert not list(run.glob(".eval.json*"))  # atomic write left no temp file


def test_learned_ape_beyond_block_size_is_na_with_the_reason(registry, runs):
    report = evaluate_run(runs["Learned-APE"], registry, lengths=["1x", "2x", "100"], max_windows=2)
    assert "ppl" in report["results"]["1x"]["nonoverlapping"]
    assert "ppl" in report["results"]["1x"]["strided"]
    for spec in ("2x", "100"):
        for method in ("nonoverlapping", "strided"):
            cell = report["results"][spec][method]
            assert cell["status"] == "n/a"
            assert "Learned-APE" in cell["reason"] and "block size of 32" in cell["reason"]


def test_max_tokens_scores_the_same_targets_at_every_length(registry, runs):
    report = evaluate_run(runs["RoPE-SM"], registry, lengths=["1x", "2x", "100"], max_tokens=128,
                          out=runs["RoPE-SM"] / "capped.json")  # fmt: skip
    results = report["results"]
    assert report["max_tokens"] == 128
    for spec in ("1x", "2x"):
        assert (
            results[spec]["nonoverlapping"]["tokens"] == 128 == results[spec]["strided"]["tokens"]
        )
    assert results["100"]["strided"]["tokens"] == 100  # whole windows only
    report = evaluate_run(runs["RoPE-SM"], registry, lengths=["1x"], max_tokens=8,
                          out=runs["RoPE-SM"] / "capped.json")  # fmt: skip
    cell = report["results"]["1x"]["nonoverlapping"]
    assert cell["status"] == "n/a" and "less than one window of 32 tokens" in cell["reason"]


def test_att_option_overrides_switch_on_rope_scaling(registry, runs):
    run = runs["RoPE-SM"]
    options = parse_att_options(["scaling=yarn", "scale_factor=2"])
    assert options == {"scaling": "yarn", "scale_factor": 2}
    scaled = evaluate_run(run, registry, lengths=["2x"], att_options=options, max_windows=2)
    plain = evaluate_run(run, registry, lengths=["2x"], max_windows=2, out=run / "plain.json")
    assert Path(scaled["path"]).name == eval_file_name(options) != "eval.json"
    assert scaled["att_options"]["scaling"] == "yarn"
    assert scaled["att_option_overrides"] == options
    a = scaled["results"]["2x"]["nonoverlapping"]["loss"]
    b = plain["results"]["2x"]["nonoverlapping"]["loss"]
    assert a != b  # different RoPE tables, same weights (a tiny model: a small difference)
    # the same number from a model built by hand with the options and the checkpoint's weights
    trained = load_model(run, registry)
    config = trained.config.model_copy(update={"att_options": options})
    by_hand = TransformerLM.from_config(config, registry)
    by_hand.load_state_dict(trained.state_dict())
    data = load_prepared(next((run.parent / "cache").glob("tokens-*")))
    expected = length_perplexity(by_hand, data.val, length=64, max_windows=2, batch_size=1)
    assert a == pytest.approx(expected.loss, rel=1e-6)


def test_auto_scale_factor_follows_the_length(registry, runs):
    run = runs["RoPE-SM"]
    auto = evaluate_run(run, registry, lengths=["1x", "2x"], max_windows=2,
                        att_options={"scaling": "yarn", "scale_factor": "auto"})  # fmt: skip
    assert Path(auto["path"]).name == "eval-scale_factor-auto_scaling-yarn.json"
    assert [auto["results"][s]["att_options"]["scale_factor"] for s in ("1x", "2x")] == [1.0, 2.0]
    fixed = evaluate_run(run, registry, lengths=["2x"], max_windows=2, out=run / "fixed.json",
                         att_options={"scaling": "yarn", "scale_factor": 2})  # fmt: skip
    plain = evaluate_run(run, registry, lengths=["1x"], max_windows=2, out=run / "plain1x.json")
    for method in ("nonoverlapping", "strided"):
        assert auto["results"]["2x"][method]["loss"] == fixed["results"]["2x"][method]["loss"]
        # YaRN with factor 1 leaves RoPE as trained
        one = auto["results"]["1x"][method]["loss"]
        assert one == pytest.approx(plain["results"]["1x"][method]["loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="only scale_factor can be auto"):
        evaluate_run(run, registry, lengths=["1x"], att_options={"n_kv_head": "auto"})


def test_bad_att_option_names_the_key(registry, runs, assert_one_sentence):
    with pytest.raises(ConfigError) as info:
        evaluate_run(runs["RoPE-SM"], registry, lengths=["1x"], att_options={"scalin": "yarn"})
    assert "scalin" in str(info.value) and "did you mean 'scaling'" in str(info.value)
    assert_one_sentence(str(info.value))


def test_run_dir_without_checkpoints(registry, tmp_path, runs):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.yaml").write_text((runs["RoPE-SM"] / "config.yaml").read_text())
    with pytest.raises(CheckpointError, match="No 'best' checkpoint"):
        evaluate_run(empty, registry, lengths=["1x"])


def test_a_gpu_fp16_run_evaluates_in_float32_on_the_cpu(registry, tmp_path, runs):
    """fp16 autocast is CUDA's: the same weights evaluated on the CPU run in float32."""
    gpu_run = tmp_path / "gpu-run"
    shutil.copytree(runs["RoPE-SM"], gpu_run)
    config = yaml.safe_load((gpu_run / "config.yaml").read_text())
    config["train"]["precision"] = "fp16"
    (gpu_run / "config.yaml").write_text(yaml.safe_dump(config))
    kwargs = {"lengths": ["1x"], "max_windows": 4, "methods": ["nonoverlapping"]}
    fp16 = evaluate_run(gpu_run, registry, device="cpu", **kwargs)
    fp32 = evaluate_run(runs["RoPE-SM"], registry, device="cpu", **kwargs)
    cell = fp16["results"]["1x"]["nonoverlapping"]
    assert cell["loss"] == fp32["results"]["1x"]["nonoverlapping"]["loss"]


def invoke(*args: object) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_cli_eval_prints_the_table(runs):
    code, out = invoke(
        "eval", runs["Learned-APE"], "--lengths", "1x,2x", "--max-windows", "2", "--stride", "8"
    )
    assert code == 0, out
    assert "ppl nonoverlapping" in out and "ppl strided" in out
    assert "n/a: Learned-APE does not run beyond its block size of 32 tokens" in out
    saved = json.loads((runs["Learned-APE"] / "eval.json").read_text())
    assert saved["results"]["1x"]["strided"]["stride"] == 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lengths", "3y"], "Evaluation length '3y' is not understood"),
        (["--att-option", "scaling"], "--att-option 'scaling': write it as KEY=VALUE"),
        (["--stride", "2.5"], "Stride '2.5' is not understood"),
    ],
)
def test_cli_eval_bad_input_is_one_line(runs, args, message):
    code, out = invoke("eval", runs["RoPE-SM"], *args)
    assert code == 1 and out.startswith(f"Error: {message}") and out.count("\n") == 1


def test_cli_eval_on_a_directory_that_is_not_a_run(tmp_path):
    code, out = invoke("eval", tmp_path)
    assert code == 1 and "is not a run directory" in out and out.count("\n") == 1


def test_a_model_that_cannot_load_is_an_error_not_na(registry, tmp_path, runs):
    """Failure is never recorded as data: no eval file, the previous one untouched."""
    run = tmp_path / "run"
    shutil.copytree(runs["RoPE-SM"], run)
    evaluate_run(run, registry, lengths=["1x"], max_windows=2)
    before = (run / "eval.json").read_text()
    with pytest.raises(CheckpointError, match="does not match the model"):
        evaluate_run(run, registry, lengths=["1x"], max_windows=2, att_options={"n_kv_head": 1})
    assert not (run / "eval-n_kv_head-1.json").exists()
    best = next((run / "checkpoints").glob("step-*")) / "model.safetensors"
    best.write_bytes(best.read_bytes()[:-64])  # damaged weights
    with pytest.raises(CheckpointError):
        evaluate_run(run, registry, lengths=["1x"], max_windows=2)
    assert (run / "eval.json").read_text() == before


def test_an_unwritable_output_fails_before_computing(registry, tmp_path, runs, monkeypatch):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(StorageError, match="is not a directory"):
        evaluate_run(runs["RoPE-SM"], registry, lengths=["1x"], out=not_a_folder / "e.json")
    monkeypatch.setattr(
        "ropelm.eval_run.length_perplexity", lambda *a, **k: pytest.fail("computed first")
    )
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    monkeypatch.setattr("os.access", lambda path, mode: Path(path) != read_only)
    with pytest.raises(StorageError, match="permission is denied"):
        evaluate_run(runs["RoPE-SM"], registry, lengths=["1x"], out=read_only / "eval.json")
