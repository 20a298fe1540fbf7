"""Exact inner-product top-k over a live float32 matrix: the one place the bank calls FAISS.

Rows change every step, so there is no index to build: each search is a brute-force FAISS call
on the current rows.
"""

from __future__ import annotations

import faiss
import numpy as np


def set_threads(threads: int) -> None:
    """Cap the OpenMP threads FAISS uses (0 leaves FAISS's default: one per core)."""
    if threads > 0:
        faiss.omp_set_num_threads(threads)


def search_inner_product(rows: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k rows by inner product with each query.

    Parameters
    ----------
    rows : (N, D) float32, C-contiguous; searched in place.
    queries : (B, D) float32.
    k : 1 <= k <= N.

    Returns
    -------
    scores : (B, k) float32, descending.
    ids : (B, k) int64 row ids.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    scores, ids = faiss.knn(queries, rows, k, metric=faiss.METRIC_INNER_PRODUCT)
    return scores, ids
