"""``local://`` with torch tensors: they stay tensors from the call to the store and back (no
numpy, no copy of a tensor already where the bank is), get every check numpy requests get, with
the same error, and answer what numpy requests answer. CPU tensors here; CUDA ones in
tests/test_gpu_bank.py."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn

from fgc_bank import connect
from fgc_bank.bank import MemoryBank, _by_id_then_bits
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.local import LocalBank

ROWS, DIM = 600, 16


class Spy:
    """Counts the ways a tensor can become numpy (``Tensor.numpy``, which ``np.asarray`` of a
    tensor calls too, and the bank's answer copy ``_host``) and records the storage of the
    queries and rows that reach the store."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, bank: MemoryBank) -> None:
        self.numpy = self.host = 0
        self.searched: list[int] = []
        self.written: list[int] = []
        to_numpy, host = torch.Tensor.numpy, MemoryBank._host
        search, write = bank.store.search, bank.store.write

        def counted_numpy(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> np.ndarray:
            self.numpy += 1
            return to_numpy(tensor, *args, **kwargs)

        def counted_host(owner: MemoryBank, tensor: torch.Tensor) -> np.ndarray:
            self.host += 1
            return host(owner, tensor)

        def recorded_search(queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
            self.searched.append(queries.data_ptr())
            return search(queries, k)

        def recorded_write(ids: torch.Tensor, rows: torch.Tensor) -> None:
            self.written.append(rows.data_ptr())
            write(ids, rows)

        monkeypatch.setattr(torch.Tensor, "numpy", counted_numpy)
        monkeypatch.setattr(MemoryBank, "_host", counted_host)
        monkeypatch.setattr(bank.store, "search", recorded_search)
        monkeypatch.setattr(bank.store, "write", recorded_write)


@pytest.fixture(params=["torch", "faiss"])
def local(request: pytest.FixtureRequest) -> Iterator[LocalBank]:
    with connect("local://", engine=request.param) as bank:
        bank.create("feat", ROWS, DIM, seed=5)
        yield bank


def _rows(bank: LocalBank) -> np.ndarray:
    return bank.gather("feat", np.arange(ROWS))


def test_tensors_reach_the_store_and_come_back_without_numpy(local: LocalBank, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = _rows(local)
    bank = local.service.bank("feat")
    queries = torch.randn(32, DIM, generator=torch.Generator().manual_seed(1))
    ids = torch.randperm(ROWS, generator=torch.Generator().manual_seed(2))[:32]
    values = torch.randn(4, DIM)
    spy = Spy(monkeypatch, bank)
    scores, found = local.knn("feat", queries, 20)
    searched = local.knn_update("feat", ids, queries, 20)
    local.update("feat", ids[:4], values, mode="overwrite")
    gathered = local.gather("feat", ids[:4])
    # (the CPU store views its tensors as numpy for FAISS's heaps: counted only for the torch store)
    assert spy.host == 0 and (bank.store.engine != "torch" or spy.numpy == 0)
    assert spy.searched[:2] == [queries.data_ptr()] * 2  # the caller's tensor itself, not a copy
    assert spy.written[-1] == values.data_ptr()  # an overwrite writes the caller's rows as they are
    for answer in (scores, found, searched.scores, searched.ids, gathered):
        assert isinstance(answer, torch.Tensor) and answer.device == queries.device
    assert found.dtype == torch.int64 and scores.dtype == torch.float32
    assert_same_knn(scores.numpy(), found.numpy(), *brute_force_knn(rows, queries.numpy(), 20))
    assert_same_knn(searched.scores.numpy(), searched.ids.numpy(), *brute_force_knn(rows, queries.numpy(), 20, ids.numpy()))
    assert torch.equal(gathered, values)


def test_numpy_calls_still_answer_numpy(local: LocalBank, monkeypatch: pytest.MonkeyPatch) -> None:
    spy = Spy(monkeypatch, local.service.bank("feat"))
    scores, ids = local.knn("feat", np.ones((3, DIM), np.float32), 5)
    assert isinstance(scores, np.ndarray) and isinstance(ids, np.ndarray) and spy.host == 2  # the spy sees copies


def test_step_tagged_tensors_close_their_step_as_numpy_requests_do() -> None:
    """Two ranks' requests of one step writing some rows twice, once as tensors and once as numpy:
    the same answers and the same rows bit for bit (the step's fixed order is the same)."""
    rng = np.random.default_rng(3)
    perm = rng.permutation(ROWS)
    requests = []
    for step in range(3):
        first = perm[step * 40:step * 40 + 24]
        second = np.concatenate([first[:4], perm[step * 40 + 24:step * 40 + 44]])  # 4 rows written twice
        for ids in (first, second):
            requests.append((step, ids, rng.standard_normal((24, DIM)).astype(np.float32)))
    answers, rows = [], []
    for as_tensor in (False, True):
        with connect("local://", engine="torch") as bank:
            bank.create("feat", ROWS, DIM, seed=5)
            answers.append([bank.knn_update("feat", *((torch.from_numpy(ids), torch.from_numpy(features))
                                                      if as_tensor else (ids, features)), 10, step=step)
                            for step, ids, features in requests])
            rows.append(_rows(bank))
    assert np.array_equal(rows[0], rows[1])
    for numpy_answer, tensor_answer in zip(*answers):
        assert isinstance(tensor_answer.ids, torch.Tensor)
        assert np.array_equal(numpy_answer.ids, tensor_answer.ids.numpy())
        assert np.array_equal(numpy_answer.scores, tensor_answer.scores.numpy())


def test_the_steps_order_on_the_device_is_numpys_lexsort() -> None:
    rng = np.random.default_rng(4)
    ids = rng.integers(0, 5, 200)
    values = rng.choice(np.array([-0.0, 0.0, 1.0, -1.0, 2.5, np.inf], np.float32), (200, 3))  # many ties
    expected = np.lexsort((*values.view(np.uint32).T[::-1], ids))
    assert np.array_equal(_by_id_then_bits(torch.from_numpy(ids), torch.from_numpy(values)).numpy(), expected)


HOSTILE = {
    "id out of range": lambda b, t: b.update("feat", t(np.array([ROWS])), t(np.ones((1, DIM), np.float32))),
    "negative id": lambda b, t: b.knn_update("feat", t(np.array([-1, 2])), t(np.ones((2, DIM), np.float32)), 3),
    "duplicate ids": lambda b, t: b.update("feat", t(np.array([4, 4])), t(np.ones((2, DIM), np.float32))),
    "nan": lambda b, t: b.knn("feat", t(np.full((2, DIM), np.nan, np.float32)), 3),
    "inf": lambda b, t: b.update("feat", t(np.array([1])), t(np.full((1, DIM), np.inf, np.float32))),
    "huge norm": lambda b, t: b.knn("feat", t(np.full((1, DIM), 3e18, np.float32)), 3),
    "huge overwrite": lambda b, t: b.update("feat", t(np.array([1])), t(np.full((1, DIM), 3e18, np.float32)),
                                            mode="overwrite"),
    "wrong dim": lambda b, t: b.knn("feat", t(np.ones((2, DIM + 1), np.float32)), 3),
    "rows for ids": lambda b, t: b.update("feat", t(np.array([1, 2])), t(np.ones((3, DIM), np.float32))),
    "no queries": lambda b, t: b.knn("feat", t(np.ones((0, DIM), np.float32)), 3),
    "bad k": lambda b, t: b.knn_update("feat", t(np.array([1])), t(np.ones((1, DIM), np.float32)), ROWS),
    "float ids": lambda b, t: b.gather("feat", t(np.array([1.5]))),
    "2-D ids": lambda b, t: b.gather("feat", t(np.array([[1]]))),
    "exclude count": lambda b, t: b.knn("feat", t(np.ones((2, DIM), np.float32)), 3, exclude=t(np.array([1]))),
    "complex rows": lambda b, t: b.knn("feat", t(np.ones((1, DIM), np.complex64)), 3),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_tensors_are_refused_as_numpy_is(local: LocalBank, case: str) -> None:
    errors = []
    for convert in (np.asarray, torch.from_numpy):
        with pytest.raises(BankError) as info:
            HOSTILE[case](local, convert)
        errors.append((info.value.code, info.value.message))
    assert errors[0] == errors[1]
    assert local.hello()["banks"]["feat"]["updates"] == 0  # nothing was written


def test_a_local_bank_is_placed_like_a_server() -> None:
    with connect("local://", engine="torch", device="cpu") as bank:
        assert bank.create("b", 10, 4)["engine"] == "torch"
    if not torch.cuda.is_available():
        with pytest.raises(BankError) as info:
            connect("local://", device="cuda")
        assert info.value.code is ErrorCode.BAD_ARGUMENT and "no CUDA GPU" in info.value.message
