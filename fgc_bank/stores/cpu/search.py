"""Exact top-k inner-product search over a live float32 matrix, close to the machine's GEMM rate.

``search_inner_product(rows, queries, k, low)`` is the one search the bank runs. It returns the
same answer as a float32 brute force (up to the order of equal scores) and is built from library
calls only: ``torch.mm`` for the scores, FAISS heaps, FAISS pairwise products or numpy for the
selection.

Why not just ``faiss.knn`` (``docs/perf-notes.md`` has the measurements; 2-core EPYC, FAISS 1.15):

- FAISS uses BLAS only when ``nq * d >= faiss.cvar.distance_compute_blas_threshold`` (128000).
  256 queries at d = 64 or 128 fall below it, so FAISS scans the whole bank once per query with a
  dot-product loop: memory-bound, about 0.2x and 0.13x of the sgemm bound (0.9x at d = 512).
- With BLAS forced, every score still passes through a per-query heap (k < 100) or reservoir;
  a heap insertion at k = 200 costs ~57 ns and a query makes about k (1 + ln(N / k)) of them:
  at cifar's shape that is as long as the query's GEMM.
- torch (MKL) and FAISS each bring an OpenMP runtime whose idle threads spin for milliseconds
  after a parallel region; alternating the two on 2 cores makes each wait for the other.

What this module does instead:

- One search thread per core (a pool), each single-threaded in torch and FAISS (both settings
  are per thread): no OpenMP team, no barrier per chunk. Each thread works on all the queries and
  a share of the rows. Phases (sample, scan, finish) follow each other on the search threads:
  the thread that ends one starts the next (:func:`_then`), and the caller waits for the
  answer only. In the scan over all rows the shares are not fixed (:class:`_Claims`): a thread
  that finishes its own run of row pieces takes half of the longest run left, so a thread on a
  slower or busier core does not hold the others.
- Scores come from one ``torch.mm`` per chunk of rows into a preallocated, cache-sized buffer.
- Selection, chosen per call by a small cost model (:func:`_plan`):

  - heap: FAISS min-heaps per query (``float_minheap_array_t.addn``) over each (B, c) chunk. The
    compare costs ~0.3 ns per score; insertions are few when N per thread is large next to k
    (imagenet shapes). Each thread's heaps are merged at the end.
  - threshold: for large k over a small bank (cifar), a strided sample gives each query a
    threshold that its k-th best score exceeds except with probability ``MISS_RATE`` (a Poisson
    tail bound). The chunk scan is two numpy passes (``scores > T``, ``flatnonzero``); a few
    hundred candidates per query survive, packed as sortable uint64 (score bits, row id) keys.
    Exactness is checked, not assumed: an answer is exact when its k-th score is above the
    threshold; a query that fails the check is searched again with ``faiss.knn``.
  - threshold with a prefilter, when the caller keeps a low-precision copy of the rows
    (``fgc_bank.stores.cpu.prefilter``; the bank does on CPUs with int8 or bfloat16 dot products): the chunk
    GEMM runs in int8 (about 4.5x the float32 rate here) or bfloat16 (2.9x), each query's
    threshold lowered by a proven bound on the low-precision error and folded into the GEMM, so
    the filter is one test per score. The rows that pass are scored again in float32
    (``faiss.pairwise_indexed_inner_product``) while still in cache; from there on it is the
    float32 threshold search. The cost model picks it for all three benchmark shapes.

Thread-safety: any number of threads may call :func:`search_inner_product` at once; the work goes
to one shared pool, and scratch buffers belong to the pool threads.
"""

from __future__ import annotations

import concurrent.futures
import functools
import itertools
import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import torch

from fgc_bank.stores.cpu.costs import (
    CANDIDATE_NS,
    ENCODE_NS,
    ENCODE_VALUE_NS,
    FLOP_NS,
    HEAP_INSERT_NS,
    HEAP_LEVEL_NS,
    HEAP_SCAN_NS,
    RESCORE_NS,
    SAMPLE_GROUP,
    SAMPLE_ROW_NS,
    THRESHOLD_SCAN_NS,
)
from fgc_bank.stores.cpu.prefilter import Prefilter, Scan, scratch

SCORES_PER_CHUNK = 1 << 20  # threshold strategy: one thread's (c, B) score buffer, 4 MB
HEAP_SCORES_PER_CHUNK = 1 << 19  # heap strategy: one thread's (B, c) score buffer, 2 MB
MIN_CHUNK_ROWS = 4096  # prefilter scan: a smaller chunk's fixed costs show (2048 rows: 1.1-1.5x per row at B=256)
CHUNKS_PER_THREAD = 4  # prefilter scan: at least this many chunks a thread, unless that makes them small
MIN_ROWS_PER_THREAD = 4096  # below this a thread's share is not worth the hand-off
MIN_BATCH = 8  # fewer queries: faiss.knn's own paths are as good
MAX_BATCH = 1024  # more queries (coalesced requests): searched in equal blocks of at most this many
MISS_RATE = 1e-4  # per query: chance that the threshold is too high and the query is searched again

_pool_lock = threading.Lock()
_pool: concurrent.futures.ThreadPoolExecutor | None = None
_pool_threads = 0  # 0: one per core
_local = threading.local()  # the "in the pool" mark of a pool thread


def set_threads(threads: int) -> None:
    """Use ``threads`` search threads (0: one per core); also caps FAISS's OpenMP threads."""
    global _pool, _pool_threads
    if threads < 0:
        raise ValueError(f"threads must be >= 0, got {threads}")
    if threads > 0:
        faiss.omp_set_num_threads(threads)
    with _pool_lock:
        if threads != _pool_threads and _pool is not None:
            _pool.shutdown(wait=False)
            _pool = None
        _pool_threads = threads


def search_threads() -> int:
    """How many search threads a search uses."""
    if _pool_threads > 0:
        return _pool_threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def search_inner_product(rows: np.ndarray, queries: np.ndarray, k: int,
                         low: Prefilter | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by inner product with each query, exact.

    Parameters
    ----------
    rows : (N, D) float32, C-contiguous; searched in place, never copied.
    queries : (B, D) float32.
    k : 1 <= k <= N.
    low : a low-precision copy of ``rows`` kept in step with them (``fgc_bank.stores.cpu.prefilter``):
        candidates are then found in low precision and ranked in float32, with the same answer.

    Returns
    -------
    scores : (B, k) float32, descending.
    ids : (B, k) int64 row ids (ties between equal scores in any order).
    """
    if low is not None and low.source is not rows:
        raise ValueError("low must be the copy of these very rows (prefilter.make(rows, kind))")
    if rows.ndim != 2 or queries.ndim != 2 or rows.shape[1] != queries.shape[1]:
        raise ValueError(f"rows (N, D) and queries (B, D) must share D, got {rows.shape} and {queries.shape}")
    if not 1 <= k <= rows.shape[0]:
        raise ValueError(f"k must be in [1, {rows.shape[0]}], got {k}")
    # A private, writable float32 copy of the (small) queries: torch.from_numpy needs writable
    # memory, and a view of received bytes (np.frombuffer) is read-only.
    queries = np.array(queries, dtype=np.float32, order="C", copy=True)
    n, b = rows.shape[0], queries.shape[0]
    if b == 0:  # nothing to search (and nothing to share out between threads)
        return np.empty((0, k), dtype=np.float32), np.empty((0, k), dtype=np.int64)
    if b < MIN_BATCH or n < 2 * MIN_ROWS_PER_THREAD or 16 * k > n or not _torch_can_share(rows):
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        return _knn_ranges(rows, queries, k, _bounds(n))
    if b > MAX_BATCH:
        return _in_blocks(lambda part: search_inner_product(rows, part, k, low), queries, MAX_BATCH)
    return _search_blocked(rows, queries, k, low)


def _in_blocks(search: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], queries: np.ndarray,
               size: int) -> tuple[np.ndarray, np.ndarray]:
    """``search`` over equal blocks of at most ``size`` queries, answers stacked.

    Equal, because a search's cost per query falls with its batch up to about ``MAX_BATCH``
    (cifar's shape: 47 us at 256 queries, 43 at 512, 39 at 1024): 1280 queries go as two blocks of
    640, not 1024 and a costly 256.
    """
    b = queries.shape[0]
    blocks = -(-b // size)
    cuts = [b * i // blocks for i in range(blocks + 1)]
    parts = [search(queries[lo:hi]) for lo, hi in itertools.pairwise(cuts)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _torch_can_share(rows: np.ndarray) -> bool:
    return rows.dtype == np.float32 and rows.flags.c_contiguous and rows.flags.writeable


# -- the blocked search -------------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How one search is cut up: row ranges per thread, chunk rows, and the selection strategy."""

    bounds: tuple[tuple[int, int], ...]
    chunk: int
    stride: int  # threshold strategy: the sample is every stride-th row
    rank: int  # threshold strategy: the threshold is the rank-th best sample score; 0: heaps
    prefilter: bool = False  # threshold strategy: scan the low-precision copy, rescore in float32


def _bounds(n: int) -> tuple[tuple[int, int], ...]:
    """Each search thread's row range: as many threads as have ``MIN_ROWS_PER_THREAD`` rows."""
    threads = max(1, min(search_threads(), n // MIN_ROWS_PER_THREAD))
    cuts = [n * t // threads for t in range(threads + 1)]
    return tuple(itertools.pairwise(cuts))


def _plan(n: int, d: int, b: int, k: int, low: Prefilter | None = None) -> _Plan:
    bounds = _bounds(n)
    share = bounds[0][1]
    # ns per query and thread of each way to score and select (rough, see the constants)
    inserts = k * (1.0 + math.log(max(share / k, 1.0)))  # expected heap insertions
    heap_ns = share * (2 * d * FLOP_NS + HEAP_SCAN_NS) \
        + inserts * (HEAP_INSERT_NS + HEAP_LEVEL_NS * math.log2(k + 1))
    sample_ns, stride, rank = _threshold_sample(n, d, k, RESCORE_NS if low else 0.0)
    scan_ns = share * (2 * d * low.flop_ns + low.scan_ns if low else 2 * d * FLOP_NS + THRESHOLD_SCAN_NS)
    if heap_ns <= scan_ns + sample_ns / len(bounds):
        return _Plan(bounds, max(64, min(share, HEAP_SCORES_PER_CHUNK // b)), 0, 0)
    if low is None:
        return _Plan(bounds, max(64, min(share, SCORES_PER_CHUNK // b)), stride, rank)
    # Chunks are what threads share out (_Claims): enough per thread that the one in flight at the
    # end is short, none so small that its fixed costs show.
    chunk = max(MIN_CHUNK_ROWS, min(low.chunk_scores // b, share // CHUNKS_PER_THREAD))
    return _Plan(bounds, min(share, chunk), stride, rank, True)


def _threshold_sample(n: int, d: int, k: int, rescore_ns: float = 0.0) -> tuple[float, int, int]:
    """(ns per query, stride, rank) of the cheapest threshold sample for top-k of n rows."""
    best: tuple[float, int, int] = (math.inf, n, 0)
    for stride in (8, 16, 32, 64, 128, 256, 512, 1024):
        sample = n // stride
        rank = _poisson_rank(k / stride, MISS_RATE)
        if rank > sample // 4:
            break
        # ns per query: the sample (GEMM, group maxima, partition), then ~rank * stride candidates
        cost = sample * (2 * d * FLOP_NS + SAMPLE_ROW_NS) + (CANDIDATE_NS + rescore_ns) * rank * stride
        if cost < best[0]:
            best = (cost, stride, rank)
    return best


@functools.lru_cache(maxsize=1024)
def _poisson_rank(mean: float, miss: float) -> int:
    """Smallest r with P(X >= r) <= miss for X ~ Poisson(mean), 0 < miss < 1/2.

    X counts the sample rows that score at or above a query's k-th best (hypergeometric with this
    mean, which Poisson bounds). The threshold, the r-th best sample score, is then below the k-th
    best score, as the exact answer needs, except with probability ``miss``.

    Summed from the mode up, not from P(X = 0) = exp(-mean): that underflows to 0 for a mean above
    ~745 (a deep search), and a sum started from it never ends. A Poisson law's median is at least
    floor(mean), so the answer lies above it (P(X >= floor(mean)) >= 1/2 > miss); the mode's term,
    computed in log space, is about 1 / sqrt(2 pi mean), never 0, and the terms after it fall
    faster than geometrically, so the loop ends after O(sqrt(mean)) terms for every mean.
    """
    if not 0.0 < miss < 0.5:
        raise ValueError(f"miss must be in (0, 1/2), got {miss}")
    if mean <= 0.0:
        return 1
    mode = math.floor(mean)
    term = math.exp(mode * math.log(mean) - mean - math.lgamma(mode + 1))  # P(X = mode)
    terms = []
    while True:
        terms.append(term)
        term *= mean / (mode + len(terms))  # P(X = mode + len(terms))
        # everything from here on: at most term / (1 - ratio), the terms falling by ratio or faster
        rest = term / (1.0 - mean / (mode + len(terms) + 1))
        if rest < miss * 2.0**-30:  # too small to move any tail sum that matters
            break
    tail = rest  # P(X >= mode + i), from the far end, so no sum loses the small terms
    tails = [tail := tail + t for t in reversed(terms)][::-1]
    return mode + next((i for i, p in enumerate(tails) if p <= miss), len(terms))  # P(X >= that) <= rest


def _pool_executor() -> concurrent.futures.ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = concurrent.futures.ThreadPoolExecutor(
                max_workers=search_threads(), thread_name_prefix="fgc-bank-search", initializer=_init_search_thread)
        return _pool


def _init_search_thread() -> None:
    """Make this pool thread single-threaded in torch (MKL) and FAISS (OpenMP).

    Both settings are per thread. ``torch.set_num_threads`` also sets the default that threads
    created later start from, so a helper thread puts the process default back.
    """
    default = torch.get_num_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    _local.in_pool = True
    restore = threading.Thread(target=torch.set_num_threads, args=(default,), name="fgc-bank-threads")
    restore.start()
    restore.join()


def _run(tasks: list[tuple]) -> list:
    """Run ``(function, *args)`` tasks on the search threads (inline on a search thread)."""
    if getattr(_local, "in_pool", False):
        return [task[0](*task[1:]) for task in tasks]
    pool = _pool_executor()
    futures = [pool.submit(*task) for task in tasks]
    return [future.result() for future in futures]


def _then(tasks: list[tuple], after: Callable[[list], None], done: concurrent.futures.Future,
          inline: bool) -> None:
    """Run ``(function, *args)`` tasks on the search threads; the thread that finishes the last
    one calls ``after(results)`` itself, and runs the first task of the next phase it starts, so
    a search's phases follow each other without a round trip through the caller's thread (two
    thread wake-ups per phase on the critical path, ~0.1 ms each on this VM, become one that the
    other threads' work covers). No task ever waits for another, so searches sharing the pool
    cannot deadlock. An exception ends ``done``. ``inline``: all on this thread, in order."""
    if inline:
        after([task[0](*task[1:]) for task in tasks])
        return
    results: list = [None] * len(tasks)
    left = len(tasks)
    lock = threading.Lock()

    def run(i: int) -> None:
        nonlocal left
        try:
            results[i] = tasks[i][0](*tasks[i][1:])
            with lock:
                left -= 1
                last = not left
            if last and not done.done():
                after(results)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller waiting on done
            if not done.done():
                try:
                    done.set_exception(exc)
                except concurrent.futures.InvalidStateError:  # another task failed first
                    pass

    pool = _pool_executor()
    here = getattr(_local, "in_pool", False)  # a phase's last thread, starting the next phase
    for i in range(int(here), len(tasks)):
        pool.submit(run, i)
    if here:  # it takes the first task itself: one submit and one pick-up fewer
        run(0)


class _Claims:
    """Rows 0..n shared by the tasks of one phase, in pieces of ``chunk`` rows.

    Each task owns an equal run of pieces and takes them from its front; a task whose run is used
    up takes the back half of the longest run still unclaimed. So a thread slowed by something
    else (one vCPU of this VM often runs 20% slower than the other; the socket's threads wake on
    one core) is covered by the others instead of keeping them waiting: a static split loses
    that difference, this loses at most the piece in flight. Pieces keep fixed bounds, so oneDNN
    sees the same two shapes and can reuse its cached primitives (stealing halves of any size
    measured slower).
    """

    def __init__(self, n: int, chunk: int, owners: int) -> None:
        pieces = -(-n // chunk)
        cuts = [pieces * t // owners for t in range(owners + 1)]
        self._rest = [[lo, hi] for lo, hi in itertools.pairwise(cuts)]  # per owner: pieces not yet taken
        self._n, self._chunk = n, chunk
        self._owners = itertools.count()
        self._lock = threading.Lock()

    def pieces(self) -> Iterator[tuple[int, int]]:
        """The calling task's pieces (lo, hi), one at a time, until none are left."""
        owner = next(self._owners) % len(self._rest)
        while True:
            with self._lock:
                rest = self._rest[owner]
                if rest[0] >= rest[1]:  # own run used up: take the back half of the longest
                    victim = max(self._rest, key=lambda r: r[1] - r[0])
                    take = (victim[1] - victim[0] + 1) // 2
                    if not take:
                        return
                    rest[:] = victim[1] - take, victim[1]
                    victim[1] -= take
                piece = rest[0]
                rest[0] += 1
            yield piece * self._chunk, min((piece + 1) * self._chunk, self._n)


def _search_blocked(rows: np.ndarray, queries: np.ndarray, k: int,
                    low: Prefilter | None) -> tuple[np.ndarray, np.ndarray]:
    plan = _plan(rows.shape[0], rows.shape[1], queries.shape[0], k, low)
    rows_t, queries_t = torch.from_numpy(rows), torch.from_numpy(queries)
    if not plan.rank:
        claims = _Claims(rows.shape[0], plan.chunk, len(plan.bounds))
        return _merge(_run([(_heap_scan, rows_t, queries_t, k, claims.pieces(), plan.chunk) for _ in plan.bounds]), k)
    b = queries.shape[0]
    scores = np.empty((b, k), dtype=np.float32)
    ids = np.empty((b, k), dtype=np.int64)
    done: concurrent.futures.Future[np.ndarray] = concurrent.futures.Future()
    inline = getattr(_local, "in_pool", False)  # a search inside a search thread runs on that thread

    def scan(parts: list) -> None:
        encoded, samples = (parts[0], parts[1:]) if encode else (None, parts)
        pooled = np.concatenate(samples, axis=1)  # (B, parts * rank)
        column = pooled.shape[1] - plan.rank  # the rank-th best of all parts' samples
        threshold = np.ascontiguousarray(np.partition(pooled, column, axis=1)[:, column])
        scanner = low.scanner(encoded, threshold) if encoded is not None else None
        claims = _Claims(rows.shape[0], plan.chunk, len(plan.bounds))
        if scanner is None:
            tasks = [(_scan, rows_t, queries_t, threshold, claims.pieces(), plan.chunk) for _ in plan.bounds]
        else:
            tasks = [(_scan_filtered, rows, queries, scanner, threshold, claims.pieces()) for _ in plan.bounds]
        _then(tasks, lambda found: finish(found, threshold), done, inline)

    def finish(found: list, threshold: np.ndarray) -> None:
        cuts = [b * t // len(found) for t in range(len(found) + 1)]
        tasks = [(_finish, found, threshold, qa, qb, scores, ids) for qa, qb in itertools.pairwise(cuts)]
        _then(tasks, lambda _: done.set_result(threshold), done, inline)

    # The queries' low-precision encoding does not need the thresholds: it runs beside the sample,
    # and the thread that makes it samples fewer rows.
    encode = [(low.encode, queries)] if plan.prefilter else []
    _then(encode + [(_sample_best, rows_t[lo:hi], queries_t, plan)
                    for lo, hi in _sample_ranges(rows.shape[0], b, rows.shape[1], plan, bool(encode))],
          scan, done, inline)
    threshold = done.result()
    redo = np.flatnonzero(~(scores[:, -1] > threshold) | (ids[:, -1] < 0))
    if redo.size:  # the threshold was above these queries' k-th score: search them the plain way
        scores[redo], ids[redo] = _knn_ranges(rows, queries[redo], k, plan.bounds)
    return scores, ids


def _sample_ranges(n: int, b: int, d: int, plan: _Plan, encoding: bool) -> list[tuple[int, int]]:
    """Row ranges to sample, one per search thread, cut at multiples of the stride (so together
    they sample every stride-th row). With ``encoding``, the last range is shortened by the time
    the queries' encoding takes, for the thread that makes it (it is queued first)."""
    threads, stride = len(plan.bounds), plan.stride
    if not encoding or threads < 2:
        shares = [1.0 / threads] * threads
    else:
        per_row = b * (2 * d * FLOP_NS + SAMPLE_ROW_NS)  # one sampled row against every query
        lead = (ENCODE_NS + ENCODE_VALUE_NS * b * d) / (per_row * n / stride)  # encoding / whole sample
        last = max(0.0, 1.0 - (threads - 1) * (1.0 + lead) / threads)
        shares = [(1.0 - last) / (threads - 1)] * (threads - 1) + [last]
    cuts = [0]
    for share in shares[:-1]:
        cuts.append(min(n, cuts[-1] + round(share * n / stride) * stride))
    cuts.append(n)
    minimum = stride * SAMPLE_GROUP * plan.rank  # fewer rows: too few sample scores to rank
    ranges = [(lo, hi) for lo, hi in itertools.pairwise(cuts) if hi > lo]
    if len(ranges) > 1 and ranges[-1][1] - ranges[-1][0] < minimum:
        ranges[-2:] = [(ranges[-2][0], n)]
    return ranges


def _knn_ranges(rows: np.ndarray, queries: np.ndarray, k: int,
                bounds: tuple[tuple[int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    """Plain ``faiss.knn`` per row range on the search threads, merged (a rare fallback)."""
    if any(hi - lo < k for lo, hi in bounds):
        bounds = ((0, rows.shape[0]),)
    return _merge(_run([(_knn_range, rows, queries, k, lo, hi) for lo, hi in bounds]), k)


def _merge(parts: list[tuple[np.ndarray, np.ndarray]], k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each thread's (scores, ids), (B, k) -> the k best of all, best first. Slots with id -1
    (a thread that saw fewer than k rows) become empty keys, below every row's."""
    if len(parts) == 1:
        return parts[0]
    keys = np.concatenate([np.where(i >= 0, _pack(s, i), 0) for s, i in parts], axis=1)
    keys.sort(axis=1)
    return _decode(keys[:, :-k - 1:-1])


def _knn_range(rows: np.ndarray, queries: np.ndarray, k: int, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = faiss.knn(queries, rows[lo:hi], k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores, ids + lo


# -- the phases, each run on every search thread --------------------------------------------------


def _heap_scan(rows: torch.Tensor, queries: torch.Tensor, k: int, pieces: Iterable[tuple[int, int]],
               chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of the rows of ``pieces`` (ranges of at most ``chunk`` rows) through one FAISS
    min-heap per query: (scores, ids), (B, k), best first; slots no row filled hold id -1."""
    b = queries.shape[0]
    vals = np.empty((b, k), dtype=np.float32)
    ids = np.empty((b, k), dtype=np.int64)
    heaps = _heaps(vals, ids)
    scores = scratch("scores", chunk * b, torch.float32)
    for j0, j1 in pieces:
        n = j1 - j0
        torch.mm(queries, rows[j0:j1].T, out=scores[:n * b].view(b, n))  # (B, n), as heaps read
        heaps.addn(n, faiss.swig_ptr(scores.numpy()), j0, 0, b)
    heaps.reorder()
    return vals, ids


def _heaps(vals: np.ndarray, ids: np.ndarray) -> faiss.float_minheap_array_t:
    """FAISS min-heaps over ``vals``/``ids`` (B, k), emptied: each keeps its query's k best."""
    heaps = faiss.float_minheap_array_t()
    heaps.nh, heaps.k = vals.shape
    heaps.val, heaps.ids = faiss.swig_ptr(vals), faiss.swig_ptr(ids)
    heaps.heapify()
    return heaps


def _sample_best(rows: torch.Tensor, queries: torch.Tensor, plan: _Plan) -> np.ndarray:
    """Per query, ``plan.rank`` scores from every ``plan.stride``-th row of ``rows``, (B, rank).

    Not the rank best sample scores but the rank best maxima of groups of ``SAMPLE_GROUP`` sample
    scores: ``rank`` distinct rows score at least that much, so the rank-th is at most the rank-th
    best sample score (the threshold may only get lower, never wrong), and finding it takes a
    ``topk`` over 1/SAMPLE_GROUP of the scores instead of a heap over all of them.
    """
    b, rank = queries.shape[0], plan.rank
    sample = rows[::plan.stride]
    m = sample.shape[0] // SAMPLE_GROUP * SAMPLE_GROUP
    if m < SAMPLE_GROUP * rank:  # too few sample rows to group: take the plain rank best
        best = torch.mm(queries, sample.T).numpy()
    else:
        scores = scratch("sample", m * b, torch.float32)[:m * b].view(b, m)
        torch.mm(queries, sample[:m].T, out=scores)  # (B, m)
        best = scores.view(b, SAMPLE_GROUP, m // SAMPLE_GROUP).amax(dim=1).numpy()  # (B, m / group)
    return np.partition(best, best.shape[1] - rank, axis=1)[:, best.shape[1] - rank:]


def _scan(rows: torch.Tensor, queries: torch.Tensor, threshold: np.ndarray, pieces: Iterable[tuple[int, int]],
          chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``pieces`` (ranges of at most ``chunk`` rows) scoring above each query's threshold,
    grouped by query: (counts (B,), keys)."""
    b = queries.shape[0]
    above = np.ascontiguousarray(threshold)[None, :]  # (1, B); contiguous, or numpy's compare loses SIMD
    scores = scratch("scores", chunk * b, torch.float32)
    flat = scores.numpy()
    mask = scratch("mask", chunk * b, torch.bool).numpy()
    queries_t = queries.T  # (D, B) view: the GEMM reads it transposed, no copy
    found_q, found_v, found_r = [], [], []
    for j0, j1 in pieces:
        n = j1 - j0
        torch.mm(rows[j0:j1], queries_t, out=scores[:n * b].view(n, b))  # (n, B)
        np.greater(flat[:n * b].reshape(n, b), above, out=mask[:n * b].reshape(n, b))
        hits = np.flatnonzero(mask[:n * b])
        row, query = _split(hits, b)
        found_v.append(flat[hits])
        found_q.append(query)
        found_r.append(row + j0)
    return _group(b, found_q, found_v, found_r)


def _split(flat: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat positions in a row-major (rows, B) block -> (row, query). For B a power of two a
    shift and a mask, 4x faster than divmod (cifar: 9 against 46 us a piece of 6,250 rows)."""
    if b & (b - 1) == 0:
        return flat >> (b.bit_length() - 1), flat & (b - 1)
    return np.divmod(flat, b)


def _group(b: int, found_q: list[np.ndarray], found_v: list[np.ndarray],
           found_r: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Candidates (query, score, row) of a thread's chunks -> (counts (B,), keys grouped by query)."""
    if not found_q:  # the other threads took every piece
        return np.zeros(b, dtype=np.int64), np.empty(0, dtype=np.uint64)
    query = np.concatenate(found_q)
    order = np.argsort(query.astype(np.int16 if b <= 32767 else np.int32), kind="stable")  # radix
    keys = _pack(np.concatenate(found_v), np.concatenate(found_r))[order]
    return np.bincount(query, minlength=b), keys


def _scan_filtered(rows: np.ndarray, queries: np.ndarray, scan: Scan, threshold: np.ndarray,
                   pieces: Iterable[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_scan` with a prefilter: ``scan`` (``fgc_bank.stores.cpu.prefilter``) finds, per piece, a
    superset of the (row, query) pairs whose float32 score beats the query's threshold; those are
    scored again in float32 while the rows are still in cache, and kept if they beat it."""
    b, d = queries.shape
    found_q, found_v, found_r = [], [], []
    for j0, j1 in pieces:
        row, query = _split(scan(j0, j1 - j0), b)
        row += j0
        exact = np.empty(row.size, dtype=np.float32)
        faiss.pairwise_indexed_inner_product(d, row.size, faiss.swig_ptr(queries), faiss.swig_ptr(query),
                                             faiss.swig_ptr(rows), faiss.swig_ptr(row), faiss.swig_ptr(exact))
        # Positions, then takes: three boolean-mask selections of the same mask cost 4x as much
        # (cifar: 1.1 against 0.25 ms a thread and search).
        keep = np.flatnonzero(exact > threshold[query])
        found_v.append(exact.take(keep))
        found_q.append(query.take(keep))
        found_r.append(row.take(keep))
    return _group(b, found_q, found_v, found_r)


def _finish(found: list[tuple[np.ndarray, np.ndarray]], threshold: np.ndarray, qa: int, qb: int,
            scores: np.ndarray, ids: np.ndarray) -> None:
    """Queries qa..qb: the k best of every thread's candidates, sorted, into scores/ids rows."""
    k = scores.shape[1]
    segments = []
    for counts, keys in found:
        starts = np.cumsum(counts) - counts
        segments.append((counts[qa:qb], keys[starts[qa]:starts[qb - 1] + counts[qb - 1]]))
    counts = np.sum([c for c, _ in segments], axis=0)
    width = max(k, int(counts.max(initial=0)))
    # Padding: 0, 1, 2... (empty keys, below every score) rather than all zeros: numpy's partition
    # slows down ~7x on rows that are mostly one repeated value (imagenet-128: 14 ms vs 2 ms).
    table = np.empty((qb - qa, width), dtype=np.uint64)
    table[:] = np.arange(width, dtype=np.uint64)
    flat = table.reshape(-1)
    ends = np.arange(qb - qa) * width  # per query: flat position of its next key in the table
    for seg_counts, seg_keys in segments:  # one flat scatter per thread's candidates
        starts = np.cumsum(seg_counts) - seg_counts
        flat[np.repeat(ends - starts, seg_counts) + np.arange(seg_keys.size)] = seg_keys
        ends += seg_counts
    if width > k:  # each row's k largest keys, in any order: then only those need sorting
        table = np.partition(table, width - k, axis=1)[:, width - k:]
    table.sort(axis=1)
    scores[qa:qb], ids[qa:qb] = _decode(table[:, ::-1])


EMPTY_BELOW = np.uint64(1 << 32)  # keys under this hold no score: the finite scores' keys are above


def _pack(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """float32 scores and row ids -> uint64 keys that sort like (score, id); every key of a
    finite score is at least 2^32, so smaller keys can stand for "empty"."""
    bits = np.ascontiguousarray(scores, dtype=np.float32).view(np.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).view(np.uint32) ^ np.uint32(0x80000000)
    return (ordered.astype(np.uint64) << np.uint64(32)) | ids.astype(np.uint64)


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Keys -> (scores float32, ids int64); empty keys (below 2^32) -> (-inf, -1)."""
    ordered = ((keys >> np.uint64(32)).astype(np.uint32) ^ np.uint32(0x80000000)).view(np.int32)
    scores = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32)
    ids = (keys & np.uint64(0xFFFFFFFF)).astype(np.int64)
    empty = keys < EMPTY_BELOW
    scores[empty], ids[empty] = -np.inf, -1
    return scores, ids
