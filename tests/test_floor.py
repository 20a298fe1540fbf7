"""``python -m benchmarks.floor``: the bare pyzmq server answers like the search, and the
comparison runs end to end (timings are never asserted, only that every figure is there)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks import floor
from benchmarks.workloads import WORKLOADS, make_queries
from fgc_bank.bank import MemoryBank

pytestmark = pytest.mark.slow


def test_bare_server_answers_the_exact_top_k(tmp_path: Path) -> None:
    workload = WORKLOADS["cifar"].resized(3000, batch=32)
    address = tmp_path / "address"
    server = threading.Thread(target=floor.serve_bare, args=(address, workload, 0, 1), daemon=True)
    server.start()
    deadline = time.monotonic() + 60
    while not (address.exists() and address.read_text()) and time.monotonic() < deadline:
        time.sleep(0.02)
    rows = MemoryBank(workload.bank_config(0)).export()  # the rows the bare server builds from the seed
    (queries,) = make_queries(rows.__getitem__, workload.rows, workload.batch, 1, 5)
    client = floor.BareClient(address.read_text(), "unused")
    scores, ids = client.knn(queries, workload.k)
    client.stop()
    server.join(timeout=30)
    assert not server.is_alive()  # the stop frame ends the loop

    brute = queries @ rows.T  # numpy oracle
    expected = np.argsort(-brute, axis=1, kind="stable")[:, :workload.k]
    np.testing.assert_allclose(scores, np.take_along_axis(brute, expected, 1), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.sort(ids, axis=1), np.sort(expected, axis=1))


def test_floor_command_times_all_three_contenders(tmp_path: Path) -> None:
    out = tmp_path / "floor.json"
    args = ["--workload", "cifar", "--max-rows", "3000", "--blocks", "2", "--per-block", "2", "--threads", "1",
            "--json", str(out)]
    result = CliRunner().invoke(floor.main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "search / this" in result.output
    run = json.loads(out.read_text())
    assert set(run["seconds"]) == {"search", "server", "bare"}
    assert all(len(s) == 2 and min(s) > 0 for s in run["seconds"].values())
    assert run["x_search"]["search"] == 1.0
    assert all(x > 0 for x in run["x_search"].values())
