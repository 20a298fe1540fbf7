"""search_inner_product against a numpy brute-force oracle, across shapes and code paths."""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import threading

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn

from fgc_bank.stores.cpu import prefilter, search
from fgc_bank.stores.cpu.search import search_inner_product


def make_bank(n: int, d: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, d), dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def make_queries(rows: np.ndarray, b: int, seed: int = 1) -> np.ndarray:
    """Queries near bank rows (like FGC features near their own entries), plus noise."""
    rng = np.random.default_rng(seed)
    picks = rows[rng.integers(0, rows.shape[0], b)]
    return (picks + 0.3 * rng.standard_normal(picks.shape, dtype=np.float32)).astype(np.float32)


def assert_exact(rows: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray, ids: np.ndarray) -> None:
    """Same answer as brute force, up to the order (and choice) among equal scores."""
    b = queries.shape[0]
    assert scores.shape == (b, k) and ids.shape == (b, k)
    assert scores.dtype == np.float32 and ids.dtype == np.int64
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T  # (B, N) oracle
    best = -np.sort(-exact, axis=1)[:, :k]
    tol = 1e-5
    assert np.all(np.diff(scores, axis=1) <= tol), "scores must be descending"
    assert np.all((ids >= 0) & (ids < rows.shape[0]))
    for i in range(b):
        assert np.unique(ids[i]).size == k, f"query {i}: repeated ids"
    np.testing.assert_allclose(np.take_along_axis(exact, ids, 1), scores, atol=tol)  # ids match scores
    np.testing.assert_allclose(scores, best, atol=tol)  # and they are the k best


@pytest.mark.parametrize(
    "n, d, b, k",
    [
        (1, 4, 1, 1),  # smallest bank
        (100, 8, 1, 1),  # one query, k = 1
        (100, 8, 3, 100),  # k = N
        (1000, 16, 20, 1000),  # k = N, several queries
        (5000, 32, 7, 200),  # few queries: the faiss.knn path
        (20000, 64, 64, 1),  # blocked path, k = 1
        (20000, 64, 64, 200),  # blocked path, large k
        (20000, 64, 256, 1250),  # largest k the blocked path takes (N / 16)
        (20011, 24, 37, 20),  # sizes that are multiples of nothing
        (8192, 128, 9, 5),  # just enough rows for two search threads
        (30000, 512, 16, 200),  # wide rows
        (12345, 1, 33, 7),  # D = 1: very many ties
    ],
)
def test_matches_brute_force(n: int, d: int, b: int, k: int) -> None:
    rows = make_bank(n, d)
    queries = make_queries(rows, b)
    scores, ids = search_inner_product(rows, queries, k)
    assert_exact(rows, queries, k, scores, ids)


@pytest.mark.parametrize("strategy", ["heap", "threshold"])
@pytest.mark.parametrize("n, d, b, k", [(20000, 64, 64, 1), (20000, 64, 100, 200), (25013, 128, 9, 20)])
def test_both_selection_strategies_match_brute_force(monkeypatch: pytest.MonkeyPatch, strategy: str,
                                                     n: int, d: int, b: int, k: int) -> None:
    planner = search._plan

    def forced(*args: int) -> search._Plan:
        plan = planner(*args)
        if strategy == "heap":
            return search._Plan(plan.bounds, plan.chunk, 0, 0)
        stride = 8
        return search._Plan(plan.bounds, plan.chunk, stride, search._poisson_rank(k / stride, search.MISS_RATE))

    monkeypatch.setattr(search, "_plan", forced)
    rows = make_bank(n, d)
    queries = make_queries(rows, b)
    scores, ids = search_inner_product(rows, queries, k)
    assert_exact(rows, queries, k, scores, ids)


def test_duplicate_rows_force_the_exact_fallback() -> None:
    """Many equal rows put the threshold on the k-th score itself; the check must catch it."""
    rows = make_bank(20000, 32)
    rows[::3] = rows[0]  # a third of the bank is one row
    queries = make_queries(rows, 40)
    queries[:10] = rows[0]
    scores, ids = search_inner_product(rows, queries, 100)
    assert_exact(rows, queries, 100, scores, ids)


def test_threshold_too_high_is_searched_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """A plan whose threshold sits above the k-th score still returns the exact answer."""
    rows = make_bank(20000, 16)
    queries = make_queries(rows, 32)
    plan = search._plan(rows.shape[0], rows.shape[1], queries.shape[0], 50)
    monkeypatch.setattr(search, "_plan", lambda *a: search._Plan(plan.bounds, plan.chunk, 8, 1))
    scores, ids = search_inner_product(rows, queries, 50)
    assert_exact(rows, queries, 50, scores, ids)


def test_read_only_inputs_are_searched_without_copying_rows() -> None:
    rows = make_bank(20000, 32)
    queries = make_queries(rows, 64)
    frozen_rows = np.frombuffer(rows.tobytes(), dtype=np.float32).reshape(rows.shape)
    frozen_queries = np.frombuffer(queries.tobytes(), dtype=np.float32).reshape(queries.shape)
    scores, ids = search_inner_product(frozen_rows, frozen_queries, 30)
    assert_exact(rows, queries, 30, scores, ids)


def test_large_batches_are_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(search, "MAX_BATCH", 40)
    rows = make_bank(20000, 16)
    queries = make_queries(rows, 100)
    scores, ids = search_inner_product(rows, queries, 10)
    assert_exact(rows, queries, 10, scores, ids)


def test_concurrent_callers_get_their_own_answers() -> None:
    rows = make_bank(20000, 32)
    batches = [make_queries(rows, 48, seed=s) for s in range(6)]
    expected = [search_inner_product(rows, q, 64) for q in batches]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda q: search_inner_product(rows, q, 64), batches))
    for (s0, i0), (s1, i1) in zip(expected, got):
        np.testing.assert_array_equal(s0, s1)
        np.testing.assert_array_equal(i0, i1)


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_count_does_not_change_the_answer(threads: int) -> None:
    rows = make_bank(30000, 32)
    queries = make_queries(rows, 64)
    try:
        search.set_threads(threads)
        assert search.search_threads() == threads
        scores, ids = search_inner_product(rows, queries, 40)
    finally:
        search.set_threads(0)
    assert_exact(rows, queries, 40, scores, ids)


def claimed_by_threads(claims: search._Claims, tasks: int, stall_first: bool) -> list[list[tuple[int, int]]]:
    """Pieces each of ``tasks`` threads took from ``claims``. With ``stall_first``, the first task
    holds its first piece until every other task has finished: a thread on a busy core."""
    taken: list[list[tuple[int, int]]] = [[] for _ in range(tasks)]
    others_done = threading.Event()
    started = [threading.Event() for _ in range(tasks)]

    def work(t: int) -> None:
        if t:
            started[t - 1].wait()  # owners in thread order: the first task owns the first run
        pieces = claims.pieces()
        for piece in pieces:
            started[t].set()
            taken[t].append(piece)
            if t == 0 and stall_first:
                others_done.wait()
        started[t].set()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(tasks)]
    for thread in threads:
        thread.start()
    for thread in threads[1:]:
        thread.join()
    others_done.set()
    threads[0].join()
    return taken


@pytest.mark.parametrize("n, chunk, tasks", [(10007, 1000, 3), (4096, 4096, 2), (5, 1, 4), (100, 7, 1)])
@pytest.mark.parametrize("stall_first", [False, True])
def test_claims_hand_out_every_row_once(n: int, chunk: int, tasks: int, stall_first: bool) -> None:
    """The pieces of a phase cover rows 0..n exactly once, in chunks; a stalled task's run is
    taken over by the others (it keeps only the piece it was on)."""
    taken = claimed_by_threads(search._Claims(n, chunk, tasks), tasks, stall_first)
    covered = np.zeros(n, dtype=int)
    for lo, hi in (piece for pieces in taken for piece in pieces):
        assert 0 < hi - lo <= chunk and lo % chunk == 0
        covered[lo:hi] += 1
    assert (covered == 1).all()
    if stall_first and tasks > 1:
        assert taken[0] == [(0, chunk)]


@pytest.mark.parametrize("n, b, d, encoding", [(50000, 256, 64, True), (50000, 1024, 64, True),
                                               (1281167, 256, 512, True), (50000, 256, 64, False)])
def test_sample_ranges_sample_every_stride_th_row(n: int, b: int, d: int, encoding: bool) -> None:
    """However the sample is cut between threads (the one encoding the queries samples less),
    together the ranges sample exactly rows 0, stride, 2 stride, ..."""
    plan = search._Plan(((0, n // 2), (n // 2, n)), 4096, 16, 29, True)
    ranges = search._sample_ranges(n, b, d, plan, encoding)
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(hi == lo for (_, hi), (lo, _) in itertools.pairwise(ranges))
    assert all(lo % plan.stride == 0 for lo, _ in ranges)
    if encoding:
        assert ranges[-1][1] - ranges[-1][0] < ranges[0][1] - ranges[0][0]


def test_a_search_thread_left_without_rows_adds_nothing() -> None:
    """A search thread whose rows the others all took reports no candidates, and merging that
    empty part with the others' still gives the exact top-k."""
    rows = make_bank(20000, 64)
    queries = make_queries(rows, 64)
    k = 100
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    threshold = (-np.sort(-exact, axis=1)[:, k + 50]).astype(np.float32)  # ~150 candidates a query
    rows_t, queries_t = torch.from_numpy(rows), torch.from_numpy(queries)
    empty = search._scan(rows_t, queries_t, threshold, [], 8192)
    assert empty[0].shape == (64,) and not empty[0].any() and empty[1].size == 0
    found = search._scan(rows_t, queries_t, threshold, [(0, 8192), (8192, 16384), (16384, 20000)], 8192)
    scores, ids = np.empty((64, k), np.float32), np.empty((64, k), np.int64)
    search._finish([empty, found, empty], threshold, 0, 64, scores, ids)
    assert_exact(rows, queries, k, scores, ids)


def test_a_heap_thread_with_fewer_than_k_rows_adds_nothing() -> None:
    """The heap strategy's threads share pieces too: one left with no rows, or fewer than k,
    returns slots with id -1, and merging them with the others' heaps gives the exact top-k."""
    rows = make_bank(20000, 64)
    queries = make_queries(rows, 48)
    k = 100
    rows_t, queries_t = torch.from_numpy(rows), torch.from_numpy(queries)
    empty = search._heap_scan(rows_t, queries_t, k, [], 2048)
    assert (empty[1] == -1).all()
    few = search._heap_scan(rows_t, queries_t, k, [(0, 40)], 2048)  # 40 rows: 60 slots stay empty
    assert (few[1][:, :40] >= 0).all() and (few[1][:, 40:] == -1).all()
    rest = search._heap_scan(rows_t, queries_t, k, [(j, min(j + 2048, 20000)) for j in range(40, 20000, 2048)], 2048)
    scores, ids = search._merge([empty, few, rest, empty], k)
    assert_exact(rows, queries, k, scores, ids)


def test_phases_chain_on_the_search_threads_and_report_failures() -> None:
    """Each phase's last task starts the next phase from its own thread; many chained searches
    sharing the pool all finish (no task waits for another), and a failing task ends its
    search's future without running what follows."""
    def chain(tag: int) -> concurrent.futures.Future:
        done: concurrent.futures.Future = concurrent.futures.Future()

        def second(first: list) -> None:
            search._then([(lambda x: x * 10, v) for v in first], done.set_result, done, False)

        search._then([(lambda i: tag + i, i) for i in range(3)], second, done, False)
        return done

    chains = [chain(100 * t) for t in range(12)]
    assert [c.result(timeout=30) for c in chains] == [[1000 * t, 1000 * t + 10, 1000 * t + 20] for t in range(12)]

    def fail() -> None:
        raise RuntimeError("boom")

    after: list = []
    done: concurrent.futures.Future = concurrent.futures.Future()
    search._then([(fail,), (lambda: 1,)], after.append, done, False)
    with pytest.raises(RuntimeError, match="boom"):
        done.result(timeout=30)
    assert after == []
    done = concurrent.futures.Future()
    search._then([(lambda: 2,), (lambda: 3,)], done.set_result, done, True)  # inline: already done
    assert done.done() and done.result() == [2, 3]


def test_rejects_mismatched_shapes_and_k() -> None:
    rows = make_bank(100, 8)
    with pytest.raises(ValueError, match="share D"):
        search_inner_product(rows, np.zeros((2, 7), np.float32), 1)
    with pytest.raises(ValueError, match="k must be"):
        search_inner_product(rows, np.zeros((2, 8), np.float32), 101)
    with pytest.raises(ValueError, match="k must be"):
        search_inner_product(rows, np.zeros((2, 8), np.float32), 0)


def test_poisson_rank_bounds_the_miss_rate() -> None:
    assert search._poisson_rank(0.0, 1e-4) == 1
    assert search._poisson_rank(1e-15, 1e-4) == 1  # P(X >= 1) ~ 1e-15, all but P(X = 0) cut off
    for mean in (0.1, 1.0, 6.25, 25.0):
        r = search._poisson_rank(mean, 1e-4)
        rng = np.random.default_rng(0)
        assert (rng.poisson(mean, 200_000) >= r).mean() <= 3e-4
        assert (rng.poisson(mean, 200_000) >= r - 1).mean() > 1e-4


@pytest.mark.parametrize("mean", [745.5, 1000.0, 1e4, 1e6, 2.0**31])
def test_poisson_rank_ends_and_bounds_the_miss_rate_for_deep_searches(mean: float) -> None:
    """exp(-mean) underflows above ~745: the rank is still found (a worker once spun here forever),
    and it is the smallest with a tail of at most 1e-4 (near mean + 3.72 sqrt(mean), the normal
    law's quantile, for a large mean)."""
    r = search._poisson_rank(mean, 1e-4)
    assert mean + 3.5 * math.sqrt(mean) < r < mean + 4.2 * math.sqrt(mean)
    if mean <= 1e4:
        draws = np.random.default_rng(0).poisson(mean, 400_000)
        assert (draws >= r).mean() <= 3e-4
        assert (draws >= r - 3).mean() > 1e-4


@pytest.mark.parametrize("n, d, b, k", [
    (8000, 8, 4, 7180),  # k > N / 16: the faiss.knn path, whose row ranges once came from the planner
    (96000, 4, 8, 6000),  # the blocked path: its threshold sample ranks k / 8 = 750 sample rows
])
def test_deep_searches_end_and_match_brute_force(n: int, d: int, b: int, k: int) -> None:
    """Depths past 5962 (a coalesced run's search goes deeper than its k) end and are exact."""
    rows = make_bank(n, d)
    queries = make_queries(rows, b)
    scores, ids = search_inner_product(rows, queries, k)
    assert_same_knn(scores, ids, *brute_force_knn(rows, queries, k))


@pytest.mark.parametrize("kind", [None, "bf16"])
def test_zero_queries_get_an_empty_answer(kind: str | None) -> None:
    rows = make_bank(20000, 16)
    scores, ids = search_inner_product(rows, np.zeros((0, 16), np.float32), 10, prefilter.make(rows, kind))
    assert scores.shape == ids.shape == (0, 10) and scores.dtype == np.float32 and ids.dtype == np.int64


def test_keys_round_trip_and_sort_like_scores() -> None:
    scores = np.array([-np.inf, -3.4e38, -3.5, -0.0, 0.0, 1e-30, 2.0, np.inf], dtype=np.float32)
    ids = np.arange(scores.size, dtype=np.int64) * 1000 + 7
    keys = search._pack(scores, ids)
    assert np.all(keys[:-1] < keys[1:])
    back_scores, back_ids = search._decode(keys)
    np.testing.assert_array_equal(back_scores, scores)
    np.testing.assert_array_equal(back_ids, ids)
    assert keys.min() >= search.EMPTY_BELOW  # keys below it are free to mean "empty"
    empty = np.array([0, 1, 4095, (1 << 32) - 1], np.uint64)  # the final top-k's table padding
    empty_scores, empty_ids = search._decode(empty)
    assert np.all(np.isneginf(empty_scores)) and np.all(empty_ids == -1)
