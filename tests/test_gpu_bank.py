"""The bank on a GPU (skipped without CUDA; ``make gpu-check`` runs it): oracle kNN, coalesced
execution with its replay, the update rule, snapshots out and back, a real server with
``--device cuda``, and ``local://`` on the GPU answering CUDA tensors without host copies."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn, check_served_knn, momentum_oracle

from fgc_bank import connect
from fgc_bank.bank import BankConfig, MemoryBank, Search, SearchUpdate, Update
from fgc_bank.stores import Placement

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (make gpu-check)")


@pytest.fixture
def bank() -> MemoryBank:
    return MemoryBank(BankConfig("feat/7", 20_000, 128, seed=3), placement=Placement.resolve("auto", "cuda"))


def test_a_gpu_bank_is_exact_through_coalesced_runs(bank: MemoryBank, rng: np.random.Generator) -> None:
    assert bank.info()["engine"] == "torch" and bank.info()["device"].startswith("cuda")
    rows = bank.export()
    queries = rng.standard_normal((256, 128)).astype(np.float32)
    ids = rng.choice(20_000, 256, replace=False)
    results = bank.execute([Search(queries, 200), SearchUpdate(ids, queries, 200), Search(queries, 200),
                            Update(ids[:64], queries[:64])])
    assert_same_knn(results[0].knn.scores, results[0].knn.ids, *brute_force_knn(rows, queries, 200))
    assert_same_knn(results[1].knn.scores, results[1].knn.ids, *brute_force_knn(rows, queries, 200, ids))
    after = momentum_oracle(rows, ids, queries, 0.5)
    assert_same_knn(results[2].knn.scores, results[2].knn.ids, *brute_force_knn(after.astype(np.float32), queries, 200))
    final = momentum_oracle(after, ids[:64], queries[:64], 0.5)
    np.testing.assert_allclose(bank.export(), final, rtol=1e-5, atol=1e-6)


def test_a_gpu_bank_restores_from_host_rows_bit_for_bit(bank: MemoryBank) -> None:
    rows = bank.export()
    again = MemoryBank(bank.config, rows, Placement.resolve("torch", "cuda"))
    assert np.array_equal(again.export(), rows)


def test_a_server_on_the_gpu_answers_like_the_oracle(tmp_path, rng: np.random.Generator) -> None:
    check_served_knn(tmp_path, rng, "torch", "--device", "cuda")


def _memcpy_counts(calls: Callable[[], object]) -> dict[str, int]:
    """How many host-to-device copies, and device-to-pinned-host copies (the bank's numpy
    answers), CUDA ran during ``calls``, as the profiler saw them."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        calls()
        torch.cuda.synchronize()
    names = [event.name for event in prof.events()]
    return {"to_device": sum("Memcpy HtoD" in n for n in names),
            "to_pinned_host": sum("Memcpy DtoH (Device -> Pinned)" in n for n in names)}


def test_local_cuda_tensors_never_copy_through_the_host(rng: np.random.Generator) -> None:
    """``local://`` with a bank on the GPU: CUDA tensors in, CUDA tensors out, exact, and no copy
    to or from the host but the checks' scalars (the same calls with numpy, as a control, show
    the copies the profiler would have seen)."""
    with connect("local://", device="cuda", engine="torch") as bank:
        bank.create("feat", 20_000, 64, seed=2)
        queries_np = rng.standard_normal((256, 64)).astype(np.float32)
        ids_np = rng.choice(20_000, 256, replace=False)
        queries, ids = torch.from_numpy(queries_np).cuda(), torch.from_numpy(ids_np).cuda()
        answers: list[object] = []
        steps = itertools.count()  # gather closes the step: each round tags a new one

        def calls(q: object, i: object) -> Callable[[], object]:
            return lambda: answers.extend([bank.knn("feat", q, 200), bank.knn_update("feat", i, q, 200, step=next(steps)),
                                           bank.gather("feat", i)])

        calls(queries, ids)()  # warm-up: kernels loaded, caches filled
        rows = bank.gather("feat", np.arange(20_000))  # as the next knn sees them (the warm-up's step is closed)
        tensor_path = _memcpy_counts(calls(queries, ids))
        numpy_path = _memcpy_counts(calls(queries_np, ids_np))
        assert numpy_path["to_device"] > 0 and numpy_path["to_pinned_host"] > 0, numpy_path
        assert tensor_path == {"to_device": 0, "to_pinned_host": 0}, tensor_path
        first, stepped, gathered = answers[3:6]  # the profiled tensor calls
        for answer in (first.scores, first.ids, stepped.ids, gathered):
            assert isinstance(answer, torch.Tensor) and answer.device == queries.device
        assert_same_knn(first.scores.cpu().numpy(), first.ids.cpu().numpy(), *brute_force_knn(rows, queries_np, 200))
