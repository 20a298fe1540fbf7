"""Clients that stop reading their replies must not freeze the server for everyone else.

(a) A DEALER sends thousands of ``gather`` requests (32 KB replies) and never reads a reply. It
    sets RCVHWM=1 and a 4 KB receive buffer so its pipe fills after ~1,000 replies; a client with
    default settings does the same with a few thousand more requests.
(b) A real ``fgc_bank`` client process with thousands of ``knn_async`` calls in flight (24 KB
    replies) is SIGSTOPped, as a debugger or a swapped-out trainer would be.

During each, a second client's ``hello`` must be answered within 1 s, probed several times over a
few seconds (and, for (a), again after the slow reader has gone); then SIGTERM must stop the
server within a few seconds. Every observation is made before anything is asserted, so a failure
reports all of them.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import TIME_FACTOR
from hostile import ServerProcess, pack, probe

from fgc_bank import connect
from fgc_bank.protocol import PROTOCOL_VERSION

BANK, ROWS, DIM = "slow", 8192, 32
HELLO_WITHIN_S = 1.0 * TIME_FACTOR
SIGTERM_WITHIN_S = 10.0 * TIME_FACTOR


def _probe_hellos(address: str, count: int, spacing_s: float) -> list[float | None]:
    """``count`` hello round trips, ``spacing_s`` apart: seconds each, None if not within 1 s."""
    latencies = []
    for _ in range(count):
        latencies.append(probe(address, "hello", timeout_s=HELLO_WITHIN_S))
        time.sleep(spacing_s)
    return latencies


def _describe(latencies: list[float | None]) -> str:
    return "[" + ", ".join("none" if s is None else f"{s * 1000:.1f} ms" for s in latencies) + "]"


def _serve_bank(tmp_path: Path) -> ServerProcess:
    server = ServerProcess(tmp_path)
    with connect(server.address, timeout=30 * TIME_FACTOR) as client:
        client.create(BANK, ROWS, DIM, init="unit", seed=1)
    return server


@pytest.mark.timeout(120)
def test_a_client_that_never_reads_its_replies_does_not_freeze_the_server(tmp_path: Path) -> None:
    server = _serve_bank(tmp_path)
    attacker = zmq.Context.instance().socket(zmq.DEALER)
    try:
        attacker.setsockopt(zmq.LINGER, 0)
        attacker.setsockopt(zmq.RCVHWM, 1)
        attacker.setsockopt(zmq.RCVBUF, 4096)
        attacker.setsockopt(zmq.SNDTIMEO, int(2000 * TIME_FACTOR))
        attacker.connect(server.address)
        ids = np.arange(256, dtype=np.int64)  # 256 x 32 float32: 32 KB a reply
        sent = 0
        for rid in range(1, 4001):
            header = {"v": PROTOCOL_VERSION, "id": rid, "op": "gather", "bank": BANK, "args": {},
                      "arrays": [["ids", "int64", [len(ids)]]]}
            try:
                attacker.send_multipart([pack(header), ids.tobytes()])
            except zmq.Again:  # the server stopped reading
                break
            sent += 1
        during = _probe_hellos(server.address, 5, 1.0)
        attacker.close(linger=0)
        after_leaving = _probe_hellos(server.address, 3, 1.0)
        alive = server.alive()
        status = server.terminate(SIGTERM_WITHIN_S)
    finally:
        attacker.close(linger=0)
        server.kill()
    _assert_served({f"hello while {sent} unread gather replies piled up": during,
                    "hello after the slow reader closed its socket": after_leaving}, alive, status)


def _assert_served(probes: dict[str, list], alive: bool, status: int | None) -> None:
    """Every hello probe answered, the server alive, and SIGTERM obeyed; all failures at once."""
    failures = [f"{what}: {_describe(latencies)}" for what, latencies in probes.items() if None in latencies]
    if not alive:
        failures.append("the server died")
    if status is None:
        failures.append(f"SIGTERM did not stop the server within {SIGTERM_WITHIN_S:.0f} s (killed)")
    assert not failures, "\n".join(failures)


CALLS = 4000  # in flight at once: more replies than a peer's pipe holds (the client allows that many)
CLIENT_SCRIPT = """
import sys, time
import numpy as np
from fgc_bank import connect

address, calls = sys.argv[1], int(sys.argv[2])
client = connect(address, timeout=600, max_in_flight=calls)
queries = np.random.default_rng(0).standard_normal((2, 32)).astype(np.float32)
futures = [client.knn_async("slow", queries, 1024) for _ in range(calls)]
futures[0].result()
time.sleep(0.2)
print("in flight", flush=True)
for future in futures:
    future.result()
print("done", flush=True)
"""


def _read_line(proc: subprocess.Popen, timeout_s: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    return proc.stdout.readline().strip() if ready else ""


@pytest.mark.timeout(120)
def test_a_sigstopped_client_with_many_calls_in_flight_does_not_freeze_the_server(tmp_path: Path) -> None:
    server = _serve_bank(tmp_path)
    client = subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, server.address, str(CALLS)],
                              stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = _read_line(client, 60 * TIME_FACTOR)
        assert line == "in flight", f"the client process did not start its calls ({line!r})"
        os.kill(client.pid, signal.SIGSTOP)
        during = _probe_hellos(server.address, 6, 1.0)
        alive = server.alive()
        status = server.terminate(SIGTERM_WITHIN_S)
    finally:
        client.kill()  # SIGKILL ends a stopped process too
        client.wait(timeout=30)
        server.kill()
    _assert_served({f"hello while a client with {CALLS} knn calls in flight is stopped": during}, alive, status)
