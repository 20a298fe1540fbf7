"""The exactly-once table: its window, its isolation between clients, its memory, and the same
guarantees through a real server (resends after many later requests, after floods of fresh client
ids, with other content, and across a restart)."""

from __future__ import annotations

import gc
import inspect
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import zmq
from conftest import TIME_FACTOR, server_log, start_server, stop_server

from bank_server.dedup import (
    CACHE_ENTRY_BYTES,
    RECORD_BYTES,
    RecentRequests,
    Seen,
    digest,
    reply_bytes,
)
from fgc_bank import connect
from fgc_bank.protocol import Reply, Request, decode_reply, encode_request


class Job:
    peer = b"old"


def update(rid: int, ids: list[int], value: float = 1.0, client: int = 5) -> Request:
    rows = np.full((len(ids), 4), value, np.float32)
    return Request("update", "b", {}, {"ids": np.array(ids, np.int64), "rows": rows}, rid, client)


def run(table: RecentRequests, request: Request, reply: Reply | None = None) -> Seen:
    """What the server does with a request: check it, and if new, queue it and answer it."""
    seen, _ = table.check(request.client, request.id, digest(request), request.op)
    if seen is Seen.NEW:
        table.begin(request.client, request.id, digest(request), Job())
        table.done(request.client, request.id, request.op, reply or Reply(request.id))
    return seen


def test_a_copy_is_recognised_within_the_window_and_refused_after_it() -> None:
    table = RecentRequests(window=4, reply_budget=10 * CACHE_ENTRY_BYTES)
    for rid in range(1, 8):
        assert run(table, update(rid, [rid])) is Seen.NEW
    assert run(table, update(7, [7])) is Seen.DONE
    assert run(table, update(4, [4])) is Seen.DONE  # the 4th latest: still in the window
    assert run(table, update(3, [3])) is Seen.STALE  # older: refused, never applied again
    assert run(table, update(8, [8])) is Seen.NEW


def test_a_queued_copy_redirects_its_reply_and_an_id_reused_with_other_content_is_refused() -> None:
    table = RecentRequests()
    job, request = Job(), update(1, [1, 2])
    table.begin(5, 1, digest(request), job)
    assert table.check(5, 1, digest(request), "update", b"new")[0] is Seen.QUEUED and job.peer == b"new"
    assert table.check(5, 1, digest(update(1, [1, 2], value=2.0)), "update")[0] is Seen.REUSED
    drop = Request("drop", "b", {}, {}, 1, 5)
    assert table.check(5, 1, digest(drop), "drop")[0] is Seen.REUSED
    table.done(5, 1, "update", Reply(1))
    assert table.check(5, 1, digest(update(1, [2, 1])), "update")[0] is Seen.REUSED
    assert table.check(5, 1, digest(request), "update")[0] is Seen.DONE


def test_no_client_evicts_another_clients_records() -> None:
    table = RecentRequests(max_clients=3, ttl_s=3600)
    assert run(table, update(1, [1], client=1)) is Seen.NEW
    for client in range(100, 110):
        seen = run(table, update(1, [1], client=client))
        assert seen is (Seen.NEW if client < 102 else Seen.FULL)
    assert run(table, update(1, [1], client=1)) is Seen.DONE


def test_clients_idle_past_the_ttl_make_room_for_new_ones() -> None:
    table = RecentRequests(max_clients=2, ttl_s=0.0)
    for client in range(1, 5):
        assert run(table, update(1, [1], client=client)) is Seen.NEW
    assert run(table, update(1, [1], client=1)) is Seen.NEW  # forgotten: known only inside the TTL


def test_the_table_round_trips_through_a_snapshot_and_old_snapshots_still_load() -> None:
    table = RecentRequests(window=3)
    for rid in range(1, 6):
        run(table, update(rid, [rid]))
    knn = Request("knn", "b", {"k": 1}, {"queries": np.zeros((1, 4), np.float32)}, 6, 5)
    run(table, knn)
    saved = table.export()
    assert saved["5"]["floor"] == 3 and [r for r, _ in saved["5"]["done"]] == [4, 5]  # reads not kept
    fresh = RecentRequests(window=3)
    fresh.restore(saved)
    assert run(fresh, update(5, [5])) is Seen.DONE
    assert run(fresh, update(5, [5], value=3.0)) is Seen.REUSED
    assert run(fresh, update(2, [2])) is Seen.STALE
    old = RecentRequests()
    old.restore({"5": [4, 5]})  # format 1: bare ids
    assert run(old, update(4, [4])) is Seen.DONE


def test_held_bytes_bound_what_the_table_really_takes() -> None:
    reply = Reply(1, result={"version": 3}, arrays={"ids": np.zeros((256, 200), np.int64)})
    assert reply_bytes(reply) == CACHE_ENTRY_BYTES + 256 * 200 * 8
    table = RecentRequests(window=512, max_clients=64, reply_budget=0)
    requests = [update(rid, [rid % 7], client=1 + rid % 40) for rid in range(1, 20_001)]
    sums = [digest(r) for r in requests]
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for request, sum_ in zip(requests, sums):
        table.begin(request.client, request.id, sum_, None)
        table.done(request.client, request.id, request.op, Reply(request.id))
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert table.held_bytes() == 20_000 * RECORD_BYTES
    assert used <= table.held_bytes(), f"{used / 20_000:.0f} bytes a record, estimate {RECORD_BYTES}"


# -- through a real server ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    proc, address = start_server(tmp_path_factory.mktemp("dedup"))
    with connect(address) as bank:
        bank.create("b", 64, 4, momentum=0.5)
    yield address
    assert proc.poll() is None, "the server died"
    stop_server(proc)


class Raw:
    """A DEALER that sends requests with the client and request ids it is told."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)

    def call(self, request: Request) -> Reply:
        self.socket.send_multipart(encode_request(request))
        if not self.socket.poll(30_000 * TIME_FACTOR):
            raise AssertionError(f"no reply to {request.op} {request.id} of client {request.client}; "
                                 f"the server says {server_counters(self.address)}")
        return decode_reply(self.socket.recv_multipart())

    def close(self) -> None:
        self.socket.close()


def server_counters(address: str) -> dict:
    """What the server counted (dropped requests and replies, queues), to tell why a reply is missing."""
    try:
        with connect(address, timeout=5 * TIME_FACTOR) as bank:
            stats = bank.stats()
    except Exception as exc:  # noqa: BLE001 - a diagnosis, never the test's verdict
        return {"unreachable": repr(exc)}
    return {k: v for k, v in stats.items() if k not in ("banks", "ops")}


def version(address: str) -> int:
    with connect(address) as bank:
        return bank.info("b")["updates"]


def test_a_resend_after_many_later_requests_is_refused_not_applied_twice(served: str) -> None:
    raw = Raw(served)
    try:
        client = 77
        assert raw.call(update(1, [1], client=client)).error is None
        for rid in range(2, 700):  # more than the window of 512 later requests
            assert raw.call(Request("info", "b", {}, {}, rid, client)).error is None
        applied = version(served)
        reply = raw.call(update(1, [1], client=client))
        assert reply.error is not None and reply.error.code.value == "stale_request"
        assert version(served) == applied
    finally:
        raw.close()


def test_a_flood_of_fresh_client_ids_never_makes_a_resend_apply_twice(tmp_path: Path) -> None:
    proc, served = start_server(tmp_path)
    raw = Raw(served)
    try:
        with connect(served) as bank:
            bank.create("b", 64, 4)
        victim = 88
        assert raw.call(update(1, [2], client=victim)).error is None
        applied = version(served)
        codes = set()
        for client in range(10_000, 10_000 + 1100):  # more clients than the table holds
            try:
                reply = raw.call(update(1, [3], client=client))
            except AssertionError as exc:  # no reply: say what the server logged
                raise AssertionError(f"{exc}\nthe server's log ends:\n{server_log(proc)[-4000:]}") from None
            codes.add(reply.error.code.value if reply.error else "ok")
        assert codes == {"ok", "busy"}  # new clients past the table's size are told to come back
        after_flood = version(served)
        reply = raw.call(update(1, [2], client=victim))
        assert reply.error is None  # answered (from the reply cache), not applied again
        assert version(served) == after_flood and after_flood > applied
    finally:
        raw.close()
        stop_server(proc)


def test_a_reused_id_is_refused_and_a_drop_under_an_update_id_drops_nothing(served: str) -> None:
    raw = Raw(served)
    try:
        assert raw.call(update(1, [4], client=99)).error is None
        applied = version(served)
        for other in (update(1, [4], value=2.0, client=99), Request("drop", "b", {}, {}, 1, 99)):
            reply = raw.call(other)
            assert reply.error is not None and reply.error.code.value == "id_reused"
        assert version(served) == applied
        with connect(served) as bank:
            assert "b" in bank.hello()["banks"]
    finally:
        raw.close()


def test_exactly_once_holds_across_a_restart(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snaps))
    raw = Raw(address)
    try:
        with connect(address) as bank:
            bank.create("b", 64, 4)
        assert raw.call(update(1, [5], client=123)).error is None
        before = version(address)
    finally:
        raw.close()
        stop_server(proc)  # the final snapshot holds the update and its record
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snaps))
    raw = Raw(address)
    try:
        assert version(address) == before
        reply = raw.call(update(1, [5], client=123))
        assert reply.error is None and reply.result["retry"] is True
        reply = raw.call(update(1, [6], client=123))
        assert reply.error is not None and reply.error.code.value == "id_reused"
        assert version(address) == before
    finally:
        raw.close()
        stop_server(proc)


def test_the_client_library_keeps_its_calls_in_flight_inside_the_window() -> None:
    from fgc_bank.client import BankClient

    assert inspect.signature(BankClient).parameters["max_in_flight"].default <= RecentRequests().window
