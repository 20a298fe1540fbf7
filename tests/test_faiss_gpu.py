"""The ``faiss-gpu`` engine: the torch store searched by ``faiss.knn_gpu`` on its CUDA tensor
(skipped without CUDA and FAISS built for GPUs; ``make gpu-check`` runs it). Answers are compared
with the float64 numpy oracle, through the bank's coalesced execution and a real server."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn, check_served_knn, momentum_oracle

from fgc_bank.bank import BankConfig, MemoryBank, Search, SearchUpdate
from fgc_bank.errors import BankError
from fgc_bank.stores import Placement


def _why_not() -> str | None:
    """Why this machine cannot run the engine (None: it can)."""
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (make gpu-check)"
    try:
        Placement.resolve("faiss-gpu", "cuda")
    except BankError as exc:
        return exc.message
    return None


pytestmark = pytest.mark.skipif(_why_not() is not None, reason=f"faiss-gpu: {_why_not()}")


@pytest.fixture
def bank() -> MemoryBank:
    return MemoryBank(BankConfig("feat/7", 20_000, 128, seed=3), placement=Placement.resolve("faiss-gpu", "cuda"))


def test_the_store_searches_in_place_like_the_oracle(bank: MemoryBank, rng: np.random.Generator) -> None:
    assert bank.info()["engine"] == "faiss-gpu" and bank.info()["device"].startswith("cuda")
    assert not hasattr(bank.store, "low")  # no bfloat16 copy: FAISS reads the float32 rows
    rows = bank.export()
    queries = torch.from_numpy(rng.standard_normal((256, 128)).astype(np.float32)).cuda()
    scores, ids = bank.store.search(queries, 2048)  # FAISS's largest k on a GPU
    assert scores.device == bank.store.device and ids.dtype == torch.int64
    assert_same_knn(scores.cpu().numpy(), ids.cpu().numpy(), *brute_force_knn(rows, queries.cpu().numpy(), 2048))
    deeper, deeper_ids = bank.store.search(queries[:4], 2100)  # beyond it: the torch store's float32 search
    assert_same_knn(deeper.cpu().numpy(), deeper_ids.cpu().numpy(), *brute_force_knn(rows, queries[:4].cpu().numpy(), 2100))


def test_coalesced_runs_with_updates_are_exact(bank: MemoryBank, rng: np.random.Generator) -> None:
    rows = bank.export()
    queries = rng.standard_normal((256, 128)).astype(np.float32)
    ids = rng.choice(20_000, 256, replace=False)
    results = bank.execute([Search(queries, 200), SearchUpdate(ids, queries, 200), Search(queries, 200)])
    assert_same_knn(results[0].knn.scores, results[0].knn.ids, *brute_force_knn(rows, queries, 200))
    assert_same_knn(results[1].knn.scores, results[1].knn.ids, *brute_force_knn(rows, queries, 200, ids))
    after = momentum_oracle(rows, ids, queries, 0.5).astype(np.float32)
    assert_same_knn(results[2].knn.scores, results[2].knn.ids, *brute_force_knn(after, queries, 200))


def test_a_server_with_engine_faiss_gpu_answers_like_the_oracle(tmp_path, rng: np.random.Generator) -> None:
    check_served_knn(tmp_path, rng, "faiss-gpu", "--device", "cuda", "--engine", "faiss-gpu")
