"""``fgc-bank bench`` runs end to end on a tiny bank and writes well-formed results.

Timings are never asserted (the machine decides those); only that every figure is there.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from benchmarks import inprocess, report
from benchmarks.suite import MAX_PAIRS, MIN_PAIRS, WIRE_MIN_REQUESTS, pairing
from benchmarks.timing import Latency, Stats
from benchmarks.workloads import WORKLOADS, make_queries, make_update_ids
from fgc_bank.stores.cpu import prefilter

pytestmark = pytest.mark.slow


def test_pairing_fills_the_budget_with_short_blocks() -> None:
    # cifar on this machine: ~10 ms a request, 6 s a client count
    assert pairing(0.010, 6.0) == (10, 60)
    # imagenet-512: a few seconds a request, so the fewest requests and pairs allowed
    assert pairing(2.5, 6.0) == (2, MIN_PAIRS)
    # a fast request and a long budget: capped
    block, pairs = pairing(0.001, 600.0)
    assert (block, pairs) == (100, MAX_PAIRS)


def test_quick_bench_writes_json_chart_and_page_and_fails_on_a_missed_target(tmp_path: Path) -> None:
    """The real command in its own process (its own logging set-up and exit status), with a goal
    no machine meets: every file is still written, the miss is named, the status is 1, and the
    log lines printed while the bar is up each start a line of their own."""
    out = tmp_path / "results"
    args = ["--quick", "--workload", "cifar", "--max-rows", "9000", "--seconds", "0.05", "--reps", "2",
            "--clients", "1", "--clients", "2", "--peak-size", "256", "--out", str(out), "--bound-goal", "1e6", "--shards", "2"]
    done = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "--log-level", "info", "bench", *args],
                          check=False, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-4000:]
    assert "\nfgc-bank bench: missed target: cifar: server, 1 client / compute bound = " in done.stderr
    assert "goal >= 1e+06" in done.stderr
    assert "compute bound" in done.stdout and "targets:" in done.stdout and "(goal >= 1e+06)" in done.stdout
    assert re.search(r"fgc-bank bench: +\d+%\|", done.stderr), done.stderr[-4000:]  # the bar was drawn
    logged = [line for line in done.stderr.split("\n") if "created bank" in line]
    assert logged, done.stderr[-4000:]
    for line in logged:  # what follows the bar's last carriage return is the log line alone
        assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ INFO ", line.split("\r")[-1]), repr(line)

    run = json.loads((out / "bench.json").read_text())
    assert run["peak"]["gflops"] > 0
    assert set(run["machine"]["versions"]) >= {"torch", "faiss-cpu", "numpy"}
    (res,) = run["results"]
    assert res["workload"] == {"name": "cifar", "rows": 9000, "dim": 64, "k": 200, "batch": 256}
    assert res["bound_qps"] == pytest.approx(run["peak"]["gflops"] * 1e9 / (2 * 9000 * 64))
    bf16_beside = {"search-bf16"} if inprocess.bf16_beside(prefilter.best_kind()) else set()
    assert set(res["methods"]) == {"faiss-default", "faiss-blas", "torch-topk", "search-fp32", "search", "bank"} | bf16_beside
    for entry in [*res["methods"].values(), *res["server"]["clients"].values()]:
        stats = entry["qps"]
        assert 0 < stats["low"] <= stats["median"] <= stats["high"] and stats["n"] >= 1
    assert set(res["server"]["clients"]) == {"1", "2"}
    beside = res["server"]["search_beside"]["qps"]
    clients = res["server"]["clients"].values()
    assert 0 < beside["low"] <= beside["median"] <= beside["high"] and beside["n"] == sum(e["pairs"] for e in clients)
    for entry in clients:
        assert MIN_PAIRS <= entry["pairs"] <= MAX_PAIRS and entry["block_requests"] >= 2
        for key in ("beside_qps", "x_beside"):
            stats = entry[key]
            assert 0 < stats["low"] <= stats["median"] <= stats["high"] and stats["n"] == entry["pairs"]
    one_client = res["server"]["clients"]["1"]
    one = next(c for c in run["checks"] if c["what"] == "server, 1 client / search in process")
    assert one["value"] == pytest.approx(one_client["x_beside"]["median"])
    assert "paired blocks" in done.stdout
    assert one_client["server_knn_p50_ms"] > 0
    assert ("wire_p50_ms" in one_client) == (one_client["knn_ms"]["n"] >= WIRE_MIN_REQUESTS)
    for latency in (res["bank"]["knn_update_ms"], res["server"]["knn_update_ms"]):
        assert 0 < latency["p50_ms"] <= latency["p99_ms"]
    assert res["bank"]["update_rows_per_s"]["median"] > 0 and res["server"]["update_rows_per_s"]["median"] > 0
    assert {c["what"] for c in run["checks"]} >= {"server, 1 client / compute bound", "in-process bank / search in process"}
    assert all(c["verdict"] in {"met", "MISSED", "reported"} for c in run["checks"])
    assert run["bound_goals"] == {"cifar": 1e6, "imagenet-128": 1e6, "imagenet-512": 1e6}
    assert report.missed(run)[0] == next(line.removeprefix("fgc-bank bench: ") for line in done.stderr.split("\n")
                                         if "missed target" in line)

    shards = run["shards"]  # one bank over 2 shard servers, imagenet-512's shape capped like the workloads
    assert shards["shards"] == 2 and shards["rows"] == 9000 and shards["k"] == 200 and not shards["judged"]
    assert 0 < shards["slowest_shard_alone_ms"] and 0 < shards["request_ms"] and shards["projected_qps"] > 0
    assert -1 < shards["overhead_fraction"]["median"] < 1 and shards["merge_ms"] > 0
    assert "over S = 2 shard servers" in done.stdout

    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "RESULTS.md").read_text()
    assert "## cifar" in page and "![" in page and "GFLOP/s" in page and "## One bank over shard servers" in page


def test_stats_and_latency_summaries() -> None:
    stats = Stats.of([3.0, 1.0, 2.0])
    assert (stats.median, stats.low, stats.high, stats.n) == (2.0, 1.0, 3.0, 3)
    assert stats.spread == pytest.approx(1.0)
    latency = Latency.of([0.001] * 99 + [0.1])
    assert latency.p50_ms == pytest.approx(1.0) and latency.p99_ms > 1.0


def test_workloads_resize_and_synthetic_inputs() -> None:
    small = WORKLOADS["imagenet-512"].resized(max_rows=1000, batch=16)
    assert (small.rows, small.dim, small.k, small.batch) == (1000, 512, 200, 16)
    assert WORKLOADS["cifar"].resized(max_rows=10).rows == 200  # never below k
    rows = WORKLOADS["cifar"].resized(max_rows=500)
    table = make_queries(lambda ids: ids[:, None] * 1.0 + 1.0, rows.rows, 8, 2, seed=0)
    assert len(table) == 2 and table[0].shape == (8, 1) and table[0].dtype.name == "float32"
    ids = make_update_ids(500, 64, 3, seed=0)
    assert all(len(set(i.tolist())) == 64 for i in ids)


def test_checks_compare_the_right_contenders() -> None:
    def stats(q: float) -> dict:
        return {"median": q, "low": q, "high": q, "n": 1}

    result = {"workload": {"name": "imagenet-128"}, "bound_qps": 1000.0,
              "methods": {k: {"qps": stats(q)} for k, q in
                          {"faiss-default": 100, "faiss-blas": 600, "torch-topk": 300, "search": 800, "bank": 790}.items()},
              "server": {"clients": {"1": {"qps": stats(760)}, "4": {"qps": stats(820)}}}}
    found = {c.what: (c.value, c.verdict) for c in report.checks([result])}
    assert found["server, 1 client / compute bound"] == (pytest.approx(0.76), "met")
    assert found["server, 1 client / search in process"] == (pytest.approx(0.95), "met")
    assert found["server, 4 clients (aggregate) / search in process"] == (pytest.approx(1.025), "met")
    assert found["in-process bank / search in process"] == (pytest.approx(0.9875), "met")
    assert found["search / faiss-default"] == (pytest.approx(8.0), "reported")
    # With the search measured beside the server runs, the server's ratios use that one.
    result["server"]["search_beside"] = {"qps": stats(760)}
    found = {c.what: (c.value, c.verdict) for c in report.checks([result])}
    assert found["server, 1 client / search in process"] == (pytest.approx(1.0), "met")
    assert found["server, 4 clients (aggregate) / search in process"] == (pytest.approx(820 / 760), "met")
    assert found["in-process bank / search in process"] == (pytest.approx(0.9875), "met")
    # The paired blocks' ratios, where the run has them, are what the checks use.
    result["server"]["clients"]["1"]["x_beside"] = {"median": 0.88, "low": 0.8, "high": 0.95, "n": 8}
    assert report._paired(result["server"]) == "1 client(s) 0.880 (0.800-0.950, 8 pairs)"
    found = {c.what: (c.value, c.verdict) for c in report.checks([result])}
    assert found["server, 1 client / search in process"] == (pytest.approx(0.88), "MISSED")
    assert found["server, 4 clients (aggregate) / search in process"] == (pytest.approx(820 / 760), "met")
    assert "server, 1 client: server p50 / client p50" not in found  # no wire figure in this run
    result["server"]["clients"]["1"].update(knn_ms={"p50_ms": 12.5, "p99_ms": 20.0, "n": 500},
                                            server_knn_p50_ms=11.4, wire_p50_ms=1.1)
    found = {c.what: (c.value, c.verdict) for c in report.checks([result])}
    assert found["server, 1 client: server p50 / client p50"] == (pytest.approx(11.4 / 12.5), "met")
    # What makes `fgc-bank bench` exit 1: exactly the missed targets, each named with value and goal.
    run = {"checks": [c.__dict__ | {"verdict": c.verdict} for c in report.checks([result])]}
    assert report.missed(run) == ["missed target: imagenet-128: server, 1 client / search in process = 0.880, goal >= 0.9"]
    run = {"checks": [c.__dict__ | {"verdict": c.verdict} for c in report.checks([result], {"imagenet-128": 0.8})]}
    assert report.missed(run)[0].startswith("missed target: imagenet-128: server, 1 client / compute bound = 0.760")


def test_gpu_bench_names_its_missed_targets() -> None:
    from benchmarks import gpu

    met = {"workload": "imagenet-512", **{key: goal for key, goal in gpu.TARGETS.items()}}
    assert gpu.missed([met, {"workload": "cifar", **dict.fromkeys(gpu.TARGETS, 0.0)}]) == []
    assert gpu.missed([{**met, "update_rows_per_s": 9e6}]) == ["missed target: imagenet-512: update_rows_per_s = 9e+06, goal >= 1e+07"]


@pytest.mark.parametrize("what", ["search", "bank", "server"])
def test_the_paired_ab_compares_two_trees(what: str, capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """The tree against itself: both processes run, pair up, and the ratio is about 1."""
    from benchmarks import ab_search

    tree = str(Path(ab_search.__file__).resolve().parent.parent)
    monkeypatch.setattr("sys.argv", ["ab_search", "--old-tree", tree, "--rows", "3000", "--dim", "16", "--k", "10",
                                     "--batch", "8", "--requests", "3", "--pairs", "4", "--what", what])
    ab_search.main()
    line = capsys.readouterr().out.strip()
    median = float(line.split("median ")[1].split(",")[0])
    assert line.startswith(f"{what}, N 3,000") and "(4 pairs)" in line and 0.2 < median < 5.0, line


def test_the_chart_gives_every_series_its_own_colour_and_marker_and_says_how_the_run_was_made(tmp_path: Path) -> None:
    """Drawn again from the committed run's bench.json (nothing measured)."""
    recorded = Path(report.__file__).with_name("bench.json")
    run = json.loads(recorded.read_text())
    keys = report.series(run["results"])
    assert len(keys) == 12 and keys[:3] == report.BASELINES  # the baselines form their own group
    styles = report.series_styles([*keys, "server-8", "server-16"])  # and two series the table does not know
    assert len({colour for colour, _ in styles.values()}) == len(styles) == 14
    assert len({marker for _, marker in styles.values()}) == 14
    title = report.chart_title(run)
    assert "full run" in title and run["machine"]["cpu"] in title and "cifar N=50,000 k=200" in title
    assert "--quick, banks capped at 9,000 rows" in report.chart_title({**run, "mode": {"quick": True, "max_rows": 9000}})
    result = CliRunner().invoke(report.redraw, [str(recorded), "--chart", str(tmp_path / "c.png"),
                                                "--page", str(tmp_path / "p.md")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![queries/s of each contender beside the compute bound](c.png)" in (tmp_path / "p.md").read_text()
