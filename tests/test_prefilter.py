"""The prefilters (int8 and bfloat16 copies of the rows): their error bounds hold, their thresholds
round the right way, and a search that uses them returns the float32 brute-force answer (oracle:
float64 numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgc_bank import prefilter, search
from fgc_bank.bank import BankConfig, MemoryBank, Search, SearchUpdate, Update
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.prefilter import Bf16Rows, Int8Rows, round_down_bf16
from fgc_bank.search import search_inner_product
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
    assert bank.low is not None and bank.low.kind == kind
    rng = np.random.default_rng(5)
    ids = rng.choice(20000, 256, replace=False)
    strong = rng.standard_normal((256, 64), dtype=np.float32)  # far from the old rows
    strong /= np.linalg.norm(strong, axis=1, keepdims=True)
    bank.execute([Update(ids[:128], strong[:128], "overwrite"), Update(ids[128:], strong[128:])])
    queries = bank.rows_np[ids[:64]] + 0.05 * rng.standard_normal((64, 64), dtype=np.float32)
    results = bank.execute([Search(queries, 200), SearchUpdate(ids[:64], queries, 200), Search(queries, 200)])
    assert copy_matches(bank.low, bank.rows_np)
    assert calls
    assert_exact(bank.rows_np, queries, 200, results[2].knn.scores, results[2].knn.ids)


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
    rng = np.random.default_rng(7)
    rows = make_bank(20000, 64)
    center = rows[0] / np.linalg.norm(rows[0])
    cluster = center + 1e-4 * rng.standard_normal((2000, 64), dtype=np.float32)
    rows[rng.choice(20000, 2000, replace=False)] = cluster / np.linalg.norm(cluster, axis=1, keepdims=True)
    queries = center + 0.3 * rng.standard_normal((64, 64), dtype=np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    scores, ids = search_inner_product(rows, queries, 200, prefilter.make(rows, kind))
    assert calls
    assert_exact(rows, queries, 200, scores, ids)


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
            assert (bank.low.kind if bank.low else None) == expected
    finally:
        monkeypatch.delenv(prefilter.ENV)
        prefilter.best_kind.cache_clear()
