"""The torch store on CPU against the float64 oracle: exact top-k through chunks, merges and query
blocks, writes that keep the bfloat16 copy in step, magnitudes at float32's edges (the float32
search takes over), ties, a check that fails, the bound itself, and the memory it claims."""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn

from fgc_bank.stores import torch_store
from fgc_bank.stores.torch_store import TorchStore, ieee_float32

SMALL_BUDGET = 256 << 10  # bytes of scores: several chunks for the banks below


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def knn(store: TorchStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = store.search(torch.from_numpy(queries), k)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64 and scores.shape == (len(queries), k)
    return scores.numpy(), ids.numpy()


def chunks(store: TorchStore, b: int) -> int:
    """Chunks of rows one block of b queries is scored in (bfloat16 output on CPU: 2 bytes)."""
    return math.ceil(store.rows.shape[0] / store._chunk_rows(min(b, store._query_block(2)), 2))


def float32_error(queries: np.ndarray, rows: np.ndarray) -> float:
    """How far any float32 dot product of these may be from the exact one: relative rounding
    and, for subnormal products and sums, an absolute 2^-149 per operation."""
    d = rows.shape[1]
    largest = np.linalg.norm(queries.astype(np.float64), axis=1).max() * np.linalg.norm(rows.astype(np.float64), axis=1).max()
    return 2 * d * 2.0**-24 * largest + 4 * d * 2.0**-149


def assert_knn_within(scores: np.ndarray, ids: np.ndarray, ref_scores: np.ndarray, ref_ids: np.ndarray,
                      atol: float) -> None:
    """assert_same_knn with an absolute tolerance of its own, where float32 itself is only that
    close (subnormal products): scores within it, ids equal except among scores within twice it."""
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-4, atol=atol)
    ties = np.abs(ref_scores[:, :-1] - ref_scores[:, 1:]) <= 2 * atol + 1e-5 * np.abs(ref_scores[:, 1:])
    tied = np.zeros_like(ids, dtype=bool)
    tied[:, :-1] |= ties
    tied[:, 1:] |= ties
    assert (ids[~tied] == ref_ids[~tied]).all()


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(2024)


@pytest.fixture
def float_output(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU's kernel on a CPU: bfloat16 values, products exact and summed in float32, float32
    output (what ``torch.mm(..., out_dtype=torch.float32)`` computes on CUDA)."""
    def emulated(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        return torch.mm(queries.float(), rows.float().T)

    monkeypatch.setattr(torch_store, "_choose_kernel", lambda device, output: (emulated, 0.0))


# --- exactness ---------------------------------------------------------------------------------

@pytest.mark.parametrize("n,d,k,b,budget", [
    (5000, 64, 200, 32, SMALL_BUDGET),  # 2 chunks
    (20000, 128, 20, 16, SMALL_BUDGET),  # 3 chunks
    (5000, 64, 200, 1, torch_store.SCORE_BUDGET),  # one query
    (5000, 16, 20, 1, 4096),  # one query, 3 chunks
    (5000, 64, 200, 32, torch_store.SCORE_BUDGET),  # one chunk
    (300, 16, 300, 8, torch_store.SCORE_BUDGET),  # k = N: every row, float32 search
    (300, 16, 299, 8, torch_store.SCORE_BUDGET),  # candidates: all rows but one
])
def test_exact_against_the_oracle(n: int, d: int, k: int, b: int, budget: int, rng: np.random.Generator) -> None:
    rows, queries = unit(rng, n, d), unit(rng, b, d)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=budget, extra=None if k < n - 1 else 0)
    filtered = store._filter_pays(store.candidate_count(k))
    assert filtered == (k < n)
    if budget < torch_store.SCORE_BUDGET:
        assert chunks(store, b) > 1
    assert_same_knn(*knn(store, queries, k), *brute_force_knn(rows, queries, k))
    if filtered and k < 250:
        assert store.last_fallbacks <= b // 4, "the default candidates should usually prove the answer"


def test_exact_with_the_gpus_float_output_kernel(float_output: None, rng: np.random.Generator) -> None:
    rows, queries = unit(rng, 20000, 64), unit(rng, 64, 64)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    assert store._output_rounding == 0.0 and store._kernel_ok
    assert_same_knn(*knn(store, queries, 100), *brute_force_knn(rows, queries, 100))
    assert store.last_fallbacks <= 8


def test_queries_in_blocks(rng: np.random.Generator) -> None:
    """More queries than one block holds within the budget: blocks, one check for all of them."""
    rows, queries = unit(rng, 3000, 32), unit(rng, 300, 32)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=128 << 10)
    assert store._query_block(2) < 300 and store._query_block(4) < 300
    assert_same_knn(*knn(store, queries, 50), *brute_force_knn(rows, queries, 50))


def test_float32_search_alone_is_exact(rng: np.random.Generator) -> None:
    rows, queries = unit(rng, 5000, 64), unit(rng, 40, 64)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    with ieee_float32():
        scores, ids = store._search_float32(torch.from_numpy(queries), 200)
    assert_same_knn(scores.numpy(), ids.numpy(), *brute_force_knn(rows, queries, 200))


# --- writes ------------------------------------------------------------------------------------

def assert_copy_in_step(store: TorchStore) -> None:
    assert torch.equal(store.low, store.rows.to(torch.bfloat16))
    assert torch.equal(store.norms, torch_store.norm_bounds(store.rows))
    assert torch.equal(store.errors, torch_store.norm_bounds(store.rows.double() - store.low.double()))


def test_writes_keep_the_bfloat16_copy_in_step(rng: np.random.Generator) -> None:
    n, d = 6000, 64
    bank = unit(rng, n, d)
    store = TorchStore(torch.from_numpy(bank), "cpu", budget=SMALL_BUDGET)
    queries = unit(rng, 32, d)
    for step in range(3):  # momentum-like: m * row + (1 - m) * value, normalised
        ids = rng.choice(n, 700, replace=False)
        mixed = 0.5 * bank[ids].astype(np.float64) + 0.5 * unit(rng, 700, d)
        bank[ids] = (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)
        store.write(torch.from_numpy(ids), torch.from_numpy(bank[ids]))
        assert_copy_in_step(store)
        assert_same_knn(*knn(store, queries, 100), *brute_force_knn(bank, queries, 100))
    ids = rng.choice(n, 500, replace=False)  # overwrite: rows of any norm
    bank[ids] = rng.standard_normal((500, d)).astype(np.float32) * 3
    store.write(torch.from_numpy(ids), torch.from_numpy(bank[ids]))
    assert_copy_in_step(store)
    assert np.array_equal(store.export(), bank)
    assert_same_knn(*knn(store, queries, 100), *brute_force_knn(bank, queries, 100))


def test_bank_bounds_follow_writes_down_as_well_as_up(rng: np.random.Generator) -> None:
    """A huge row sends every query to the float32 search; overwritten, the bfloat16 pass is back."""
    n, d = 4000, 32
    bank = unit(rng, n, d)
    store = TorchStore(torch.from_numpy(bank), "cpu")
    queries = unit(rng, 16, d)
    ids = np.array([5, 77, 3000])
    bank[ids] = unit(rng, 3, d) * np.float32(1e20)
    store.write(torch.from_numpy(ids), torch.from_numpy(bank[ids]))
    assert_same_knn(*knn(store, queries, 100), *brute_force_knn(bank, queries, 100))
    assert store.last_fallbacks == 16
    bank[ids] = unit(rng, 3, d)
    store.write(torch.from_numpy(ids), torch.from_numpy(bank[ids]))
    assert_same_knn(*knn(store, queries, 100), *brute_force_knn(bank, queries, 100))
    assert store.last_fallbacks == 0


# --- magnitudes at float32's edges -------------------------------------------------------------

def test_tiny_and_subnormal_rows_in_a_unit_bank(rng: np.random.Generator) -> None:
    """Rows of 1e-20, 1e-30 and 1e-40 (subnormal) coordinates, and zeros, among unit rows: the
    bound (norms in float64, flush terms) holds, with or without the float32 search."""
    d = 32
    parts = [unit(rng, 1000, d)] + [unit(rng, 500, d) * np.float32(s) for s in (1e-20, 1e-30, 1e-40)]
    rows = np.concatenate(parts + [np.zeros((500, d), np.float32)])
    rng.shuffle(rows)
    assert (np.abs(rows[np.abs(rows).max(axis=1) < 1e-35]) < np.finfo(np.float32).tiny).all()
    queries = unit(rng, 16, d)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    for k in (200, 600):  # 600: the top-k reaches into the rows scoring about 0
        assert store._filter_pays(store.candidate_count(k))
        assert_same_knn(*knn(store, queries, k), *brute_force_knn(rows, queries, k))


def test_huge_rows_send_every_query_to_the_float32_search(rng: np.random.Generator) -> None:
    """One bank with unit rows, rows of 1e-20, 1e-30, 1e-40 and 1e20: R > 2^60."""
    d = 32
    parts = [unit(rng, 1500, d)] + [unit(rng, 300, d) * np.float32(s) for s in (1e-20, 1e-30, 1e-40)]
    rows = np.concatenate(parts + [unit(rng, 20, d) * np.float32(1e20)])
    rng.shuffle(rows)
    queries = unit(rng, 24, d)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    for k in (10, 300):
        assert_same_knn(*knn(store, queries, k), *brute_force_knn(rows, queries, k))
        assert store.last_fallbacks == 24


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e-40])
def test_tiny_and_subnormal_queries_take_the_float32_search(scale: float, rng: np.random.Generator) -> None:
    """Queries scaled below 2^-60 in one batch with unit ones: only they leave the bfloat16 pass,
    and their answers are the scaled problem's (checked at that scale: float32's own error)."""
    rows, d = unit(rng, 5000, 32), 32
    queries = unit(rng, 20, d)
    queries[::2] *= np.float32(scale)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    scores, ids = knn(store, queries, 100)
    assert store.last_fallbacks >= 10
    unit_ref = brute_force_knn(rows, queries[1::2], 100)
    assert_same_knn(scores[1::2], ids[1::2], *unit_ref)
    tiny = queries[::2].astype(np.float64) / scale  # the float32 values the store saw, scaled up
    ref_scores, ref_ids = brute_force_knn(rows, tiny, 100)
    atol = float32_error(queries[::2], rows) / scale
    assert_knn_within(scores[::2] / scale, ids[::2], ref_scores, ref_ids, atol)


@pytest.mark.parametrize("scale", [1e-20, 1e-30, 1e-40, 1e20])
def test_a_bank_outside_the_range_takes_the_float32_search(scale: float, rng: np.random.Generator) -> None:
    d = 32
    rows = unit(rng, 4000, d) * np.float32(scale)
    queries = unit(rng, 12, d)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    scores, ids = knn(store, queries, 50)
    assert store.last_fallbacks == 12
    ref_scores, ref_ids = brute_force_knn(rows.astype(np.float64) / scale, queries, 50)
    assert_knn_within(scores / scale, ids, ref_scores, ref_ids, float32_error(queries, rows) / scale)


def test_non_finite_queries_do_not_break_the_others(rng: np.random.Generator) -> None:
    rows, queries = unit(rng, 3000, 16), unit(rng, 6, 16)
    queries[2, 3] = np.inf
    queries[4, 0] = np.nan
    store = TorchStore(torch.from_numpy(rows), "cpu")
    scores, ids = knn(store, queries, 30)
    assert store.last_fallbacks >= 2
    good = [0, 1, 3, 5]
    assert_same_knn(scores[good], ids[good], *brute_force_knn(rows, queries[good], 30))


# --- ties --------------------------------------------------------------------------------------

def test_ties_and_duplicate_rows(rng: np.random.Generator) -> None:
    """Small integers (every score exact, many equal) and each row four times: ids may differ
    only among equal scores."""
    base = rng.integers(-2, 3, (1000, 16)).astype(np.float32)
    rows = np.repeat(base, 4, axis=0)
    rng.shuffle(rows)
    queries = np.concatenate([rng.integers(-2, 3, (12, 16)), base[:4]]).astype(np.float32)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    for k in (1, 7, 100, 1000):
        scores, ids = knn(store, queries, k)
        ref_scores, ref_ids = brute_force_knn(rows, queries, k + 1)  # the k-th may tie with the next
        assert_same_knn(np.hstack([scores, ref_scores[:, k:]]), np.hstack([ids, ref_ids[:, k:]]),
                        ref_scores, ref_ids)
        assert all(len(set(row)) == k for row in ids)


# --- the check ---------------------------------------------------------------------------------

def test_a_failed_check_falls_back_to_the_exact_answer(rng: np.random.Generator) -> None:
    """No extra candidates: the (k+1)-th bfloat16 score sits right under the k-th float32 one,
    the check fails, and the float32 search answers."""
    rows, queries = unit(rng, 5000, 64), unit(rng, 32, 64)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET, extra=0)
    assert_same_knn(*knn(store, queries, 200), *brute_force_knn(rows, queries, 200))
    assert store.last_fallbacks > 16


def test_an_infinite_margin_fails_every_check(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    monkeypatch.setattr(torch_store, "ACCUMULATION", math.inf)
    rows, queries = unit(rng, 5000, 64), unit(rng, 32, 64)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET)
    assert_same_knn(*knn(store, queries, 200), *brute_force_knn(rows, queries, 200))
    assert store.last_fallbacks == 32


@pytest.mark.parametrize("extra", [0, 2, 8])
def test_the_check_passes_only_exact_answers(extra: int, rng: np.random.Generator) -> None:
    """Few extra candidates (so that many filtered answers are wrong): every answer the check
    passes is the oracle's, and the search returns the oracle's for all."""
    rows, queries = unit(rng, 5000, 32), unit(rng, 128, 32)
    store = TorchStore(torch.from_numpy(rows), "cpu", budget=SMALL_BUDGET, extra=extra)
    q = torch.from_numpy(queries)
    with ieee_float32():
        scores, ids, ok = store._search_filtered(q, 50, store.candidate_count(50))
    ref = brute_force_knn(rows, queries, 50)
    passed = ok.numpy()
    assert 0 < passed.sum() or extra == 0
    assert (~passed).sum() > 0
    assert_same_knn(scores.numpy()[passed], ids.numpy()[passed], ref[0][passed], ref[1][passed])
    assert_same_knn(*knn(store, queries, 50), *ref)
    assert store.last_fallbacks == (~passed).sum()


@pytest.mark.parametrize("output_rounding", [torch_store.OUTPUT_ROUNDING, 0.0])
def test_the_check_threshold(output_rounding: float, rng: np.random.Generator) -> None:
    """k-th score >= cut + the output's rounding + margin, rounded up; no cut: always."""
    store = TorchStore(torch.from_numpy(unit(rng, 10, 4)), "cpu")
    store._output_rounding = output_rounding
    cut = torch.tensor([1.0, 1.0, -2.0, -2.0, -math.inf, 1.0], dtype=torch.float64)
    margin = torch.full((6,), 0.01, dtype=torch.float64)
    slack = np.array([1.0, 1.0, 2.0, 2.0, 0.0, 1.0]) * output_rounding + 0.01
    threshold = cut.numpy() + slack
    kth = torch.tensor(threshold + np.array([1e-6, -1e-6, 1e-6, -1e-6, 0.0, np.nan]), dtype=torch.float32)
    kth[4] = -1e30
    assert store._proven(kth, cut, margin).tolist() == [True, False, True, False, True, False]


def rounded_down_by_bf16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Positive values just under a bfloat16 midpoint near 1/8: each loses almost half a step,
    every pair is nearly parallel, and the bfloat16 scores are low by almost the whole bound."""
    below_midpoint = rng.integers(0, 6, (n, d)) + 0.49 - 0.04 * rng.random((n, d))
    return ((1.0 + below_midpoint / 128.0) / 8.0).astype(np.float32)


@pytest.mark.parametrize("data", ["unit", "mixed norms", "tiny rows", "worst-case rounding"])
@pytest.mark.parametrize("kernel", ["bf16 output", "float output"])
def test_the_margin_bounds_every_row(data: str, kernel: str, rng: np.random.Generator,
                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """For every row: float32 score <= GEMM output (its rounding undone) + margin, and the GEMM
    output is no further below; the margin stays small beside unit scores."""
    if kernel == "float output":
        monkeypatch.setattr(torch_store, "_choose_kernel",
                            lambda device, output: (lambda q, r: torch.mm(q.float(), r.float().T), 0.0))
    d = 64
    if data == "unit":
        rows, queries = unit(rng, 4000, d), unit(rng, 32, d)
    elif data == "mixed norms":
        scales = np.exp(rng.uniform(-8, 8, (4000, 1))).astype(np.float32)
        rows, queries = unit(rng, 4000, d) * scales, unit(rng, 32, d) * np.float32(3)
    elif data == "tiny rows":
        rows = unit(rng, 4000, d) * np.float32(1e-30)
        rows[::3] = unit(rng, len(rows[::3]), d)
        rows[1::3] *= np.float32(1e-10)  # subnormal
        queries = unit(rng, 32, d)
    else:
        rows, queries = rounded_down_by_bf16(rng, 4000, d), rounded_down_by_bf16(rng, 32, d)
    store = TorchStore(torch.from_numpy(rows), "cpu")
    q = torch.from_numpy(queries)
    with ieee_float32():
        filt = store._filter(q, *store._bank_bounds())
        out = store._kernel(filt.low, store.low).double()  # (B, N)
        exact32 = torch.mm(q, store.rows.T).double()  # (B, N)
    assert filt.safe.all()
    undone = out + store._output_rounding * out.abs() + torch_store.FLUSH
    margin = filt.margin[:, None]
    assert (exact32 <= undone + margin).all()
    assert (exact32 >= out - store._output_rounding * out.abs() - torch_store.FLUSH - margin).all()
    if data == "unit":
        assert float(filt.margin.max()) < 0.02
    if data == "worst-case rounding" and kernel == "float output":  # the bound is nearly reached
        assert float(((exact32 - out) / margin).max()) > 0.9


# --- the GEMM probe and the matmul settings ----------------------------------------------------

def bf16_accumulating(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """A GEMM whose running sums are bfloat16: what the probe must refuse."""
    acc = torch.zeros(queries.shape[0], rows.shape[0], dtype=torch.bfloat16)
    for i in range(queries.shape[1]):
        acc = acc + queries[:, i:i + 1] * rows[:, i][None, :]
    return acc


def test_the_probe_refuses_a_bfloat16_accumulator(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    cpu = torch.device("cpu")
    assert torch_store._kernel_is_sound(torch_store._mm_bf16_out, torch_store.OUTPUT_ROUNDING, cpu, 64)
    assert not torch_store._kernel_is_sound(bf16_accumulating, torch_store.OUTPUT_ROUNDING, cpu, 64)
    monkeypatch.setattr(torch_store, "_choose_kernel", lambda device, output: (bf16_accumulating, torch_store.OUTPUT_ROUNDING))
    rows, queries = unit(rng, 2000, 64), unit(rng, 8, 64)
    store = TorchStore(torch.from_numpy(rows), "cpu")
    assert not store._kernel_ok and not store._filter_pays(store.candidate_count(10))
    assert_same_knn(*knn(store, queries, 10), *brute_force_knn(rows, queries, 10))


@pytest.fixture
def precision_restored() -> Iterator[None]:
    saved = torch_store._read_precision()
    yield
    torch_store._write_precision(saved)


def test_settings_strict_during_a_search_and_restored_after(precision_restored: None, monkeypatch: pytest.MonkeyPatch,
                                                            rng: np.random.Generator) -> None:
    """A process that asked for TF32 on CUDA, bfloat16 float32 matmuls in oneDNN and bfloat16
    reductions: IEEE float32 inside the search (and an exact answer), its settings back after."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    torch.backends.mkldnn.matmul.fp32_precision = "bf16"
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = True
    before = torch_store._read_precision()
    inside = []
    rescore = TorchStore._rescore

    def spying(self: TorchStore, *args: torch.Tensor) -> torch.Tensor:
        inside.append(torch_store._read_precision())
        return rescore(self, *args)

    monkeypatch.setattr(TorchStore, "_rescore", spying)
    rows, queries = unit(rng, 3000, 64), unit(rng, 16, 64)
    store = TorchStore(torch.from_numpy(rows), "cpu")
    with ieee_float32():  # nested: the inner exit must not restore yet
        assert_same_knn(*knn(store, queries, 40), *brute_force_knn(rows, queries, 40))
        assert torch_store._read_precision() == torch_store._strict(before)
    assert inside == [torch_store._strict(before)]
    assert inside[0]["cuda"] == inside[0]["mkldnn"] == "ieee" and not inside[0]["bf16"]
    assert torch_store._read_precision() == before
    assert_same_knn(*knn(store, queries, 40), *brute_force_knn(rows, queries, 40))
    assert torch_store._read_precision() == before


# --- the rest of the interface -----------------------------------------------------------------

def test_nbytes_is_what_the_store_allocates(rng: np.random.Generator) -> None:
    for n, d in ((1000, 64), (777, 3), (1, 512)):
        store = TorchStore(torch.from_numpy(unit(rng, n, d)), "cpu")
        tensors = [v for v in vars(store).values() if isinstance(v, torch.Tensor)]
        assert sum(t.untyped_storage().nbytes() for t in tensors) == TorchStore.nbytes(n, d)


def test_score_read_write_export(rng: np.random.Generator) -> None:
    rows = unit(rng, 2000, 16)
    source = torch.from_numpy(rows.copy())
    store = TorchStore(source, "cpu", budget=4096)
    assert store.exact and store.device == torch.device("cpu")
    source.zero_()  # the store copied its rows
    queries = unit(rng, 5, 16)
    ids = rng.choice(2000, 300, replace=False)
    scores = store.score(torch.from_numpy(queries), torch.from_numpy(ids))
    assert scores.dtype == torch.float32 and scores.shape == (5, 300)
    np.testing.assert_allclose(scores.numpy(), queries.astype(np.float64) @ rows[ids].astype(np.float64).T,
                               rtol=1e-5, atol=1e-6)
    read = store.read(torch.from_numpy(ids[:10]))
    assert np.array_equal(read.numpy(), rows[ids[:10]])
    read.zero_()
    exported = store.export()
    assert np.array_equal(exported, rows)
    exported[:] = 0
    assert np.array_equal(store.export(), rows)


def test_no_autograd_graph_through_the_store(rng: np.random.Generator) -> None:
    """Features that require grad (a trainer's) leave no graph in the rows or the results."""
    rows = torch.from_numpy(unit(rng, 500, 8)).requires_grad_()
    store = TorchStore(rows, "cpu")
    queries = torch.from_numpy(unit(rng, 4, 8)).requires_grad_()
    store.write(torch.arange(4), queries * 2)
    scores, _ = store.search(queries, 10)
    assert not (store.rows.requires_grad or store.low.requires_grad or scores.requires_grad)
    assert not store.score(queries, torch.arange(3)).requires_grad


def test_gemm_output_choice(rng: np.random.Generator) -> None:
    rows = torch.from_numpy(unit(rng, 100, 8))
    assert TorchStore(rows, "cpu", gemm_output=torch.bfloat16)._output_rounding == torch_store.OUTPUT_ROUNDING
    with pytest.raises(ValueError, match="float32 output"):
        TorchStore(rows, "cpu", gemm_output=torch.float32)


def test_bad_arguments(rng: np.random.Generator) -> None:
    store = TorchStore(torch.from_numpy(unit(rng, 100, 8)), "cpu")
    queries = torch.from_numpy(unit(rng, 3, 8))
    for k in (0, 101):
        with pytest.raises(ValueError, match="k must be"):
            store.search(queries, k)
    with pytest.raises(ValueError, match="queries"):
        store.search(queries[:, :4], 5)
    with pytest.raises(ValueError, match="float32"):
        TorchStore(torch.zeros(4, 4, dtype=torch.float64), "cpu")
    assert TorchStore(torch.zeros(0, 8), "cpu").nbytes(0, 8) == 0
