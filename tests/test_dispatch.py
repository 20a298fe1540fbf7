"""The bank workers' coalescing: which requests go into one search, and that waiting for the
clients just answered is bounded and never holds up a lone client, a barrier or a stop."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest
from conftest import assert_same_knn, brute_force_knn

from bank_server import dispatch
from bank_server.dispatch import Dispatcher, Job
from fgc_bank.protocol import Reply, Request
from fgc_bank.service import BankService

LONG_S = 60.0  # a wait nobody should sit through: a test that did would time out (see `answers`)


class Recorder:
    """The worker's ``respond``: keeps each search's clients and every reply by request id."""

    def __init__(self) -> None:
        self.runs: list[list[int]] = []  # the clients of each call to respond, in order
        self.replies: dict[int, Reply] = {}
        self._changed = threading.Condition()

    def __call__(self, replies: list[tuple[Job, Reply]]) -> None:
        with self._changed:
            self.runs.append([job.request.client for job, _ in replies])
            self.replies.update((reply.id, reply) for _, reply in replies)
            self._changed.notify_all()

    def answers(self, *ids: int) -> list[Reply]:
        """The replies to ``ids``, waiting for them (far less than LONG_S)."""
        with self._changed:
            assert self._changed.wait_for(lambda: all(i in self.replies for i in ids), timeout=LONG_S / 2)
            return [self.replies[i] for i in ids]


@pytest.fixture
def service() -> BankService:
    service = BankService()
    service.create("b", {"rows": 2000, "dim": 16, "init": "unit", "seed": 4})
    return service


def knn(rid: int, client: int, queries: np.ndarray) -> Job:
    return Job(peer=None, request=Request("knn", "b", {"k": 5}, {"queries": queries}, id=rid, client=client))


def start(service: BankService, wait_s: float, monkeypatch: pytest.MonkeyPatch) -> tuple[Dispatcher, Recorder]:
    """A one-worker dispatcher whose wait is ``wait_s`` whatever the last search took."""
    monkeypatch.setattr(dispatch, "COALESCE_WAIT_SHARE", 1e9)
    recorder = Recorder()
    return Dispatcher(service, recorder, workers=1, coalesce_wait_s=wait_s), recorder


def first_round(dispatcher: Dispatcher, recorder: Recorder, clients: list[int], q: np.ndarray) -> None:
    """Each client's first request, queued while the worker is paused, so all go into one search:
    the worker then expects every one of them back."""
    dispatcher.barrier(lambda: [dispatcher.submit(knn(100 + i, c, q)) for i, c in enumerate(clients)])
    recorder.answers(*range(100, 100 + len(clients)))
    assert sorted(recorder.runs[-1]) == clients


def test_clients_just_answered_are_waited_for_and_searched_together(
        service: BankService, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher, recorder = start(service, LONG_S, monkeypatch)
    rng = np.random.default_rng(0)
    q = [rng.standard_normal((8, 16)).astype(np.float32) for _ in range(3)]
    try:
        first_round(dispatcher, recorder, [1, 2, 3], q[0])
        searches = dispatcher.batches
        dispatcher.submit(knn(1, 1, q[0]))
        time.sleep(0.05)  # the worker is waiting for clients 2 and 3 by now (or has them, or will)
        dispatcher.submit(knn(2, 2, q[1]))
        time.sleep(0.05)
        dispatcher.submit(knn(3, 3, q[2]))
        replies = recorder.answers(1, 2, 3)
    finally:
        dispatcher.stop()
    assert dispatcher.batches == searches + 1  # one search for the three
    assert sorted(recorder.runs[-1]) == [1, 2, 3]
    rows = service.bank("b").export()
    for reply, queries in zip(replies, q):
        assert reply.error is None
        expected_scores, expected_ids = brute_force_knn(rows, queries, 5)
        np.testing.assert_allclose(reply.arrays["scores"], expected_scores, rtol=1e-5, atol=1e-6)
        assert np.array_equal(np.sort(reply.arrays["ids"], 1), np.sort(expected_ids, 1))


def test_a_lone_client_is_never_waited_for(service: BankService, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher, recorder = start(service, LONG_S, monkeypatch)
    q = np.ones((4, 16), np.float32)
    try:
        first_round(dispatcher, recorder, [7], q)
        for rid in range(1, 4):  # each would sit out LONG_S if the worker waited for anybody
            dispatcher.submit(knn(rid, 7, q))
            assert recorder.answers(rid)[0].error is None
    finally:
        dispatcher.stop()


def test_the_wait_for_a_client_that_stopped_sending_is_bounded(
        service: BankService, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher, recorder = start(service, 0.3, monkeypatch)
    q = np.ones((4, 16), np.float32)
    try:
        first_round(dispatcher, recorder, [1, 2], q)
        dispatcher.submit(knn(1, 1, q))  # client 2 never comes back
        assert recorder.answers(1)[0].error is None
        assert recorder.runs[-1] == [1]
    finally:
        dispatcher.stop()
    assert 0.3 <= dispatcher.waited_s < LONG_S / 2  # the whole wait, counted for `stats`


@pytest.mark.parametrize("then", ["barrier", "stop"])
def test_a_barrier_or_a_stop_ends_the_wait(service: BankService, monkeypatch: pytest.MonkeyPatch,
                                           then: str) -> None:
    dispatcher, recorder = start(service, LONG_S, monkeypatch)
    q = np.ones((4, 16), np.float32)
    first_round(dispatcher, recorder, [1, 2], q)
    dispatcher.submit(knn(1, 1, q))  # the worker waits for client 2...
    time.sleep(0.05)
    seen: list[Any] = []
    done = threading.Thread(target=lambda: seen.append(
        dispatcher.barrier(lambda: sorted(recorder.replies)) if then == "barrier" else dispatcher.stop()))
    done.start()
    done.join(LONG_S / 2)
    assert not done.is_alive()
    if then == "barrier":
        assert seen == [[1, 100, 101]]  # ...and answers client 1 before the barrier's action runs
        dispatcher.stop()
    else:
        assert recorder.answers(1)[0].error is None  # a stop still answers what was queued


def test_no_wait_when_disabled(service: BankService, monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher, recorder = start(service, 0.0, monkeypatch)
    q = np.ones((4, 16), np.float32)
    try:
        first_round(dispatcher, recorder, [1, 2], q)
        dispatcher.submit(knn(1, 1, q))
        assert recorder.answers(1)[0].error is None
        assert recorder.runs[-1] == [1]
    finally:
        dispatcher.stop()


def test_a_request_that_joins_no_search_is_not_held(service: BankService,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    dispatcher, recorder = start(service, LONG_S, monkeypatch)
    try:
        first_round(dispatcher, recorder, [1, 2], np.ones((4, 16), np.float32))
        dispatcher.submit(Job(peer=None, request=Request("gather", "b", {}, {"ids": np.arange(3)}, id=1, client=1)))
        reply = recorder.answers(1)[0]  # would sit out LONG_S waiting for client 2
    finally:
        dispatcher.stop()
    assert reply.error is None
    np.testing.assert_array_equal(reply.arrays["rows"], service.bank("b").export()[:3])


def test_a_bug_in_a_run_is_answered_and_the_worker_lives_on(service: BankService,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An exception escaping the service (a bug) answers its run with `internal`; the worker,
    which alone serves its banks, keeps serving, and the queued bytes are given back."""
    dispatcher, recorder = start(service, 0.0, monkeypatch)
    real = service.handle_batch
    monkeypatch.setattr(service, "handle_batch", lambda bank, requests: 1 / 0)
    q = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    try:
        dispatcher.submit(knn(1, 1, q))
        broken = recorder.answers(1)[0]
        monkeypatch.setattr(service, "handle_batch", real)
        dispatcher.submit(knn(2, 1, q))
        fixed = recorder.answers(2)[0]
    finally:
        dispatcher.stop()
    assert broken.error is not None and broken.error.code.value == "internal"
    assert "ZeroDivisionError" in broken.error.message
    ref_scores, ref_ids = brute_force_knn(service.bank("b").export(), q, 5)
    assert_same_knn(fixed.arrays["scores"], fixed.arrays["ids"], ref_scores, ref_ids)
    assert dispatcher.queued_bytes == 0


def test_a_failing_respond_does_not_end_the_worker(service: BankService) -> None:
    calls: list[int] = []

    def respond(replies: list[tuple[Job, Reply]]) -> None:
        calls.append(replies[0][1].id)
        if len(calls) == 1:
            raise RuntimeError("the socket went away")

    dispatcher = Dispatcher(service, respond, workers=1, coalesce_wait_s=0.0)
    q = np.ones((2, 16), np.float32)
    try:
        deadline = time.monotonic() + LONG_S / 2
        for rid in (1, 2):
            dispatcher.submit(knn(rid, 1, q))
            while len(calls) < rid and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        dispatcher.stop()
    assert calls[-1] == 2 and dispatcher.queued_bytes == 0
