"""The training-side commands as a user types them: prepare, train, run, generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from ropelm.cli import main


@pytest.fixture()
def experiment(tmp_path: Path) -> Path:
    raw = {
        "name": "cli",
        "model": {"block_size": 32, "vocab_size": 512, "n_layer": 1, "n_head": 2, "n_embd": 32},
        "tokenizer": {"max_documents": 200},
        "data": {
            "source": "wiki-sample",
            "max_documents": 300,
            "cache_dir": str(tmp_path / "cache"),
        },
        "train": {"max_steps": 6, "batch_size": 4, "eval_every": 3, "log_every": 3},
        "eval": {"max_batches": 2},
    }
    path = tmp_path / "cli.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def test_train_before_prepare_says_which_command_to_run(experiment):
    code, out = invoke("train", experiment, "--out", experiment.parent / "run", "--quiet")
    assert code == 1
    assert f"ropelm-exp prepare {experiment}" in out
    assert "Traceback" not in out


def test_prepare_train_then_generate(experiment):
    run_dir = experiment.parent / "run"
    assert invoke("prepare", experiment, "--quiet")[0] == 0
    code, out = invoke("train", experiment, "--out", run_dir, "--quiet")
    assert code == 0, out
    assert "done: RoPE-SM" in out and (run_dir / "summary.json").is_file()

    args = ["generate", run_dir, "--prompt", "The city", "--max-new-tokens", "8"]
    code, cached = invoke(*args, "--temperature", "0")
    assert code == 0, cached
    assert cached.startswith("The city") and len(cached.strip()) > len("The city")
    assert invoke(*args, "--temperature", "0", "--no-cache") == (0, cached)
    seeded = [invoke(*args, "--top-p", "0.9", "--seed", "3")[1] for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_run_reports_a_yaml_syntax_error_with_its_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: 2\n train: {}\n")
    code, out = invoke("run", bad)
    assert code == 1
    assert out.startswith(f"Error: {bad} at line 3") and out.count("\n") == 1


def test_run_names_an_unknown_key_and_an_impossible_value(experiment):
    code, out = invoke("run", experiment, "--set", "train.batch_sise=4")
    assert code == 1 and "train.batch_sise: unknown key (did you mean 'batch_size'?)" in out
    code, out = invoke("run", experiment, "--set", "train.batch_size=0")
    assert code == 1 and "train.batch_size: Input should be greater than 0" in out


def test_missing_experiment_file_is_one_sentence(tmp_path):
    code, out = invoke("run", tmp_path / "nope.yaml")
    assert code == 1 and "does not exist" in out and "Traceback" not in out


def test_threads_option_sets_torch_threads_for_training(tmp_path):
    """--threads (or train.threads) decides torch's CPU threads for the run's training."""
    import subprocess
    import sys

    code = (
        "import torch, os\n"
        "from click.testing import CliRunner\n"
        "from ropelm.cli import main\n"
        "from ropelm.distributed import apply_cpu_threads\n"
        "apply_cpu_threads(3); a = torch.get_num_threads()\n"
        f"CliRunner().invoke(main, ['run', {str(tmp_path / 'none.yaml')!r}, '--threads', '1'])\n"
        "apply_cpu_threads(3); b = torch.get_num_threads()\n"
        "print(a, b, os.environ['ROPELM_THREADS'])\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "ROPELM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.stdout.split() == ["3", "1", "1"], out.stderr  # train.threads; --threads wins
