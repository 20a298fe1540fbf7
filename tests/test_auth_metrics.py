"""CURVE authentication, and the Prometheus endpoint."""

from __future__ import annotations

import itertools
import logging
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
from prometheus_client import PROCESS_COLLECTOR, CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import fgc_bank
from bank_server.metrics import LATENCY_BUCKETS_S, ServerMetrics
from bank_server.prometheus import StatsCollector
from fgc_bank import connect
from fgc_bank.bank import BankConfig
from fgc_bank.cli import main
from fgc_bank.errors import BankError, BankTimeout, BankUnavailable, ErrorCode


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
        # A key the server does not accept: "authentication refused", at once, not a timeout
        # that asks whether the server runs; the server logs the refusal.
        with connect(address, timeout=30 * TIME_FACTOR, curve_secret=keys / "stranger.key_secret",
                     curve_server=keys / "server.key") as stranger:
            with pytest.raises(BankUnavailable) as refused:  # a timeout would raise BankTimeout
                stranger.hello()
            assert "authentication refused" in refused.value.message and address in refused.value.message
        result = CliRunner().invoke(main, ["info", address, "--curve-secret", str(keys / "trainer.key_secret"),
                                           "--curve-server", str(keys / "server.key")])
        assert result.exit_code == 0 and "secure" in result.output, result.output
    finally:
        stop_server(proc)
    assert "refused 1 CURVE handshake(s) (Unknown key)" in proc.stderr.read()


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
            bank.update("feat/7", np.arange(4), np.ones((4, 8), np.float32))
            with pytest.raises(BankError):
                bank.knn("feat/7", np.ones((16, 8), np.float32), 0)
        text = urllib.request.urlopen(url, timeout=10).read().decode()
        assert 'fgc_bank_requests_total{op="knn"} 4.0' in text
        assert 'fgc_bank_errors_total{code="bad_k"} 1.0' in text
        assert 'fgc_bank_rows{bank="feat/7"} 1000.0' in text
        assert 'fgc_bank_searches_total{bank="feat/7"} 3.0' in text
        assert 'fgc_bank_queries_total{bank="feat/7"} 48.0' in text
        assert 'fgc_bank_updates_total{bank="feat/7"} 1.0' in text
        assert 'fgc_bank_rows_updated_total{bank="feat/7"} 4.0' in text
        assert "fgc_bank_queue_depth" in text
        assert 'fgc_bank_placement_info{bank="feat/7",device="cpu",engine="faiss"} 1.0' in text
        assert f'fgc_bank_build_info{{device="cpu",engine="faiss",version="{fgc_bank.__version__}"}} 1.0' in text
        assert "fgc_bank_coalesce_wait_seconds_total" in text
        held = BankConfig("feat/7", 1000, 8).nbytes()
        assert f'fgc_bank_held_bytes{{what="banks"}} {float(held)}' in text
        assert 'fgc_bank_held_bytes{what="queued_requests"} 0.0' in text
        assert 'fgc_bank_held_bytes{what="unread_replies"}' in text and "fgc_bank_dropped_requests_total" in text
        assert "process_resident_memory_bytes" in text and "python_info" in text and "python_gc_objects_collected_total" in text
        assert "fgc_bank_stats_errors_total 0.0" in text
        families = {f.name: f for f in text_string_to_metric_families(text)}
    finally:
        stop_server(proc)
    # The three successful knn requests in the histogram (the refused one is an error, not a latency).
    knn = {s.labels["le"]: s.value for s in families["fgc_bank_request_duration_seconds"].samples
           if s.labels.get("op") == "knn" and s.name.endswith("_bucket")}
    assert knn["+Inf"] == 3.0 and knn["0.0001"] <= knn["0.01"] <= knn["10"] <= 3.0
    assert [float(le) for le in knn if le != "+Inf"] == list(LATENCY_BUCKETS_S)
    for name, family in families.items():
        if not name.startswith("fgc_bank_"):
            continue
        words = name.split("_")
        assert all(a != b for a, b in itertools.pairwise(words)), f"{name}: a word said twice"
        assert "bank" not in words[2:], f"{name}: the prefix already says bank"
        assert not any(w in words for w in ("ms", "milliseconds", "kb", "mib", "latency")), f"{name}: not a base unit"
        if family.type == "counter":
            assert all(s.name.endswith(("_total", "_created")) for s in family.samples), name
        else:
            assert not name.endswith("_total"), f"{name}: _total is for counters"


def test_latency_histogram_counts_every_success_in_cumulative_buckets() -> None:
    metrics = ServerMetrics()
    for seconds in (0.00005, 0.001, 0.003, 20.0):  # below the first bound, on a bound, between, above the last
        metrics.observe("knn", None, seconds)
    metrics.observe("knn", BankError(ErrorCode.BAD_K, "k"), 0.0)
    summary = metrics.summary()
    counts = summary["latency_histogram"]["knn"]["counts"]
    bounds = summary["latency_buckets_s"]
    at = dict(zip([*bounds, "+Inf"], counts))
    assert (at[0.0001], at[0.001], at[0.0025], at[0.005], at[10.0], at["+Inf"]) == (1, 2, 2, 3, 3, 4)
    assert summary["latency_histogram"]["knn"]["sum_s"] == pytest.approx(20.00405)
    assert summary["requests"]["knn"] == 5 and summary["errors"]["bad_k"] == 1


def test_a_failing_stats_read_is_logged_and_counted_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    """A bug in the stats (here: a field of the wrong shape) must not turn every scrape into an
    HTTP 500: the scrape answers with the process metrics and the count of failed reads."""
    good = ServerMetrics()
    good.observe("knn", None, 0.01)
    broken = {**good.summary(), "latency_buckets_s": [0.1]}  # 2 bounds' worth of buckets missing
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(lambda: broken, {"version": "x", "device": "cpu", "engine": "faiss"}))
    registry.register(PROCESS_COLLECTOR)
    with caplog.at_level(logging.ERROR, logger="bank_server.prometheus"):
        first = generate_latest(registry).decode()
        second = generate_latest(registry).decode()
    assert "fgc_bank_stats_errors_total 1.0" in first and "fgc_bank_stats_errors_total 2.0" in second
    assert "process_cpu_seconds_total" in second and 'fgc_bank_build_info{device="cpu"' in second
    assert "fgc_bank_requests_total" not in second  # none of a failed read's metrics, rather than some
    failures = [r for r in caplog.records if "cannot read the server's stats" in r.getMessage()]
    assert len(failures) == 2 and failures[0].exc_info is not None and not failures[1].exc_info
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(good.summary))
    assert 'fgc_bank_request_duration_seconds_count{op="knn"} 1.0' in generate_latest(registry).decode()
