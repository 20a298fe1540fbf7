"""The CPU store: rows as one float32 matrix in host memory, searched in place.

The search is :func:`fgc_bank.stores.cpu.search.search_inner_product` (torch.mm into cache-sized
buffers, FAISS heaps or a sampled threshold, and on CPUs with int8 or bfloat16 dot products a
low-precision copy of the rows that finds candidates before float32 ranks them). The copy is
refreshed in :meth:`CpuStore.write`, the one place rows change.
"""

from __future__ import annotations

import numpy as np
import torch

from fgc_bank.stores.base import RowStore
from fgc_bank.stores.cpu import prefilter
from fgc_bank.stores.cpu.search import search_inner_product


class CpuStore(RowStore):
    """(N, D) float32 rows in a torch tensor that shares memory with the numpy matrix FAISS and
    the prefilter read."""

    device = torch.device("cpu")
    engine = "faiss"

    def __init__(self, rows: torch.Tensor, device: torch.device | str = "cpu", kind: str | None = None) -> None:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the CPU store holds rows in host memory, not on {device}")
        self.rows = rows.detach().to("cpu", torch.float32).contiguous()
        self.rows_np = self.rows.numpy()  # shares memory: the search reads the live rows
        self.low = prefilter.make(self.rows_np, prefilter.best_kind() if kind is None else kind)

    @property
    def kind(self) -> str | None:
        """The low-precision copy kept beside the rows: "int8", "bf16" or None."""
        return None if self.low is None else self.low.kind

    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = search_inner_product(self.rows_np, queries.numpy(), k, self.low)
        return torch.from_numpy(scores), torch.from_numpy(ids)

    def score(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return queries @ self.rows.index_select(0, ids).T  # (B, S)

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.index_select(0, ids)

    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        self.rows.index_copy_(0, ids, rows)
        if self.low is not None:
            self.low.refresh(ids.numpy())

    def export(self) -> np.ndarray:
        return self.rows_np.copy()

    @classmethod
    def nbytes(cls, rows: int, dim: int) -> int:
        return rows * dim * 4 + prefilter.copy_bytes(rows, dim, prefilter.best_kind())

    @classmethod
    def layout(cls) -> str:
        kind = prefilter.best_kind()
        return f"float32 and its {kind} copy" if kind else "float32"
