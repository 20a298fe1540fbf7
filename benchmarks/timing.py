"""Repeated timings, their summary, and the machine's measured matrix-multiply peak."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Median and spread of repeated measurements of one quantity."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stats:
        values = np.asarray(samples, dtype=np.float64)
        return cls(float(np.median(values)), float(values.min()), float(values.max()), int(values.size))

    @property
    def spread(self) -> float:
        """(high - low) / median: 0.1 means the repetitions lay within 10% of each other."""
        return (self.high - self.low) / self.median if self.median else 0.0

    def scaled(self, factor: float) -> Stats:
        return Stats(self.median * factor, self.low * factor, self.high * factor, self.n)

    def to_json(self) -> dict[str, float]:
        return asdict(self)


@dataclass(frozen=True)
class Latency:
    """Per-request latency percentiles, in milliseconds."""

    p50_ms: float
    p99_ms: float
    n: int

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latency:
        values = np.asarray(seconds, dtype=np.float64) * 1e3
        return cls(float(np.percentile(values, 50)), float(np.percentile(values, 99)), int(values.size))


def time_once(fn: Callable[..., object], *args: Any) -> float:
    """Seconds one call of ``fn(*args)`` takes."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def reps_for(seconds_per_call: float, budget_s: float, low: int, high: int) -> int:
    """How many repetitions fit in ``budget_s``, clamped to [low, high]."""
    return int(np.clip(budget_s / max(seconds_per_call, 1e-6), low, high))


@dataclass(frozen=True)
class Peak:
    """The best single-precision GEMM rate measured on this machine."""

    gflops: float
    library: str
    size: int
    threads: int

    def bound_qps(self, flops_per_query: float) -> float:
        """Queries per second if every flop of a query ran at the peak rate."""
        return self.gflops * 1e9 / flops_per_query


def measure_peak(size: int = 4096, reps: int = 3) -> Peak:
    """Best-of-``reps`` square sgemm rate, through torch (MKL) and numpy (OpenBLAS), all cores."""
    import torch

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
    flops = 2.0 * size**3
    candidates = {
        "torch.mm (MKL)": lambda: torch.mm(ta, tb, out=tout),
        "numpy.matmul (OpenBLAS)": lambda: np.matmul(a, b, out=out),
    }
    best = Peak(0.0, "", size, torch.get_num_threads())
    for library, fn in candidates.items():
        fn()  # warm-up: page in, spin up the thread pool
        seconds = min(time_once(fn) for _ in range(reps))
        if flops / seconds / 1e9 > best.gflops:
            best = Peak(flops / seconds / 1e9, library, size, torch.get_num_threads())
    return best
