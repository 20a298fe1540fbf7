"""MemoryBank against numpy oracles: kNN, self-exclusion, FGC's momentum rule, coalesced batches."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn, momentum_oracle

from fgc_bank.bank import (
    MAX_K,
    MAX_NORM,
    BankConfig,
    MemoryBank,
    Search,
    SearchUpdate,
    Update,
    momentum_update_,
)
from fgc_bank.errors import BankError, ErrorCode


def make_bank(rows: int = 500, dim: int = 16, init: str = "unit", momentum: float = 0.5) -> MemoryBank:
    return MemoryBank(BankConfig("b", rows, dim, momentum=momentum, init=init, seed=7))


@pytest.mark.parametrize("rows,dim,batch,k", [(500, 16, 7, 10), (1000, 64, 64, 200), (300, 8, 1, 1), (64, 4, 5, 64)])
def test_knn_matches_brute_force(rows: int, dim: int, batch: int, k: int, rng: np.random.Generator) -> None:
    bank = make_bank(rows, dim)
    queries = rng.standard_normal((batch, dim)).astype(np.float32)
    result = bank.execute([Search(queries, k)])[0].knn
    assert result.scores.shape == (batch, k) and result.ids.dtype == np.int64
    assert_same_knn(result.scores, result.ids, *brute_force_knn(bank.export(), queries, k))


def test_knn_excludes_each_querys_own_id(rng: np.random.Generator) -> None:
    bank = make_bank(400, 8)
    ids = rng.choice(400, 32, replace=False)
    queries = bank.export()[ids] * 3  # each query's own row is its best match
    result = bank.execute([Search(queries, 20, ids)])[0].knn
    assert not (result.ids == ids[:, None]).any()
    assert_same_knn(result.scores, result.ids, *brute_force_knn(bank.export(), queries, 20, ids))


def test_knn_with_k_equal_to_all_other_rows(rng: np.random.Generator) -> None:
    bank = make_bank(50, 4)
    ids = np.arange(5)
    result = bank.execute([Search(bank.export()[ids].copy(), 49, ids)])[0].knn
    for i in range(5):
        assert sorted(result.ids[i]) == [j for j in range(50) if j != i]


def test_momentum_update_matches_fgc_formula(rng: np.random.Generator) -> None:
    bank = make_bank(200, 16, init="uniform")
    before = bank.export().copy()
    ids = rng.choice(200, 30, replace=False)
    values = rng.standard_normal((30, 16)).astype(np.float32) * 5
    bank.execute([Update(ids, values)])
    expected = momentum_oracle(before, ids, values, 0.5)
    np.testing.assert_allclose(bank.export(), expected, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(200), ids)
    assert np.array_equal(bank.export()[untouched], before[untouched])


def test_momentum_update_function_on_torch_rows() -> None:
    rows = torch.rand(10, 3, dtype=torch.float64)
    before = rows.numpy().copy()
    ids = torch.tensor([1, 4])
    values = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], dtype=torch.float64)
    momentum_update_(rows, ids, values, 0.9)
    np.testing.assert_allclose(rows.numpy(), momentum_oracle(before, ids.numpy(), values.numpy(), 0.9))


F32_MAX = float(np.finfo(np.float32).max)


def edge_values(rng: np.random.Generator, b: int, d: int) -> np.ndarray:
    """Rows of random signs at the edges of float32: near its largest value, tiny (squares that
    underflow), denormal, a single denormal among zeros, and ordinary."""
    signs = np.where(rng.random((b, d)) < 0.5, -1.0, 1.0)
    scales = np.array([F32_MAX, 3e38, 1e30, 1e-24, 1e-30, 1e-40, 1.0])[np.arange(b) % 7]
    values = (signs * rng.uniform(0.5, 1.0, (b, d)) * scales[:, None]).astype(np.float32)
    values[-1] = 0.0
    values[-1, 0] = np.float32(1e-45)  # the smallest denormal
    return values


def assert_unit_rows_of_the_formula(after: np.ndarray, before: np.ndarray, ids: np.ndarray, values: np.ndarray,
                                    m: float) -> None:
    norms = np.linalg.norm(after[ids].astype(np.float64), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=0, atol=1e-6)
    np.testing.assert_allclose(after, momentum_oracle(before, ids, values, m), rtol=0, atol=1e-6)


@pytest.mark.parametrize("m", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("old", ["unit", "edge"])
def test_momentum_update_gives_unit_rows_at_the_edges_of_float32(m: float, old: str, rng: np.random.Generator) -> None:
    """Values near 3.4e38 (whose float32 norm overflows, and whose mix with huge old rows can
    too), tiny and denormal values (whose squares underflow): every row written is a unit row in
    the direction of the float64 formula."""
    rows = torch.from_numpy(rng.standard_normal((40, 16)).astype(np.float32))
    rows /= rows.norm(dim=1, keepdim=True)
    ids = rng.choice(40, 21, replace=False)
    if old == "edge":  # rows written verbatim (overwrite) can be anything finite
        rows[torch.from_numpy(ids)] = torch.from_numpy(edge_values(rng, 21, 16))
    values = edge_values(rng, 21, 16)
    before = rows.numpy().copy()
    momentum_update_(rows, torch.from_numpy(ids), torch.from_numpy(values), m)
    assert_unit_rows_of_the_formula(rows.numpy(), before, ids, values, m)


def test_momentum_update_of_float64_rows_near_their_largest_value() -> None:
    rows = torch.full((4, 3), 1e300, dtype=torch.float64)
    values = torch.tensor([[1.7e308, -1e308, 5e307], [1e-310, 0, 0], [1.0, 2.0, 3.0], [-1e300] * 3],
                          dtype=torch.float64)
    momentum_update_(rows, torch.arange(4), values, 0.5)
    assert torch.allclose(rows[:3].norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert torch.equal(rows[3], torch.full((3,), 1e300, dtype=torch.float64))  # a zero mix: kept


def test_momentum_update_keeps_a_row_whose_mix_is_zero(rng: np.random.Generator) -> None:
    """normalize(0) has no direction: a row whose mix is exactly zero keeps its old value; the
    other rows of the batch are updated as usual."""
    bank = make_bank(50, 8)
    before = bank.export().copy()
    values = rng.standard_normal((3, 8)).astype(np.float32)
    values[0] = -before[4]  # 0.5 * row + 0.5 * -row == 0
    bank.execute([Update(np.array([4, 5, 6]), values)])
    assert np.array_equal(bank.export()[4], before[4])
    assert_unit_rows_of_the_formula(np.delete(bank.export(), 4, 0), np.delete(before, 4, 0), np.array([4, 5]),
                                    values[1:], 0.5)
    zero_bank = make_bank(50, 8, momentum=0.0)
    kept = zero_bank.export()[7].copy()
    zero_bank.execute([Update(np.array([7]), np.zeros((1, 8), np.float32))])
    assert np.array_equal(zero_bank.export()[7], kept)


def test_momentum_update_at_the_edges_through_the_bank(rng: np.random.Generator) -> None:
    bank = make_bank(100, 16, momentum=0.5)
    ids = rng.choice(100, 21, replace=False)
    values = edge_values(rng, 21, 16)
    before = bank.export().copy()
    bank.execute([Update(ids, values)])
    assert_unit_rows_of_the_formula(bank.export(), before, ids, values, 0.5)


def test_overwrite_writes_rows_verbatim(rng: np.random.Generator) -> None:
    bank = make_bank(100, 4)
    values = rng.standard_normal((3, 4)).astype(np.float32)
    bank.execute([Update(np.array([5, 0, 99]), values, "overwrite")])
    assert np.array_equal(bank.export()[[5, 0, 99]], values)


def test_knn_update_searches_before_updating(rng: np.random.Generator) -> None:
    bank = make_bank(300, 8)
    before = bank.export().copy()
    ids = rng.choice(300, 16, replace=False)
    features = rng.standard_normal((16, 8)).astype(np.float32)
    result = bank.execute([SearchUpdate(ids, features, 10)])[0].knn
    assert_same_knn(result.scores, result.ids, *brute_force_knn(before, features, 10, ids))
    np.testing.assert_allclose(bank.export(), momentum_oracle(before, ids, features, 0.5), rtol=1e-5, atol=1e-6)


def test_uniform_init_is_fgcs_range() -> None:
    bank = make_bank(2000, 12, init="uniform")
    bound = 1 / math.sqrt(12 / 3)
    assert bank.export().min() >= -bound and bank.export().max() <= bound
    assert bank.export().max() > 0.95 * bound  # it fills the range, it is not all zeros
    again = make_bank(2000, 12, init="uniform")
    assert np.array_equal(bank.export(), again.export())  # seeded


def random_ops(rng: np.random.Generator, rows: int, dim: int, count: int) -> list:
    ops = []
    for _ in range(count):
        kind = rng.integers(3)
        batch = int(rng.integers(1, 40))
        ids = rng.choice(rows, batch, replace=False)
        values = rng.standard_normal((batch, dim)).astype(np.float32)
        k = int(rng.integers(1, 30))
        if kind == 0:
            ops.append(Update(ids, values, "momentum" if rng.random() < 0.8 else "overwrite"))
        elif kind == 1:
            ops.append(Search(values, k, ids if rng.random() < 0.5 else None))
        else:
            ops.append(SearchUpdate(ids, values, k))
    return ops


@pytest.mark.parametrize("rows", [60, 400, 5000])
def test_coalesced_batch_equals_one_op_at_a_time(rows: int, rng: np.random.Generator) -> None:
    """One FAISS call for a whole run of ops answers exactly as the ops run one by one would,
    including when the run's updates change most of a small bank (the re-search path)."""
    ops = random_ops(rng, rows, 8, 12)
    batched, serial = make_bank(rows, 8), make_bank(rows, 8)
    together = batched.execute(ops)
    one_by_one = [serial.execute([op])[0] for op in ops]
    for got, want in zip(together, one_by_one):
        assert got.version == want.version
        if want.knn is None:
            assert got.knn is None
        else:
            assert_same_knn(got.knn.scores, got.knn.ids, want.knn.scores, want.knn.ids)
    np.testing.assert_array_equal(batched.export(), serial.export())
    assert batched.counters["coalesced_calls"] == 1


@pytest.mark.parametrize("op,code", [
    (lambda: Search(np.zeros((2, 5), np.float32), 3), ErrorCode.BAD_SHAPE),
    (lambda: Search(np.zeros((2, 8), np.float64), 3), ErrorCode.BAD_DTYPE),
    (lambda: Search(np.zeros((2, 8), np.float32), 0), ErrorCode.BAD_K),
    (lambda: Search(np.zeros((2, 8), np.float32), 101), ErrorCode.BAD_K),
    (lambda: Search(np.zeros((2, 8), np.float32), 100, np.array([1, 2])), ErrorCode.BAD_K),
    (lambda: Search(np.full((2, 8), np.nan, np.float32), 3), ErrorCode.NOT_FINITE),
    (lambda: Search(np.zeros((2, 8), np.float32), 3, np.array([1])), ErrorCode.BAD_SHAPE),
    (lambda: Update(np.array([1, 100]), np.zeros((2, 8), np.float32)), ErrorCode.ID_OUT_OF_RANGE),
    (lambda: Update(np.array([-1, 3]), np.zeros((2, 8), np.float32)), ErrorCode.ID_OUT_OF_RANGE),
    (lambda: Update(np.array([3, 3]), np.ones((2, 8), np.float32)), ErrorCode.DUPLICATE_IDS),
    (lambda: Update(np.array([3]), np.ones((2, 8), np.float32)), ErrorCode.BAD_SHAPE),
    (lambda: Update(np.array([3]), np.full((1, 8), np.inf, np.float32)), ErrorCode.NOT_FINITE),
    (lambda: Update(np.array([3]), np.ones((1, 8), np.float32), "average"), ErrorCode.BAD_ARGUMENT),
    (lambda: SearchUpdate(np.array([3, 4]), np.ones((2, 8), np.float32), 100), ErrorCode.BAD_K),
    (lambda: SearchUpdate(np.array([3, 3]), np.ones((2, 8), np.float32), 5), ErrorCode.DUPLICATE_IDS),
    (lambda: Search(np.zeros((0, 8), np.float32), 3), ErrorCode.BAD_SHAPE),  # no query
    (lambda: Search(np.zeros((0, 8), np.float32), 3, np.zeros(0, np.int64)), ErrorCode.BAD_SHAPE),
    (lambda: SearchUpdate(np.zeros(0, np.int64), np.zeros((0, 8), np.float32), 3), ErrorCode.BAD_SHAPE),
    # rows and queries whose float32 scores could overflow (norm 2^63 or more)
    (lambda: Search(np.full((2, 8), 1e30, np.float32), 3), ErrorCode.NOT_FINITE),
    (lambda: SearchUpdate(np.array([3, 4]), np.full((2, 8), 3e38, np.float32), 5), ErrorCode.NOT_FINITE),
    (lambda: Update(np.array([3]), np.full((1, 8), 3e38, np.float32), "overwrite"), ErrorCode.NOT_FINITE),
])
def test_bad_ops_are_refused_and_change_nothing(op, code: ErrorCode) -> None:
    bank = make_bank(100, 8)
    before = bank.export().copy()
    with pytest.raises(BankError) as info:
        bank.validate(op())
    assert info.value.code is code
    assert np.array_equal(bank.export(), before)


def test_sample_is_seeded_distinct_and_gathers_the_rows() -> None:
    bank = make_bank(100, 4)
    ids, rows = bank.sample(30, seed=3)
    again, _ = bank.sample(30, seed=3)
    assert np.array_equal(ids, again) and len(set(ids.tolist())) == 30
    assert np.array_equal(rows, bank.export()[ids])
    assert np.array_equal(bank.gather(ids[:5]), bank.export()[ids[:5]])
    with pytest.raises(BankError) as info:
        bank.sample(101, seed=0)
    assert info.value.code is ErrorCode.BAD_ARGUMENT


@pytest.mark.parametrize("kwargs,code", [
    ({"rows": 0}, ErrorCode.BAD_ARGUMENT), ({"dim": 0}, ErrorCode.BAD_ARGUMENT),
    ({"momentum": 1.0}, ErrorCode.BAD_ARGUMENT), ({"init": "zeros"}, ErrorCode.BAD_ARGUMENT),
    ({"dtype": "float64"}, ErrorCode.BAD_ARGUMENT), ({"rows": 10**9, "dim": 512}, ErrorCode.TOO_LARGE),
])
def test_bad_configs_are_refused_before_allocating(kwargs: dict, code: ErrorCode) -> None:
    config = BankConfig(**{"name": "b", "rows": 10, "dim": 4, **kwargs})
    with pytest.raises(BankError) as info:
        config.validate(max_bytes=2**30)
    assert info.value.code is code


def test_coalesced_search_researches_when_updates_empty_its_candidates(rng: np.random.Generator) -> None:
    """Rows that were a query's best matches are moved away earlier in the same batch: every
    pre-batch candidate is stale, so the bank must search that query again to stay exact."""
    direction = rng.standard_normal((1, 16)).astype(np.float32)
    aligned = np.repeat(direction / np.linalg.norm(direction), 40, axis=0)
    batched, serial = make_bank(5000, 16), make_bank(5000, 16)
    for bank in (batched, serial):
        bank.execute([Update(np.arange(40), aligned, "overwrite")])
    ops = [Update(np.arange(40), -aligned, "overwrite"), Search(direction, 20)]
    calls = []
    original = batched._search_one
    batched._search_one = lambda *a: calls.append(a) or original(*a)  # type: ignore[method-assign]
    got = batched.execute(ops)[1].knn
    want = [serial.execute([op])[0] for op in ops][1].knn
    assert calls, "the stale-candidate fallback did not run"
    assert not np.isin(got.ids, np.arange(40)).any()
    assert_same_knn(got.scores, got.ids, want.scores, want.ids)


@pytest.mark.parametrize("excluding", [False, True])
def test_k_above_max_k_is_refused(excluding: bool, rng: np.random.Generator) -> None:
    """k is at most MAX_K (2048, FAISS's GPU limit) however many rows the bank has."""
    bank = make_bank(3000, 4)
    queries = rng.standard_normal((2, 4)).astype(np.float32)
    ids = np.array([0, 1])
    make = (lambda k: SearchUpdate(ids, queries, k)) if excluding else (lambda k: Search(queries, k))
    bank.validate(make(MAX_K))
    with pytest.raises(BankError) as info:
        bank.validate(make(MAX_K + 1))
    assert info.value.code is ErrorCode.BAD_K and "2048" in str(info.value)
    before = bank.export().copy()
    result = bank.execute([make(MAX_K)])[0].knn
    assert_same_knn(result.scores, result.ids, *brute_force_knn(before, queries, MAX_K, ids if excluding else None))


def test_zero_queries_are_a_bad_shape_through_the_service() -> None:
    """knn and knn_update with no queries are answered bad_shape (they once reached the planner
    and divided by zero: internal)."""
    from fgc_bank.protocol import Request
    from fgc_bank.service import BankService

    service = BankService()
    service.create("b", {"rows": 100, "dim": 8})
    empty = np.zeros((0, 8), np.float32)
    replies = service.handle_batch("b", [
        Request("knn", "b", {"k": 3}, {"queries": empty}, id=1),
        Request("knn_update", "b", {"k": 3}, {"ids": np.zeros(0, np.int64), "features": empty}, id=2)])
    assert [r.error.code for r in replies] == [ErrorCode.BAD_SHAPE, ErrorCode.BAD_SHAPE]
    assert all("at least one query" in r.error.message for r in replies)


def test_coalesced_run_deeper_than_5962_rows_answers_exactly(rng: np.random.Generator) -> None:
    """A run whose updates change most of a small bank searches deeper than any k (here 2,049 +
    8 + 4 x 2,049 x 5,000 / 8,000 = 7,180 rows): once the planner's Poisson tail spun forever
    from that depth. The answers are those of the ops one at a time, and of the oracle."""
    ids = rng.choice(8000, 5000, replace=False)
    values = rng.standard_normal((5000, 8)).astype(np.float32)
    features = rng.standard_normal((3, 8)).astype(np.float32)
    own = np.setdiff1d(np.arange(8000), ids)[:3]
    ops = [Update(ids, values), SearchUpdate(own, features, MAX_K)]
    batched, serial = make_bank(8000, 8), make_bank(8000, 8)
    assert batched._depth([ops[1]], 5000) > 5962
    got = batched.execute(ops)[1].knn
    serial.execute(ops[:1])
    before = serial.export().copy()
    want = serial.execute(ops[1:])[0].knn
    assert_same_knn(got.scores, got.ids, want.scores, want.ids)
    assert_same_knn(got.scores, got.ids, *brute_force_knn(before, features, MAX_K, own))
    np.testing.assert_array_equal(batched.export(), serial.export())


def test_scores_that_could_overflow_are_refused_everywhere_rows_are_scored() -> None:
    """Norms below MAX_NORM = 2^63 pass (scores stay below 2^126), norms at it do not: for
    queries, overwritten rows and rows given to the constructor (a snapshot's restore), which
    also refuses NaN and Inf. Momentum values may be as large as float32 goes: they make unit
    rows."""
    bank = make_bank(100, 4)
    below = np.zeros((1, 4), np.float32)
    below[0, 0] = np.nextafter(np.float32(MAX_NORM), np.float32(0))
    at = np.full((1, 4), MAX_NORM / 2, np.float32)  # norm exactly 2^63
    bank.validate(Search(below, 3))
    bank.validate(Update(np.array([1]), below, "overwrite"))
    bank.validate(Update(np.array([1]), np.full((1, 4), 3.4e38, np.float32)))
    for op in (Search(at, 3), Update(np.array([1]), at, "overwrite"), SearchUpdate(np.array([1]), at, 3)):
        with pytest.raises(BankError) as info:
            bank.validate(op)
        assert info.value.code is ErrorCode.NOT_FINITE and "2^63" in info.value.message
    config = BankConfig("b", 100, 4)
    for bad in (1e30, 3e38, np.inf, np.nan):
        rows = torch.from_numpy(bank.export().copy())
        rows[7, 2] = bad
        with pytest.raises(BankError) as info:
            MemoryBank(config, rows)
        assert info.value.code is ErrorCode.NOT_FINITE
    rows = torch.from_numpy(bank.export().copy())
    rows[7] = torch.from_numpy(below[0])
    assert MemoryBank(config, rows).export()[7, 0] == below[0, 0]
