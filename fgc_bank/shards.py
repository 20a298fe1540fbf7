"""One logical bank over several shards: which rows each shard owns, and the exact top-k merge.

Shard I of S owns the contiguous ids ``split(N, S)[I]`` of every bank of N rows (as even as
possible, the first ``N % S`` shards one row longer); ids on the wire stay global. A search runs on
every shard and :func:`merge_topk` keeps the best k of their answers: each shard's top-k holds
every row of its range that can be in the global top-k, so the merge is exact. The client
(``fgc_bank.sharded``) and a server holding several devices (``fgc_bank.service``) share this code.
No torch here: a client process stays light.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from fgc_bank.errors import BankError, ErrorCode

_SPEC = re.compile(r"(\d{1,6})/(\d{1,6})")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based); ``Shard(0, 1)`` is a whole, unsharded bank."""

    index: int = 0
    count: int = 1

    def __post_init__(self) -> None:
        if not (isinstance(self.count, int) and isinstance(self.index, int) and 0 <= self.index < self.count <= 65536):
            raise BankError(ErrorCode.BAD_ARGUMENT, f"shard {self.index}/{self.count}: need 0 <= I < S <= 65536")

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"I/S"`` (as ``--shard`` takes it) -> Shard(I, S)."""
        match = _SPEC.fullmatch(text.strip())
        if match is None:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"shard {text[:40]!r} is not of the form I/S (for example 0/4)")
        return cls(int(match.group(1)), int(match.group(2)))

    def range(self, rows: int) -> tuple[int, int]:
        """The ids [lo, hi) this shard owns in a bank of ``rows`` rows."""
        return split(rows, self.count)[self.index]

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


WHOLE = Shard()  # an unsharded server: shard 0 of 1
SUMMED_COUNTERS = ("rows_updated",)  # each part counts its own rows; every other counter counts each op once


def sample_ids(rows: int, m: int, seed: int) -> np.ndarray:
    """``m`` distinct ids of ``rows``, sorted, drawn from ``seed``: the draw of a bank's ``sample``,
    the same whether one server, a sharded client or a bank split over devices makes it."""
    if not 1 <= m <= rows:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"m must be in [1, {rows}], got {m}")
    if not 0 <= seed < 2**63:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"seed must be in [0, 2^63), got {seed}")
    return np.sort(np.random.default_rng(seed).choice(rows, size=m, replace=False)).astype(np.int64)


def merged_info(infos: list[dict[str, Any]], ids: tuple[int, int]) -> dict[str, Any]:
    """One bank's info from its parts' (shards' or devices'), in order: its config, its counters
    as one bank counts them, the ids [lo, hi) the parts hold together, and their devices."""
    merged = dict(infos[0])
    for key in SUMMED_COUNTERS:
        if key in merged:
            merged[key] = sum(info.get(key, 0) for info in infos)
    merged["ids"] = list(ids)
    merged["device"] = ",".join(str(info.get("device")) for info in infos)  # each part's, in order
    return merged


def split(rows: int, count: int) -> list[tuple[int, int]]:
    """[lo, hi) of each of ``count`` shards of ``rows`` ids, contiguous and as even as possible."""
    base, extra = divmod(rows, count)
    bounds = [0]
    for i in range(count):
        bounds.append(bounds[-1] + base + (1 if i < extra else 0))
    return list(itertools.pairwise(bounds))


def owners(ids: np.ndarray, rows: int, count: int) -> np.ndarray:
    """The shard owning each id (ids within [0, rows))."""
    highs = np.array([hi for _, hi in split(rows, count)], np.int64)
    return np.searchsorted(highs, ids, side="right")


def by_owner(owner: np.ndarray, parts: dict[int, np.ndarray]) -> np.ndarray:
    """Rows answered by their owners (``parts``: owner -> its rows, in the order of its ids) put
    back in the order of the ids they answer (``owner``: each id's owner)."""
    first = next(iter(parts.values()))
    out = np.empty((owner.shape[0], *first.shape[1:]), first.dtype)
    for index, rows in parts.items():
        out[owner == index] = rows
    return out


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int) -> tuple[np.ndarray, np.ndarray]:
    """The exact top-k of several shards' answers to the same B queries.

    Each shard's (B, k_s) float32 scores and int64 ids (below 2^31) hold its best rows; padding
    (a shard with fewer rows than k) is id -1 with score -inf and never wins while the bank has k
    rows to give. Equal scores are ordered by id, lowest first, whichever shard holds them (a cut
    through equal scores keeps the lowest ids). Each (score, id) becomes one int64 whose order is
    (descending score, ascending id): the float's bits made order-preserving above, the id
    below; a partition and a sort of those integers give the answer, no tie left to break.
    """
    keys = _sort_keys(np.concatenate(scores, axis=1), np.concatenate(ids, axis=1))
    if keys.shape[1] > k:
        keys = np.partition(keys, k - 1, axis=1)[:, :k]
    keys.sort(axis=1)
    ordered = (keys >> 32).astype(np.int32)
    negated = (ordered ^ ((ordered >> 31) & 0x7FFFFFFF)).view(np.float32)
    return np.negative(negated), (keys & 0xFFFFFFFF) - 1


def _sort_keys(scores: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """int64 keys ascending in (-score, id): -score's float32 bits with the magnitude bits of
    negative numbers flipped (an int32 ordered as the floats are), shifted above id + 1."""
    bits = np.negative(scores, dtype=np.float32).view(np.int32)
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    return (ordered.astype(np.int64) << 32) | (ids + 1)
