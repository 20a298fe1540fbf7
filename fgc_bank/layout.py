"""Where a service's banks live: one device or several, and which shard of every bank it holds.

A :class:`Layout` is a server's answer to ``--device`` and ``--shard``: with one device each bank
is one :class:`~fgc_bank.bank.MemoryBank`; with several (``--device cuda:0,cuda:1``) each bank
is a :class:`SplitBank`, the ids this server holds split over the devices, one part per device,
searched in parallel and merged with the shard merge (:func:`fgc_bank.shards.merge_topk`). A
bank split over devices answers exactly as one bank does, and snapshots the same rows.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fgc_bank.bank import BankConfig, MemoryBank, Op, OpResult, Update
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.results import KnnResult
from fgc_bank.shards import (
    SUMMED_COUNTERS,
    WHOLE,
    Shard,
    by_owner,
    merge_topk,
    merged_info,
    sample_ids,
    split,
)
from fgc_bank.stores import Placement


@dataclass(frozen=True)
class Layout:
    """The placement of each device's part of a bank (one or more) and the server's shard."""

    placements: tuple[Placement, ...] = field(default_factory=lambda: (Placement.resolve(),))
    shard: Shard = WHOLE

    @classmethod
    def resolve(cls, engine: str = "auto", devices: str = "cpu", shard: Shard = WHOLE) -> Layout:
        """``devices``: one device or several, comma-separated; BAD_ARGUMENT for an unusable one."""
        names = [d.strip() for d in devices.split(",")]
        placements = tuple(Placement.resolve(engine, d) for d in names)
        if len({p.device for p in placements}) != len(placements) and any(p.device != "cpu" for p in placements):
            raise BankError(ErrorCode.BAD_ARGUMENT, f"device list {devices!r} names a GPU twice")
        return cls(placements, shard)

    @property
    def placement(self) -> Placement:
        """The first device's placement (the only one, but on a multi-device server)."""
        return self.placements[0]

    @property
    def device(self) -> str:
        """The devices, comma-separated (as ``--device`` takes them)."""
        return ",".join(p.device for p in self.placements)

    def held(self, rows: int) -> tuple[int, int]:
        """The ids [lo, hi) of a bank of ``rows`` rows that this server holds."""
        return self.shard.range(rows)

    def nbytes(self, config: BankConfig) -> int:
        """Memory a bank takes here, over all devices."""
        lo, hi = self.held(config.rows)
        sizes = [b - a for a, b in split(hi - lo, len(self.placements))]
        return sum(p.store.nbytes(size, config.dim) for p, size in zip(self.placements, sizes))

    def check(self, config: BankConfig) -> None:
        """Refuse a bank too small to give every shard and device a row."""
        pieces = self.shard.count * len(self.placements)
        if isinstance(config.rows, int) and 0 < config.rows < pieces:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"bank {config.name!r} of {config.rows} rows cannot be split "
                            f"over {self.shard.count} shard(s) x {len(self.placements)} device(s): give it at "
                            f"least {pieces} rows")

    def make(self, config: BankConfig, rows: torch.Tensor | np.ndarray | None = None) -> MemoryBank | SplitBank:
        """A bank holding this server's ids of ``config`` (``rows``: those rows, else its init)."""
        lo, hi = self.held(config.rows)
        part = None if (lo, hi) == (0, config.rows) else (lo, hi)
        if len(self.placements) == 1:
            return MemoryBank(config, rows, self.placement, part)
        return SplitBank(config, self.placements, (lo, hi), rows)


class SplitBank:
    """A bank whose held ids [lo, hi) are split over several devices, one MemoryBank each;
    every op runs on all parts at once (threads: the devices work in parallel) and the answers
    are merged. Same methods as :class:`MemoryBank` where the service and snapshots use them."""

    def __init__(self, config: BankConfig, placements: Sequence[Placement], span: tuple[int, int],
                 rows: torch.Tensor | np.ndarray | None = None) -> None:
        self.config = config
        self.first, end = span
        self.size = end - self.first
        self.bounds = [(self.first + a, self.first + b) for a, b in split(self.size, len(placements))]
        if rows is not None:
            rows = torch.as_tensor(rows)
            if tuple(rows.shape) != (self.size, config.dim):
                raise BankError(ErrorCode.BANK_MISMATCH, f"rows of shape {tuple(rows.shape)} do not fit bank "
                                f"{config.name!r} ({self.size} x {config.dim} float32)")
        whole = (self.first, end) == (0, config.rows)
        self.parts = [MemoryBank(config, None if rows is None else rows[a - self.first:b - self.first], p,
                                 None if whole and len(placements) == 1 else (a, b))
                      for p, (a, b) in zip(placements, self.bounds)]
        self._pool = concurrent.futures.ThreadPoolExecutor(len(self.parts), thread_name_prefix=f"fgc-bank-{config.name}")

    @property
    def counters(self) -> dict[str, int]:
        """The bank's counters as one bank counts them."""
        merged = dict(self.parts[0].counters)
        for key in SUMMED_COUNTERS:
            merged[key] = sum(p.counters[key] for p in self.parts)
        return merged

    def load_counters(self, counters: dict[str, int]) -> None:
        """Counters from a snapshot (the summed ones are kept by the first part)."""
        for i, part in enumerate(self.parts):
            part.load_counters({k: (0 if i and k in SUMMED_COUNTERS else v) for k, v in counters.items()})

    def info(self) -> dict[str, Any]:
        return merged_info([p.info() for p in self.parts], (self.first, self.first + self.size))

    def nbytes(self) -> int:
        return sum(p.nbytes() for p in self.parts)

    def export(self) -> np.ndarray:
        return np.concatenate(list(self._pool.map(MemoryBank.export, self.parts)))

    def validate(self, op: Op) -> None:
        self.parts[0].validate(op, span=(self.first, self.first + self.size))

    def _owner(self, ids: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.array([b for _, b in self.bounds]), ids, side="right")

    def execute(self, ops: Sequence[Op]) -> list[OpResult | BankError]:
        """Each part runs ``ops`` (an update: its own rows of it); the answers merged."""
        per_part = [list(ops) for _ in self.parts]
        for j, op in enumerate(ops):
            if isinstance(op, Update):
                owner = self._owner(op.ids)
                for i in range(len(self.parts)):
                    per_part[i][j] = Update(op.ids[owner == i], op.values[owner == i], op.mode)
        results = list(self._pool.map(MemoryBank.execute, self.parts, per_part))
        merged: list[OpResult | BankError] = []
        for j, first in enumerate(results[0]):
            if isinstance(first, BankError) or first.knn is None:
                merged.append(first)
                continue
            k = first.knn.ids.shape[1]
            scores, ids = merge_topk([r[j].knn.scores for r in results], [r[j].knn.ids for r in results], k)
            merged.append(OpResult(KnnResult(scores, ids, first.version), first.version))
        return merged

    def gather(self, ids: np.ndarray) -> np.ndarray:
        self.parts[0]._check_held(ids, "ids", (self.first, self.first + self.size))
        owner = self._owner(ids)
        held = [i for i in range(len(self.parts)) if (owner == i).any()] or [0]
        return by_owner(owner, {i: self.parts[i].gather(ids[owner == i]) for i in held})

    def sample(self, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        ids = sample_ids(self.size, m, seed) + self.first
        return ids, self.gather(ids)
