"""What a search answers, as the client, the in-process bank and the bank itself return it.

Kept apart from the bank so that a client-only process imports neither torch nor FAISS.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class KnnResult:
    """Top-k answers: ``scores`` (B, k) float32, descending; ``ids`` (B, k) int64; numpy, or
    torch tensors where the request's were (in process, and as a handle gives them back).

    Unpacks as FAISS's ``(D, I)``: ``scores, ids = bank.knn(name, queries, k)``.

    ``version`` is the bank's update count after the op: for ``knn`` the updates its search saw,
    for ``knn_update`` including its own. Replaying acknowledged updates in version order
    reproduces the bank exactly.
    """

    scores: np.ndarray
    ids: np.ndarray
    version: int = 0

    def __iter__(self) -> Iterator[np.ndarray]:
        yield self.scores
        yield self.ids
