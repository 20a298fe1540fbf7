"""The memory bank: N x D float32 rows, FGC's momentum update, exact inner-product kNN.

This is the one implementation of the bank. The in-process bank and the server both call
:meth:`MemoryBank.execute`; trainers that keep a bank of their own (the replicated gate bank) call
:func:`momentum_update_`. :func:`momentum_rows` is the one place the update rule lives.

A bank is the coordination (validation, its lock, its version, the update rule, the coalesced
execution of queued ops and its exactness replay); its rows and their search live in a row store
(``fgc_bank.stores``: on the CPU, or a torch tensor on any device), updated where they are, never
by rebuilding an index. Work between the bank and its store is done in torch on the store's
device. Requests' arrays are numpy (a server's received frames) or torch tensors (an in-process
caller's, on any device); every check runs on them where they are, and answers come back as the
request came: numpy on the host, or tensors on the store's device (never through the host).
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from fgc_bank.errors import BankError, ErrorCode, quote
from fgc_bank.results import KnnResult
from fgc_bank.shards import sample_ids
from fgc_bank.stores import Placement, RowStore
from fgc_bank.stores.cpu.prefilter import norm_bounds
from fgc_bank.stores.torch_store import norm_bounds as tensor_norm_bounds

logger = logging.getLogger(__name__)

INITS = ("uniform", "unit")
UPDATE_MODES = ("momentum", "overwrite")
MAX_K = 2048  # the largest k a search answers: FAISS's GPU search stops here, so a bank on a GPU can too
MAX_NORM = 2.0**63  # rows and queries have smaller norms, so every score |q.r| <= |q||r| < 2^126 is finite

Array = np.ndarray | torch.Tensor  # a request's array: numpy (from the wire) or a torch tensor (in process)


@torch.no_grad()
def momentum_rows(old: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """FGC's bank update rule: ``normalize(m * old + (1 - m) * values)``, a new tensor.

    Every row returned has norm 1 (within rounding) for every finite input, from denormals to the
    dtype's largest values. A mixed row that is exactly zero has no direction: it keeps its old
    value. On a GPU the check for the rare rows that need care costs one synchronisation.

    Parameters
    ----------
    old : (B, D) float tensor, the rows' current values (not modified).
    values : (B, D) tensor, the new features (or gate logits), not normalised; finite.
    momentum : m in [0, 1]; 0 takes the normalised values.
    """
    values = values.to(old.dtype)
    mixed = old.mul(momentum).add_(values, alpha=1.0 - momentum)
    norms = mixed.norm(dim=1, keepdim=True)
    if _norms_are_safe(norms):
        return mixed.div_(norms)
    return _unit_mix(old, values, momentum)  # a norm that over- or underflowed, or a zero mix


@torch.no_grad()
def momentum_update_(rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor, momentum: float) -> None:
    """:func:`momentum_rows` applied in place to rows ``ids`` (distinct) of an (N, D) tensor."""
    rows.index_copy_(0, ids, momentum_rows(rows.index_select(0, ids), values, momentum))


def _norms_are_safe(norms: torch.Tensor) -> bool:
    """Whether every norm is finite and so far above the dtype's smallest normal number that
    squares lost below it (at most D of them, each under ``tiny``) cannot move it by a rounding:
    then dividing by it normalises. True for ordinary batches: the hot path's only extra cost."""
    if norms.numel() == 0:
        return True
    info = torch.finfo(norms.dtype)
    low, high = torch.aminmax(norms)
    return info.tiny ** 0.25 <= low.item() and high.item() <= info.max


def _unit_mix(old: torch.Tensor, values: torch.Tensor, momentum: float) -> torch.Tensor:
    """``normalize(m * old + (1 - m) * values)`` for any finite rows, computed in float64 (where
    float32 inputs make no denormals, which CPUs handle far slower). Each pair is divided by its
    largest magnitude before mixing, so the mix cannot overflow, and the mix by its own largest
    before its norm, so its squares cannot all underflow (the largest is 1): this holds for
    float64 rows too. Rows whose mix is zero keep ``old``."""
    tiny = torch.finfo(torch.float64).tiny
    top = torch.maximum(old.abs().amax(1, keepdim=True), values.abs().amax(1, keepdim=True)).double().clamp_min_(tiny)
    mixed = values.to(torch.float64, copy=True).div_(top).mul_(1.0 - momentum)  # copies: never the caller's
    mixed.add_(old.to(torch.float64, copy=True).div_(top), alpha=momentum)
    peak = mixed.abs().amax(1, keepdim=True)
    mixed.div_(peak.clamp_min(tiny))
    unit = mixed.div_(mixed.norm(dim=1, keepdim=True)).to(old.dtype)
    zero = peak.flatten() == 0
    unit[zero] = old[zero]
    return unit


def initial_rows(rows: int, dim: int, init: str = "uniform", seed: int = 0,
                 part: tuple[int, int] | None = None) -> torch.Tensor:
    """A bank's first rows, from a seeded generator: ``uniform`` is FGC's U[-s, s] with
    s = 1/sqrt(dim/3) (feature and gate banks alike); ``unit`` is random unit rows (normal
    directions, drawn from uniforms by Box-Muller).

    ``part`` = (lo, hi): only rows [lo, hi), equal to those rows of the whole bank, so the shards
    of a bank start as the bank would. Uniform draws are consumed one per value whatever the
    batch size (normal ones are not), so the rows are drawn in chunks, those before ``lo``
    dropped, and no temporary is larger than a chunk.
    """
    lo, hi = (0, rows) if part is None else part
    gen = torch.Generator().manual_seed(seed)
    out = torch.empty(hi - lo, dim)
    width = dim if init == "uniform" else 2 * dim
    for start, u in _uniform_chunks(gen, lo, hi, width):
        target = out[start - lo:start - lo + u.shape[0]]
        if init == "uniform":
            bound = 1.0 / math.sqrt(dim / 3.0)
            target.copy_(u.mul_(2 * bound).sub_(bound))
        else:
            radius = torch.log1p(-u[:, :dim]).mul_(-2.0).sqrt_()  # 1 - u is in (0, 1]: no log(0)
            values = radius.mul_(torch.cos(u[:, dim:].mul_(2 * math.pi)))
            target.copy_(values.div_(values.norm(dim=1, keepdim=True).clamp_min_(1e-12)))
    return out


def _uniform_chunks(gen: torch.Generator, lo: int, hi: int, width: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Rows [lo, hi) of the U[0, 1) stream ``gen`` draws ``width`` values a row from, in chunks
    (first row, chunk); the rows before ``lo`` are drawn into one reused buffer and dropped."""
    chunk = max(1, (1 << 22) // width)
    buffer = torch.empty(chunk, width)
    for start in range(0, hi, chunk):
        n = min(chunk, hi - start)
        torch.rand(n, width, generator=gen, out=buffer[:n])
        if start + n > lo:
            keep = max(lo - start, 0)
            yield start + keep, buffer[keep:n]


@dataclass(frozen=True)
class BankConfig:
    """What defines a bank. Stored in snapshots and answered by ``info``."""

    name: str
    rows: int
    dim: int
    momentum: float = 0.5
    init: str = "uniform"
    seed: int = 0
    dtype: str = "float32"

    def validate(self, max_bytes: int, store: type[RowStore] | None = None, held: int | None = None) -> None:
        """Reject configs a server must not build (in ``store``, holding ``held`` of the rows:
        all by default), before allocating anything."""
        if not 1 <= self.rows <= 2**31 - 1:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"rows must be in [1, 2^31), got {self.rows}")
        if not 1 <= self.dim <= 65536:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"dim must be in [1, 65536], got {self.dim}")
        if not (isinstance(self.momentum, (int, float)) and 0.0 <= self.momentum < 1.0):
            raise BankError(ErrorCode.BAD_ARGUMENT, f"momentum must be in [0, 1), got {self.momentum}")
        if self.init not in INITS:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"init must be one of {INITS}, got {quote(self.init)}")
        if self.dtype != "float32":
            raise BankError(ErrorCode.BAD_ARGUMENT, f"dtype {quote(self.dtype)} is not supported; use float32")
        if not 0 <= self.seed < 2**63:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"seed must be in [0, 2^63), got {self.seed}")
        size = self.nbytes(store, held)
        if size > max_bytes:
            raise BankError(ErrorCode.TOO_LARGE, f"bank {self.name!r} would take {size / 2**30:.2f} GiB "
                            f"({held or self.rows} x {self.dim} {(store or Placement.resolve().store).layout()}); "
                            f"this server's limit is {max_bytes / 2**30:.2f} GiB")

    def nbytes(self, store: type[RowStore] | None = None, held: int | None = None) -> int:
        """Memory the bank's rows (``held`` of them: all by default) take in ``store`` (the CPU
        store by default): float32, plus the low-precision copy a store searches with."""
        return (store or Placement.resolve().store).nbytes(held or self.rows, self.dim)


def _count(values: Array) -> int:
    """Elements of a numpy array or a tensor (``size`` is a method on tensors)."""
    return math.prod(values.shape)


def _extremes(values: Array) -> tuple[Any, Any]:
    """(min, max) of a non-empty numpy array or tensor as Python numbers, NaN passed on (a
    tensor's two read back together: one wait on a GPU)."""
    if isinstance(values, np.ndarray):
        return values.min().item(), values.max().item()
    low, high = torch.stack(torch.aminmax(values)).tolist()
    return low, high


def _distinct(ids: Array) -> bool:
    """Whether no id repeats."""
    unique = np.unique(ids).size if isinstance(ids, np.ndarray) else torch.unique(ids).numel()
    return unique == _count(ids)


_FLOAT32 = (np.dtype(np.float32), torch.float32)


def _dtype_name(values: Array) -> str:
    """``float32``, ``int64``, ... for numpy and torch alike (as numpy prints its dtypes)."""
    return str(values.dtype).removeprefix("torch.")


def _largest_norm(values: Array) -> float:
    """An upper bound of the largest row norm, in float64 chunks (no float64 copy of the whole)."""
    step = max(1, (1 << 22) // values.shape[1])
    bounds = norm_bounds if isinstance(values, np.ndarray) else tensor_norm_bounds
    return max(float(bounds(values[i:i + step]).max()) for i in range(0, len(values), step))


def _check_values(values: Array, what: str, scored: bool) -> None:
    """Refuse NaN and Inf, and, where ``scored``, rows of norm ``MAX_NORM`` or more. min and max
    make no temporary the size of ``values`` (a restored bank's rows) and pass NaN on; the exact
    norms are only computed when the largest magnitude says one could be that large."""
    if _count(values) == 0:
        return
    low, high = (float(x) for x in _extremes(values))
    if not (math.isfinite(low) and math.isfinite(high)):
        raise BankError(ErrorCode.NOT_FINITE, f"{what} contains NaN or Inf")
    if scored and max(-low, high) * math.sqrt(values.shape[1]) >= MAX_NORM:
        largest = _largest_norm(values)
        if largest >= MAX_NORM:
            raise BankError(ErrorCode.NOT_FINITE, f"{what} has a row of norm {largest:.3g}: norms must be below "
                            f"2^63 (~9.2e18), or float32 scores could overflow")


@dataclass(frozen=True)
class Search:
    """kNN of ``queries`` (B, D) float32; ``exclude`` (B,) int64 drops one id per query (-1: none)."""

    queries: Array
    k: int
    exclude: Array | None = None


@dataclass(frozen=True)
class Update:
    """Write ``values`` (B, D) into rows ``ids`` (B,), by momentum or overwrite."""

    ids: Array
    values: Array
    mode: str = "momentum"


@dataclass(frozen=True)
class SearchUpdate:
    """FGC's fused step: search with the rows as they were (own id excluded), then update ``ids``.
    With a ``step`` (a training step, >= 0) it is step-consistent: see :class:`MemoryBank`."""

    ids: Array
    features: Array
    k: int
    step: int | None = None


Op = Search | Update | SearchUpdate


@dataclass(frozen=True)
class OpResult:
    """What one op of :meth:`MemoryBank.execute` produced: a kNN answer (searches) and the
    bank's version after the op."""

    knn: KnnResult | None
    version: int


class MemoryBank:
    """N x D float32 rows with a momentum update and exact inner-product search.

    The rows live in a row store (``placement``: an engine on a device, see
    :class:`fgc_bank.stores.Placement`): by default the CPU store, which on CPUs with int8 or bfloat16 dot products also keeps a
    low-precision copy of its rows that its search uses to find candidates before it ranks them
    in float32.

    Step-consistent ``knn_update`` (``SearchUpdate.step = t``): every request tagged with step t
    searches the bank as it was at the end of step t-1, whatever order the requests (from any
    number of ranks) arrive in, and their updates wait, one step's worth, until the step closes:
    when a request of a later step or an untagged op arrives, or a snapshot is taken. They are
    then applied in a fixed order (by row id; a row written twice in the step by its values'
    bits), so the bank after step t is the same bit for bit however the requests interleaved. A
    request for a step already closed is refused with ``step_closed``: it could no longer be
    answered exactly. Untagged ops behave as always.

    Numbers: rows and queries are finite, and every row or query that is scored (rows given to
    the constructor or written by ``overwrite``, queries and ``knn_update`` features) has a norm
    below ``MAX_NORM`` = 2^63, so no float32 score overflows; others are refused with
    ``not_finite``. Momentum updates take any finite values: they write unit rows. Scores below
    float32's normal range (tiny rows against tiny queries) are as float32 computes them.
    """

    def __init__(self, config: BankConfig, rows: torch.Tensor | np.ndarray | None = None,
                 placement: Placement | None = None, part: tuple[int, int] | None = None) -> None:
        self.config = config
        self.first, end = (0, config.rows) if part is None else part  # the ids this bank holds: a shard's
        if not 0 <= self.first < end <= config.rows:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"rows [{self.first}, {end}) are not a part of bank "
                            f"{config.name!r} of {config.rows} rows")
        self.size = end - self.first
        initial = initial_rows(config.rows, config.dim, config.init, config.seed, (self.first, end)) \
            if rows is None else torch.as_tensor(rows)
        if tuple(initial.shape) != (self.size, config.dim) or initial.dtype != torch.float32:
            raise BankError(ErrorCode.BANK_MISMATCH, f"rows of shape {tuple(initial.shape)} do not fit bank "
                            f"{config.name!r} ({self.size} x {config.dim} float32{self._held_ids()})")
        if rows is not None:  # a restore's rows are checked like any written ones
            _check_values(initial.detach().cpu().numpy(), "rows", scored=True)
        self.store = (placement or Placement.resolve()).make(initial)
        self.counters = {"updates": 0, "rows_updated": 0, "searches": 0, "queries": 0,
                         "coalesced_calls": 0, "closed_step": -1}
        self.lock = threading.Lock()
        self._step: int | None = None  # the open training step, whose updates wait in _pending
        self._pending: list[tuple[torch.Tensor, torch.Tensor]] = []  # (ids, features) of its requests, on the device
        self._copying = False  # a GPU-to-host copy of an answer was started: _landed waits for it

    def info(self) -> dict:
        """Config, counters, the ids held ([lo, hi): all of them but on a shard), and where the
        rows live and what searches them (``info``, ``stats``)."""
        return {**asdict(self.config), **self.counters, "ids": [self.first, self.first + self.size],
                "device": str(self.store.device), "engine": self.store.engine}

    @property
    def partial(self) -> bool:
        """Whether this bank holds only some of its ids (a shard of it)."""
        return self.size != self.config.rows

    def load_counters(self, counters: dict[str, int]) -> None:
        """Counters from a snapshot."""
        self.counters.update(counters)

    def nbytes(self) -> int:
        """Memory the rows held take in this bank's store."""
        return type(self.store).nbytes(self.size, self.config.dim)

    def _held_ids(self) -> str:
        return f", ids {self.first}..{self.first + self.size - 1} of {self.config.rows}" if self.partial else ""

    def export(self) -> np.ndarray:
        """(N, D) float32 host copy of the rows held (snapshots), taken under the lock; an open
        training step is closed first, so its updates are in it."""
        with self.lock:
            self._close_step()
            return self.store.export()

    def _tensor(self, array: Array, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A request's array as a tensor (of ``dtype``: as it is by default) on the store's device.
        A tensor is moved or cast only where it differs. Numpy, CPU store: no copy for a writable
        array (a received frame is read-only: copied once). GPU: copied into a pinned host buffer
        (torch's caching host allocator reuses them) and sent with one asynchronous copy."""
        if isinstance(array, torch.Tensor):
            return array.to(self.store.device, dtype or array.dtype)
        if dtype is not None:
            array = np.asarray(array, _NUMPY_DTYPES[dtype])
        if self.store.device.type == "cpu":
            array = np.ascontiguousarray(array)  # a caller's view may be strided (ids[::-1])
            return torch.from_numpy(array if array.flags.writeable else array.copy())
        pinned = torch.empty(array.shape, dtype=_TORCH_DTYPES[array.dtype], pin_memory=True)
        pinned.numpy()[...] = array
        return pinned.to(self.store.device, non_blocking=True)

    def _owned(self, array: Array, dtype: torch.dtype) -> torch.Tensor:
        """A copy of a request's array on the store's device that its sender can no longer
        change (a held update outlives the request: frames are reused, tensors written)."""
        if isinstance(array, torch.Tensor):
            return array.to(self.store.device, dtype, copy=True)
        return self._tensor(np.array(array, _NUMPY_DTYPES[dtype]))  # writable: the CPU store takes it as it is

    def _answer(self, like: Array, tensor: torch.Tensor) -> Array:
        """A result as the request came (``like`` one of its arrays): a tensor stays a tensor on
        the store's device; numpy gets :meth:`_host`'s copy."""
        return tensor if isinstance(like, torch.Tensor) else self._host(tensor)

    def _host(self, tensor: torch.Tensor) -> np.ndarray:
        """A result as numpy on the host: no copy from a CPU store; from a GPU, one asynchronous
        copy into pinned memory, readable once :meth:`_landed` has run."""
        if tensor.device.type == "cpu":
            return tensor.detach().contiguous().numpy()
        pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
        pinned.copy_(tensor, non_blocking=True)
        self._copying = True
        return pinned.numpy()

    def _landed(self) -> None:
        """Wait for the copies :meth:`_host` started (a GPU store's numpy answers only: tensor
        answers are left to the stream, in order with the caller's work)."""
        if self._copying:
            self._copying = False
            torch.cuda.current_stream(self.store.device).synchronize()  # SYNC: the answers are read next

    # -- validation: everything that crosses a socket is checked before it touches the rows ------

    def _check_ids(self, ids: Array, what: str, allow_negative: bool = False) -> None:
        if ids.ndim != 1:
            raise BankError(ErrorCode.BAD_SHAPE, f"{what} must be 1-D, got shape {list(ids.shape)}")
        if _count(ids) == 0:
            return
        low, high = (int(x) for x in _extremes(ids))
        if (low < (-1 if allow_negative else 0)) or high >= self.config.rows:
            bad = low if low < 0 else high
            raise BankError(ErrorCode.ID_OUT_OF_RANGE, f"{what} contains id {bad}; bank "
                            f"{self.config.name!r} has rows 0..{self.config.rows - 1}")

    def _check_held(self, ids: Array, what: str, span: tuple[int, int] | None = None) -> None:
        """Ids written or read here must be held here (``span``, by default this bank's ids: a
        shard holds a range of them)."""
        self._check_ids(ids, what)
        lo, hi = span or (self.first, self.first + self.size)
        if (lo, hi) != (0, self.config.rows) and _count(ids):
            low, high = (int(x) for x in _extremes(ids))
            if low < lo or high >= hi:
                raise BankError(ErrorCode.ID_OUT_OF_RANGE, f"{what} contains id {low if low < lo else high}; "
                                f"this shard of bank {self.config.name!r} holds ids {lo}..{hi - 1} "
                                "(send each id to the shard that holds it)")

    def _local(self, ids: Array) -> Array:
        """Held ids (global) -> row positions in the store."""
        return ids - self.first if self.first else ids

    def _held_part(self, ids: Array, values: Array) -> tuple[Array, Array]:
        """Of a step's ids (global) and their values, those held here, as row positions."""
        if not self.partial:
            return ids, values
        held = (ids >= self.first) & (ids < self.first + self.size)
        return ids[held] - self.first, values[held]

    def _local_exclude(self, exclude: torch.Tensor) -> torch.Tensor:
        """Ids to exclude (global; -1: none) -> row positions, -2 where the id is not held here."""
        if not self.partial:
            return exclude
        held = (exclude >= self.first) & (exclude < self.first + self.size)
        return torch.where(held, exclude - self.first, -2)

    def _check_rows(self, rows: Array, what: str, count: int | None, scored: bool = True) -> None:
        if rows.ndim != 2 or rows.shape[1] != self.config.dim:
            raise BankError(ErrorCode.BAD_SHAPE, f"{what} must be (B, {self.config.dim}) for bank "
                            f"{self.config.name!r}, got shape {list(rows.shape)}")
        if count is not None and rows.shape[0] != count:
            raise BankError(ErrorCode.BAD_SHAPE, f"{what} has {rows.shape[0]} rows but {count} ids were given")
        if rows.dtype not in _FLOAT32:  # numpy's str(dtype) runs Python: only for the message
            raise BankError(ErrorCode.BAD_DTYPE, f"{what} must be float32, got {_dtype_name(rows)}")
        _check_values(rows, what, scored)

    def _check_k(self, k: int, excluding: bool) -> None:
        rows = self.config.rows - (1 if excluding else 0)
        limit = min(rows, MAX_K)
        if not isinstance(k, int) or not 1 <= k <= limit:
            why = f"{MAX_K} is the largest k a bank answers" if rows > MAX_K else \
                f"{self.config.rows} rows{', own id excluded' if excluding else ''}"
            raise BankError(ErrorCode.BAD_K, f"k must be in [1, {limit}] for bank {self.config.name!r} ({why}), got {k}")

    @staticmethod
    def _check_some(count: int, what: str) -> None:
        if count == 0:
            raise BankError(ErrorCode.BAD_SHAPE, f"a search needs at least one query; {what} has none")

    def _check_distinct(self, ids: Array) -> None:
        if _count(ids) > 1 and not _distinct(ids):
            raise BankError(ErrorCode.DUPLICATE_IDS, "ids of one update must be distinct "
                            "(a repeated id would make the update depend on order)")

    def validate(self, op: Op, span: tuple[int, int] | None = None) -> None:
        """Raise BankError if ``op`` is malformed for this bank (for a bank holding ids ``span``:
        this one's by default); the rows are never touched."""
        if isinstance(op, Search):
            self._check_rows(op.queries, "queries", None)
            self._check_some(op.queries.shape[0], "queries")
            if op.exclude is not None:
                self._check_ids(op.exclude, "exclude", allow_negative=True)
                if op.exclude.shape[0] != op.queries.shape[0]:
                    raise BankError(ErrorCode.BAD_SHAPE, f"exclude has {op.exclude.shape[0]} ids "
                                    f"for {op.queries.shape[0]} queries")
            self._check_k(op.k, op.exclude is not None)
        elif isinstance(op, Update):
            if op.mode not in UPDATE_MODES:
                raise BankError(ErrorCode.BAD_ARGUMENT, f"update mode must be one of {UPDATE_MODES}, got {quote(op.mode)}")
            self._check_held(op.ids, "ids", span)
            self._check_rows(op.values, "rows", op.ids.shape[0], scored=op.mode == "overwrite")
            self._check_distinct(op.ids)
        elif isinstance(op, SearchUpdate):
            self._check_ids(op.ids, "ids")
            self._check_some(op.ids.shape[0], "ids")
            self._check_rows(op.features, "features", op.ids.shape[0])
            self._check_distinct(op.ids)
            self._check_k(op.k, True)
            if op.step is not None and not (isinstance(op.step, int) and 0 <= op.step < 2**63):
                raise BankError(ErrorCode.BAD_ARGUMENT, f"step must be in [0, 2^63), got {quote(op.step)}")
        else:
            raise BankError(ErrorCode.INTERNAL, f"unknown bank op {type(op).__name__}")

    # -- operations ---------------------------------------------------------------------------

    def gather(self, ids: Array) -> Array:
        """Rows ``ids`` (B,) -> (B, D) float32 copy (numpy, or a tensor on the store's device for
        tensor ids)."""
        self._check_held(ids, "ids")
        with self.lock:
            self._close_step()
            rows = self._answer(ids, self.store.read(self._local(self._tensor(ids, torch.int64))))
            self._landed()
            return rows

    def sample(self, m: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """``m`` distinct random ids (sorted) and their rows, reproducible from ``seed``; a shard
        draws among the ids it holds (a sharded client draws among all and gathers)."""
        local = sample_ids(self.size, m, seed)
        ids = local + self.first
        with self.lock:
            self._close_step()
            rows = self._host(self.store.read(self._tensor(local)))
            self._landed()
            return ids, rows

    def execute(self, ops: Sequence[Op]) -> list[OpResult | BankError]:
        """Apply ``ops`` in order, as if one at a time, with all their searches in one store search;
        an op refused by the step rules (see the class) gets its BankError in its place.

        Each op must have passed :meth:`validate`. Searches are run together against the rows as
        they are before the first op, ``depth`` deep; an op that follows updates in the same batch
        then swaps the stale scores of the rows those updates changed for fresh ones. That answer
        is exact whenever at least k unchanged candidates remain, and a query for which fewer do
        is searched again on its own (rare: changed rows are a tiny fraction of the bank).
        """
        with self.lock:
            plan = self._step_plan(ops)
            if plan and plan[0] == "close":  # before the search, which then sees the closed step
                self._close_step()
                plan[0] = "open" if isinstance(ops[0], SearchUpdate) and ops[0].step is not None else None
            searches = [op for op, how in zip(ops, plan) if not isinstance(op, Update) and how not in ("refuse", "full")]
            if not searches:
                return self._replay(ops, plan, None, None, None)
            changes = sum(op.ids.shape[0] for op in ops[:-1] if not isinstance(op, Search))
            changes += sum(p[0].shape[0] for p in self._pending) if "close" in plan else 0
            depth = self._depth(searches, changes)
            queries = self._batch([self._queries(op) for op in searches])
            scores, ids = self._search(queries, depth)
            self.counters["searches"] += len(searches)
            self.counters["queries"] += queries.shape[0]
            self.counters["coalesced_calls"] += 1
            return self._replay(ops, plan, queries, scores, ids)

    def _step_plan(self, ops: Sequence[Op]) -> list[str | None]:
        """What each op does to the training step, in order: "open" one, "close" the open one
        first (and open its own, for a tagged op), "refuse" (its step is closed), "full" (its
        step already holds a bank's worth of rows: held updates stay within one step's worth),
        or None."""
        step, closed, plan = self._step, self.counters["closed_step"], []
        held = sum(p[0].shape[0] for p in self._pending)
        for op in ops:
            tagged = op.step if isinstance(op, SearchUpdate) else None
            how = None
            if tagged is not None and (tagged <= closed or (step is not None and tagged < step)):
                how = "refuse"
            elif tagged is not None and step is None:
                how, step, held = "open", tagged, 0
            elif step is not None and tagged != step:  # an untagged op, or a later step
                how, closed, step, held = "close", step, tagged, 0
            if tagged is not None and how is None and held + op.ids.shape[0] > self.config.rows:
                how = "full"
            elif tagged is not None and how != "refuse":
                held += op.ids.shape[0]
            plan.append(how)
        return plan

    def _close_step(self) -> torch.Tensor | None:
        """Apply the open step's updates in their fixed order; the ids written (None if none).
        Done on the store's device: the held requests are already there."""
        if self._step is None:
            return None
        self.counters["closed_step"], self._step = self._step, None
        pending, self._pending = self._pending, []
        if not pending:
            return None
        ids = torch.cat([p[0] for p in pending])  # (S,) int64 row positions
        values = torch.cat([p[1] for p in pending])  # (S, D) float32
        if not len(ids):  # a shard that holds none of the step's ids
            return None
        order = torch.argsort(ids, stable=True)
        if bool((ids[order].diff() == 0).any()):  # a row written twice: by its values' bits, not by arrival
            order = _by_id_then_bits(ids, values)
        ids, values = ids[order], values[order]
        occurrence = torch.arange(len(ids), device=ids.device) - torch.searchsorted(ids, ids)  # 0: a row's first write
        written = [self._apply_update(ids[occurrence == r], values[occurrence == r], "momentum")
                   for r in range(int(occurrence.max()) + 1)]
        return torch.unique(torch.cat(written))

    @staticmethod
    def _queries(op: Search | SearchUpdate) -> Array:
        return op.queries if isinstance(op, Search) else op.features

    def _batch(self, queries: list[Array]) -> torch.Tensor:
        """The searches' queries (B, D) as one tensor on the store's device; numpy ones are
        joined on the host first, so that they cross to a GPU in one copy."""
        if len(queries) == 1:
            return self._tensor(queries[0])
        if all(isinstance(q, np.ndarray) for q in queries):
            return self._tensor(np.concatenate(queries))
        return torch.cat([self._tensor(q) for q in queries])

    def _depth(self, searches: list[Search | SearchUpdate], changes: int) -> int:
        base = max(op.k + (0 if isinstance(op, Search) and op.exclude is None else 1) for op in searches)
        if changes:  # room for the changed rows expected among each query's candidates
            base += 8 + math.ceil(4 * base * changes / self.size)
        return min(base, self.config.rows)

    def _search(self, queries: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The store's top-``depth``; a shard holding fewer rows pads with score -inf, id -1."""
        scores, ids = self.store.search(queries, min(depth, self.size))
        if depth > self.size:
            pad = (0, depth - self.size)
            scores = torch.nn.functional.pad(scores, pad, value=float("-inf"))
            ids = torch.nn.functional.pad(ids, pad, value=-1)
        return scores, ids

    def _replay(self, ops: Sequence[Op], plan: list[str | None], queries: torch.Tensor | None,
                scores: torch.Tensor | None, ids: torch.Tensor | None) -> list[OpResult | BankError]:
        results: list[OpResult | BankError] = []
        changed: list[torch.Tensor] = []
        offset = 0
        for op, how in zip(ops, plan):
            if how == "refuse":
                results.append(BankError(ErrorCode.STEP_CLOSED, f"step {op.step} of bank {self.config.name!r} "
                                         f"is closed (the bank is at step {self._open_or_closed()}); its "
                                         "answer could no longer be exact"))
                continue
            if how == "full":
                results.append(BankError(ErrorCode.TOO_LARGE, f"step {op.step} of bank {self.config.name!r} "
                                         f"already holds {self.config.rows} rows of updates, a bank's worth"))
                continue
            if how == "close":
                closed = self._close_step()
                if closed is not None:
                    changed.append(closed)
            if how in ("open", "close") and isinstance(op, SearchUpdate) and op.step is not None:
                self._step = op.step
            if isinstance(op, Update):
                changed.append(self._apply_update(self._local(op.ids), op.values, op.mode))
                results.append(OpResult(None, self.counters["updates"]))
                continue
            rows = slice(offset, offset + self._queries(op).shape[0])
            offset = rows.stop
            exclude = op.ids if isinstance(op, SearchUpdate) else op.exclude
            exclude = None if exclude is None else self._local_exclude(self._tensor(exclude, torch.int64))
            stale = torch.unique(torch.cat(changed)) if changed else None
            top_scores, top_ids = self._finish(queries[rows], scores[rows], ids[rows], op.k, exclude, stale)
            if self.first:  # row positions -> the bank's ids (padding stays -1)
                top_ids = torch.where(top_ids >= 0, top_ids + self.first, top_ids)
            if isinstance(op, SearchUpdate) and op.step is not None:
                self._hold(op)
            elif isinstance(op, SearchUpdate):
                changed.append(self._apply_update(*self._held_part(op.ids, op.features), "momentum"))
            version = self.counters["updates"]
            like = self._queries(op)
            results.append(OpResult(KnnResult(self._answer(like, top_scores), self._answer(like, top_ids), version), version))
        self._landed()
        return results

    def _hold(self, op: SearchUpdate) -> None:
        """Keep a tagged request's update for when its step closes, copied to the device."""
        ids, features = self._held_part(op.ids, op.features)
        self._pending.append((self._owned(ids, torch.int64), self._owned(features, torch.float32)))

    def _open_or_closed(self) -> int:
        return self.counters["closed_step"] if self._step is None else self._step

    def _finish(self, queries: torch.Tensor, scores: torch.Tensor, ids: torch.Tensor, k: int,
                exclude: torch.Tensor | None, stale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Cut candidates (B, depth) to the top-k, dropping excluded ids and refreshing stale rows."""
        if stale is None and exclude is None:
            return scores[:, :k], ids[:, :k]
        if stale is None:  # candidates are sorted: skip each query's own id where it appears
            own = ids == exclude[:, None]  # (B, depth)
            at = torch.where(own.any(1), own.to(torch.uint8).argmax(1), ids.shape[1])  # (B,)
            take = torch.arange(k, device=ids.device)[None, :]
            take = take + (take >= at[:, None])  # (B, k)
            return scores.gather(1, take), ids.gather(1, take)
        # stale rows: their scores in the candidates are old, so swap them for current ones
        keep = ~torch.isin(ids, stale)
        if exclude is not None:
            keep &= ids != exclude[:, None]
        short = None
        if ids.shape[1] < self.size:  # too few unchanged candidates: the merge could miss one
            short = keep.sum(1) < k  # (B,)
        fresh = self.store.score(queries, stale)  # (B, S): current scores of the changed rows
        fresh_keep = torch.ones_like(fresh, dtype=torch.bool) if exclude is None else stale[None, :] != exclude[:, None]
        scores = torch.cat([scores, fresh], dim=1)
        ids = torch.cat([ids, stale.expand(fresh.shape[0], -1)], dim=1)
        masked = scores.masked_fill(~torch.cat([keep, fresh_keep], dim=1), float("-inf"))
        top_scores, order = torch.sort(masked, dim=1, descending=True, stable=True)
        top_scores, top_ids = top_scores[:, :k].contiguous(), ids.gather(1, order[:, :k])
        for i in ([] if short is None else short.nonzero().flatten().tolist()):  # a host sync, rarely taken
            top_scores[i], top_ids[i] = self._search_one(queries[i], k, None if exclude is None else exclude[i])
        return top_scores, top_ids

    def _search_one(self, query: torch.Tensor, k: int, exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        scores, ids = self._search(query[None], k + 1)
        keep = ids[0] != (-2 if exclude is None else exclude)
        return scores[0][keep][:k], ids[0][keep][:k]

    def _apply_update(self, ids: Array, values: Array, mode: str) -> torch.Tensor:
        """Write rows ``ids`` (overwrite: verbatim, as restores and seeds need; momentum: FGC's
        rule); the ids, as a tensor on the store's device."""
        index = self._tensor(ids, torch.int64)
        new = self._tensor(values, torch.float32)
        if mode != "overwrite":
            new = momentum_rows(self.store.read(index), new, self.config.momentum)
        self.store.write(index, new)
        self.counters["updates"] += 1
        self.counters["rows_updated"] += int(ids.shape[0])
        return index


_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.int64): torch.int64}
_NUMPY_DTYPES = {torch.float32: np.float32, torch.int64: np.int64}


def _by_id_then_bits(ids: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """The order of rows (ids (S,), values (S, D) float32) by id, then by the values' bits as
    unsigned 32-bit words, first column first: a least-significant-first radix of stable sorts,
    as numpy's lexsort does it, on the rows' device."""
    bits = values.view(torch.int32).long() & 0xFFFFFFFF  # (S, D) the bits as unsigned, in int64
    order = torch.arange(len(ids), device=ids.device)
    for column in reversed(range(values.shape[1])):
        order = order[torch.argsort(bits[order, column], stable=True)]
    return order[torch.argsort(ids[order], stable=True)]
