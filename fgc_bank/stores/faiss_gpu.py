"""The FAISS GPU store: the torch store's float32 rows on a GPU, searched by ``faiss.knn_gpu``.

For a GPU machine whose ``faiss`` was built for GPUs, as an alternative to the torch store's
checked bfloat16 search: FAISS's brute force (a float32 GEMM and its k-selection) runs on the
store's CUDA tensor in place (``faiss.contrib.torch_utils`` hands FAISS the tensor's pointer and
torch's current stream: no host copy, no wait). Which of the two is faster depends on the GPU and
the shapes, so ``--engine auto`` never picks this one; ``benchmarks/gpu.py`` times both side by
side. Reads, writes, rescoring and snapshots are the torch store's. FAISS's GPU k-selection stops
at k = 2048 (``MAX_GPU_K``); a deeper search (the bank's replay can ask for a few more than the
k it answers) takes the torch store's float32 search.

Nothing here imports FAISS until a store is made or a placement names the engine, so a machine
without it imports this module freely.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.stores.torch_store import TorchStore, ieee_float32

MAX_GPU_K = 2048  # FAISS's GPU k-selection answers k <= 2048

_resources: dict[int, Any] = {}  # one faiss.StandardGpuResources per CUDA device, shared by its stores
_resources_lock = threading.Lock()


def gpu_faiss(device: torch.device) -> Any:
    """The ``faiss`` module, set up for torch tensors, when it can search on ``device``; else a
    one-line BankError(BAD_ARGUMENT) saying why not (a CPU device, no FAISS, a CPU-only FAISS)."""
    if device.type != "cuda":
        raise BankError(ErrorCode.BAD_ARGUMENT, f"engine 'faiss-gpu' searches a CUDA tensor; a bank on "
                        f"{device} is searched by engine 'faiss' or 'torch'")
    try:
        import faiss
    except ImportError:
        raise BankError(ErrorCode.BAD_ARGUMENT, "engine 'faiss-gpu' needs FAISS built for GPUs "
                        "(faiss-gpu); this Python has no faiss") from None
    gpus = getattr(faiss, "get_num_gpus", None)
    if gpus is None or gpus() == 0:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"engine 'faiss-gpu' needs FAISS built for GPUs; faiss "
                        f"{getattr(faiss, '__version__', '?')} here sees no GPU (a CPU-only build?): use "
                        "engine 'torch' on a GPU")
    import faiss.contrib.torch_utils

    return faiss


def gpu_resources(faiss: Any, device: torch.device) -> Any:
    """The StandardGpuResources of ``device``: made once (its scratch memory and cuBLAS handle
    are not cheap) and shared by every store on that device."""
    with _resources_lock:
        if device.index not in _resources:
            _resources[device.index] = faiss.StandardGpuResources()
        return _resources[device.index]


class FaissGpuStore(TorchStore):
    """N x D float32 rows on a CUDA device; exact top-k by ``faiss.knn_gpu`` (inner product)."""

    engine = "faiss-gpu"
    low_copy = False  # FAISS searches the float32 rows themselves

    def __init__(self, rows: torch.Tensor, device: torch.device | str, **options: Any) -> None:
        """``rows`` (N, D) float32 anywhere, copied onto the CUDA ``device``; ``options`` as the
        torch store's (its float32 search answers what FAISS cannot)."""
        self._faiss = gpu_faiss(torch.device(device))
        super().__init__(rows, device, **options)
        self._resources = gpu_resources(self._faiss, self.device)

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self._search_input(queries, k)
        self.last_fallbacks = 0
        if k > MAX_GPU_K:
            with ieee_float32():
                return self._search_float32(queries, k)
        with torch.cuda.device(self.device):  # torch_utils runs FAISS on the current device's current stream
            scores, ids = self._faiss.knn_gpu(self._resources, queries, self.rows, k,
                                              metric=self._faiss.METRIC_INNER_PRODUCT, device=self.device.index)
        return scores, ids  # (B, k) float32 descending, (B, k) int64
