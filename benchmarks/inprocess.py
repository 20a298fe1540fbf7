"""The in-process contenders, all searching the same rows in this process.

- ``faiss-default``: ``faiss.knn(..., METRIC_INNER_PRODUCT)`` as installed.
- ``faiss-blas``: the same call with FAISS's BLAS path forced (``distance_compute_blas_threshold``
  lowered so a 256-query batch is one GEMM per block instead of a per-query scan).
- ``torch-topk``: the FGC paper's search, one dense ``torch.mm`` over the whole bank and ``topk``.
- ``search-fp32``, ``search-bf16``: fgc-bank's search with no prefilter, and with the bfloat16
  one (where the bank uses int8): what the prefilters buy, side by side.
- ``search``: :func:`fgc_bank.stores.cpu.search.search_inner_product` called directly: the bank's own search,
  configured as the bank configures it (same threads, same prefilter), with no bank around it.
- ``bank``: ``knn`` on an in-process :class:`~fgc_bank.local.LocalBank` (protocol encode/decode,
  validation, the bank's bookkeeping, then the same search).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from benchmarks.timing import reps_for, time_once
from fgc_bank.local import LocalBank
from fgc_bank.stores.cpu import prefilter
from fgc_bank.stores.cpu.prefilter import Prefilter
from fgc_bank.stores.cpu.search import search_inner_product

FAISS_BLAS_DATABASE_BS = 4096  # rows per FAISS GEMM block when its BLAS path is forced


@dataclass(frozen=True)
class Method:
    """A contender: ``run(queries)`` answers one batch of top-k queries."""

    key: str
    label: str
    run: Callable[[np.ndarray], object]


@contextlib.contextmanager
def faiss_blas_forced(database_bs: int = FAISS_BLAS_DATABASE_BS) -> Iterator[None]:
    """FAISS's BLAS path for every batch size, then the previous (process-wide) settings back."""
    saved = (faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs)
    faiss.cvar.distance_compute_blas_threshold = 1
    faiss.cvar.distance_compute_blas_database_bs = database_bs
    try:
        yield
    finally:
        faiss.cvar.distance_compute_blas_threshold, faiss.cvar.distance_compute_blas_database_bs = saved


def methods(rows: np.ndarray, k: int, bank: LocalBank, bank_name: str, low: Prefilter | None) -> list[Method]:
    """Every in-process contender for top-``k`` over ``rows`` (N, D), which ``bank_name`` holds;
    ``low`` is that bank's low-precision copy (None where the CPU has no fast int8 or bfloat16)."""
    rows_t = torch.from_numpy(rows)

    def faiss_default(queries: np.ndarray) -> object:
        return faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)

    def faiss_blas(queries: np.ndarray) -> object:
        with faiss_blas_forced():
            return faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)

    def torch_topk(queries: np.ndarray) -> object:
        scores = torch.mm(torch.from_numpy(queries), rows_t.T)  # (B, N), as the paper's bank does
        return torch.topk(scores, k, dim=1)

    others = []
    if bf16_beside(low.kind if low else None):
        bf16 = prefilter.make(rows, "bf16")
        others.append(Method("search-bf16", "fgc-bank search, bf16 prefilter",
                             lambda q: search_inner_product(rows, q, k, bf16)))
    return [
        Method("faiss-default", "FAISS knn, default settings", faiss_default),
        Method("faiss-blas", "FAISS knn, BLAS path forced", faiss_blas),
        Method("torch-topk", "paper: torch.mm + topk", torch_topk),
        Method("search-fp32", "fgc-bank search, float32 only", lambda q: search_inner_product(rows, q, k)),
        *others,
        Method("search", f"fgc-bank search, raw ({low.kind if low else 'no'} prefilter)",
               lambda q: search_inner_product(rows, q, k, low)),
        Method("bank", "fgc-bank in-process bank", lambda q: bank.knn(bank_name, q, k)),
    ]


def bf16_beside(kind: str | None) -> bool:
    """Whether the bfloat16 prefilter is measured beside the bank's own (an int8 one)."""
    return kind not in (None, "bf16")


def count(kind: str | None) -> int:
    """How many contenders :func:`methods` returns for a bank with a ``kind`` prefilter."""
    return 6 + bf16_beside(kind)


def measure(contenders: Sequence[Method], batches: Sequence[np.ndarray], budget_s: float,
            min_reps: int, max_reps: int, tick: Callable[[str], None], rounds: int = 6) -> dict[str, list[float]]:
    """Seconds per batch for each contender: a warm-up, then ``rounds`` blocks of back-to-back calls.

    Blocks alternate between contenders so drift (other load on the machine) hits all of them
    alike, in the reverse order every other round so that no contender always follows the same
    one (the bank's target compares it with the search just before it in the list). Each block
    starts with an untimed call: it absorbs the previous contender's idle OpenMP threads, which
    keep spinning for milliseconds, and any clock ramp-up after a pause. No sleeps: an idle pause
    makes the next call slower on this VM (clock scaling), unlike a busy trainer.
    """
    reps: dict[str, int] = {}
    for method in contenders:
        method.run(batches[0])  # warm-up: caches, thread pools, scratch buffers
        reps[method.key] = reps_for(time_once(method.run, batches[1 % len(batches)]), budget_s, min_reps, max_reps)
        tick(f"warm {method.key}")
    seconds: dict[str, list[float]] = {m.key: [] for m in contenders}
    for r in range(rounds):
        for method in (contenders if r % 2 == 0 else contenders[::-1]):
            method.run(batches[-1])
            block = math.ceil(reps[method.key] / rounds)
            for i in range(block):
                seconds[method.key].append(time_once(method.run, batches[(r * block + i) % len(batches)]))
    for method in contenders:
        tick(f"measured {method.key}")
    return seconds


def bank_step_latency(bank: LocalBank, bank_name: str, features: Sequence[np.ndarray],
                      ids: Sequence[np.ndarray], k: int, reps: int, step_consistent: bool = False) -> list[float]:
    """Seconds per ``knn_update`` (FGC's fused search-then-update step) on the in-process bank.
    ``step_consistent``: each call tagged with the next training step, so each also closes the
    step before it (whose held update is applied then): the whole cost of the mode."""
    steps = itertools.count(bank.info(bank_name)["closed_step"] + 2)  # after any step the bank has seen

    def call(i: int) -> None:
        step = next(steps) if step_consistent else None
        bank.knn_update(bank_name, ids[i % len(ids)], features[i % len(features)], k, step=step)

    call(0)  # warm-up
    return [time_once(call, i) for i in range(reps)]


def bank_update_seconds(bank: LocalBank, bank_name: str, values: Sequence[np.ndarray],
                        ids: Sequence[np.ndarray], reps: int) -> list[float]:
    """Seconds per momentum ``update`` of one batch of rows on the in-process bank."""
    bank.update(bank_name, ids[0], values[0])
    return [time_once(bank.update, bank_name, ids[i % len(ids)], values[i % len(values)]) for i in range(reps)]
