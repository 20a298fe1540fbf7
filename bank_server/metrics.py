"""Request counters and latency percentiles, for the ``stats`` op (and Prometheus, later)."""

from __future__ import annotations

import collections
import threading
from typing import Any

import numpy as np

from fgc_bank.errors import BankError

LATENCY_WINDOW = 4096  # most recent latencies kept per op


class ServerMetrics:
    """Thread-safe counts of requests and errors by op, and recent latencies."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.latencies: dict[str, collections.deque[float]] = collections.defaultdict(
            lambda: collections.deque(maxlen=LATENCY_WINDOW))
        self.dropped_replies = 0  # replies to clients that were gone or read none of theirs
        self.dropped_requests = 0  # requests from clients holding their budget of unread replies

    def observe(self, op: str, error: BankError | None, seconds: float) -> None:
        """Count one answered request."""
        with self._lock:
            self.requests[op] += 1
            if error is not None:
                self.errors[error.code.value] += 1
            else:
                self.latencies[op].append(seconds)

    def summary(self) -> dict[str, Any]:
        """Counts and p50/p99 latency (ms) by op."""
        with self._lock:
            latency = {op: {"p50_ms": float(np.percentile(v, 50) * 1e3), "p99_ms": float(np.percentile(v, 99) * 1e3)}
                       for op, v in self.latencies.items() if v}
            return {"requests": dict(self.requests), "errors": dict(self.errors),
                    "latency": latency, "dropped_replies": self.dropped_replies,
                    "dropped_requests": self.dropped_requests}
