"""Request counters, latency percentiles and latency histograms, for the ``stats`` op and Prometheus."""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
from typing import Any

import numpy as np

from fgc_bank.errors import BankError

LATENCY_WINDOW = 4096  # most recent latencies kept per op, for p50/p99
# Upper bounds (seconds) of the latency histogram's buckets: a hello answered inline (~0.1 ms) up
# to an imagenet-512 search queued behind others (seconds); +Inf is implied after the last.
LATENCY_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
                     0.5, 1.0, 2.5, 5.0, 10.0)


class ServerMetrics:
    """Thread-safe counts of requests and errors by op, recent latencies, and a latency histogram
    per op that counts every successful request since start (Prometheus wants cumulative buckets,
    which a window of recent latencies cannot give)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=LATENCY_WINDOW))
        # op -> requests per bucket (not cumulative), the last one for latencies above every bound
        self._buckets: dict[str, list[int]] = collections.defaultdict(lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
        self._latency_sum: collections.Counter[str] = collections.Counter()
        self.dropped_replies = 0  # replies to clients that were gone or read none of theirs
        self.dropped_requests = 0  # requests from clients holding their budget of unread replies

    def observe(self, op: str, error: BankError | None, seconds: float) -> None:
        """Count one answered request (its latency only if it succeeded)."""
        with self._lock:
            self.requests[op] += 1
            if error is not None:
                self.errors[error.code.value] += 1
            else:
                self.latencies[op].append(seconds)
                self._buckets[op][bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
                self._latency_sum[op] += seconds

    def summary(self) -> dict[str, Any]:
        """Counts, p50/p99 latency (ms) and the latency histogram by op. The lock is held only to
        copy: the percentiles are computed outside it, so a scrape never delays a reply."""
        with self._lock:
            windows = {op: np.array(v) for op, v in self.latencies.items() if v}
            histogram = {op: {"counts": list(itertools.accumulate(counts)), "sum_s": self._latency_sum[op]}
                         for op, counts in self._buckets.items()}
            out = {"requests": dict(self.requests), "errors": dict(self.errors),
                   "dropped_replies": self.dropped_replies, "dropped_requests": self.dropped_requests}
        latency = {op: {"p50_ms": float(np.percentile(v, 50) * 1e3), "p99_ms": float(np.percentile(v, 99) * 1e3)}
                   for op, v in windows.items()}
        return {**out, "latency": latency, "latency_buckets_s": list(LATENCY_BUCKETS_S),
                "latency_histogram": histogram}

