"""CURVE authentication, and the Prometheus endpoint."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TIME_FACTOR, server_log, start_server, stop_server

from fgc_bank import connect
from fgc_bank.bank import BankConfig
from fgc_bank.cli import main
from fgc_bank.errors import BankError, BankTimeout, ErrorCode


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("keys")
    for name in ("server", "trainer", "stranger"):
        result = CliRunner().invoke(main, ["keys", "--dir", str(root), "--name", name])
        assert result.exit_code == 0, result.output
    (root / "allowed").mkdir()
    shutil.copy(root / "trainer.key", root / "allowed" / "trainer.key")
    return root


def test_curve_server_serves_keyed_clients_and_refuses_the_rest(keys: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "fgc_bank.cli", "serve", "--port", "0",
                             "--address-file", str(tmp_path / "addr"), "--curve-secret", str(keys / "server.key_secret"),
                             "--curve-clients", str(keys / "allowed")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60 * TIME_FACTOR
        while not (tmp_path / "addr").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.poll() is not None else ""
            time.sleep(0.05)
        address = (tmp_path / "addr").read_text().strip()
        with connect(address, timeout=30 * TIME_FACTOR, curve_secret=keys / "trainer.key_secret",
                     curve_server=keys / "server.key") as trainer:
            trainer.create("secure", 100, 4)
            assert trainer.knn("secure", np.ones((1, 4), np.float32), 3).ids.shape == (1, 3)
        with connect(address, timeout=1.0) as anonymous:
            # Refused handshakes leave the DEALER without a peer, where a blocking send would hang
            # the client for good: every call must still end, and close() must return.
            for _ in range(3):
                with pytest.raises(BankTimeout):
                    anonymous.hello()
                time.sleep(0.3)
        with connect(address, timeout=1.0, curve_secret=keys / "stranger.key_secret",
                     curve_server=keys / "server.key") as stranger, pytest.raises(BankTimeout):
            stranger.hello()
        result = CliRunner().invoke(main, ["info", address, "--curve-secret", str(keys / "trainer.key_secret"),
                                           "--curve-server", str(keys / "server.key")])
        assert result.exit_code == 0 and "secure" in result.output, result.output
    finally:
        stop_server(proc)


def test_curve_options_are_checked_up_front(keys: Path) -> None:
    with pytest.raises(BankError) as info:
        connect("tcp://127.0.0.1:1", curve_secret=keys / "trainer.key_secret")
    assert info.value.code is ErrorCode.BAD_ARGUMENT
    with pytest.raises(BankError) as info:
        connect("tcp://127.0.0.1:1", curve_secret=keys / "trainer.key", curve_server=keys / "server.key")
    assert "no secret key" in info.value.message
    result = CliRunner().invoke(main, ["serve", "--curve-secret", str(keys / "server.key_secret")])
    assert result.exit_code == 2 and "go together" in result.output


def test_prometheus_endpoint_reports_requests_and_banks(tmp_path: Path) -> None:
    proc, address = start_server(tmp_path, "--metrics-port", "0")
    try:
        url = next(w for w in server_log(proc).split() if w.startswith("http://"))
        with connect(address) as bank:
            bank.create("feat/7", 1000, 8)
            for _ in range(3):
                bank.knn("feat/7", np.ones((16, 8), np.float32), 5)
            with pytest.raises(BankError):
                bank.knn("feat/7", np.ones((16, 8), np.float32), 0)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'fgc_bank_requests_total{op="knn"} 4.0' in text
        assert 'fgc_bank_errors_total{code="bad_k"} 1.0' in text
        assert 'fgc_bank_bank_rows{bank="feat/7"} 1000.0' in text
        assert 'fgc_bank_bank_queries_total{bank="feat/7"} 48.0' in text
        assert "fgc_bank_queue_depth" in text
        assert 'fgc_bank_bank_placement{bank="feat/7",device="cpu",engine="faiss"} 1.0' in text
        assert "fgc_bank_coalesce_wait_seconds_total" in text
        held = BankConfig("feat/7", 1000, 8).nbytes()
        assert f'fgc_bank_held_bytes{{what="banks"}} {float(held)}' in text
        assert 'fgc_bank_held_bytes{what="queued_requests"} 0.0' in text
        assert 'fgc_bank_held_bytes{what="unread_replies"}' in text and "fgc_bank_dropped_requests_total" in text
    finally:
        stop_server(proc)
