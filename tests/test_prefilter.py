"""The prefilters (int8 and bfloat16 copies of the rows): their error bounds hold, their thresholds
round the right way, and a search that uses them returns the float32 brute-force answer (oracle:
float64 numpy)."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from fgc_bank.bank import BankConfig, MemoryBank, Search, SearchUpdate, Update
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.stores.cpu import prefilter, search
from fgc_bank.stores.cpu.prefilter import SAFE_NORMS, Bf16Rows, Int8Rows, round_down_bf16
from fgc_bank.stores.cpu.search import search_inner_product
from tests.test_search import assert_exact, make_bank, make_queries

INT8 = pytest.param("int8", marks=pytest.mark.skipif(
    not prefilter._int8_gemm_is_exact(),
    reason="oneDNN's int8 GEMM does not sum exactly on this CPU (no VNNI): the int8 prefilter is off here"))
KINDS = [INT8, "bf16"]


def spy_on_filtered_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the row ranges scanned through a prefilter, so a test knows the prefilter really ran."""
    calls: list[int] = []
    scan = search._scan_filtered

    def counted(*args: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        return scan(*args)

    monkeypatch.setattr(search, "_scan_filtered", counted)
    return calls


def rounded_down_by_bf16(n: int, d: int, seed: int) -> np.ndarray:
    """Positive values just under a bfloat16 rounding midpoint, near 1/8: bf16() lowers each by
    almost half a step (relative 2^-8), so every bf16 score is low by almost 2u of the exact one,
    and the vectors are nearly parallel (Cauchy-Schwarz is tight): the margin's worst case."""
    rng = np.random.default_rng(seed)
    below_midpoint = rng.integers(0, 6, (n, d)) + 0.49 - 0.04 * rng.random((n, d))
    return ((1.0 + below_midpoint / 128.0) / 8.0).astype(np.float32)


def rounded_down_by_int8(n: int, d: int, seed: int) -> np.ndarray:
    """The same for int8: each vector's largest value is 1 (so its scale, or the bank's, is 1/127)
    and the others lie just under a midpoint between two steps, so quantising lowers every one of
    them by almost half a step, and every int8 score is low by almost the whole bound."""
    rng = np.random.default_rng(seed)
    values = (rng.integers(60, 120, (n, d)) + 0.49 - 0.04 * rng.random((n, d))) / 127.0
    values[:, 0] = 1.0
    return values.astype(np.float32)


def worst_case(kind: str, n: int, d: int, seed: int) -> np.ndarray:
    return (rounded_down_by_int8 if kind == "int8" else rounded_down_by_bf16)(n, d, seed)


def mixed_norms(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32) * np.exp(rng.uniform(-4, 4, (n, 1))).astype(np.float32)


def kept_pairs(scan: prefilter.Scan, n: int, b: int) -> np.ndarray:
    """(B, N) bool: the pairs one scan of all n rows lets through."""
    kept = np.zeros(n * b, dtype=bool)
    kept[scan(0, n)] = True
    return kept.reshape(n, b).T


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data", ["unit rows", "mixed norms", "worst-case rounding", "negative scores"])
@pytest.mark.parametrize("d", [1, 7, 64, 512])
def test_filter_keeps_every_row_above_the_threshold(kind: str, data: str, d: int) -> None:
    """The low-precision GEMM and its test keep every row whose score beats the query's
    threshold, with thresholds set at many ranks."""
    if data == "unit rows":
        rows, queries = make_bank(3000, d, seed=d), make_bank(64, d, seed=d + 1)
    elif data == "mixed norms":
        rows, queries = mixed_norms(3000, d, d), mixed_norms(64, d, d + 1)
    elif data == "worst-case rounding":
        rows, queries = worst_case(kind, 3000, d, d), worst_case(kind, 64, d, d + 1)
    else:
        rows, queries = -np.abs(make_bank(3000, d, seed=d)), np.abs(make_bank(64, d, seed=d + 1))
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    slack = 1e-6 * np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(rows, axis=1)[None, :]
    low = prefilter.make(rows, kind)
    ranked = -np.sort(-exact, axis=1)
    for rank in (0, 10, 100, 1000, 2999):
        threshold = ranked[:, rank].astype(np.float32)
        kept = kept_pairs(low.prepare(queries, threshold), 3000, 64)
        must = exact > threshold[:, None].astype(np.float64) + slack
        assert not (must & ~kept).any(), f"rank {rank}: rows above the threshold were dropped"
        if rank == 100 and d > 7 and data == "unit rows":  # and the filter does filter
            assert kept.sum() < 3 * (must.sum() + 64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data", ["random", "worst-case rounding"])
def test_scan_keeps_exactly_the_rows_above_a_threshold_set_between_two_scores(kind: str, data: str) -> None:
    """Thresholds between each query's k-th and (k+1)-th exact scores: the filtered scan must
    keep exactly the k rows above. Rows just above a threshold are where the low-precision error
    bites."""
    if data == "random":
        rows = make_bank(20000, 64)
        queries = make_queries(rows, 256)
    else:  # scores crowd together, all low by almost the whole margin
        rows, queries = worst_case(kind, 4000, 64, 0), worst_case(kind, 256, 64, 1)
    n = rows.shape[0]
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    ranked = -np.sort(-exact, axis=1)
    low = prefilter.make(rows, kind)
    pieces = [(j0, min(j0 + 4096, n)) for j0 in range(0, n, 4096)]
    checked = 0
    for k in (50, 200, 400):
        threshold = ((ranked[:, k - 1] + ranked[:, k]) / 2).astype(np.float32)
        clear = np.abs(exact - threshold[:, None]).min(axis=1) > 2e-6  # float32 rescoring agrees
        scan = low.prepare(queries, threshold)
        counts, keys = search._scan_filtered(rows, queries, scan, threshold, pieces)
        _, ids = search._decode(keys)
        starts = np.cumsum(counts) - counts
        for i in np.flatnonzero(clear):
            expected = np.flatnonzero(exact[i] > threshold[i])
            assert np.array_equal(np.sort(ids[starts[i]:starts[i] + counts[i]]), expected), f"query {i}, k {k}"
            checked += 1
    assert checked > 300


def test_round_down_bf16_gives_the_nearest_bf16_at_or_below() -> None:
    rng = np.random.default_rng(0)
    magnitudes = np.exp(rng.uniform(-80, 80, 5000))
    values = np.concatenate([magnitudes, -magnitudes, [1.0, -1.0, 0.5, 0.0, 3.0e38, -3.0e38, 1e-39, -1e-39]])
    down = round_down_bf16(values)
    as_float = down.double().numpy()
    assert (as_float <= values).all()
    step_up = torch.from_numpy(down.view(torch.int16).numpy() + np.where(as_float >= 0, 1, -1).astype(np.int16))
    above = step_up.view(torch.bfloat16).double().numpy()  # the next bf16 value up
    exact = as_float == values
    assert (above[~exact] > values[~exact]).all()
    assert exact[[-8, -7, -6, -5]].all()  # 1, -1, 0.5, 0 are bf16 values


@pytest.mark.parametrize("kind", KINDS)
def test_prepare_refuses_what_it_cannot_bound(kind: str) -> None:
    """Sums that could overflow, and non-finite thresholds: no filter (the search goes float32);
    for int8 also sums so small that oneDNN's scales would be denormal (and could be flushed)."""
    rows = make_bank(100, 8) * np.float32(1e20)
    low = prefilter.make(rows, kind)
    assert low.prepare(make_bank(4, 8) * np.float32(1e20), np.zeros(4, np.float32)) is None
    if kind == "int8":
        tiny = prefilter.make(make_bank(100, 8) * np.float32(1e-12), kind)
        assert tiny.prepare(make_bank(4, 8) * np.float32(1e-12), np.zeros(4, np.float32)) is None
    fine = prefilter.make(make_bank(100, 8), kind)
    assert fine.prepare(make_bank(4, 8), np.array([0, np.inf, 0, 0], np.float32)) is None
    assert fine.prepare(make_bank(4, 8), np.zeros(4, np.float32)) is not None


@pytest.mark.parametrize("kind", KINDS)
# B = 100: a batch that is not a power of two takes the scan's divmod instead of its shift and mask
@pytest.mark.parametrize("n, d, b, k", [(20000, 64, 256, 200), (30011, 32, 64, 100), (20000, 512, 16, 200),
                                        (20011, 48, 100, 150)])
def test_search_with_the_prefilter_matches_brute_force(monkeypatch: pytest.MonkeyPatch, kind: str,
                                                       n: int, d: int, b: int, k: int) -> None:
    calls = spy_on_filtered_scans(monkeypatch)
    rows = make_bank(n, d)
    queries = make_queries(rows, b)
    scores, ids = search_inner_product(rows, queries, k, prefilter.make(rows, kind))
    assert calls, "the filtered scan did not run"
    assert_exact(rows, queries, k, scores, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_prefilter_with_crowded_scores_and_mixed_norms(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Non-negative features (post-ReLU, like FGC's) crowd the scores near the k-th: many rows
    within the margin must be rescored, and rows of varied norm widen it."""
    calls = spy_on_filtered_scans(monkeypatch)
    rng = np.random.default_rng(3)
    rows = np.abs(rng.standard_normal((20000, 64), dtype=np.float32)) + 0.5
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[::7] *= 3.0
    queries = np.abs(rng.standard_normal((64, 64), dtype=np.float32))
    scores, ids = search_inner_product(rows, queries, 150, prefilter.make(rows, kind))
    assert calls
    assert_exact(rows, queries, 150, scores, ids)


@pytest.mark.parametrize("kind", KINDS)
def test_prefilter_with_negative_thresholds(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    calls = spy_on_filtered_scans(monkeypatch)
    rows = -np.abs(make_bank(20000, 64))
    queries = np.abs(make_queries(rows, 64))  # every score is negative, and so every threshold
    scores, ids = search_inner_product(rows, queries, 200, prefilter.make(rows, kind))
    assert calls
    assert_exact(rows, queries, 200, scores, ids)


def test_prefilter_must_be_the_copy_of_the_rows_searched() -> None:
    rows = make_bank(20000, 16)
    with pytest.raises(ValueError, match="copy"):
        search_inner_product(rows, make_queries(rows, 32), 10, Bf16Rows(rows.copy()))


def copy_matches(low: prefilter.Prefilter, rows: np.ndarray) -> bool:
    """Whether the copy holds the low-precision values of ``rows`` (int8: each within half a step)
    and the norms of their errors."""
    if isinstance(low, Int8Rows):
        rounded = (low.rows.numpy().astype(np.float64) - 128) * low.scale
        if not np.abs(rows - rounded).max() <= (0.5 + 1e-4) * low.scale:  # float32 division may round past the midpoint
            return False
    else:
        rounded = low.rows[:, :-1].double().numpy()
        if not torch.equal(low.rows[:, :-1], torch.from_numpy(rows).bfloat16()):
            return False
    errors = np.linalg.norm(rows - rounded, axis=1)
    return bool(np.allclose(low.errors, errors, rtol=1e-5, atol=0))


@pytest.mark.parametrize("kind", KINDS)
def test_bank_keeps_its_copy_in_step_with_updates(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """After updates of both modes and coalesced runs, the copy equals the rounded rows and
    searches that rely on it still match brute force on the updated rows."""
    monkeypatch.setattr(prefilter, "best_kind", lambda: kind)
    calls = spy_on_filtered_scans(monkeypatch)
    bank = MemoryBank(BankConfig("b", 20000, 64, init="unit", seed=4))
    assert bank.store.low is not None and bank.store.low.kind == kind
    rng = np.random.default_rng(5)
    ids = rng.choice(20000, 256, replace=False)
    strong = rng.standard_normal((256, 64), dtype=np.float32)  # far from the old rows
    strong /= np.linalg.norm(strong, axis=1, keepdims=True)
    bank.execute([Update(ids[:128], strong[:128], "overwrite"), Update(ids[128:], strong[128:])])
    queries = bank.export()[ids[:64]] + 0.05 * rng.standard_normal((64, 64), dtype=np.float32)
    results = bank.execute([Search(queries, 200), SearchUpdate(ids[:64], queries, 200), Search(queries, 200)])
    assert copy_matches(bank.store.low, bank.export())
    assert calls
    assert_exact(bank.export(), queries, 200, results[2].knn.scores, results[2].knn.ids)


@pytest.mark.parametrize("kind", [INT8])
def test_int8_copy_rescales_when_rows_outgrow_it(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Rows written larger than the copy's range rebuild it with a larger scale (never clipped
    values): the copy still matches and searches stay exact."""
    calls = spy_on_filtered_scans(monkeypatch)
    rows = make_bank(20000, 32)
    low = Int8Rows(rows)
    scale = low.scale
    rows[:100] *= 5.0
    low.refresh(np.arange(100))
    assert low.scale > 4 * scale and copy_matches(low, rows)
    queries = make_queries(rows, 64)
    scores, ids = search_inner_product(rows, queries, 100, low)
    assert calls
    assert_exact(rows, queries, 100, scores, ids)
    rows[200] = np.inf
    with pytest.raises(ValueError, match="finite"):
        low.refresh(np.array([200]))


@pytest.mark.parametrize("kind", KINDS)
def test_margin_keeps_a_cluster_finer_than_a_step(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """2,000 near-duplicate rows whose scores differ by less than one low-precision step: the k
    best and the threshold both fall inside the cluster, so only the margin keeps every row that
    belongs in the answer (with a zero margin this fails)."""
    calls = spy_on_filtered_scans(monkeypatch)
    rows, queries = fine_cluster(20000)
    scores, ids = search_inner_product(rows, queries, 200, prefilter.make(rows, kind))
    assert calls
    assert_exact(rows, queries, 200, scores, ids)


def fine_cluster(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit rows (n, 64), 2,000 of them near-duplicates, and 64 unit queries near the cluster."""
    rng = np.random.default_rng(7)
    rows = make_bank(n, 64)
    center = rows[0] / np.linalg.norm(rows[0])
    cluster = center + 1e-4 * rng.standard_normal((2000, 64), dtype=np.float32)
    rows[rng.choice(n, 2000, replace=False)] = cluster / np.linalg.norm(cluster, axis=1, keepdims=True)
    queries = center + 0.3 * rng.standard_normal((64, 64), dtype=np.float32)
    return rows, (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("kind", KINDS)
def test_coalesced_batches_are_searched_in_blocks(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """Many queries (coalesced requests) go through the threshold search in cache-sized blocks."""
    monkeypatch.setattr(search, "MAX_BATCH", 64)
    calls = spy_on_filtered_scans(monkeypatch)
    rows = make_bank(20000, 32)
    low = prefilter.make(rows, kind)
    queries = make_queries(rows, 200)
    scores, ids = search_inner_product(rows, queries, 100, low)
    assert len(calls) == 4 * len(search._plan(20000, 32, 50, 100, low).bounds)  # 4 blocks of 50
    assert_exact(rows, queries, 100, scores, ids)


@pytest.mark.parametrize("kind, per_row", [("int8", 100 + 8), ("bf16", 2 * 101 + 8)])
def test_memory_limit_counts_the_copy(monkeypatch: pytest.MonkeyPatch, kind: str, per_row: int) -> None:
    """A bank that fits in float32 alone but not with its low-precision copy is refused up front."""
    config = BankConfig("b", 1000, 100)
    monkeypatch.setattr(prefilter, "best_kind", lambda: None)
    config.validate(400_000)
    monkeypatch.setattr(prefilter, "best_kind", lambda: kind)
    assert config.nbytes() == 400_000 + 1000 * per_row
    with pytest.raises(BankError) as err:
        config.validate(400_000)
    assert err.value.code is ErrorCode.TOO_LARGE and f"{kind} copy" in str(err.value)


def test_environment_picks_or_turns_off_the_prefilter(monkeypatch: pytest.MonkeyPatch) -> None:
    """FGC_BANK_PREFILTER overrides the CPU's choice (int8 only where it sums exactly)."""
    try:
        for value, expected in [("off", None), ("bf16", "bf16"),
                                ("int8", "int8" if prefilter._int8_gemm_is_exact() else None)]:
            monkeypatch.setenv(prefilter.ENV, value)
            prefilter.best_kind.cache_clear()
            assert prefilter.best_kind() == expected
            bank = MemoryBank(BankConfig("b", 100, 8))
            assert (bank.store.low.kind if bank.store.low else None) == expected
    finally:
        monkeypatch.delenv(prefilter.ENV)
        prefilter.best_kind.cache_clear()


# -- the edges of float32 ---------------------------------------------------------------------------

EDGE_SCALES = (1e-20, 1e-30, 1e-40)  # squares denormal, squares 0, the values themselves denormal


def float32_errors(rows: np.ndarray, queries: np.ndarray, relative: float | None = None) -> np.ndarray:
    """(B, N) how far a float32 score may be from the exact one: ``relative`` |q||r| (by default
    a float32 sum of d products in any order), and products and inputs below float32's normal
    range flushed to zero."""
    q = np.linalg.norm(queries.astype(np.float64), axis=1)[:, None]
    r = np.linalg.norm(rows.astype(np.float64), axis=1)[None, :]
    d = rows.shape[1]
    relative = 1.01 * (d + 2) * 2.0**-24 if relative is None else relative
    return relative * q * r + 2.0**-126 * (d + np.sqrt(d) * (q + r))


def assert_exact_at_any_magnitude(rows: np.ndarray, queries: np.ndarray, k: int, scores: np.ndarray,
                                  ids: np.ndarray, exclude: np.ndarray | None = None) -> None:
    """The float64 oracle's top k (``exclude``: each query's own id left out), each score within
    float32's own error of it (relative to the magnitudes, see float32_errors); ids differ only
    where scores are that close."""
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    error = float32_errors(rows, queries)
    b = queries.shape[0]
    if exclude is not None:
        exact[np.arange(b), exclude] = -np.inf
    assert ids.shape == (b, k) and np.all((ids >= 0) & (ids < rows.shape[0]))
    assert all(np.unique(ids[i]).size == k for i in range(b)), "repeated ids"
    got, slack = np.take_along_axis(exact, ids, 1), np.take_along_axis(error, ids, 1)
    assert np.all(np.abs(scores - got) <= slack), "scores are not those of their ids"
    left_out = np.ones_like(exact, dtype=bool)
    left_out[np.arange(b)[:, None], ids] = False
    weakest = (got + slack).min(axis=1, keepdims=True)  # the lowest a returned row can really be
    assert not np.any(left_out & (exact - error > weakest)), "a row that beats the answer was left out"
    best = -np.sort(-np.partition(exact, exact.shape[1] - k, axis=1)[:, -k:], axis=1)  # the oracle's k best
    assert np.all(np.abs(scores - best) <= error.max(axis=1, keepdims=True))


def edge_rows(n: int, d: int, seed: int, negative: bool = False) -> np.ndarray:
    """Unit rows, and among them rows scaled to the edges of float32 (tiny, denormal, zero).
    ``negative``: the unit rows have only negative coordinates, so that for positive queries the
    tiny rows (of either sign) are the best matches."""
    rows = make_bank(n, d, seed)
    if negative:
        rows = -np.abs(rows)
    for step, scale in zip((5, 7, 11), EDGE_SCALES):
        rows[step // 2::step] = make_bank(len(rows[step // 2::step]), d, seed + step) * np.float32(scale)
    rows[6::13] = 0.0
    return rows


def test_int8_scales_never_make_a_step_of_128() -> None:
    """A denormal top / 127 rounds to a float32 scale that can be far below it: top / scale would
    round to a step of 128, which int8 wraps to -128. The scale is raised instead."""
    rng = np.random.default_rng(0)
    tops = np.concatenate([np.arange(1, 20000) * 2.0**-149, np.exp(rng.uniform(-100, 88, 20000)),
                           [float(np.finfo(np.float32).max), 1.0, 127.0, 2.0**-126]]).astype(np.float32)
    scales, wide = prefilter._int8_scales(tops).astype(np.float64), tops.astype(np.float64)
    assert np.all(wide / scales <= 127) and np.all(scales > 0) and np.all(np.isfinite(scales))
    assert np.all(scales <= wide / 127 * (1 + 2.0**-22) + 2.0**-148)  # at most a step and a half up
    assert prefilter._int8_scales(0.0) == 1.0 and prefilter._int8_scales(np.inf) == 1.0


@pytest.mark.parametrize("kind", KINDS)
def test_row_norms_and_errors_do_not_underflow(kind: str) -> None:
    """Each row's norm and rounding error are upper bounds of the exact (float64) ones, however
    small: in float32 the norm of coordinates near 1e-23 is 0."""
    rows = edge_rows(3000, 16, 0)
    rows[1::9] *= np.float32(1e-3)  # coordinates near 1e-23 and 1e-43 too
    low = prefilter.make(rows, kind)
    exact = rows.astype(np.float64)
    rounded = (low.rows.numpy().astype(np.float64) - 128) * low.scale if kind == "int8" \
        else low.rows[:, :-1].double().numpy()
    norms, errors = np.linalg.norm(exact, axis=1), np.linalg.norm(exact - rounded, axis=1)
    assert np.all(low.norms >= norms) and np.all(low.errors >= errors)
    assert np.all(low.norms <= norms * (1 + 2.0**-22) + 2.0**-149)  # and tight: float32's next step up


@pytest.mark.parametrize("kind", KINDS)
def test_prefilter_is_only_used_where_its_bound_holds(kind: str) -> None:
    """Queries or rows whose norms lie outside SAFE_NORMS (tiny, denormal, huge) make the search
    go float32: a bound computed there could not be trusted. Zero queries and tiny rows among
    normal ones are fine."""
    rows = edge_rows(3000, 16, 0)
    low = prefilter.make(rows, kind)
    queries = make_bank(8, 16, seed=1)
    queries[3] = 0.0
    assert low.encode(queries) is not None
    for scale in (*EDGE_SCALES, 1e13, 1e18):
        odd = queries.copy()
        odd[5] *= np.float32(scale)
        assert low.encode(odd) is None, scale
    for inside in (SAFE_NORMS[0] * 1.01, SAFE_NORMS[1] * 0.99):  # unit queries moved to the range's ends
        assert low.encode(queries * np.float32(inside)) is not None
    for scale in (1e-20, 1e18):  # every row outside it
        assert prefilter.make(make_bank(3000, 16) * np.float32(scale), kind).encode(queries) is None
    if kind == "int8":  # a scale that grew for rows since overwritten with small ones
        rows[0] = 1e13
        low.refresh(np.array([0]))
        rows[0] = 0.0
        low.refresh(np.array([0]))
        assert low.bounds()[0] <= 1.01 and low.encode(queries) is None


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("negative", [False, True])
def test_filter_keeps_every_row_above_the_threshold_at_the_edges(kind: str, negative: bool) -> None:
    """Tiny, denormal and zero rows among unit rows, and queries at the ends of SAFE_NORMS: the
    filter still keeps every row whose score beats the threshold (with ``negative``, the tiny rows
    are each query's best)."""
    rows = edge_rows(3000, 16, 0, negative)
    queries = np.abs(make_bank(64, 16, seed=1))
    queries[:20] *= np.float32(SAFE_NORMS[0] * 1.01)
    queries[20:40] *= np.float32(SAFE_NORMS[1] * 0.99)
    queries[40] = 0.0
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    slack = float32_errors(rows, queries, relative=1e-6)
    ranked = -np.sort(-exact, axis=1)
    low = prefilter.make(rows, kind)
    for rank in (0, 10, 100, 1000):
        threshold = ranked[:, rank].astype(np.float32)
        scan = low.prepare(queries, threshold)
        assert scan is not None
        must = exact > threshold[:, None].astype(np.float64) + slack
        assert not (must & ~kept_pairs(scan, 3000, 64)).any(), f"rank {rank}: rows above the threshold were dropped"


@functools.cache
def edge_cases(n: int, d: int = 64) -> dict[str, tuple[np.ndarray, np.ndarray, bool]]:
    """name -> (rows, queries, whether the prefilter may run); shared: not to be written."""
    rows, negative = edge_rows(n, d, 0), edge_rows(n, d, 0, negative=True)
    queries = make_queries(rows, 64)
    huge = rows.copy()
    huge[::3] *= np.float32(1e18)  # norms 1e18: below the bank's limit of 2^63, scores up to 1e36
    cluster, near = fine_cluster(n)  # scores finer than a low-precision step
    cases = {"tiny rows among unit rows": (rows, queries, True),
             "tiny rows are the best matches": (negative, np.abs(queries), True),
             "huge rows and queries": (huge, queries * np.float32(1e18), False),
             "a fine cluster at 1e-30": (cluster * np.float32(1e-30), near, False),
             "a fine cluster, queries at 1e-30": (cluster, near * np.float32(1e-30), False)}
    for scale in EDGE_SCALES:
        cases[f"queries at {scale:g}"] = (rows, queries * np.float32(scale), False)
        cases[f"rows at {scale:g}"] = (make_bank(n, d) * np.float32(scale), queries, False)
    return cases


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", list(edge_cases(2000)))
def test_search_is_exact_at_the_edges_of_float32(monkeypatch: pytest.MonkeyPatch, kind: str, case: str) -> None:
    """Tiny, denormal, zero and huge rows and queries, searched with each prefilter: the float64
    oracle's answer, with the prefilter where its bound holds and plain float32 elsewhere."""
    calls = spy_on_filtered_scans(monkeypatch)
    rows, queries, filtered = edge_cases(20000)[case]
    scores, ids = search_inner_product(rows, queries, 100, prefilter.make(rows, kind))
    assert bool(calls) == filtered
    assert_exact_at_any_magnitude(rows, queries, 100, scores, ids)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("case", ["tiny rows among unit rows", "tiny rows are the best matches", "huge rows and queries",
                                  "a fine cluster at 1e-30", "queries at 1e-40"])
def test_bank_is_exact_at_the_edges_of_float32(monkeypatch: pytest.MonkeyPatch, kind: str, case: str) -> None:
    """The same rows entering a bank through ``MemoryBank(config, rows)`` (a snapshot's restore)
    and through ``update(mode="overwrite")``: knn and knn_update answer as the oracle does."""
    monkeypatch.setattr(prefilter, "best_kind", lambda: kind)
    rows, queries, _ = edge_cases(10000)[case]
    config = BankConfig("b", 10000, 64, init="unit", seed=3)
    restored = MemoryBank(config, torch.from_numpy(rows.copy()))
    written = MemoryBank(config)
    ids = np.arange(10000)
    written.execute([Update(ids[i:i + 2500], rows[i:i + 2500], "overwrite") for i in range(0, 10000, 2500)])
    own = np.random.default_rng(2).choice(10000, 64, replace=False)
    for bank in (restored, written):
        assert np.array_equal(bank.export(), rows)
        found = bank.execute([Search(queries, 100), SearchUpdate(own, queries, 100)])
        assert_exact_at_any_magnitude(rows, queries, 100, found[0].knn.scores, found[0].knn.ids)
        mine = found[1].knn
        assert_exact_at_any_magnitude(rows, queries, 100, mine.scores, mine.ids, exclude=own)
