"""The torch store against the FGC paper's search, in process, on one device.

``benchmark(device, n, d, b, k, repeats)`` times :meth:`TorchStore.search` and the paper's
float32 ``torch.mm`` + ``topk`` over the same unit rows and queries on the same device (CUDA
synchronised around every timed call) and returns each one's queries per second (the median
repetition). On a GPU with FAISS built for GPUs importable, ``faiss.knn_gpu`` is timed on the
same tensor too (the ``faiss-gpu`` engine's search); otherwise ``faiss_knn_gpu`` says why not.
Run it as ``python -m benchmarks.torch_store --device cuda --n 1281167 --d 512``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.timing import Stats
from fgc_bank.errors import BankError
from fgc_bank.stores.faiss_gpu import MAX_GPU_K, gpu_faiss, gpu_resources
from fgc_bank.stores.torch_store import TorchStore, ieee_float32


def _unit(n: int, d: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    x = torch.randn(n, d, generator=generator, device=device)  # (n, d)
    return x / torch.linalg.vector_norm(x, dim=1, keepdim=True)


def _seconds(fn: Callable[[], object], device: torch.device, repeats: int) -> Stats:
    """Median and spread of ``repeats`` timed calls after one warm-up call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()
    samples = []
    for _ in range(repeats):
        sync()  # SYNC: nothing queued before the clock starts
        start = time.perf_counter()
        fn()
        sync()  # SYNC: the call's kernels have finished
        samples.append(time.perf_counter() - start)
    return Stats.of(samples)


def benchmark(device: str | torch.device = "cpu", n: int = 50_000, d: int = 64, b: int = 256, k: int = 200,
              repeats: int = 5, seed: int = 0, gemm_output: torch.dtype | None = None) -> dict[str, Any]:
    """Queries per second of the torch store and of float32 ``torch.mm`` + ``topk`` (TF32 off),
    and how many of the store's queries fell back to its float32 search. ``gemm_output``: the
    store's (None: its default)."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    rows, queries = _unit(n, d, generator, device), _unit(b, d, generator, device)  # (n, d), (b, d)
    store = TorchStore(rows, device, gemm_output=gemm_output)
    del rows  # the store holds its own copy

    def paper() -> object:
        with ieee_float32():
            return torch.mm(queries, store.rows.T).topk(k, dim=1)  # (b, n) scores at once

    stats = {"torch_store": _seconds(lambda: store.search(queries, k), device, repeats),
             "float32_mm_topk": _seconds(paper, device, repeats)}
    knn_gpu, why_not = _faiss_knn_gpu(store.rows, queries, k)
    if knn_gpu is not None:
        stats["faiss_knn_gpu"] = _seconds(knn_gpu, device, repeats)
    store.search(queries, k)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "n": n, "d": d, "b": b, "k": k, "repeats": repeats,
        "kernel_output": "float32" if store._output_rounding == 0 else "bfloat16",
        "fallbacks": store.last_fallbacks, "faiss_knn_gpu": why_not or "timed",
    }
    for name, s in stats.items():
        result[f"{name}_qps"] = b / s.median
        result[f"{name}_spread"] = s.spread
    result["speedup"] = result["torch_store_qps"] / result["float32_mm_topk_qps"]
    if knn_gpu is not None:
        result["store_vs_faiss_knn_gpu"] = result["torch_store_qps"] / result["faiss_knn_gpu_qps"]
    return result


def _faiss_knn_gpu(rows: torch.Tensor, queries: torch.Tensor, k: int) -> tuple[Callable[[], object] | None, str | None]:
    """``faiss.knn_gpu`` of ``queries`` against ``rows`` in place (inner product, float32), as
    the ``faiss-gpu`` engine calls it; or None and why it cannot run here ("not installed: ...")."""
    try:
        faiss = gpu_faiss(rows.device)
    except BankError as exc:
        return None, f"not installed: {exc.message}"
    if k > MAX_GPU_K:
        return None, f"k = {k} is above FAISS's GPU limit {MAX_GPU_K}"
    resources = gpu_resources(faiss, rows.device)

    def search() -> object:
        with torch.cuda.device(rows.device):
            return faiss.knn_gpu(resources, queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT,
                                 device=rows.device.index)

    return search, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--d", type=int, default=64)
    parser.add_argument("--b", type=int, default=256)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gemm-output", choices=["float32", "bfloat16"], default=None)
    args = parser.parse_args()
    output = None if args.gemm_output is None else getattr(torch, args.gemm_output)
    print(json.dumps(benchmark(args.device, args.n, args.d, args.b, args.k, args.repeats, gemm_output=output),
                     indent=2))


if __name__ == "__main__":
    main()
