"""The bfloat16 prefilter: its error bound holds, its thresholds round the right way, and a search
that uses it returns the float32 brute-force answer (oracle: float64 numpy) on any CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fgc_bank import search
from fgc_bank.bank import BankConfig, MemoryBank, Search, SearchUpdate, Update
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.prefilter import Bf16Rows, biased_queries, round_down_bf16
from fgc_bank.search import search_inner_product
from tests.test_search import assert_exact, make_bank, make_queries


def spy_on_bf16_scans(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count the chunks scanned in bfloat16, so a test knows the prefilter really ran."""
    calls: list[int] = []
    scan = search._scan_bf16

    def counted(*args: object) -> tuple[np.ndarray, np.ndarray]:
        calls.append(1)
        return scan(*args)

    monkeypatch.setattr(search, "_scan_bf16", counted)
    return calls


def rounded_down_by_bf16(n: int, d: int, seed: int) -> np.ndarray:
    """Positive values just under a bfloat16 rounding midpoint, near 1/8: bf16() lowers each by
    almost half a step (relative 2^-8), so every bf16 score is low by almost 2u of the exact one,
    and the vectors are nearly parallel (Cauchy-Schwarz is tight): the margin's worst case."""
    rng = np.random.default_rng(seed)
    below_midpoint = rng.integers(0, 6, (n, d)) + 0.49 - 0.04 * rng.random((n, d))
    return ((1.0 + below_midpoint / 128.0) / 8.0).astype(np.float32)


def mixed_norms(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, d)).astype(np.float32) * np.exp(rng.uniform(-4, 4, (n, 1))).astype(np.float32)


@pytest.mark.parametrize("data", ["unit rows", "mixed norms", "worst-case rounding", "negative scores"])
@pytest.mark.parametrize("d", [1, 7, 64, 512])
def test_biased_sums_keep_every_row_above_the_threshold(data: str, d: int) -> None:
    """``rows16 @ biased.T >= 0`` (the bfloat16 GEMM the scan runs, its output's sign bit) for
    every row whose score beats the query's threshold, with thresholds set at many ranks."""
    if data == "unit rows":
        rows, queries = make_bank(3000, d, seed=d), make_bank(64, d, seed=d + 1)
    elif data == "mixed norms":
        rows, queries = mixed_norms(3000, d, d), mixed_norms(64, d, d + 1)
    elif data == "worst-case rounding":
        rows, queries = rounded_down_by_bf16(3000, d, d), rounded_down_by_bf16(64, d, d + 1)
    else:
        rows, queries = -np.abs(make_bank(3000, d, seed=d)), np.abs(make_bank(64, d, seed=d + 1))
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    slack = 1e-6 * np.linalg.norm(queries, axis=1)[:, None] * np.linalg.norm(rows, axis=1)[None, :]
    low = Bf16Rows(rows)
    ranked = -np.sort(-exact, axis=1)
    for rank in (0, 10, 100, 1000, 2999):
        threshold = ranked[:, rank].astype(np.float32)
        biased = biased_queries(queries, threshold, low)
        sums = torch.mm(low.rows, biased.T).T  # (B, N) bfloat16
        kept = sums.view(torch.int16).numpy() >= 0
        must = exact > threshold[:, None].astype(np.float64) + slack
        assert not (must & ~kept).any(), f"rank {rank}: rows above the threshold were dropped"
        if rank == 100 and d > 1 and data != "worst-case rounding":  # and the filter does filter
            assert kept.sum() < 3 * (must.sum() + 64)


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


def test_biased_queries_refuse_sums_that_could_overflow() -> None:
    rows = make_bank(100, 8) * np.float32(1e20)
    assert biased_queries(make_bank(4, 8) * np.float32(1e20), np.zeros(4, np.float32), Bf16Rows(rows)) is None


@pytest.mark.parametrize("n, d, b, k", [(20000, 64, 256, 200), (30011, 32, 64, 100), (20000, 512, 16, 200)])
def test_search_with_the_prefilter_matches_brute_force(monkeypatch: pytest.MonkeyPatch,
                                                       n: int, d: int, b: int, k: int) -> None:
    calls = spy_on_bf16_scans(monkeypatch)
    rows = make_bank(n, d)
    queries = make_queries(rows, b)
    scores, ids = search_inner_product(rows, queries, k, Bf16Rows(rows))
    assert calls, "the bfloat16 scan did not run"
    assert_exact(rows, queries, k, scores, ids)


def test_prefilter_with_crowded_scores_and_mixed_norms(monkeypatch: pytest.MonkeyPatch) -> None:
    """Non-negative features (post-ReLU, like FGC's) crowd the scores near the k-th: many rows
    within the bfloat16 margin must be rescored, and rows of varied norm widen it."""
    calls = spy_on_bf16_scans(monkeypatch)
    rng = np.random.default_rng(3)
    rows = np.abs(rng.standard_normal((20000, 64), dtype=np.float32)) + 0.5
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows[::7] *= 3.0
    queries = np.abs(rng.standard_normal((64, 64), dtype=np.float32))
    scores, ids = search_inner_product(rows, queries, 150, Bf16Rows(rows))
    assert calls
    assert_exact(rows, queries, 150, scores, ids)


def test_prefilter_with_negative_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = spy_on_bf16_scans(monkeypatch)
    rows = -np.abs(make_bank(20000, 64))
    queries = np.abs(make_queries(rows, 64))  # every score is negative, and so every threshold
    scores, ids = search_inner_product(rows, queries, 200, Bf16Rows(rows))
    assert calls
    assert_exact(rows, queries, 200, scores, ids)


def test_prefilter_must_be_the_copy_of_the_rows_searched() -> None:
    rows = make_bank(20000, 16)
    with pytest.raises(ValueError, match="copy"):
        search_inner_product(rows, make_queries(rows, 32), 10, Bf16Rows(rows.copy()))


def test_bank_keeps_its_bf16_copy_in_step_with_updates(monkeypatch: pytest.MonkeyPatch) -> None:
    """After updates of both modes and coalesced runs, the copy equals bf16(rows) and searches
    that rely on it still match brute force on the updated rows."""
    monkeypatch.setattr("fgc_bank.bank.bf16_is_fast", lambda: True)
    calls = spy_on_bf16_scans(monkeypatch)
    bank = MemoryBank(BankConfig("b", 20000, 64, init="unit", seed=4))
    assert bank.low is not None
    rng = np.random.default_rng(5)
    ids = rng.choice(20000, 256, replace=False)
    strong = rng.standard_normal((256, 64), dtype=np.float32)  # far from the old rows
    strong /= np.linalg.norm(strong, axis=1, keepdims=True)
    bank.execute([Update(ids[:128], strong[:128], "overwrite"), Update(ids[128:], strong[128:])])
    queries = bank.rows_np[ids[:64]] + 0.05 * rng.standard_normal((64, 64), dtype=np.float32)
    results = bank.execute([Search(queries, 200), SearchUpdate(ids[:64], queries, 200), Search(queries, 200)])
    assert torch.equal(bank.low.rows[:, :-1], torch.from_numpy(bank.rows_np).bfloat16())
    assert calls
    assert_exact(bank.rows_np, queries, 200, results[2].knn.scores, results[2].knn.ids)




@pytest.mark.parametrize("data", ["random", "worst-case rounding"])
def test_scan_keeps_every_row_above_a_threshold_set_between_two_scores(data: str) -> None:
    """Thresholds between each query's k-th and (k+1)-th exact scores: the bfloat16 scan must
    keep exactly the k rows above. Rows just above a threshold are where bfloat16 error bites:
    on the worst-case data a third of the margin loses some (bfloat16 steps hide smaller cuts)."""
    if data == "random":
        rows = make_bank(20000, 64)
        queries = make_queries(rows, 256)
    else:  # scores crowd within 0.01 of each other, all low by almost the whole margin in bf16
        rows, queries = rounded_down_by_bf16(4000, 64, 0), rounded_down_by_bf16(256, 64, 1)
    n = rows.shape[0]
    exact = queries.astype(np.float64) @ rows.astype(np.float64).T
    ranked = -np.sort(-exact, axis=1)
    low = Bf16Rows(rows)
    plan = search._Plan(((0, n),), 4096, 16, 1, True)
    checked = 0
    for k in (50, 200, 400):
        threshold = ((ranked[:, k - 1] + ranked[:, k]) / 2).astype(np.float32)
        clear = np.abs(exact - threshold[:, None]).min(axis=1) > 2e-6  # float32 rescoring agrees
        biased = biased_queries(queries, threshold, low)
        counts, keys = search._scan_bf16(rows, low.rows, queries, biased, threshold, 0, n, plan)
        _, ids = search._decode(keys)
        starts = np.cumsum(counts) - counts
        for i in np.flatnonzero(clear):
            expected = np.flatnonzero(exact[i] > threshold[i])
            assert np.array_equal(np.sort(ids[starts[i]:starts[i] + counts[i]]), expected), f"query {i}, k {k}"
            checked += 1
    assert checked > 300


def test_margin_keeps_a_cluster_finer_than_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """2,000 near-duplicate rows whose scores differ by less than one bfloat16 step: the k best
    and the threshold both fall inside the cluster, so only the margin keeps every row that
    belongs in the answer (with a zero margin this fails)."""
    calls = spy_on_bf16_scans(monkeypatch)
    rng = np.random.default_rng(7)
    rows = make_bank(20000, 64)
    center = rows[0] / np.linalg.norm(rows[0])
    cluster = center + 1e-4 * rng.standard_normal((2000, 64), dtype=np.float32)
    rows[rng.choice(20000, 2000, replace=False)] = cluster / np.linalg.norm(cluster, axis=1, keepdims=True)
    queries = center + 0.3 * rng.standard_normal((64, 64), dtype=np.float32)
    queries = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    scores, ids = search_inner_product(rows, queries, 200, Bf16Rows(rows))
    assert calls
    assert_exact(rows, queries, 200, scores, ids)


def test_coalesced_batches_are_searched_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Many queries (coalesced requests) go through the threshold search in cache-sized blocks."""
    monkeypatch.setattr(search, "THRESHOLD_MAX_BATCH", 64)
    calls = spy_on_bf16_scans(monkeypatch)
    rows = make_bank(20000, 32)
    queries = make_queries(rows, 200)
    scores, ids = search_inner_product(rows, queries, 100, Bf16Rows(rows))
    assert len(calls) == 4 * len(search._plan(20000, 32, 64, 100, True).bounds)  # blocks of 64, 64, 64, 8
    assert_exact(rows, queries, 100, scores, ids)


def test_memory_limit_counts_the_bf16_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bank that fits in float32 alone but not with its bfloat16 copy is refused up front."""
    config = BankConfig("b", 1000, 100)
    monkeypatch.setattr("fgc_bank.bank.bf16_is_fast", lambda: False)
    config.validate(400_000)
    monkeypatch.setattr("fgc_bank.bank.bf16_is_fast", lambda: True)
    assert config.nbytes() == 400_000 + 1000 * 101 * 2
    with pytest.raises(BankError) as err:
        config.validate(400_000)
    assert err.value.code is ErrorCode.TOO_LARGE and "bfloat16" in str(err.value)
