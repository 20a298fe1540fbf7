"""The row-store interface: where a bank's rows live and how they are searched.

A bank (:class:`fgc_bank.bank.MemoryBank`) is the coordination: validation, its lock, its
version, FGC's update rule, the coalesced execution of queued ops and its exactness replay. The
rows and their search live in a row store behind this small interface, one module per store:
the CPU store (``fgc_bank.stores.cpu``: torch.mm + FAISS heaps + the int8/bf16 prefilter) and
the torch store (``fgc_bank.stores.torch_store``: a tensor on any device, low-precision scoring
on tensor cores checked by a proven bound, float32 rescoring). Only the bank calls a store, and
always under the bank's lock.

Everything crosses the interface as torch tensors on the store's ``device`` (a CPU tensor shares
memory with numpy, so the CPU store converts for free).
"""

from __future__ import annotations

import abc

import numpy as np
import torch


class RowStore(abc.ABC):
    """N x D float32 rows, updated in place, with exact inner-product top-k."""

    exact: bool = True  # False for approximate stores: the bank's replay then searches again
    device: torch.device

    @abc.abstractmethod
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k rows by inner product with each query.

        Parameters
        ----------
        queries : (B, D) float32 on ``device``, B >= 1.
        k : 1 <= k <= N.

        Returns
        -------
        scores : (B, k) float32, descending (equal scores in any order).
        ids : (B, k) int64 row ids.
        """

    @abc.abstractmethod
    def score(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, S) float32: the current exact scores of rows ``ids`` (S,) against ``queries``."""

    @abc.abstractmethod
    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """(S, D) float32 copy of rows ``ids``."""

    @abc.abstractmethod
    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        """Rows ``ids`` (S,) distinct <- ``rows`` (S, D) float32, in place; any side copy (a
        low-precision prefilter) kept in step."""

    @abc.abstractmethod
    def export(self) -> np.ndarray:
        """(N, D) float32 host copy of every row (snapshots)."""

    @classmethod
    @abc.abstractmethod
    def nbytes(cls, rows: int, dim: int) -> int:
        """Memory a store of ``rows`` x ``dim`` takes, side copies included, checked against the
        server's limits before anything is allocated."""

    @classmethod
    def layout(cls) -> str:
        """What :meth:`nbytes` counts, in words, for a limit's error message."""
        return "float32"
