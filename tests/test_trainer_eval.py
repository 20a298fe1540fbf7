"""`fgc-train eval` on checkpoints with no bank, best.pt, and run directories never reused."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from conftest import start_server, stop_server

from trainer.checkpoint import load_checkpoint
from trainer.cli import train
from trainer.eval_cli import eval_command

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16",
        "--max-steps", "2", "--no-progress", "--log-level", "WARNING", "--lr", "0.05"]
FGC_TINY = ["--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1", "--contrast-blocks", "7,8"]


def run(*args: str) -> Result:
    return CliRunner().invoke(train, [*TINY, *args], catch_exceptions=False)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def evaluated(path: Path) -> dict:
    result = CliRunner().invoke(eval_command, [str(path), "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_eval_reproduces_the_runs_last_evaluation_and_best_pt_its_best(tmp_path: Path) -> None:
    out = tmp_path / "bas"
    assert run("--epochs", "3", "--out-dir", str(out)).exit_code == 0
    epochs = [r for r in records(out) if r["event"] == "epoch"]
    final = evaluated(out / "checkpoint.pt")
    assert final["top1"] == epochs[-1]["test_top1"] and final["macs_kept"] == epochs[-1]["macs_kept"]
    assert final["density"] == epochs[-1]["test_density"]
    best_epoch = max(epochs, key=lambda r: r["test_top1"])  # the first of equals: best.pt is replaced only on a gain
    best = load_checkpoint(out / "best.pt")
    assert best.epoch == best_epoch["epoch"] + 1 and best.optimizer is None and best.gate_bank is None
    assert evaluated(out / "best.pt")["top1"] == best_epoch["test_top1"]


def test_an_fgc_checkpoint_evaluates_with_its_bank_server_gone(tmp_path: Path) -> None:
    proc, address = start_server(tmp_path)
    try:
        assert run(*FGC_TINY, "--epochs", "2", "--bank", address, "--out-dir", str(tmp_path / "fgc")).exit_code == 0
    finally:
        stop_server(proc)
    last = [r for r in records(tmp_path / "fgc") if r["event"] == "epoch"][-1]
    assert evaluated(tmp_path / "fgc" / "checkpoint.pt")["top1"] == last["test_top1"]  # no bank to reach


def test_a_directory_that_holds_a_run_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    out = tmp_path / "run"
    assert run("--epochs", "1", "--out-dir", str(out)).exit_code == 0
    before = {name: (out / name).read_bytes() for name in ("checkpoint.pt", "best.pt", "metrics.jsonl")}
    result = CliRunner().invoke(train, [*TINY, "--epochs", "2", "--out-dir", str(out)])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "already holds a run" in lines[0] and "--resume" in lines[0], result.output
    assert {name: (out / name).read_bytes() for name in before} == before
    assert run("--resume", str(out / "checkpoint.pt"), "--epochs", "2").exit_code == 0  # continuing is fine
    assert [r["epoch"] for r in records(out) if r["event"] == "epoch"] == [0, 1]


def test_fgc_train_eval_is_a_subcommand_that_fails_in_one_line(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, "-m", "trainer", "eval", str(tmp_path / "none.pt")],
                          check=False, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "does not exist" in done.stderr and "Traceback" not in done.stderr, done.stderr
    torch.save({"an": "object"}, tmp_path / "foreign.pt")
    result = CliRunner().invoke(eval_command, [str(tmp_path / "foreign.pt")])
    assert result.exit_code == 1 and "not an fgc-train checkpoint" in result.output, result.output
