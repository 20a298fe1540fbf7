"""What a run records: stamped JSONL, TensorBoard (optional), --config / --print-config, config.json."""

from __future__ import annotations

import importlib.util
import json
from datetime import datetime
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from trainer.cli import train
from trainer.logs import SCALARS, epoch_scalars

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16",
        "--max-steps", "2", "--no-progress", "--log-level", "WARNING"]
FGC_TINY = ["--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1", "--contrast-blocks", "7,8"]
STEPS_PER_EPOCH = 64 // 16  # the loader's length; --max-steps 2 stops each epoch after 2


def run(*args: str) -> Result:
    result = CliRunner().invoke(train, [*TINY, *args])
    assert result.exit_code == 0, result.output
    return result


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_records_carry_time_global_step_and_bank_wait(tmp_path: Path) -> None:
    run(*FGC_TINY, "--epochs", "3", "--out-dir", str(tmp_path))
    logged = records(tmp_path)
    epochs = [r for r in logged if r["event"] == "epoch"]
    assert [r["global_step"] for r in epochs] == [e * STEPS_PER_EPOCH + 2 for e in (0, 1, 2)]
    assert logged[-1]["event"] == "final" and logged[-1]["global_step"] == epochs[-1]["global_step"]
    times = [datetime.fromisoformat(r["time"]) for r in logged]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    assert epochs[0]["bank_wait_s"] == 0.0  # warm-up: no kNN answer to wait for
    assert all(r["bank_wait_s"] > 0 for r in epochs[1:])
    for r in epochs:  # every curve TensorBoard is promised is in the record it is drawn from
        assert set(epoch_scalars(r)) == set(SCALARS), set(SCALARS) - set(epoch_scalars(r))


def test_tensorboard_logs_or_says_once_why_not(tmp_path: Path) -> None:
    result = CliRunner().invoke(train, [*TINY, "--epochs", "2", "--tensorboard", "--out-dir", str(tmp_path)],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    if importlib.util.find_spec("tensorboard") is None:
        warnings = [line for line in result.output.splitlines() if "tensorboard" in line]
        assert len(warnings) == 1 and "not installed" in warnings[0], result.output
        assert not (tmp_path / "tensorboard").exists()
    else:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len([r for r in records(tmp_path) if r["event"] == "epoch"]) == 2  # the JSONL either way


def test_config_file_sets_options_the_command_line_overrides(tmp_path: Path) -> None:
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"optim": {"lr": 0.05, "milestones": [1]}, "rho": 0.25}))
    printed = json.loads(run("--config", str(config), "--rho", "0.3", "--print-config").output)
    assert printed["optim"]["lr"] == 0.05 and printed["optim"]["milestones"] == [1]
    assert printed["gates"]["rho"] == 0.3  # the command line wins over the file
    assert not (tmp_path / "runs").exists()
    out = tmp_path / "run"
    run("--config", str(config), "--epochs", "1", "--out-dir", str(out))
    written = json.loads((out / "config.json").read_text())
    assert written["optim"]["lr"] == 0.05 and written["model"]["num_classes"] == 10
    again = json.loads(run("--config", str(out / "config.json"), "--print-config").output)
    assert again == {**written, "model": {**written["model"], "num_classes": 10, "in_channels": 3}}


@pytest.mark.parametrize("content, phrase", [
    ('{"optim": {"learning_rate": 0.1}}', "unknown key optim.learning_rate"),
    ('{"batchsize": 4}', "unknown option 'batchsize'"),
    ("[1, 2]", "must hold a mapping"),
    ("lr: 0.1", "is not valid JSON"),
])
def test_a_bad_config_file_gets_one_line(tmp_path: Path, content: str, phrase: str) -> None:
    config = tmp_path / "bad.json"
    config.write_text(content)
    result = CliRunner().invoke(train, [*TINY, "--config", str(config), "--print-config"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and phrase in lines[0], result.output


def test_yaml_config_files_need_pyyaml(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("optim:\n  lr: 0.02\n")
    result = CliRunner().invoke(train, [*TINY, "--config", str(config), "--print-config"])
    if importlib.util.find_spec("yaml") is None:
        assert result.exit_code == 2 and "pip install pyyaml" in result.output, result.output
    else:
        assert result.exit_code == 0 and json.loads(result.output)["optim"]["lr"] == 0.02, result.output
