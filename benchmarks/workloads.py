"""The benchmark workloads (FGC's bank shapes) and the synthetic rows and queries they search.

Rows are the bank's own ``init="unit"`` rows for a seed, so an in-process bank, a server's bank and
the raw searches all hold the same numbers without sending gigabytes over the wire. Queries are
bank rows plus noise, renormalised: like FGC features, each is close to its own entry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from fgc_bank.bank import BankConfig

QUERY_NOISE = 0.3


@dataclass(frozen=True)
class Workload:
    """One bank shape and search size: ``rows`` x ``dim`` float32, top-``k`` of ``batch`` queries."""

    name: str
    rows: int
    dim: int
    k: int
    batch: int = 256

    @property
    def flops_per_query(self) -> float:
        """Multiply-adds of one exact query against every row, counted as 2 flops each."""
        return 2.0 * self.rows * self.dim

    @property
    def bank_bytes(self) -> int:
        return self.rows * self.dim * 4

    def resized(self, max_rows: int | None = None, batch: int | None = None) -> Workload:
        """This workload with at most ``max_rows`` rows (never below k) and another batch size."""
        rows = self.rows if max_rows is None else max(self.k, min(self.rows, max_rows))
        return replace(self, rows=rows, batch=batch or self.batch)

    def bank_config(self, seed: int) -> BankConfig:
        """The bank every method searches: FGC's unit-norm rows, momentum 0.5."""
        return BankConfig(name=f"bench-{self.name}", rows=self.rows, dim=self.dim, momentum=0.5,
                          init="unit", seed=seed)


WORKLOADS: dict[str, Workload] = {
    "cifar": Workload("cifar", 50_000, 64, 200),
    "imagenet-128": Workload("imagenet-128", 1_281_167, 128, 20),
    "imagenet-512": Workload("imagenet-512", 1_281_167, 512, 200),
}


def make_queries(lookup: Callable[[np.ndarray], np.ndarray], n_rows: int, batch: int, count: int,
                 seed: int) -> list[np.ndarray]:
    """``count`` batches of (batch, D) float32 queries near random bank rows.

    ``lookup(ids)`` returns rows ``ids``: indexing in process, ``gather`` from a server, so both
    sides build the same queries from the same seed.
    """
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        picks = np.asarray(lookup(rng.integers(0, n_rows, batch)), dtype=np.float32)
        noisy = picks + QUERY_NOISE * rng.standard_normal(picks.shape, dtype=np.float32)
        batches.append((noisy / np.linalg.norm(noisy, axis=1, keepdims=True)).astype(np.float32))
    return batches


def make_update_ids(rows: int, batch: int, count: int, seed: int) -> list[np.ndarray]:
    """``count`` sets of ``batch`` distinct row ids (int64), as a training step's batch indices."""
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(rows, size=min(batch, rows), replace=False)).astype(np.int64)
            for _ in range(count)]
