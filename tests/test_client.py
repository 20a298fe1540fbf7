"""The client's two paths to one socket: blocking calls on the caller's thread, async calls through
the I/O thread. Whichever path a call takes, calls from one client keep their order, threads never
corrupt each other's messages, and close() ends every wait."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import zmq
from conftest import TIME_FACTOR, assert_same_knn, brute_force_knn, unused_port

from fgc_bank.client import BankClient
from fgc_bank.errors import BankError, BankTimeout, BankUnavailable, ErrorCode
from fgc_bank.protocol import Reply, Request, decode_request, encode_reply


def test_a_blocking_call_never_overtakes_async_calls_issued_before_it(server: str, monkeypatch) -> None:
    """update_async (overwrite) then at once a blocking gather: the gather sees every write, even
    when the I/O thread is slow to wake (here by 20 ms) and the socket is free when gather starts."""
    rng = np.random.default_rng(0)
    with BankClient(server) as bank:
        bank.create("order-sync", 512, 8, seed=1)
        wake_up = bank._idle.poll

        def slow_wake_up(*args: object) -> list:
            events = wake_up(*args)
            time.sleep(0.02)
            return events

        monkeypatch.setattr(bank._idle, "poll", slow_wake_up)
        for round_ in range(40):
            ids = rng.choice(512, 64, replace=False)
            writes = [rng.standard_normal((64, 8)).astype(np.float32) for _ in range(3)]
            futures = [bank.update_async("order-sync", ids, w, mode="overwrite") for w in writes]
            got = bank.gather("order-sync", ids)  # blocking, issued while the updates may be unsent
            assert np.array_equal(got, writes[-1]), f"round {round_}: the gather overtook an update"
            assert [f.result() for f in futures] == sorted(f.result() for f in futures)
        bank.drop("order-sync")


def test_blocking_and_async_calls_from_many_threads_get_their_own_answers(server: str) -> None:
    """Eight threads mix blocking knn and knn_async on one client: each answer is its query's."""
    rng = np.random.default_rng(1)
    rows = rng.standard_normal((3000, 16)).astype(np.float32)
    failures: list[str] = []
    with BankClient(server) as bank:
        bank.create("threads", 3000, 16)
        bank.update("threads", np.arange(3000), rows, mode="overwrite")

        def work(seed: int) -> None:
            local = np.random.default_rng(seed)
            for i in range(12):
                queries = local.standard_normal((int(local.integers(8, 64)), 16)).astype(np.float32)
                got = bank.knn("threads", queries, 7) if i % 2 else bank.knn_async("threads", queries, 7).result()
                want_scores, want_ids = brute_force_knn(rows, queries, 7)
                try:
                    assert_same_knn(got.scores, got.ids, want_scores.astype(np.float32), want_ids)
                except AssertionError as exc:
                    failures.append(f"thread {seed}, call {i}: {exc}")

        threads = [threading.Thread(target=work, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert bank.info("threads")["searches"] == 8 * 12
        bank.drop("threads")
    assert not failures, failures[:3]


def test_close_ends_a_blocking_call_that_is_waiting(server: str) -> None:
    """A blocking knn waiting on the socket in another thread fails with BankUnavailable when the
    client is closed, instead of waiting out its search (seconds) and its timeout."""
    bank = BankClient(server, timeout=600 * TIME_FACTOR)
    bank.create("closing", 400_000, 64, seed=2)
    outcome: list[BaseException | None] = []
    started = threading.Event()

    def wait() -> None:
        started.set()
        try:
            bank.knn("closing", np.ones((8192, 64), np.float32), 50)  # seconds of search
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome.append(exc)

    waiter = threading.Thread(target=wait)
    waiter.start()
    started.wait()
    time.sleep(0.3)  # the knn is sent and its search is running
    bank.close()
    waiter.join(timeout=60 * TIME_FACTOR)
    assert not waiter.is_alive()
    assert len(outcome) == 1 and isinstance(outcome[0], BankUnavailable), outcome
    with BankClient(server, timeout=600 * TIME_FACTOR) as admin:
        admin.drop("closing")  # queued behind the search, which still runs to its end
    with pytest.raises(BankUnavailable):
        bank.hello()


def test_a_blocking_call_is_resent_when_slow_and_runs_once(server: str) -> None:
    """A blocking knn whose search outlasts retry_interval is sent again by the calling thread (it
    owns the socket); the server drops the copies, so the search runs once and the answer is right."""
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((200_000, 64)).astype(np.float32)
    queries = rng.standard_normal((1024, 64)).astype(np.float32)
    with BankClient(server, retry_interval=0.01, timeout=600 * TIME_FACTOR) as bank:
        bank.create("resent", 200_000, 64)
        for start in range(0, 200_000, 50_000):
            bank.update("resent", np.arange(start, start + 50_000), rows[start:start + 50_000], mode="overwrite")
        before = bank.resends
        got = bank.knn("resent", queries, 10)
        assert bank.resends > before
        assert bank.info("resent")["queries"] == 1024  # searched once
        want_scores, want_ids = brute_force_knn(rows, queries[:32], 10)
        assert_same_knn(got.scores[:32], got.ids[:32], want_scores.astype(np.float32), want_ids)
        bank.drop("resent")


def _scripted_peer(answer: Callable[[int], list[list[bytes]]], requests: int = 1) -> tuple[str, threading.Thread]:
    """A ROUTER that answers ``requests`` requests, each with the messages ``answer(request_id)`` gives."""
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")

    def serve() -> None:
        with router:
            for _ in range(requests):
                peer, *frames = router.recv_multipart()
                for message in answer(decode_request(frames).id):
                    router.send_multipart([peer, *message])

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"tcp://127.0.0.1:{port}", thread


def test_a_blocking_call_skips_malformed_and_late_replies() -> None:
    """Garbage and a reply to another request arrive first: the blocking call drops both and
    returns its own reply."""
    gathered = np.arange(12, dtype=np.float32).reshape(3, 4)

    def answer(rid: int) -> list[list[bytes]]:
        late = encode_reply(Reply(rid + 1000, arrays={"rows": np.zeros((3, 4), np.float32)}))
        own = encode_reply(Reply(rid, arrays={"rows": gathered}))
        return [[b"\xc1garbage"], [bytes(f) for f in late], [bytes(f) for f in own]]

    address, peer = _scripted_peer(answer)
    with BankClient(address, timeout=30 * TIME_FACTOR) as bank:
        assert np.array_equal(bank.gather("x", [0, 1, 2]), gathered)
    peer.join(timeout=10)


def test_a_blocking_call_fails_on_a_reply_that_lacks_its_arrays() -> None:
    address, peer = _scripted_peer(lambda rid: [[bytes(f) for f in encode_reply(Reply(rid, result={"version": 1}))]])
    with BankClient(address, timeout=30 * TIME_FACTOR) as bank, pytest.raises(BankError) as info:
        bank.knn("x", np.ones((2, 4), np.float32), 1)
    assert info.value.code is ErrorCode.BAD_MESSAGE and "malformed knn reply" in info.value.message
    peer.join(timeout=10)


def test_a_blocking_call_times_out_and_the_client_stays_usable() -> None:
    """No reply within the timeout: BankTimeout, the call is no longer counted in flight, and the
    next call on the same client works."""
    def answer(rid: int) -> list[list[bytes]]:  # the first request is never answered
        return [] if rid == 1 else [[bytes(f) for f in encode_reply(Reply(rid, result={"rows": 7}))]]

    address, peer = _scripted_peer(answer, requests=2)
    with BankClient(address, timeout=0.3, retry_interval=600) as bank:
        with pytest.raises(BankTimeout) as info:
            bank.info("silent")
        assert "no reply to info on bank 'silent'" in info.value.message
        assert bank._in_flight == 0
        assert bank.info("silent") == {"rows": 7}
    peer.join(timeout=10)


def _rows_sent_without_a_copy() -> np.ndarray:
    """Two rows of 64 KiB each: pyzmq copies frames under 64 KiB even when asked not to."""
    return np.arange(2 * 16384, dtype=np.float32).reshape(2, 16384)


def _receive_one(port: int, version: int) -> Request:
    """Bind a ROUTER on ``port``, take one request and acknowledge it with ``version``."""
    with zmq.Context.instance().socket(zmq.ROUTER) as router:
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://127.0.0.1:{port}")
        peer, *frames = router.recv_multipart()
        request = decode_request(frames)
        router.send_multipart([peer, *encode_reply(Reply(request.id, result={"version": version}))])
    return request


def test_an_async_call_sends_its_arrays_as_they_were_when_it_was_made() -> None:
    """The server is not up yet, so the request waits in the client; meanwhile the caller writes
    over its buffers (a training loop reusing them). The server still gets the rows as they were
    at the call."""
    port = unused_port()
    rows = _rows_sent_without_a_copy()
    ids = np.array([3, 5])
    with BankClient(f"tcp://127.0.0.1:{port}", timeout=30 * TIME_FACTOR) as bank:
        future = bank.update_async("x", ids, rows)
        rows[:] = -1.0
        ids[:] = 0
        request = _receive_one(port, version=1)
        assert np.array_equal(request.arrays["rows"], _rows_sent_without_a_copy())
        assert np.array_equal(request.arrays["ids"], [3, 5])
        assert future.result(timeout=30 * TIME_FACTOR) == 1


def test_a_blocking_call_that_timed_out_cannot_send_rows_written_after_it() -> None:
    """A blocking update times out while the server is away; its request is still queued in
    ZeroMQ and leaves when the server comes up. By then the caller has reused its buffer: the
    server must get the rows of the call, not the new ones."""
    port = unused_port()
    rows = _rows_sent_without_a_copy()
    with BankClient(f"tcp://127.0.0.1:{port}", timeout=0.3, retry_interval=600) as bank:
        with pytest.raises(BankTimeout):
            bank.update("x", [3, 5], rows)
        rows[:] = -1.0
        request = _receive_one(port, version=1)
        assert np.array_equal(request.arrays["rows"], _rows_sent_without_a_copy())


def test_a_burst_of_async_calls_never_raises_at_the_call() -> None:
    """More calls than the I/O thread's wake-up pipe holds, faster than it drains them: a call
    that finds the pipe full is still queued (the thread has wake-ups to read), never refused."""
    with BankClient(f"tcp://127.0.0.1:{unused_port()}", timeout=30, max_in_flight=5000) as bank:
        futures = [bank.knn_async("x", np.ones((1, 4), np.float32), 1) for _ in range(5000)]
        assert not any(f.done() and f.exception() is not None for f in futures)
    assert all(isinstance(f.exception(), BankUnavailable) for f in futures)  # closed before any reply
