"""What the server holds is bounded in bytes: queued requests, unread replies, replies before they
are computed, all banks together; and one message that breaks the handler never ends the loop."""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import zmq
from conftest import TIME_FACTOR

from bank_server.delivery import ZERO_COPY_BYTES, Delivery
from bank_server.dispatch import Dispatcher, Job
from bank_server.server import BankServer, ServerConfig
from fgc_bank import connect
from fgc_bank.bank import BankConfig
from fgc_bank.errors import BankError, ErrorCode, quote
from fgc_bank.protocol import Reply, Request, decode_reply, encode_request
from fgc_bank.service import BankService, Limits


def test_quoting_a_hostile_value_is_bounded_in_depth_and_length() -> None:
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    for value in (deep, "x" * 10**6, list(range(10**5)), {str(i): i for i in range(10**4)}, 7**5000):
        assert len(quote(value)) < 200


def knn_job(rid: int, rows: int) -> Job:
    return Job(None, Request("knn", "b", {"k": 1}, {"queries": np.ones((rows, 16), np.float32)}, rid))


def test_queued_request_bytes_are_bounded_over_all_workers() -> None:
    service = BankService()
    service.create("b", {"rows": 100, "dim": 16})
    answered: list[Reply] = []
    dispatcher = Dispatcher(service, lambda replies: answered.extend(r for _, r in replies), workers=2,
                            max_queued_bytes=64 * 16 * 4 * 3)
    release = threading.Event()
    paused = threading.Thread(target=dispatcher.barrier, args=(release.wait,))
    paused.start()  # the workers hold still, so every job stays queued
    try:
        for rid in range(3):
            dispatcher.submit(knn_job(rid, 64))
        assert dispatcher.queued_bytes == 3 * 64 * 16 * 4
        with pytest.raises(BankError) as info:
            dispatcher.submit(knn_job(9, 1))
        assert info.value.code is ErrorCode.BUSY
        with pytest.raises(BankError) as info:
            dispatcher.submit(knn_job(10, 1000))
        assert info.value.code is ErrorCode.TOO_LARGE
    finally:
        release.set()
        paused.join()
        dispatcher.stop()
    assert sorted(r.id for r in answered) == [0, 1, 2] and dispatcher.queued_bytes == 0


def test_replies_are_refused_before_they_are_computed_when_too_large() -> None:
    service = BankService(Limits(max_reply_bytes=2**20))
    service.create("b", {"rows": 1000, "dim": 512})
    gather = Request("gather", "b", {}, {"ids": np.zeros(600, np.int64)}, 1)  # 600 x 512 x 4 > 1 MiB
    sample = Request("sample", "b", {"m": 600}, {}, 2)
    knn = Request("knn", "b", {"k": 500}, {"queries": np.ones((200, 512), np.float32)}, 3)
    for request in (gather, sample, knn):
        reply = service.handle(request)
        assert reply.error is not None and reply.error.code is ErrorCode.TOO_LARGE, request.op
        assert "ask for fewer" in reply.error.message
    assert service.handle(Request("gather", "b", {}, {"ids": np.zeros(500, np.int64)}, 4)).error is None


def test_all_banks_together_stay_under_the_total_limit() -> None:
    size = BankConfig("x", 1000, 64).nbytes()  # rows, and the low-precision copy this CPU keeps
    service = BankService(Limits(max_total_bytes=int(2.5 * size)))
    service.create("a", {"rows": 1000, "dim": 64})
    service.create("b", {"rows": 1000, "dim": 64})
    with pytest.raises(BankError) as info:
        service.create("c", {"rows": 1000, "dim": 64})
    assert info.value.code is ErrorCode.TOO_LARGE and "all banks" in info.value.message
    service.handle(Request("drop", "a"))
    service.create("c", {"rows": 1000, "dim": 64})


def test_the_delivery_ledger_counts_what_zeromq_still_holds() -> None:
    ledger = Delivery(total_bytes=10 * ZERO_COPY_BYTES, peer_bytes=3 * ZERO_COPY_BYTES)
    big = np.zeros(ZERO_COPY_BYTES, np.uint8)
    kept = [ledger.admit(b"slow", [b"peer", b"header", memoryview(big)]) for _ in range(3)]
    assert all(k is not None for k in kept) and ledger.held(b"slow") == 3 * ZERO_COPY_BYTES
    assert ledger.blocked(b"slow") and ledger.admit(b"slow", [b"p", memoryview(big)]) is None
    assert ledger.admit(b"other", [b"p", memoryview(big)]) is not None  # another peer has its own budget
    assert ledger.admit(b"small", [b"p", b"x" * 100]) is not None and ledger.held(b"small") == 0
    del kept  # what ZeroMQ does when the peer has read them: it lets the buffers go
    gc.collect()
    assert ledger.held(b"slow") == 0 and not ledger.blocked(b"slow")


@pytest.fixture
def in_process_server() -> Iterator[BankServer]:
    server = BankServer(ServerConfig(port=0))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.stop()
    thread.join(30 * TIME_FACTOR)
    assert not thread.is_alive()


def test_a_handler_that_raises_is_answered_internal_and_the_loop_goes_on(in_process_server: BankServer,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    real = in_process_server._handle
    calls = []

    def broken_once(peer, frames) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RecursionError("what a 1,000-deep value did to the error path")
        real(peer, frames)

    monkeypatch.setattr(in_process_server, "_handle", broken_once)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(in_process_server.address)
    try:
        sock.send_multipart(encode_request(Request("hello", id=41)))
        assert sock.poll(10_000 * TIME_FACTOR)
        reply = decode_reply(sock.recv_multipart())
        assert reply.id == 41 and reply.error is not None and reply.error.code is ErrorCode.INTERNAL
    finally:
        sock.close()
    with connect(in_process_server.address, timeout=10 * TIME_FACTOR) as bank:
        assert bank.hello()["protocol"] == 1


def test_a_restore_of_a_name_the_os_refuses_is_a_bad_argument(tmp_path) -> None:
    server = BankServer(ServerConfig(port=0, snapshot_dir=tmp_path / "snaps"))
    try:
        server.snapshotter.snapshot()  # the directory holds a snapshot
        reply = []
        server._respond = lambda replies: reply.extend(r for _, r in replies)
        server._run_admin(Job(None, Request("restore", None, {"name": "snapshot-" + "9" * 300}, {}, 5)))
        assert reply[0].error is not None and reply[0].error.code is ErrorCode.BAD_ARGUMENT
        assert len(reply[0].error.message) < 300
    finally:
        server.stop()
        server._shutdown()


def test_a_client_that_pipelines_many_requests_gets_every_reply(in_process_server: BankServer) -> None:
    """A worker answers a run of queued requests in one burst: a peer that reads must get all of
    it (only a peer that stops reading reaches the per-peer limit)."""
    with connect(in_process_server.address, timeout=30 * TIME_FACTOR) as bank:
        bank.create("b", 1000, 16)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(in_process_server.address)
    try:
        rows = np.ones((1, 16), np.float32)
        for rid in range(1, 1001):
            sock.send_multipart(encode_request(Request("update", "b", {}, {"ids": np.array([rid - 1]), "rows": rows}, rid)))
        got = set()
        while len(got) < 1000 and sock.poll(10_000 * TIME_FACTOR):
            got.add(decode_reply(sock.recv_multipart()).unwrap().id)
        assert got == set(range(1, 1001))
    finally:
        sock.close()
    assert in_process_server.metrics.dropped_replies == 0
