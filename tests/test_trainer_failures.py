"""Errors end a run in one line from rank 0, named in torchrun's summary; the bank hint names the
user's own port; CURVE keys reach an authenticated bank server."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TIME_FACTOR, stop_server

from fgc_bank import connect
from fgc_bank.cli import main as bank_cli
from trainer.banks import open_bank
from trainer.cli import train
from trainer.errors import TrainerError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16",
        "--max-steps", "2", "--no-progress", "--log-level", "WARNING"]
FGC_TINY = ["--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1", "--contrast-blocks", "7,8"]


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 5555:  # the hint must be seen to name this port, not a default one
            return port


def one_line(output: str) -> str:
    """The run's one error line (log lines, e.g. the client's reconnect warnings, aside)."""
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in output, output
    return errors[0]


def test_the_unreachable_bank_hint_names_the_port_given() -> None:
    port = free_port()
    with pytest.raises(TrainerError) as raised:
        open_bank(f"tcp://127.0.0.1:{port}", timeout=1.0)
    assert f"fgc-bank serve --port {port}`" in str(raised.value) and "5555" not in str(raised.value)
    with pytest.raises(TrainerError, match=r"on 10\.1\.2\.3, with --host 0\.0\.0\.0, with `fgc-bank serve --port 7000`"):
        open_bank("tcp://10.1.2.3:7000", timeout=0.2)
    with pytest.raises(TrainerError, match="--endpoint ipc:///tmp/no-such-bank.sock"):
        open_bank("ipc:///tmp/no-such-bank.sock", timeout=0.2)


def test_an_error_under_torchrun_is_printed_once_and_carried_by_the_summary(tmp_path: Path) -> None:
    port = free_port()
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "trainer",
         *TINY, *FGC_TINY, "--bank", f"tcp://127.0.0.1:{port}", "--bank-timeout", "1",
         "--out-dir", str(tmp_path / "o")],
        capture_output=True, text=True, timeout=300 * TIME_FACTOR, check=False)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    printed = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(printed) == 1 and f"fgc-bank serve --port {port}`" in printed[0], output  # rank 0 only
    summary = output[output.index("Root Cause"):]
    assert "cannot reach the bank" in summary and f"--port {port}" in summary, output
    assert 'trainer/cli.py", line' not in output and 'fgc_bank/' not in output  # no frame of ours


@pytest.fixture(scope="module")
def curve_server(tmp_path_factory: pytest.TempPathFactory):
    keys = tmp_path_factory.mktemp("keys")
    for name in ("server", "trainer", "stranger"):
        result = CliRunner().invoke(bank_cli, ["keys", "--dir", str(keys), "--name", name])
        assert result.exit_code == 0, result.output
    (keys / "allowed").mkdir()
    shutil.copy(keys / "trainer.key", keys / "allowed" / "trainer.key")
    proc, address = _start_curve(tmp_path_factory.mktemp("curve"), keys)
    yield address, keys
    stop_server(proc)


def _start_curve(tmp: Path, keys: Path) -> tuple[subprocess.Popen, str]:
    import time

    log = open(tmp / "server.log", "w")  # noqa: SIM115 - the server writes to it until stopped
    proc = subprocess.Popen([sys.executable, "-m", "fgc_bank.cli", "--log-level", "warning", "serve",
                             "--port", "0", "--address-file", str(tmp / "addr"),
                             "--curve-secret", str(keys / "server.key_secret"),
                             "--curve-clients", str(keys / "allowed")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60 * TIME_FACTOR
    while not (tmp / "addr").exists():
        assert proc.poll() is None and time.monotonic() < deadline, (tmp / "server.log").read_text()
        time.sleep(0.05)
    return proc, (tmp / "addr").read_text().strip()


def test_fgc_train_trains_against_a_curve_server_with_its_keys(tmp_path: Path, curve_server) -> None:
    address, keys = curve_server
    keyed = ["--curve-secret", str(keys / "trainer.key_secret"), "--curve-server", str(keys / "server.key")]
    result = CliRunner().invoke(train, [*TINY, *FGC_TINY, "--epochs", "2", "--bank", address,
                                        *keyed, "--out-dir", str(tmp_path / "keyed")])
    assert result.exit_code == 0, result.output
    with connect(address, curve_secret=keys / "trainer.key_secret", curve_server=keys / "server.key") as bank:
        assert bank.info("feat/7")["searches"] > 0 and bank.info("feat/8")["updates"] > 0
        assert np.isfinite(bank.gather("feat/7", np.arange(64))).all()
    anonymous = CliRunner().invoke(train, [*TINY, *FGC_TINY, "--bank", address, "--bank-timeout", "1",
                                           "--out-dir", str(tmp_path / "anonymous")])
    assert anonymous.exit_code == 2 and "cannot reach the bank" in one_line(anonymous.output)
    stranger = CliRunner().invoke(train, [*TINY, *FGC_TINY, "--bank", address, "--curve-secret",
                                          str(keys / "stranger.key_secret"), "--curve-server", str(keys / "server.key"),
                                          "--out-dir", str(tmp_path / "stranger")])
    assert stranger.exit_code == 2 and "refused this trainer's CURVE key" in one_line(stranger.output), stranger.output
    half = CliRunner().invoke(train, [*TINY, *FGC_TINY, "--bank", address, keyed[0], keyed[1],
                                      "--out-dir", str(tmp_path / "half")])
    assert half.exit_code == 2 and "needs both --curve-secret" in one_line(half.output)
