"""fgc-train end to end in one process: resume, --init-from, and bad input stopped before training."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result

from fgc_bank import connect
from trainer.builder import StartFrom, build_trainer, open_banks
from trainer.checkpoint import load_checkpoint
from trainer.cli import train
from trainer.config import TrainConfig
from trainer.distributed import DistContext
from trainer.errors import TrainerError
from trainer.models import build_model
from trainer.train import plan_epoch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16",
        "--max-steps", "2", "--no-progress", "--log-level", "WARNING"]
FGC_TINY = ["--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1", "--contrast-blocks", "7,8"]


def invoke(*args: str) -> Result:
    return CliRunner().invoke(train, [*TINY, *args], catch_exceptions=False)


def ok(*args: str) -> Result:
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    return result


def epochs_logged(out_dir: Path) -> list[dict]:
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["event"] == "epoch"]


def test_resume_continues_at_the_right_epoch_with_the_same_config(tmp_path: Path) -> None:
    out = tmp_path / "run"
    ok("--epochs", "2", "--lr", "0.05", "--milestones", "1", "--rho", "0.2", "--out-dir", str(out))
    first = load_checkpoint(out / "checkpoint.pt")
    assert first.epoch == 2 and [r["epoch"] for r in epochs_logged(out)] == [0, 1]
    # Only --resume and a new end: everything else comes back from the checkpoint.
    ok("--resume", str(out / "checkpoint.pt"), "--epochs", "3")
    records = epochs_logged(out)
    assert [r["epoch"] for r in records] == [0, 1, 2]
    assert records[2]["lr"] == pytest.approx(0.005)  # lr 0.05 and milestone 1 were restored
    second = load_checkpoint(out / "checkpoint.pt")
    assert second.epoch == 3
    expected = TrainConfig.from_dict(first.config).replace("optim", epochs=3)
    assert TrainConfig.from_dict(second.config) == expected


def test_resumed_fgc_run_restores_epoch_phase_and_both_banks(tmp_path: Path) -> None:
    out = tmp_path / "fgc"
    ok(*FGC_TINY, "--epochs", "2", "--out-dir", str(out))
    saved = load_checkpoint(out / "checkpoint.pt")
    assert (saved.epoch, saved.fgc_start) == (2, 0)
    cfg = TrainConfig.from_dict(saved.config)
    ctx = DistContext(0, 1, 0, torch.device("cpu"))
    trainer = build_trainer(cfg, ctx, StartFrom(saved, resume=True))
    assert (trainer.start_epoch, trainer.fgc_start) == (2, 0)
    assert plan_epoch(cfg, 2, 0).knn and not plan_epoch(cfg, 0, 0).knn  # warm-up was epoch 0
    client = trainer.banks.features.client
    for block in ("7", "8"):
        assert torch.equal(trainer.banks.gates[int(block)], saved.gate_bank[block])
        rows = client.gather(f"feat/{block}", np.arange(64))
        np.testing.assert_array_equal(rows, saved.feature_banks[block].numpy())
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, saved.model[name]), name
    ok("--resume", str(out / "checkpoint.pt"), "--epochs", "3")
    last = epochs_logged(out)[-1]
    assert (last["epoch"], last["phase"], last["knn"]) == (2, "fgc", True)


def test_init_from_bas_starts_fgc_at_the_checkpoint_epoch(tmp_path: Path) -> None:
    ok("--epochs", "1", "--out-dir", str(tmp_path / "bas"))
    ok(*FGC_TINY, "--epochs", "3", "--init-from", str(tmp_path / "bas" / "checkpoint.pt"),
       "--out-dir", str(tmp_path / "fgc"))
    records = epochs_logged(tmp_path / "fgc")
    assert [(r["epoch"], r["phase"], r["knn"]) for r in records] == [
        (1, "fgc", False), (2, "fgc", True)]  # one warm-up epoch, then kNN positives
    assert all(np.isfinite(r["train_gate"]) and r["train_gate"] > 0 for r in records)
    assert load_checkpoint(tmp_path / "fgc" / "checkpoint.pt").fgc_start == 1


def test_sampled_negatives_approximation_trains(tmp_path: Path) -> None:
    ok(*FGC_TINY, "--epochs", "2", "--negatives", "8", "--out-dir", str(tmp_path))
    assert all(np.isfinite(r["train_gate"]) for r in epochs_logged(tmp_path))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def assert_stopped_before_training(result: Result, out: Path, *phrases: str) -> None:
    assert result.exit_code == 2, result.output
    for phrase in phrases:
        assert phrase in result.output, result.output
    assert not (out / "metrics.jsonl").exists()


def test_missing_dataset_directory_stops_before_training(tmp_path: Path) -> None:
    result = invoke("--dataset", "cifar10", "--data-root", str(tmp_path / "nope"),
                    "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "does not exist", "--data-root")


def test_unreachable_bank_stops_before_training(tmp_path: Path) -> None:
    result = invoke(*FGC_TINY, "--bank", f"tcp://127.0.0.1:{_free_port()}", "--bank-timeout",
                    "1", "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "cannot reach the bank",
                                   "fgc-bank serve")


def test_bank_of_the_wrong_size_stops_before_training(tmp_path: Path, server: str) -> None:
    with connect(server) as client:
        client.create("cli-mismatch/7", 1000, 64)
    result = invoke(*FGC_TINY, "--bank", server, "--bank-prefix", "cli-mismatch",
                    "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "does not fit this run",
                                   "--bank-prefix")


def test_checkpoint_of_another_architecture_is_refused(tmp_path: Path) -> None:
    ok("--epochs", "1", "--out-dir", str(tmp_path / "bas"))
    ckpt = str(tmp_path / "bas" / "checkpoint.pt")
    result = invoke("--arch", "resnet32", "--init-from", ckpt, "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "--arch resnet32 conflicts",
                                   "resnet20")
    result = invoke("--resume", ckpt, "--dataset", "digits", "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "--dataset digits conflicts")


def test_checkpoint_of_another_input_shape_is_refused(tmp_path: Path) -> None:
    ok("--epochs", "1", "--out-dir", str(tmp_path / "bas"))  # synthetic: 3 channels
    result = CliRunner().invoke(train, [
        "--dataset", "digits", "--no-progress", "--init-from",
        str(tmp_path / "bas" / "checkpoint.pt"), "--out-dir", str(tmp_path / "o")])
    assert_stopped_before_training(result, tmp_path / "o", "in_channels = 3", "needs 1")


def test_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.pt"
    bogus.write_bytes(b"definitely not a checkpoint")
    result = invoke("--resume", str(bogus), "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "cannot read checkpoint")
    result = invoke("--resume", str(tmp_path / "missing.pt"), "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", "does not exist")
    result = invoke("--resume", str(bogus), "--init-from", str(bogus))
    assert result.exit_code == 2 and "give one of them" in result.output


def test_in_process_bank_cannot_be_shared_by_several_ranks() -> None:
    cfg = TrainConfig().replace("run", phase="fgc")
    model = build_model("resnet20", 10, 3, contrast_blocks=(7, 8))
    two_ranks = DistContext(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(TrainerError, match="private to each process"):
        open_banks(cfg, two_ranks, model, 100, None)


def test_python_dash_m_trainer_shows_every_fgc_knob() -> None:
    done = subprocess.run([sys.executable, "-m", "trainer", "--help"], capture_output=True,
                          text=True, check=True)
    for knob in ("--phase", "--rho", "--l0-start", "--l0-end", "--kappa", "--nn-num",
                 "--nn-epoch", "--contrast-blocks", "--temperature", "--bank-momentum",
                 "--milestones", "--epochs", "--batch-size", "--weight-decay", "--nesterov",
                 "--bank", "--resume", "--init-from"):
        assert knob in done.stdout, knob
    assert "default: 0.003" in done.stdout  # kappa, FGC's published value


@pytest.mark.parametrize("device, phrase", [("tpu", "is not a device"), ("meta", "cpu or cuda devices"), ("cuda:banana", "is not a device")]
                         + ([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")]))
def test_a_device_that_is_not_there_stops_before_training(tmp_path: Path, device: str, phrase: str) -> None:
    result = invoke("--device", device, "--out-dir", str(tmp_path / "o"))
    assert_stopped_before_training(result, tmp_path / "o", phrase)
    assert "Traceback" not in result.output


def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path: Path) -> None:
    for name, content in (("text.pt", b"not a checkpoint at all"), ("pickle.pt", None)):
        path = tmp_path / name
        if content is None:
            torch.save({"an": object()}, path)  # a real torch file that weights_only refuses
        else:
            path.write_bytes(content)
        result = invoke("--resume", str(path), "--out-dir", str(tmp_path / "o"))
        assert result.exit_code == 2, result.output
        message = [line for line in result.output.splitlines() if line.strip()]
        assert len(message) == 1 and "is it a checkpoint.pt written by fgc-train?" in message[0], result.output
