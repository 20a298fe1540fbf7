"""The bank over loopback: an ``fgc-bank serve`` subprocess and client processes that load it.

Each client is its own process (its own GIL, socket and I/O thread), like a training rank. The
parent drives them over a pipe with small JSON commands: build queries, then run N synchronous
requests after an untimed one and report each request's latency and the run's start and end on
the shared monotonic clock. Aggregate throughput is all queries answered over the span from the
first start to the last end.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.workloads import Workload, make_queries, make_update_ids

if TYPE_CHECKING:
    from typing import Self

logger = logging.getLogger(__name__)

SERVER_START_TIMEOUT_S = 120.0
CLIENT_TIMEOUT_S = 600.0  # one imagenet-512 request takes seconds; coalesced ones longer
# The client resends a request that has had no reply for retry_interval seconds (10 s by
# default). Four clients queueing imagenet-512 searches wait longer than that without anything
# being wrong, and a resent knn is searched again, so the benchmark disables resending.
CLIENT_OPTIONS = {"timeout": CLIENT_TIMEOUT_S, "retry_interval": CLIENT_TIMEOUT_S}
QUERY_BATCHES = 4
WINDOW = 2  # requests in flight for the "knn_window" runs


def wait_for_address(process: subprocess.Popen, address_file: Path, command: Sequence[str]) -> str:
    """The address a server ``process`` writes to ``address_file`` once it listens; RuntimeError
    if it exits first or takes longer than ``SERVER_START_TIMEOUT_S``."""
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not (address_file.exists() and address_file.read_text().strip()):
        if process.poll() is not None:
            raise RuntimeError(f"{' '.join(command)} exited with code {process.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{' '.join(command)} did not write {address_file} within {SERVER_START_TIMEOUT_S:.0f} s")
        time.sleep(0.05)
    return address_file.read_text().strip()


class Server:
    """``fgc-bank serve --port 0`` in a subprocess; ``address`` once it is listening."""

    def __init__(self, threads: int, workers: int = 1, device: str = "cpu", extra: Sequence[str] = ()) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="fgc-bank-bench-")
        address_file = Path(self._dir.name) / "address"
        command = [sys.executable, "-m", "fgc_bank.cli", "--log-level", "warning", "serve", "--port", "0",
                   "--address-file", str(address_file), "--faiss-threads", str(threads),
                   "--workers", str(workers), "--device", device, *extra]
        # Its log lines are relayed through this process's logging (a thread keeps reading, so the
        # pipe never fills): under `fgc-bank bench` they then print above the progress bar.
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self._relay = threading.Thread(target=_relay, args=(self.process.stderr,), daemon=True,
                                       name="fgc-bank-serve-log")
        self._relay.start()
        try:
            self.address = wait_for_address(self.process, address_file, command)
        except RuntimeError:
            self.close()
            raise

    def close(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL if it lingers)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._relay.join(timeout=5)  # its last lines (why it stopped, if it failed)
        if not self._relay.is_alive() and self.process.stderr is not None:
            self.process.stderr.close()
        self._dir.cleanup()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _relay(lines: Iterable[str]) -> None:
    """Log each line the server writes on stderr, until it closes the pipe."""
    for line in lines:
        logger.warning("fgc-bank serve: %s", line.rstrip())


@dataclass(frozen=True)
class Run:
    """What one client reports for one command."""

    start: float
    end: float
    latencies: list[float]


def client_main(address: str, workload: Workload, bank: str, seed: int, conn: multiprocessing.connection.Connection) -> None:
    """A client process: answer the parent's commands until ``stop``."""
    from fgc_bank.api import connect

    with connect(address, **CLIENT_OPTIONS) as client:
        queries = make_queries(lambda ids: client.gather(bank, ids), workload.rows, workload.batch,
                               QUERY_BATCHES, seed)
        ids = make_update_ids(workload.rows, workload.batch, QUERY_BATCHES, seed + 1)
        calls = {
            "knn": lambda i: client.knn(bank, queries[i % QUERY_BATCHES], workload.k),
            "knn_update": lambda i: client.knn_update(bank, ids[i % QUERY_BATCHES], queries[i % QUERY_BATCHES], workload.k),
            "update": lambda i: client.update(bank, ids[i % QUERY_BATCHES], queries[i % QUERY_BATCHES]),
        }
        conn.send_bytes(b"ready")
        while True:
            command = json.loads(conn.recv_bytes())
            if command["op"] == "stop":
                return
            if command["op"] == "knn_window":
                start = time.monotonic()
                latencies = _windowed_knn(client, bank, queries, workload.k, command["count"], WINDOW)
            else:
                call = calls[command["op"]]
                call(-1)  # untimed, like the search blocks' first search: caches and threads are cold
                start = time.monotonic()
                latencies = []
                for i in range(command["count"]):
                    begin = time.perf_counter()
                    call(i)
                    latencies.append(time.perf_counter() - begin)
            conn.send_bytes(json.dumps({"start": start, "end": time.monotonic(), "latencies": latencies}).encode())


def _windowed_knn(client: Any, bank: str, queries: Sequence[np.ndarray], k: int, count: int,
                  window: int) -> list[float]:
    """``count`` knn requests with ``window`` in flight (as a trainer issues ``knn_update_async``
    for one block while another's answer is still coming): per-request latencies."""
    in_flight: list[tuple[float, Any]] = []
    latencies = []
    for i in range(count):
        if len(in_flight) == window:
            begin, future = in_flight.pop(0)
            future.result()
            latencies.append(time.perf_counter() - begin)
        in_flight.append((time.perf_counter(), client.knn_async(bank, queries[i % len(queries)], k)))
    for begin, future in in_flight:
        future.result()
        latencies.append(time.perf_counter() - begin)
    return latencies


class Fleet:
    """``size`` client processes connected to one server's bank."""

    def __init__(self, address: str, workload: Workload, bank: str, size: int, seed: int) -> None:
        ctx = multiprocessing.get_context("spawn")  # no forked copies of torch/zmq thread state
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs = []
        for i in range(size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=client_main, args=(address, workload, bank, seed + 100 * i, child),
                               name=f"fgc-bank-bench-client-{i}", daemon=True)
            proc.start()
            self._conns.append(parent)
            self._procs.append(proc)
        for i, conn in enumerate(self._conns):
            if not conn.poll(CLIENT_TIMEOUT_S) or conn.recv_bytes() != b"ready":
                raise RuntimeError(f"benchmark client {i} did not start")

    def run(self, op: str, count: int, clients: int) -> list[Run]:
        """``count`` synchronous ``op`` requests from each of the first ``clients`` clients, at once."""
        command = json.dumps({"op": op, "count": count}).encode()
        for conn in self._conns[:clients]:
            conn.send_bytes(command)
        runs = []
        for conn in self._conns[:clients]:
            reply = json.loads(conn.recv_bytes())
            runs.append(Run(reply["start"], reply["end"], reply["latencies"]))
        return runs

    def close(self) -> None:
        for conn in self._conns:
            try:
                conn.send_bytes(json.dumps({"op": "stop"}).encode())
            except (BrokenPipeError, OSError):
                pass
        for proc in self._procs:
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def aggregate_qps(runs: Sequence[Run], batch: int) -> float:
    """Queries answered per second by all clients together, over their common span."""
    queries = sum(len(r.latencies) for r in runs) * batch
    return queries / (max(r.end for r in runs) - min(r.start for r in runs))


def server_counters(stats: dict[str, Any]) -> tuple[int, int]:
    """(coalesced FAISS calls, requests in them) from a ``stats`` reply."""
    return int(stats.get("batches", 0)), int(stats.get("coalesced_requests", 0))


def default_threads() -> int:
    """Cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def pooled(runs_per_rep: Sequence[Sequence[Run]]) -> np.ndarray:
    """Every request latency (seconds) of every client and repetition."""
    return np.array([lat for runs in runs_per_rep for r in runs for lat in r.latencies])
