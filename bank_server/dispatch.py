"""Per-bank ordering and coalescing, on worker threads that keep FAISS busy off the socket thread.

Each bank belongs to one worker (by a stable hash of its name), so the requests to a bank run in
the order they arrived. A worker takes everything queued, keeps each bank's requests in order, and
hands each run of consecutive update/knn/knn_update requests on a bank to
``BankService.handle_batch``: one FAISS call for the whole run.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fgc_bank.errors import BankError, ErrorCode, quote
from fgc_bank.protocol import Reply, Request
from fgc_bank.service import BATCHABLE_OPS, BankService

logger = logging.getLogger(__name__)

MAX_COALESCED_QUERIES = 16384  # bounds one FAISS call, and so the latency a run adds
COALESCE_WAIT_SHARE = 0.1  # a worker waits for expected requests at most this share of its last search


@dataclass
class Job:
    """A decoded request, who sent it, and when it arrived."""

    peer: Any  # the ROUTER identity frame to reply to
    request: Request
    arrived: float = field(default_factory=time.perf_counter)

    @property
    def nbytes(self) -> int:
        """The request's array bytes, which the job holds until it is answered."""
        return sum(a.nbytes for a in self.request.arrays.values())


Respond = Callable[[list[tuple[Job, Reply]]], None]
_STOP = object()


class Dispatcher:
    """Worker threads with bounded queues; replies leave through ``respond`` (called on a worker)."""

    def __init__(self, service: BankService, respond: Respond, workers: int = 1, max_queue: int = 1024,
                 coalesce_wait_s: float = 0.002, max_queued_bytes: int = 2**30) -> None:
        self.service = service
        self.coalesce_wait_s = coalesce_wait_s
        self.max_queue = max_queue
        self.max_queued_bytes = max_queued_bytes
        self.queued_bytes = 0  # array bytes of the jobs submitted and not yet answered
        self._bytes_lock = threading.Lock()
        # SimpleQueue: put and get are C, where queue.Queue runs a Condition's Python on both sides
        # of each hand-off, cold after every search. It has no bound of its own: submit keeps each
        # queue to max_queue jobs.
        self._queues: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(max(1, workers))]
        self._threads = [threading.Thread(target=self._work, args=(q, respond), daemon=True,
                                          name=f"fgc-bank-worker-{i}") for i, q in enumerate(self._queues)]
        self.batches = 0
        self.coalesced = 0
        self.waited_s = 0.0  # time workers spent waiting for clients they had just answered
        self._stopped = False
        for thread in self._threads:
            thread.start()

    def queue_depth(self) -> int:
        """Requests waiting, over all workers."""
        return sum(q.qsize() for q in self._queues)

    def submit(self, job: Job) -> None:
        """Queue ``job`` behind its bank's earlier requests; raise BUSY if that queue is full, in
        requests or in bytes over all queues."""
        jobs = self._queues[zlib.crc32((job.request.bank or "").encode()) % len(self._queues)]
        if jobs.qsize() >= self.max_queue:
            raise BankError(ErrorCode.BUSY, f"server queue is full ({self.max_queue} "
                            "requests waiting); retry after a short back-off")
        size = job.nbytes
        if size > self.max_queued_bytes:
            raise BankError(ErrorCode.TOO_LARGE, f"request of {size} bytes; this server holds at most "
                            f"{self.max_queued_bytes} bytes of queued requests")
        with self._bytes_lock:
            if self.queued_bytes + size > self.max_queued_bytes:
                raise BankError(ErrorCode.BUSY, f"server holds {self.queued_bytes} bytes of queued "
                                "requests; retry after a short back-off")
            self.queued_bytes += size
        jobs.put(job)

    def barrier(self, action: Callable[[], Any]) -> Any:
        """Run ``action`` while every worker is paused between requests (a consistent cut)."""
        if self._stopped:  # no worker runs any more: every point is consistent
            return action()
        paused = [threading.Event() for _ in self._queues]
        resume = threading.Event()
        for q, event in zip(self._queues, paused):
            q.put((event, resume))
        for event in paused:
            event.wait()
        try:
            return action()
        finally:
            resume.set()

    def stop(self) -> None:
        """Finish what is queued, then stop the workers."""
        if self._stopped:
            return
        for q in self._queues:
            q.put(_STOP)
        for thread in self._threads:
            thread.join()
        self._stopped = True

    def _work(self, jobs: queue.SimpleQueue, respond: Respond) -> None:
        answered: set[int] = set()  # clients whose searches the last run answered
        searched_s = 0.0  # how long those searches took
        while True:
            items = [jobs.get()]
            _take_queued(jobs, items)
            if answered:
                started = time.perf_counter()
                _wait_for(jobs, items, answered, min(self.coalesce_wait_s, COALESCE_WAIT_SHARE * searched_s))
                self.waited_s += time.perf_counter() - started
            stop = False
            run: list[Job] = []
            for item in items:
                if item is _STOP:
                    stop = True
                elif isinstance(item, tuple):  # barrier: answer what came before, then pause
                    self._run(run, respond)
                    run = []
                    paused, resume = item
                    paused.set()
                    resume.wait()
                else:
                    run.append(item)
            answered, searched_s = self._run(run, respond)
            if stop:
                return

    def _run(self, jobs: list[Job], respond: Respond) -> tuple[set[int], float]:
        """Answer ``jobs`` (in arrival order), coalescing each bank's runs of batchable requests;
        the clients whose batchable requests were answered, and the seconds their searches took."""
        by_bank: dict[str | None, list[Job]] = {}
        for job in jobs:
            by_bank.setdefault(job.request.bank, []).append(job)
        answered: set[int] = set()
        searched_s = 0.0
        for bank, bank_jobs in by_bank.items():
            replies: list[tuple[Job, Reply]] = []
            for group in _runs(bank_jobs):
                try:
                    if group[0].request.op in BATCHABLE_OPS:
                        self.batches += 1
                        self.coalesced += len(group)
                        started = time.perf_counter()
                        results = self.service.handle_batch(bank, [j.request for j in group])
                        searched_s += time.perf_counter() - started
                        answered.update(j.request.client for j in group if j.request.client)
                    else:
                        results = [self.service.handle(group[0].request)]
                except Exception as exc:  # a bug: answer every request of the run, keep the worker
                    logger.exception("internal error in a run of %d requests on %s", len(group), quote(bank))
                    error = BankError(ErrorCode.INTERNAL, f"{exc.__class__.__name__} while handling the request")
                    results = [Reply(j.request.id, error=error) for j in group]
                replies.extend(zip(group, results))
            try:
                respond(replies)
            except Exception:  # replies that cannot be sent are lost; the worker must live on
                logger.exception("internal error sending %d replies", len(replies))
            finally:
                with self._bytes_lock:
                    self.queued_bytes -= sum(job.nbytes for job in bank_jobs)
        return answered, searched_s


def _take_queued(jobs: queue.SimpleQueue, items: list[Any]) -> None:
    """Append everything already in ``jobs`` to ``items``, without waiting. Only this worker
    takes from ``jobs``, so get_nowait cannot fail: no queue.Empty raised on every request."""
    while not jobs.empty():
        items.append(jobs.get_nowait())


def _wait_for(jobs: queue.SimpleQueue, items: list[Any], clients: set[int], wait_s: float) -> None:
    """Wait up to ``wait_s`` for a request from each of ``clients`` not yet among ``items``.

    The clients a worker has just answered are the likeliest to send again within a round trip
    (synchronous callers, training ranks in step). With several clients a worker otherwise falls
    into answering them in two alternating halves, each searched as soon as the other is done:
    with this short wait all of them go into one search, whose cost per query is lower (cifar's
    shape: 39 us at 1024 queries, 43 at 512). A lone client is never waited for: a worker only
    gets here holding a request, and that request is the lone client's own. The wait is capped by
    a share of the last search's time, so it costs at most that share when nobody comes.
    """
    if not all(isinstance(item, Job) for item in items):  # a barrier or stop: no waiting
        return
    if not any(item.request.op in BATCHABLE_OPS for item in items):  # no search to join
        return
    missing = clients - {item.request.client for item in items}
    deadline = time.perf_counter() + wait_s
    while missing:
        left = deadline - time.perf_counter()
        if left <= 0:
            return
        try:
            item = jobs.get(timeout=left)
        except queue.Empty:
            return
        items.append(item)
        if not isinstance(item, Job):
            return
        missing.discard(item.request.client)


def _runs(jobs: list[Job]) -> list[list[Job]]:
    """Split one bank's jobs into maximal runs of batchable ops (bounded) and single other ops."""
    runs: list[list[Job]] = []
    queries = 0
    for job in jobs:
        size = next(iter(job.request.arrays.values())).shape[0] if job.request.arrays else 0
        batchable = job.request.op in BATCHABLE_OPS
        if (batchable and runs and runs[-1][0].request.op in BATCHABLE_OPS
                and queries + size <= MAX_COALESCED_QUERIES):
            runs[-1].append(job)
            queries += size
        else:
            runs.append([job])
            queries = size
    return runs
