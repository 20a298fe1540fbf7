"""The torch store on a CUDA GPU against the float64 oracle: the real tensor-core GEMM under the
bound, exact answers at ImageNet's width, writes, subnormal rows, and the caller's TF32 setting
back after a search. Skipped where torch sees no GPU."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from conftest import assert_same_knn, brute_force_knn

from fgc_bank.stores import torch_store
from fgc_bank.stores.torch_store import TorchStore, ieee_float32

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")


def unit(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    x = rng.standard_normal((n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def knn(store: TorchStore, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    scores, ids = store.search(torch.from_numpy(queries).to(store.device), k)
    assert scores.device == store.device and ids.device == store.device
    return scores.cpu().numpy(), ids.cpu().numpy()


@pytest.mark.parametrize("budget,output", [(torch_store.SCORE_BUDGET, None), (16 << 20, None),  # one chunk; seven
                                           (16 << 20, torch.bfloat16)])
def test_cuda_exact_at_imagenet_width(budget: int, output: torch.dtype | None) -> None:
    """N 100k, D 512, k 200, B 256."""
    rng = np.random.default_rng(7)
    rows, queries = unit(rng, 100_000, 512), unit(rng, 256, 512)
    store = TorchStore(torch.from_numpy(rows), "cuda", budget=budget, gemm_output=output)
    assert store.device.index == torch.cuda.current_device()
    assert store._kernel_ok and store._filter_pays(store.candidate_count(200))
    assert_same_knn(*knn(store, queries, 200), *brute_force_knn(rows, queries, 200))
    assert store.last_fallbacks <= 64, f"{store.last_fallbacks} of 256 queries failed their check"
    print(f"\nkernel output rounding {store._output_rounding}, fallbacks {store.last_fallbacks}/256")


def rounded_down_by_bf16(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """Values just under a bfloat16 midpoint, vectors nearly parallel: the bound nearly reached."""
    below_midpoint = rng.integers(0, 6, (n, d)) + 0.49 - 0.04 * rng.random((n, d))
    return ((1.0 + below_midpoint / 128.0) / 8.0).astype(np.float32)


@pytest.mark.parametrize("output", [None, torch.bfloat16])
@pytest.mark.parametrize("data", ["unit", "worst-case rounding", "subnormal rows"])
def test_cuda_margin_bounds_every_row(data: str, output: torch.dtype | None) -> None:
    """The tensor cores' bfloat16 GEMM stays within the bound for every pair."""
    rng = np.random.default_rng(8)
    d = 512
    if data == "worst-case rounding":
        rows, queries = rounded_down_by_bf16(rng, 50_000, d), rounded_down_by_bf16(rng, 64, d)
    else:
        rows, queries = unit(rng, 50_000, d), unit(rng, 64, d)
        if data == "subnormal rows":
            rows[::2] *= np.float32(1e-40)
    store = TorchStore(torch.from_numpy(rows), "cuda", gemm_output=output)
    q = torch.from_numpy(queries).cuda()
    with ieee_float32():
        filt = store._filter(q, *store._bank_bounds())
        out = store._kernel(filt.low, store.low).double()  # (B, N)
        exact32 = torch.mm(q, store.rows.T).double()  # (B, N)
    undone = out + store._output_rounding * out.abs() + torch_store.FLUSH
    assert bool(filt.safe.all())
    assert bool((exact32 <= undone + filt.margin[:, None]).all())
    print(f"\n{data}: largest (float32 - GEMM) / margin {float(((exact32 - out) / filt.margin[:, None]).max()):.3f}")


def test_cuda_writes_and_subnormal_rows() -> None:
    rng = np.random.default_rng(9)
    n, d = 50_000, 128
    bank = unit(rng, n, d)
    bank[1::5] *= np.float32(1e-40)
    store = TorchStore(torch.from_numpy(bank), "cuda", budget=4 << 20)
    queries = unit(rng, 128, d)
    for _ in range(3):
        ids = rng.choice(n, 4096, replace=False)
        mixed = 0.5 * bank[ids].astype(np.float64) + 0.5 * unit(rng, 4096, d)
        bank[ids] = (mixed / np.linalg.norm(mixed, axis=1, keepdims=True)).astype(np.float32)
        store.write(torch.from_numpy(ids).cuda(), torch.from_numpy(bank[ids]).cuda())
        assert torch.equal(store.low, store.rows.to(torch.bfloat16))
        assert torch.equal(store.norms, torch_store.norm_bounds(store.rows))
        assert_same_knn(*knn(store, queries, 100), *brute_force_knn(bank, queries, 100))
    assert np.array_equal(store.export(), bank)


@pytest.fixture
def precision_restored() -> Iterator[None]:
    saved = torch_store._read_precision()
    yield
    torch_store._write_precision(saved)


def test_cuda_tf32_setting_restored(precision_restored: None) -> None:
    """A trainer that turned TF32 on gets exact answers and its TF32 back."""
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    before = torch_store._read_precision()
    rng = np.random.default_rng(10)
    rows, queries = unit(rng, 20_000, 256), unit(rng, 64, 256)
    store = TorchStore(torch.from_numpy(rows), "cuda")
    assert_same_knn(*knn(store, queries, 50), *brute_force_knn(rows, queries, 50))
    with ieee_float32():
        scores = store.score(torch.from_numpy(queries).cuda(), torch.arange(1000, device="cuda"))
    np.testing.assert_allclose(scores.cpu().numpy(), queries.astype(np.float64) @ rows[:1000].astype(np.float64).T,
                               rtol=1e-5, atol=1e-6)
    assert torch_store._read_precision() == before
