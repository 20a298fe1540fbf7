"""A flood is answered with 'busy' instead of growing memory, and replies to vanished clients
are counted rather than silently lost."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import numpy as np
import zmq
from conftest import TIME_FACTOR, start_server, stop_server

from fgc_bank import connect
from fgc_bank.protocol import Request, encode_request


def test_a_flood_gets_busy_replies_and_everything_is_answered(tmp_path: Path) -> None:
    proc, address = start_server(tmp_path, "--max-queue", "4")
    try:
        with connect(address) as bank:
            bank.create("big", 200_000, 64, seed=1)
        queries = np.random.default_rng(0).standard_normal((256, 64)).astype(np.float32)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        sent = 60
        for i in range(sent):
            sock.send_multipart(encode_request(Request("knn", "big", {"k": 50}, {"queries": queries}, id=i + 1)))
        outcomes = []
        for _ in range(sent):
            assert sock.poll(int(120_000 * TIME_FACTOR))
            header = msgpack.unpackb(sock.recv_multipart()[0])
            outcomes.append("ok" if header["ok"] else header["error"]["code"])
        sock.close()
        assert set(outcomes) == {"ok", "busy"}, outcomes
        assert outcomes.count("ok") >= 4
        with connect(address) as bank:
            stats = bank.stats()
            assert stats["errors"]["busy"] == outcomes.count("busy")
            assert stats["queue_depth"] == 0
    finally:
        stop_server(proc)


def test_replies_to_a_client_that_left_are_counted_as_dropped(server: str) -> None:
    with connect(server) as bank:
        bank.create("leaver", 300_000, 64, seed=2)
        before = bank.stats()["dropped_replies"]
    queries = np.ones((512, 64), np.float32)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(server)
    for i in range(16):  # seconds of work, so the last answers come well after the client has left
        sock.send_multipart(encode_request(Request("knn", "leaver", {"k": 100}, {"queries": queries}, id=i + 1)))
    time.sleep(0.2)
    sock.close()  # gone before the answers are ready
    with connect(server) as bank:
        deadline = time.monotonic() + 60 * TIME_FACTOR
        while bank.stats()["dropped_replies"] == before and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bank.stats()["dropped_replies"] > before
        assert bank.info("leaver")["queries"] == 16 * 512  # the work was done; only the replies had nowhere to go
        bank.drop("leaver")


def test_client_bounds_its_calls_in_flight(server: str) -> None:
    from fgc_bank.client import BankClient
    from fgc_bank.errors import BankError, ErrorCode

    with BankClient(server, max_in_flight=3) as bank:
        bank.create("inflight", 100_000, 64, seed=3)
        queries = np.ones((256, 64), np.float32)
        futures = [bank.knn_async("inflight", queries, 10) for _ in range(5)]
        refused = [f for f in futures if f.done() and isinstance(f.exception(), BankError)]
        assert len(refused) == 2 and all(f.exception().code is ErrorCode.BUSY for f in refused)
        assert all(f.result().ids.shape == (256, 10) for f in futures[:3])
        assert bank.knn("inflight", queries, 10).ids.shape == (256, 10)  # room again once collected
        bank.drop("inflight")


def test_a_resent_request_still_queued_is_not_run_twice(server: str) -> None:
    """A client that resends impatiently (Lazy Pirate) costs the server nothing extra."""
    from fgc_bank.client import BankClient

    with BankClient(server, retry_interval=0.05) as bank:
        bank.create("patience", 300_000, 64, seed=4)
        queries = np.ones((512, 64), np.float32)
        futures = [bank.knn_async("patience", queries, 20) for _ in range(4)]
        assert all(f.result().ids.shape == (512, 20) for f in futures)
        assert bank.resends > 0
        assert bank.info("patience")["queries"] == 4 * 512  # each search ran once
        bank.drop("patience")
