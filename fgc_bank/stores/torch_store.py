"""The torch store: a bank's rows as one float32 tensor on any device, searched on tensor cores.

A float32 GEMM alone cannot feed a data-parallel trainer from a GPU (tensor cores run bfloat16
an order of magnitude faster than float32 without TF32), and TF32 or bfloat16 scores alone are
not the float32 answer. So the search *finds* candidates in bfloat16 and *ranks* them in float32,
and proves, query by query, that nothing outside the candidates could have entered the top-k;
a query whose proof fails is searched again in plain float32. Answers are those of a float32
brute force (equal scores in any order).

Why bfloat16 rather than float16: the same tensor-core rate on the GPUs the bank targets, and
float32's exponent range, so the copy needs no scale to keep up with the rows a write may bring
(any finite float32 row below 2^60 is one cast, never a rebuild of the copy). Its coarser rounding
(u = 2^-8 against 2^-11) widens the margin below; the candidate count pays for that.

**The bound.** With ``q'`` and ``r'`` the bfloat16 roundings of a query ``q`` and a row ``r``,
``q.r - q'.r' = (q - q').r + q'.(r - r')``, so ``|q.r - q'.r'| <= |q - q'| R + |q'| E`` where
``R`` bounds every row's norm and ``E`` every row's rounding error's norm (each row's two norms are
kept, refreshed by ``write``; the maxima are taken at the next search). The GEMM multiplies
bfloat16 values exactly in float32 and sums the products in float32: its sum ``s'`` is within
``c D u |q'| |r'|`` of ``q'.r'`` (``u = 2^-24``; ``c = 4`` rather than the textbook ``gamma_D``'s 1
because tensor cores truncate and align several products before each float32 addition, Fasi et
al. 2021; the term stays small beside the bfloat16 ones), with ``|r'| <= R + E``. The float32
rescoring ``s`` of the pair is within ``c D u |q| R`` of ``q.r``. Underflow adds at most ``2^-126``
per product or addition in either GEMM (flushed to zero in the worst case), and flushed subnormal
inputs at most ``2^-126 sqrt(D)`` times the other side's norm. So, for every row,

    s <= s' + margin_q,  margin_q = |q - q'| R + |q'| E + c D u (|q'| (R + E) + |q| R)
                                    + 2^-126 (4 D + sqrt(D) (|q| + |q'| + 2 R + E)).

Where the GEMM writes bfloat16 (CPU builds of torch), its output ``o`` of a sum ``s'`` obeys
``s' <= o + 2^-7 |o| + 2^-126`` (twice bfloat16's unit roundoff: any rounding mode). Every norm is
computed in float64 from the float32 (or bfloat16) values, where neither squaring nor summing can
underflow or overflow, and inflated by its own float64 rounding; the margin's float64 arithmetic
is inflated too. None of it is measured: the bound holds for any data within the range below.

**Candidates and the check.** Per chunk of rows the GEMM's scores keep each query's top
``kc + 1`` (``kc = k + extra``); the ``kc`` best are merged with the query's running candidates
(a second top-``(kc + 1)``), and at each cut the ``(kc + 1)``-th value, the largest one dropped, is
folded into the query's ``cut`` (a running maximum). Every row outside the final ``kc``
candidates was dropped at some cut, below that cut's largest drop, so its GEMM output is
``<= cut`` and its float32 score ``<= T = cut + margin_q`` (plus the bfloat16 output's rounding;
``T`` rounded upwards). The candidates are rescored in float32 against the float32 rows and the
top ``k`` taken; the answer is exact when the k-th float32 score is ``>= T``: then no row outside
scores above it, and one that ties with it exactly is an equal score in a different order. A query
with no row dropped (``cut = -inf``) passes at once.

**Where the bound is not used.** A query takes the float32 search without trying bfloat16 when
its norm, the bank's largest row norm ``R``, or their product lies outside ``[2^-60, 2^60]``
(``SAFE_RANGE``), and the whole search is float32 when the candidates would be the whole bank,
when one query's candidates would not fit the memory budget, or when the device's bfloat16 GEMM
failed the probe at construction. Above the range, bfloat16 casts and float32 sums could overflow
to inf; below it, the absolute underflow terms would swamp the scores and every check would fail
after a wasted pass. Non-finite queries or rows land outside the range (NaN compares false).

The GPU stream is never waited for inside the search but once, after every query's check (where
the failed queries are gathered for the float32 search); each deliberate host synchronisation is
marked ``SYNC``. Float32 matmuls run with TF32 and reduced-precision reductions off for the
duration of a search (:func:`ieee_float32`), and the caller's settings come back afterwards.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fgc_bank.stores.base import RowStore

U_FP32 = 2.0**-24  # float32's unit roundoff
U_BF16 = 2.0**-8  # bfloat16's
FLUSH = 2.0**-126  # smallest normal float32 (and bfloat16): the most one flushed operation loses
ACCUMULATION = 4.0  # float32 sums of D products lose at most ACCUMULATION * D * U_FP32 of sum |x_i y_i|
OUTPUT_ROUNDING = 2 * U_BF16  # a bfloat16 GEMM output, relative to itself, any rounding mode
SAFE_RANGE = (2.0**-60, 2.0**60)  # |q|, R and |q| R outside it: float32 search for that query
SCORE_BUDGET = 256 << 20  # bytes of (B, chunk) scores alive at once (the constructor's default)
MIN_EXTRA = 32  # candidates beyond k, at least (the default extra is max(k, MIN_EXTRA))
MIN_CHUNK_ROWS = 1024  # bank rows a chunk should have before the queries are split instead
MAX_DIM = 1 << 16  # beyond, ACCUMULATION * D * U_FP32 is no longer small: float32 only
NORM_SLACK = 2.0**-52  # float64 norms of D float32 values: within a factor 1 + (D + 4) NORM_SLACK

ScoreKernel = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (B, D), (m, D) bf16 -> (B, m)


# --- float32 as IEEE float32, for the duration of a search -------------------------------------

_precision_lock = threading.Lock()
_precision_users = 0
_precision_saved: dict[str, Any] = {}


def _read_precision() -> dict[str, Any]:
    """The process-wide matmul settings :func:`ieee_float32` changes, as they are now."""
    cuda = torch.backends.cuda.matmul
    state: dict[str, Any] = {}
    try:  # torch >= 2.9: per-backend settings; reading the legacy ones may raise once they are used
        state["cuda"], state["mkldnn"] = cuda.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        state = {"legacy": torch.get_float32_matmul_precision()}
    state["bf16"] = cuda.allow_bf16_reduced_precision_reduction
    with contextlib.suppress(AttributeError):
        state["bf16_split_k"] = cuda.allow_bf16_reduced_precision_reduction_split_k
    return state


def _write_precision(state: dict[str, Any]) -> None:
    cuda = torch.backends.cuda.matmul
    if "legacy" in state:
        torch.set_float32_matmul_precision(state["legacy"])
    else:
        cuda.fp32_precision = state["cuda"]
        torch.backends.mkldnn.matmul.fp32_precision = state["mkldnn"]
    if "bf16_split_k" in state:
        cuda.allow_bf16_reduced_precision_reduction = (state["bf16"], state["bf16_split_k"])
    else:
        cuda.allow_bf16_reduced_precision_reduction = state["bf16"]


def _strict(saved: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with float32 matmuls in IEEE float32 (no TF32, no bf16 inside oneDNN) and
    bfloat16 GEMMs reducing in float32 (no bf16 split-K partial sums)."""
    strict = dict(saved, bf16=False)
    if "legacy" in saved:
        strict["legacy"] = "highest"
    else:
        strict["cuda"] = strict["mkldnn"] = "ieee"
    return strict


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """Exact float32 and float32-reduced bfloat16 GEMMs while any search runs, then the settings
    the process had before the first of them (a count, so that concurrent searches of several
    stores share one save and restore). The settings are process-wide: other threads' matmuls
    run in IEEE float32 meanwhile too, and a setting changed by another thread while a search
    runs is overwritten when the last search ends."""
    global _precision_users, _precision_saved
    with _precision_lock:
        if _precision_users == 0:
            _precision_saved = _read_precision()
            _write_precision(_strict(_precision_saved))
        _precision_users += 1
    try:
        yield
    finally:
        with _precision_lock:
            _precision_users -= 1
            if _precision_users == 0:
                _write_precision(_precision_saved)


# --- the bfloat16 GEMM -------------------------------------------------------------------------

def _mm_bf16_out(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.mm(queries, rows.T)  # (B, m) bfloat16: float32 sums rounded once


def _mm_float_out(queries: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return torch.mm(queries, rows.T, out_dtype=torch.float32)  # (B, m) float32: the sums themselves


def _has_float_output(device: torch.device) -> bool:
    """Whether torch writes a bfloat16 GEMM's float32 sums on ``device`` (CUDA, torch >= 2.8)."""
    if device.type != "cuda":
        return False
    probe = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
    try:
        _mm_float_out(probe, probe)
        return True
    except (TypeError, RuntimeError, NotImplementedError):
        return False


def _choose_kernel(device: torch.device, output: torch.dtype | None) -> tuple[ScoreKernel, float]:
    """The bfloat16 GEMM for ``device`` and its output's relative rounding. ``output`` None:
    float32 where the device has it, else bfloat16. A float32 output needs no rounding term; a
    bfloat16 one halves the bytes every top-k reads (which of the two is faster is measured)."""
    if output != torch.bfloat16 and _has_float_output(device):
        return _mm_float_out, 0.0
    if output == torch.float32:
        raise ValueError(f"torch has no bfloat16 GEMM with float32 output on {device}")
    return _mm_bf16_out, OUTPUT_ROUNDING


def _kernel_is_sound(kernel: ScoreKernel, output_rounding: float, device: torch.device, dim: int) -> bool:
    """Whether ``kernel`` sums D products within the bound on sums that a bfloat16 accumulator
    would get badly wrong (``1 + (D - 1) 2^-9``, the 1 first or last): a guard against a backend
    that accumulates in bfloat16, not a proof."""
    with ieee_float32():
        a = torch.full((8, dim), 2.0**-9, dtype=torch.bfloat16, device=device)  # (8, D)
        a[:4, 0] = 1.0
        a[4:, -1] = 1.0
        if dim == 1:
            a[:] = 1.0
        b = torch.ones(256, dim, dtype=torch.bfloat16, device=device)  # (256, D)
        got = kernel(a, b).double()  # (8, 256)
    exact = 1.0 + (dim - 1) * 2.0**-9
    bound = (ACCUMULATION * dim * U_FP32 + output_rounding) * exact + FLUSH
    return bool(((got - exact).abs() <= bound).all())  # SYNC: once per store, at construction


# --- the store ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Filter:
    """One block of queries, ready for the bfloat16 pass: ``low`` (b, D) their bfloat16 values,
    ``margin`` (b,) float64 how far below its float32 score a row's GEMM sum can fall, ``safe``
    (b,) bool whether the bound may be used at all."""

    low: torch.Tensor
    margin: torch.Tensor
    safe: torch.Tensor


def norm_bounds(x: torch.Tensor) -> torch.Tensor:
    """(n, D) float32 or bfloat16 -> (n,) float64 upper bounds of the exact row norms, on the
    rows' device (the torch twin of ``prefilter.norm_bounds``; the bank checks tensors with it)."""
    d = x.shape[1]
    return torch.linalg.vector_norm(x.double(), dim=1) * (1.0 + (d + 4) * NORM_SLACK)


def _in_range(x: torch.Tensor) -> torch.Tensor:
    low, high = SAFE_RANGE
    return (x >= low) & (x <= high)


def _top(values: torch.Tensor, keep: int, cut: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``keep`` largest of ``values`` (b, w) per row and their positions (b, keep); where some
    are dropped, the largest dropped value is folded into ``cut`` (b,) float64, in place."""
    b, w = values.shape
    if w <= keep:
        return values, torch.arange(w, device=values.device).expand(b, w)
    top, pos = values.topk(keep + (cut is not None), dim=1)  # (b, keep [+ 1]), descending
    if cut is not None:
        torch.maximum(cut, top[:, keep].double(), out=cut)
    return top[:, :keep], pos[:, :keep]


def _merge(values: torch.Tensor, ids: torch.Tensor, new_values: torch.Tensor, new_ids: torch.Tensor,
           keep: int, cut: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Running (b, w) best values and ids, merged with a chunk's (b, w') and cut to ``keep``."""
    values = torch.cat([values, new_values], dim=1)  # (b, w + w')
    ids = torch.cat([ids, new_ids], dim=1)
    values, pos = _top(values, keep, cut)  # (b, <= keep)
    return values, ids.gather(1, pos)


def _blocks(total: int, step: int) -> Iterator[tuple[int, int]]:
    for lo in range(0, total, step):
        yield lo, min(total, lo + step)


class TorchStore(RowStore):
    """N x D float32 rows on ``device`` with a bfloat16 copy kept in step; exact top-k by a
    checked bfloat16 pass and float32 rescoring (see the module's docstring)."""

    exact = True
    engine = "torch"
    low_copy = True  # the bfloat16 copy and row norms the checked search needs (a subclass searching otherwise drops them)

    def __init__(self, rows: torch.Tensor, device: torch.device | str, *, budget: int = SCORE_BUDGET,
                 extra: int | None = None, gemm_output: torch.dtype | None = None) -> None:
        """``rows`` (N, D) float32 anywhere, copied onto ``device``. ``budget``: bytes of scores
        alive at once; ``extra``: candidates beyond k (None: ``max(k, MIN_EXTRA)``);
        ``gemm_output``: the bfloat16 GEMM's output dtype (None: float32 where torch has it)."""
        if rows.dtype != torch.float32 or rows.ndim != 2:
            raise ValueError(f"rows must be (N, D) float32, got {rows.dtype} {tuple(rows.shape)}")
        if budget < 64 or (extra is not None and extra < 0):
            raise ValueError(f"budget must be >= 64 bytes and extra >= 0, got {budget}, {extra}")
        self.device = _resolve(device)
        self.budget = budget
        self.extra = extra
        n, d = rows.shape
        self.rows = torch.empty(n, d, dtype=torch.float32, device=self.device)  # (N, D)
        with torch.no_grad():
            self.rows.copy_(rows)
        self._kernel_ok = False  # without the copy every search is the float32 one
        if self.low_copy:
            self.low = torch.empty(n, d, dtype=torch.bfloat16, device=self.device)  # (N, D) bf16(rows)
            self.norms = torch.empty(n, dtype=torch.float64, device=self.device)  # (N,) >= |r|
            self.errors = torch.empty(n, dtype=torch.float64, device=self.device)  # (N,) >= |r - bf16(r)|
            step = max(1, (64 << 20) // (16 * max(d, 1)))  # bounded float64 temporaries
            for lo, hi in _blocks(n, step):
                self._refresh(slice(lo, hi), self.rows[lo:hi])
            self._kernel, self._output_rounding = _choose_kernel(self.device, gemm_output)
            self._kernel_ok = d == 0 or _kernel_is_sound(self._kernel, self._output_rounding, self.device, d)
        # Queries of the last search that the bfloat16 pass left to the float32 search (outside
        # SAFE_RANGE or a failed check); 0 when the whole search was float32 from the start.
        self.last_fallbacks = 0

    # --- the interface ---

    @classmethod
    def nbytes(cls, rows: int, dim: int) -> int:
        """float32 rows, their bfloat16 copy, and each row's two float64 norms."""
        return rows * dim * 4 + (rows * dim * 2 + rows * 2 * 8 if cls.low_copy else 0)

    @classmethod
    def layout(cls) -> str:
        return "float32, its bfloat16 copy and two float64 norms a row" if cls.low_copy else "float32"

    def _search_input(self, queries: torch.Tensor, k: int) -> torch.Tensor:
        """The queries as the search takes them; ValueError for bad queries or a k outside [1, N]."""
        queries = self._queries(queries)
        n = self.rows.shape[0]
        if not 1 <= k <= n:
            raise ValueError(f"k must be in [1, {n}], got {k}")
        return queries

    @torch.no_grad()
    def search(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        queries = self._search_input(queries, k)
        kc = self.candidate_count(k)
        with ieee_float32():
            if not self._filter_pays(kc):
                self.last_fallbacks = 0
                return self._search_float32(queries, k)
            scores, ids, ok = self._search_filtered(queries, k, kc)
            # SYNC (the search's only one): which queries failed their check, to search them again.
            failed = torch.nonzero(~ok).squeeze(1)
            if failed.numel():
                again, again_ids = self._search_float32(queries.index_select(0, failed), k)
                scores.index_copy_(0, failed, again)
                ids.index_copy_(0, failed, again_ids)
        self.last_fallbacks = int(failed.numel())
        return scores, ids

    @torch.no_grad()
    def score(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        queries = self._queries(queries)
        ids = ids.to(self.device, torch.long)
        out = torch.empty(queries.shape[0], ids.shape[0], dtype=torch.float32, device=self.device)  # (B, S)
        step = max(1, self.budget // (4 * (self.dim + queries.shape[0])))
        with ieee_float32():
            for lo, hi in _blocks(ids.shape[0], step):
                out[:, lo:hi] = torch.mm(queries, self.rows.index_select(0, ids[lo:hi]).T)  # (B, s)
        return out

    @torch.no_grad()
    def read(self, ids: torch.Tensor) -> torch.Tensor:
        return self.rows.index_select(0, ids.to(self.device, torch.long))  # (S, D) copy

    @torch.no_grad()
    def write(self, ids: torch.Tensor, rows: torch.Tensor) -> None:
        ids = ids.to(self.device, torch.long)
        rows = rows.to(self.device, torch.float32)
        self.rows.index_copy_(0, ids, rows)
        if self.low_copy:
            self._refresh(ids, rows)

    def export(self) -> np.ndarray:
        return self.rows.to("cpu", copy=True).numpy()  # SYNC on a GPU: the copy is the point

    # --- sizes ---

    @property
    def dim(self) -> int:
        return self.rows.shape[1]

    def candidate_count(self, k: int) -> int:
        """Candidates kept per query for a top-k search (all rows at most)."""
        extra = max(k, MIN_EXTRA) if self.extra is None else self.extra
        return min(self.rows.shape[0], k + extra)

    def _filter_pays(self, kc: int) -> bool:
        """Whether the bfloat16 pass can run and leaves fewer rows than the bank to rescore."""
        fits = kc * self.dim * 4 <= self.budget  # one query's candidates, gathered in float32
        return self._kernel_ok and kc < self.rows.shape[0] and fits and self.dim <= MAX_DIM

    def _query_block(self, bytes_per_score: int) -> int:
        """Queries per block, so that a chunk of MIN_CHUNK_ROWS rows still fits the budget."""
        return max(1, self.budget // (bytes_per_score * MIN_CHUNK_ROWS))

    def _chunk_rows(self, b: int, bytes_per_score: int) -> int:
        """Bank rows per chunk so that b queries' scores fit the budget."""
        return max(1, self.budget // (b * bytes_per_score))

    # --- the search ---

    def _queries(self, queries: torch.Tensor) -> torch.Tensor:
        if queries.ndim != 2 or queries.shape[1] != self.dim or queries.shape[0] < 1:
            raise ValueError(f"queries must be (B >= 1, {self.dim}), got {tuple(queries.shape)}")
        return queries.to(self.device, torch.float32).contiguous()

    def _search_filtered(self, queries: torch.Tensor, k: int, kc: int
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k per query from its checked candidates: scores (B, k), ids (B, k), ok (B,) bool
        (False where the answer is not proven and the float32 search must answer instead)."""
        bytes_per_score = 4 if self._output_rounding == 0 else 2
        bounds = self._bank_bounds()
        parts = []
        for lo, hi in _blocks(queries.shape[0], self._query_block(bytes_per_score)):
            block = queries[lo:hi]  # (b, D)
            filt = self._filter(block, *bounds)
            ids, cut = self._candidates(filt.low, kc, bytes_per_score)  # (b, kc), (b,)
            exact = self._rescore(block, ids)  # (b, kc) float32
            top, pos = exact.topk(k, dim=1)  # (b, k) descending
            ok = filt.safe & self._proven(top[:, k - 1], cut, filt.margin)  # (b,)
            parts.append((top, ids.gather(1, pos), ok))
        scores, ids, ok = (torch.cat(column) for column in zip(*parts))
        return scores, ids, ok

    def _bank_bounds(self) -> tuple[torch.Tensor, torch.Tensor]:
        """0-dim float64 tensors: every row's norm and rounding error's norm are at most these."""
        return self.norms.max(), self.errors.max()  # device reductions, no host round trip

    def _filter(self, queries: torch.Tensor, row_norm: torch.Tensor, row_error: torch.Tensor) -> _Filter:
        """The queries' bfloat16 values, margins and range guard (the module's docstring)."""
        d = self.dim
        low = queries.to(torch.bfloat16)  # (b, D)
        q = norm_bounds(queries)  # (b,) float64
        q_low = norm_bounds(low)
        q_error = norm_bounds(queries.double() - low.double())  # the difference is exact in float64
        acc = ACCUMULATION * d * U_FP32
        rounding = q_error * row_norm + q_low * row_error
        sums = acc * (q_low * (row_norm + row_error) + q * row_norm)
        flushed = FLUSH * (4 * d + math.sqrt(d) * (q + q_low + 2 * row_norm + row_error))
        margin = (rounding + sums + flushed) * (1.0 + 2.0**-20)  # and the float64 arithmetic's own
        safe = _in_range(q) & _in_range(row_norm) & _in_range(q * row_norm)  # (b,)
        return _Filter(low, margin, safe)

    def _candidates(self, low: torch.Tensor, kc: int, bytes_per_score: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each query's kc best rows by bfloat16 GEMM output (b, kc) int64, and its cut (b,)
        float64: the largest output of a row left out (-inf where none was)."""
        b = low.shape[0]
        dtype = torch.float32 if bytes_per_score == 4 else torch.bfloat16  # the GEMM's output
        values = torch.empty(b, 0, dtype=dtype, device=self.device)  # (b, 0), grows to (b, kc)
        ids = torch.empty(b, 0, dtype=torch.long, device=self.device)
        cut = torch.full((b,), -math.inf, dtype=torch.float64, device=self.device)  # (b,)
        for lo, hi in _blocks(self.rows.shape[0], self._chunk_rows(b, bytes_per_score)):
            scores = self._kernel(low, self.low[lo:hi])  # (b, m): the budgeted buffer
            top, pos = _top(scores, kc, cut)  # (b, <= kc)
            values, ids = _merge(values, ids, top, pos + lo, kc, cut)
        return ids, cut

    def _rescore(self, queries: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(b, kc) float32 scores of rows ``ids`` (b, kc) against ``queries`` (b, D), gathered in
        blocks of queries that fit the budget."""
        b, kc = ids.shape
        out = torch.empty(b, kc, dtype=torch.float32, device=self.device)  # (b, kc)
        step = max(1, self.budget // (kc * self.dim * 4))
        for lo, hi in _blocks(b, step):
            rows = self.rows.index_select(0, ids[lo:hi].reshape(-1)).view(hi - lo, kc, self.dim)  # (s, kc, D)
            out[lo:hi] = torch.bmm(rows, queries[lo:hi, :, None])[:, :, 0]  # (s, kc)
        return out

    def _proven(self, kth: torch.Tensor, cut: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """(b,) bool: the k-th float32 score ``kth`` (b,) is at least what any row left out could
        score (its GEMM output <= cut, so its float32 score <= cut + margin)."""
        dropped = cut > -math.inf  # (b,) some row was left out
        c = torch.where(dropped, cut, torch.zeros_like(cut))  # (b,) finite stand-in where none was
        if self._output_rounding:  # the left-out rows' float32 sums, above their bfloat16 outputs
            c = c + self._output_rounding * c.abs() + FLUSH
        threshold = c + margin
        threshold = threshold + threshold.abs() * 2.0**-50  # upwards past the float64 additions
        return ~dropped | (kth.double() >= threshold)

    def _search_float32(self, queries: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The plain float32 search: chunked torch.mm and top-k merges (the caller holds
        :func:`ieee_float32`)."""
        parts = []
        for lo, hi in _blocks(queries.shape[0], self._query_block(4)):
            block = queries[lo:hi]  # (b, D)
            b = hi - lo
            values = torch.empty(b, 0, dtype=torch.float32, device=self.device)  # (b, 0), grows to (b, k)
            ids = torch.empty(b, 0, dtype=torch.long, device=self.device)
            for j0, j1 in _blocks(self.rows.shape[0], self._chunk_rows(b, 4)):
                scores = torch.mm(block, self.rows[j0:j1].T)  # (b, m)
                top, pos = _top(scores, k, None)
                values, ids = _merge(values, ids, top, pos + j0, k, None)
            values, order = values.sort(dim=1, descending=True)  # (b, k): a cut-free merge is unsorted
            parts.append((values, ids.gather(1, order)))
        scores, ids = (torch.cat(column) for column in zip(*parts))
        return scores, ids

    # --- the copy ---

    def _refresh(self, index: torch.Tensor | slice, rows: torch.Tensor) -> None:
        """The bfloat16 copy and the two norms of rows ``index`` (values ``rows`` (S, D))."""
        low = rows.to(torch.bfloat16)  # (S, D)
        norms = norm_bounds(rows)  # (S,) float64
        errors = norm_bounds(rows.double() - low.double())  # the difference is exact in float64
        if isinstance(index, slice):
            self.low[index] = low
            self.norms[index] = norms
            self.errors[index] = errors
        else:
            self.low.index_copy_(0, index, low)
            self.norms.index_copy_(0, index, norms)
            self.errors.index_copy_(0, index, errors)


def _resolve(device: torch.device | str) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so that every tensor of a store shares one device."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device
