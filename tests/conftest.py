"""Shared fixtures: seeded data, numpy oracles, and a real `fgc-bank serve` process on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

# Scale every wait by this factor on slow machines instead of asserting wall times.
TIME_FACTOR = float(os.environ.get("FGC_BANK_TIME_FACTOR", "1"))


def brute_force_knn(rows: np.ndarray, queries: np.ndarray, k: int,
                    exclude: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The oracle: float64 scores, own id masked, full sort."""
    scores = queries.astype(np.float64) @ rows.astype(np.float64).T
    if exclude is not None:
        scores[np.arange(len(queries)), exclude] = -np.inf
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, 1), order


def assert_same_knn(scores: np.ndarray, ids: np.ndarray, ref_scores: np.ndarray, ref_ids: np.ndarray) -> None:
    """Equal scores (float32 tolerance) and equal ids, except where neighbouring scores tie."""
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=1e-5)
    ties = np.isclose(ref_scores[:, :-1], ref_scores[:, 1:], rtol=1e-5, atol=1e-6)
    tied = np.zeros_like(ids, dtype=bool)
    tied[:, :-1] |= ties
    tied[:, 1:] |= ties
    assert (ids[~tied] == ref_ids[~tied]).all()


def momentum_oracle(rows: np.ndarray, ids: np.ndarray, values: np.ndarray, m: float) -> np.ndarray:
    """FGC.md step 2, written directly: normalise(m * row + (1 - m) * value)."""
    out = rows.astype(np.float64).copy()
    mixed = m * out[ids] + (1 - m) * values.astype(np.float64)
    out[ids] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)
    return out


def unused_port() -> int:
    """A loopback TCP port nothing listens on (bound once, then released), below the kernel's
    ephemeral range: a client that keeps connecting to a port inside that range until a server
    comes up can end up connected to itself (TCP simultaneous open), and the server's bind then
    fails with EADDRINUSE."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    with zmq.Context.instance().socket(zmq.ROUTER) as placeholder:
        return placeholder.bind_to_random_port("tcp://127.0.0.1", min_port=max(1024, low - 12000), max_port=low - 1)


def start_server(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    """Start `fgc-bank serve` on a free loopback port and wait until it answers a hello."""
    stamp = time.monotonic_ns()
    address_file = tmp_path / f"address-{stamp}"
    # Its output goes to a file, never to a pipe nobody reads: a full pipe would freeze the server.
    log = tmp_path / f"server-{stamp}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fgc_bank.cli", "--log-level", "warning", "serve", "--port", "0",
             "--address-file", str(address_file), *extra],
            stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log  # type: ignore[attr-defined]
    deadline = time.monotonic() + 60 * TIME_FACTOR
    while not address_file.exists():
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {server_log(proc)}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("server did not start in time")
        time.sleep(0.05)
    address = address_file.read_text().strip()
    from fgc_bank import connect

    with connect(address, timeout=30 * TIME_FACTOR) as client:
        client.hello()
    return proc, address


def server_log(proc: subprocess.Popen) -> str:
    """What a server started by :func:`start_server` has written so far (stdout and stderr)."""
    return proc.log.read_text()  # type: ignore[attr-defined]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30 * TIME_FACTOR)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def check_served_knn(tmp_path: Path, rng: np.random.Generator, engine: str, *serve_args: str) -> None:
    """A real `fgc-bank serve *serve_args`: its bank is searched by ``engine`` and its knn answers
    equal the numpy oracle's."""
    proc, address = start_server(tmp_path, *serve_args)
    try:
        from fgc_bank import connect

        with connect(address) as client:
            assert client.create("feat/7", 50_000, 64, seed=1)["engine"] == engine
            rows = client.gather("feat/7", np.arange(50_000))
            queries = rng.standard_normal((256, 64)).astype(np.float32)
            scores, ids = client.knn("feat/7", queries, 200)
            assert_same_knn(scores, ids, *brute_force_knn(rows, queries, 200))
    finally:
        stop_server(proc)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a real server process, shared by a test module."""
    proc, address = start_server(tmp_path_factory.mktemp("server"))
    yield address
    assert proc.poll() is None, "the server died during the tests"
    stop_server(proc)


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Small tensors gain nothing from intra-op threads, and the bank server shares the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)
