"""Low-precision copies of the bank's rows: a cheap first pass that the exact search then checks.

A low-precision GEMM runs much faster than the float32 one on CPUs with the right instructions
(2-core EPYC, one thread, cifar's shape: float32 73, bfloat16 210, int8 330 G flops per second).
The search uses it to *find* candidates and float32 to *rank* them, so answers stay those of a
float32 brute force. Two copies, one interface (:class:`Prefilter`):

- :class:`Int8Rows` (CPUs with VNNI: AVX512-VNNI, AVX-VNNI, AMX): rows quantised to uint8 with
  one scale for the bank, queries to int8 with one scale each; oneDNN's int8 GEMM adds each
  query's bias ``-tau`` and writes one byte per score, non-zero exactly when the sum is positive.
- :class:`Bf16Rows` (CPUs with AVX512-BF16 or AMX but no VNNI int8 path): ``[bf16(r), 1]`` against
  ``[bf16(q), -tau]``; the test is the sign bit of the bfloat16 output.

How a query's threshold ``t`` (its k-th best float32 score is above it) becomes ``tau``: with
``q'`` and ``r'`` the low-precision values, ``q.r - q'.r' = (q - q').r + q'.(r - r')``, so
``|q.r - q'.r'| <= |q - q'| max|r| + |q'| max|r - r'|``. The query's own rounding error is known
exactly and the rows' are tracked (each row's norm and error, refreshed with the row). Add the
float32 rounding of the reference score and of the GEMM's own arithmetic, and a row whose float32
score beats ``t`` has a low-precision sum above ``tau = t - margin``. Every pair that passes is
scored again in float32 before anything is ranked.

The bound holds at every magnitude it is used for. Its norms are summed in float64
(:func:`norm_bounds`), where no float32 number's square underflows (in float32, the squares of
coordinates below ~1e-19 are denormal or 0) or overflows; int8 steps never leave [-127, 127]. A search
uses a copy only while every query's norm is 0 or inside ``SAFE_NORMS``, and so is the largest
row's (:meth:`Prefilter.in_range`): there the GEMMs' scales and sums are normal float32 numbers far
from overflow, while further out oneDNN's float32 scales and bfloat16's sums may flush or
overflow. Outside it the search goes float32 only, which needs no bound.
"""

from __future__ import annotations

import abc
import functools
import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

U_FP32 = 2.0**-24
U_FP64 = 2.0**-53
FLUSH = 2.0**-126  # smallest normal float32; smaller inputs and partial sums may become 0
SAFE_NORMS = (2.0**-40, 2.0**40)  # query and row norms for which a prefilter is used (0 too)
ENV = "FGC_BANK_PREFILTER"  # "int8" / "bf16" / "off": force a prefilter (tests, comparisons)
KINDS = ("int8", "bf16")

# Finds the candidates of one chunk: scan(j0, m) -> flat positions p in the (m, B) block of rows
# j0..j0+m against every query (row j0 + p // B, query p % B) whose float32 score may beat the
# query's threshold. Every pair that does is among them.
Scan = Callable[[int, int], np.ndarray]


@dataclass(frozen=True)
class Encoded:
    """Queries in a copy's low precision, with what their error bound needs: the part of a
    search's preparation that does not depend on the thresholds, so the search can make it while
    the thresholds are still being sampled. Norms are float64 upper bounds, (B,) each."""

    values: torch.Tensor  # int8: oneDNN's packed weights; bf16: (B, D + 1), [bf16(q), 0]
    norm: np.ndarray  # |q|
    low_norm: np.ndarray  # |q'|, q' the low-precision query
    error: np.ndarray  # |q - q'|
    row_norm: float  # bounds of every row's norm and of its rounding error's norm (Prefilter.bounds)
    row_error: float
    dim: int  # D
    scales: np.ndarray | None = None  # int8: each query's scale (float32)
    out_scale: float = 0.0  # int8: the GEMM's output step


def _cpu_flags() -> set[str]:
    if not sys.platform.startswith("linux"):
        return set()
    try:
        with open("/proc/cpuinfo") as f:
            return set(next((line for line in f if line.startswith("flags")), "").split())
    except OSError:
        return set()


@functools.cache
def best_kind() -> str | None:
    """The prefilter this machine runs fastest: "int8", "bf16" or None (float32 only)."""
    forced = os.environ.get(ENV)
    if forced == "off":
        return None
    if forced in KINDS:
        return forced if forced != "int8" or _int8_gemm_is_exact() else None
    if not torch.backends.mkldnn.is_available():
        return None
    flags = _cpu_flags()
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} and _int8_gemm_is_exact():
        return "int8"
    if flags & {"avx512_bf16", "amx_bf16"}:
        return "bf16"
    return None


def make(rows: np.ndarray, kind: str | None) -> Prefilter | None:
    """The ``kind`` copy of ``rows`` (None: no copy)."""
    return {"int8": Int8Rows, "bf16": Bf16Rows, None: lambda _: None}[kind](rows)


def copy_bytes(rows: int, dim: int, kind: str | None) -> int:
    """Memory a ``kind`` copy of rows x dim takes: the values, and each row's norm and error."""
    per_row = {"int8": dim, "bf16": 2 * (dim + 1), None: 0}[kind]
    return rows * (per_row + 8) if kind else 0


def norm_bounds(values: np.ndarray | torch.Tensor) -> np.ndarray:
    """Upper bounds (B,) float64 of the Euclidean norms of rows (B, D) of float32 numbers or of
    their exact float64 differences to rounded copies. Summed in float64, where such squares
    neither underflow nor overflow (NaN and Inf give NaN and Inf)."""
    squares = np.einsum("ij,ij->i", values, values, dtype=np.float64)  # casts as it goes: no float64 copy
    return np.sqrt(squares) * (1.0 + (values.shape[1] + 4) * U_FP64)


def round_up_f32(values: np.ndarray) -> np.ndarray:
    """float64 values -> float32 values at least them (the nearest such; Inf above float32's range)."""
    with np.errstate(over="ignore"):
        up = values.astype(np.float32)
    return np.where(up < values, np.nextafter(up, np.float32(np.inf)), up)


class Prefilter(abc.ABC):
    """A low-precision copy of rows (N, D) float32 that the owner keeps writing, with each row's
    norm and the norm of its rounding error.

    The copy is only sound while it matches ``rows``: whoever writes rows calls :meth:`refresh`
    with their ids before the next search (the bank does, under its lock). ``norms`` and
    ``errors`` are float32 upper bounds of the exact ones.
    """

    kind: str
    flop_ns: float  # one flop of the GEMM on one thread (the search's cost model)
    scan_ns: float  # one score through the test and the compaction
    chunk_scores: int  # scores per chunk and thread (its output: a few MB; fewer, larger chunks measured faster)

    def __init__(self, rows: np.ndarray) -> None:
        if rows.dtype != np.float32 or rows.ndim != 2:
            raise ValueError(f"rows must be (N, D) float32, got {rows.dtype} {rows.shape}")
        self.source = rows
        self.norms = np.empty(rows.shape[0], dtype=np.float32)
        self.errors = np.empty(rows.shape[0], dtype=np.float32)
        self._allocate()
        self._refresh_all()

    def _refresh_all(self) -> None:
        n, d = self.source.shape
        step = max(1, (1 << 22) // max(d, 1))  # bounded temporaries for big banks
        for lo in range(0, n, step):
            self.refresh(np.arange(lo, min(n, lo + step)))

    def refresh(self, ids: np.ndarray) -> None:
        """Copy rows ``ids`` of the source again, after they were written."""
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        exact = torch.from_numpy(self.source).index_select(0, index)
        rounded = self._store(index, exact)
        if rounded is None:  # the rows no longer fit the copy's range: it was rebuilt
            return
        self.norms[ids] = round_up_f32(norm_bounds(exact))
        self.errors[ids] = round_up_f32(norm_bounds(exact - rounded))  # exact, in the wider dtype

    def bounds(self) -> tuple[float, float]:
        """Upper bounds of every row's norm and of every row's rounding error's norm."""
        return float(self.norms.max(initial=0.0)), float(self.errors.max(initial=0.0))

    def in_range(self, query_norms: np.ndarray, row_norm: float) -> bool:
        """Whether the bound can be trusted for queries of these norms (see the module's
        docstring): each is 0 or inside ``SAFE_NORMS``, and so is ``row_norm``, the largest row
        norm (``bounds()[0]``, which the caller has: two passes over the bank's norms, not four)."""
        low, high = SAFE_NORMS
        nonzero = query_norms[query_norms != 0]
        return low <= row_norm <= high and bool(((nonzero >= low) & (nonzero <= high)).all())

    @abc.abstractmethod
    def _allocate(self) -> None:
        """Allocate the copy."""

    @abc.abstractmethod
    def _store(self, index: torch.Tensor, exact: torch.Tensor) -> torch.Tensor | None:
        """Store the low-precision rows ``index`` (values ``exact``); their exact value (float32
        or float64), or None when the whole copy had to be rebuilt."""

    def prepare(self, queries: np.ndarray, thresholds: np.ndarray) -> Scan | None:
        """This search's candidate finder for ``queries`` (B, D) float32 and their thresholds
        (B,); None when these queries cannot be filtered safely (the caller searches in float32).
        The scan may be called from several threads at once."""
        encoded = self.encode(queries)
        return None if encoded is None else self.scanner(encoded, thresholds)

    @abc.abstractmethod
    def encode(self, queries: np.ndarray) -> Encoded | None:
        """The first, threshold-free part of :meth:`prepare` (most of its cost); None when these
        queries cannot be filtered safely. Its torch ops may start an OpenMP team: the search
        runs it on a search thread, which has none."""

    @abc.abstractmethod
    def scanner(self, encoded: Encoded, thresholds: np.ndarray) -> Scan | None:
        """The rest of :meth:`prepare`: numpy on (B,) vectors and torch ops far too small to
        start an OpenMP team, so any thread may run it."""


class Bf16Rows(Prefilter):
    """``[bf16(r), 1]`` for every row: the last column carries each query's ``-tau``.

    Rounding the GEMM's float32 sum to bfloat16 keeps its sign, so the test on the stored output
    keeps every row whose float32 score beats the threshold.
    """

    kind = "bf16"
    flop_ns = 0.0047  # AVX512-BF16
    scan_ns = 0.3
    chunk_scores = 1 << 21

    def _allocate(self) -> None:
        n, d = self.source.shape
        self.rows = torch.ones(n, d + 1, dtype=torch.bfloat16)

    def _store(self, index: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
        low = exact.to(torch.bfloat16)
        self.rows[index, :-1] = low
        return low.float()

    def encode(self, queries: np.ndarray) -> Encoded | None:
        """``[bf16(q), 0]``; None outside the range where the bound holds (:meth:`in_range`)."""
        norm = norm_bounds(queries)
        row_norm, row_error = self.bounds()
        if not self.in_range(norm, row_norm):
            return None
        d = queries.shape[1]
        q16 = torch.from_numpy(queries).to(torch.bfloat16)
        rounded = q16.float().numpy()
        values = torch.zeros(queries.shape[0], d + 1, dtype=torch.bfloat16)
        values[:, :-1] = q16
        return Encoded(values, norm, norm_bounds(rounded),
                       norm_bounds(queries - rounded),  # exact: bf16 rounding stays within a factor 2
                       row_norm, row_error, d)

    def scanner(self, encoded: Encoded, thresholds: np.ndarray) -> Scan | None:
        """``[bf16(q), -tau]`` against ``[bf16(r), 1]``: a sum ``>= 0`` for every row whose
        float32 score with ``q`` beats its threshold."""
        if not np.isfinite(thresholds).all():
            return None
        tau = round_down_bf16(thresholds.astype(np.float64) - margin(encoded, thresholds))
        biased = encoded.values.view(torch.int16).numpy().copy()  # numpy: one thread, whichever
        biased[:, -1] = (-tau).view(torch.int16).numpy()
        biased_t = torch.from_numpy(biased).view(torch.bfloat16).T  # (D + 1, B) view
        b = biased.shape[0]

        def scan(j0: int, m: int) -> np.ndarray:
            out = scratch("bf16", m * b, torch.bfloat16)
            torch.mm(self.rows[j0:j0 + m], biased_t, out=out.view(m, b))  # (m, B): score - tau
            mask = scratch("mask", m * b, torch.bool).numpy()
            np.greater_equal(out.view(torch.int16).numpy(), 0, out=mask)  # the sign bit, as int16
            return sparse_nonzero(mask)

        return scan


def margin(encoded: Encoded, thresholds: np.ndarray) -> np.ndarray:
    """Per query (B,) float64: how far below its float32 score a row's bfloat16 GEMM sum (with the
    ``-tau`` column) can fall.

    Besides the rounding of the values (see the module's docstring): float32 accumulation in any
    order (``gamma``) for the GEMM and for the float32 rescoring, and flushed denormals."""
    d = encoded.dim
    gamma = 1.01 * (d + 1) * U_FP32  # float32 sums of d + 1 terms, in any order
    q, q_low, q_error = encoded.norm, encoded.low_norm, encoded.error
    row_norm, row_error = encoded.row_norm, encoded.row_error
    rounding = q_error * row_norm + q_low * row_error
    sums = gamma * (q_low * (row_norm + row_error) + np.abs(thresholds)) + gamma * q * row_norm
    flushed = FLUSH * (2 * d + 2 + np.sqrt(d) * (q_low + row_norm + row_error))
    return (rounding + sums + flushed) * (1.0 + 2 * gamma)  # and gamma |tau| - gamma |t| <= gamma margin


def round_down_bf16(values: np.ndarray) -> torch.Tensor:
    """float64 values (B,) -> bfloat16 values at most them (the nearest such, when finite)."""
    down = values.astype(np.float32)
    down = np.where(down.astype(np.float64) > values, np.nextafter(down, np.float32(-np.inf)), down)
    bits = down.view(np.uint32)
    high = (bits >> 16).astype(np.uint16)
    cut = (bits & 0xFFFF) != 0
    high = high + ((bits >> 31).astype(np.uint16) & cut)  # negative: truncation rounded up; step down
    return torch.from_numpy(high.view(np.int16)).view(torch.bfloat16)


class Int8Rows(Prefilter):
    """Rows as uint8 ``x`` with one scale ``s`` for the bank: ``r' = s (x - 128)``, ``|x - 128| <=
    127``. A write that leaves that range rebuilds the copy with a scale 1.5x what it needs (rare:
    the range only grows, geometrically).

    oneDNN's u8 x s8 GEMM (``torch.ops.onednn.qlinear_pointwise``) sums exactly in int32 on VNNI,
    scales and adds each query's ``-tau`` in float32 and writes ``round(sum / out_scale)``
    saturated to uint8: with ``tau`` lowered by that arithmetic's error and by ``out_scale``, the
    byte is non-zero for every row that must be kept.
    """

    kind = "int8"
    flop_ns = 0.003  # VNNI, at cifar's shape
    scan_ns = 0.25
    chunk_scores = 1 << 21
    HEADROOM = 1.5

    def _allocate(self) -> None:
        n, d = self.source.shape
        self.rows = torch.empty(n, d, dtype=torch.uint8)
        self.scale = float(_int8_scales(np.abs(self.source).max(initial=0.0)))

    def _store(self, index: torch.Tensor, exact: torch.Tensor) -> torch.Tensor | None:
        steps = torch.round(exact / self.scale)
        top = float(steps.abs().max()) if steps.numel() else 0.0
        if not top <= 127:  # the rows outgrew the range: rebuild with room to grow
            largest = float(np.abs(self.source).max(initial=0.0))
            if not np.isfinite(largest):
                raise ValueError("rows must be finite")
            self.scale = float(_int8_scales(min(self.HEADROOM * largest, float(np.finfo(np.float32).max))))
            self._refresh_all()
            return None
        self.rows[index] = (steps + 128).to(torch.uint8)
        return steps.double().mul_(self.scale)  # exact in float64: 7 bits times a float32's 24

    def encode(self, queries: np.ndarray) -> Encoded | None:
        """Each query as int8 steps with its own scale, packed for oneDNN; None outside the range
        where the bound holds (:meth:`in_range`, and the copy's own range: a scale that grew for
        rows since overwritten), or when out_scale would leave float32's normal range."""
        norm = norm_bounds(queries)
        row_norm, row_error = self.bounds()
        if not self.in_range(norm, row_norm) or self.scale * 127 > SAFE_NORMS[1]:
            return None
        scales = _int8_scales(np.abs(queries).max(axis=1))
        wide_scales = scales[:, None].astype(np.float64)
        steps = np.clip(np.rint(queries / wide_scales), -127, 127)  # int8 would wrap 128 to -128
        rounded = steps * wide_scales  # q', exact in float64
        q_low = norm_bounds(rounded)
        largest = float((q_low * (row_norm + row_error)).max(initial=0.0))  # bounds |q'.r'|
        if not 1e-20 < largest < 1e30:  # out_scale stays a normal float32
            return None
        weights = torch.ops.onednn.qlinear_prepack(torch.from_numpy(steps.astype(np.int8)), None)
        return Encoded(weights, norm, q_low, norm_bounds(queries - rounded),  # an exact difference
                       row_norm, row_error, queries.shape[1], scales, largest * 2.0**-20)

    def scanner(self, encoded: Encoded, thresholds: np.ndarray) -> Scan | None:
        """oneDNN's int8 GEMM with each query's ``-tau`` as its bias: a non-zero output byte for
        every row whose float32 score may beat the query's threshold."""
        if not np.isfinite(thresholds).all():
            return None
        q, q_low, q_error = encoded.norm, encoded.low_norm, encoded.error
        row_norm, row_error, out_scale = encoded.row_norm, encoded.row_error, encoded.out_scale
        gamma = 1.01 * (encoded.dim + 1) * U_FP32  # the float32 reference score, summed in any order
        value = q_error * row_norm + q_low * row_error + gamma * q * row_norm
        # oneDNN's float32 scaling, bias and output steps: a few roundings of numbers at most
        # |q'.r'| + |tau| each, and the bias possibly quantised to the accumulator's scale.
        arithmetic = 16 * U_FP32 * (q_low * (row_norm + row_error) + np.abs(thresholds) + value) \
            + self.scale * encoded.scales + 2 * out_scale
        tau = thresholds.astype(np.float64) - (value + arithmetic) * (1.0 + 1e-6)
        weights, scales = encoded.values, torch.from_numpy(encoded.scales)
        zeros = torch.zeros(q.shape[0], dtype=torch.long)
        bias = torch.from_numpy((-tau).astype(np.float32))  # off by u |tau| at most: in the 16u terms

        def scan(j0: int, m: int) -> np.ndarray:
            out = torch.ops.onednn.qlinear_pointwise(self.rows[j0:j0 + m], self.scale, 128, weights, scales,
                                                     zeros, bias, out_scale, 0, torch.uint8, "none", [], "")
            return sparse_nonzero(out.numpy().reshape(-1))

        return scan


def _int8_scales(top: np.ndarray | float) -> np.ndarray:
    """float32 scales that map each [-top, top] onto 127 steps each way (1 where top is 0 or not
    finite). The float32 nearest top / 127 is raised one step where it fell below: a denormal
    one can be far below, and top / scale must not round to a step of 128."""
    top = np.asarray(top, dtype=np.float64)
    with np.errstate(over="ignore"):
        scale = (top / 127.0).astype(np.float32)
    scale = np.where(scale.astype(np.float64) * 127.0 < top, np.nextafter(scale, np.float32(np.inf)), scale)
    return np.where((scale > 0) & np.isfinite(scale), scale, np.float32(1.0))


def _int8_gemm_is_exact() -> bool:
    """Whether oneDNN's int8 GEMM sums exactly here. Without VNNI it may pair products in
    saturating int16 (``vpmaddubsw``); the largest products expose that."""
    try:
        d, b = 512, 16
        x = torch.full((64, d), 255, dtype=torch.uint8)
        x[1::2] = 0
        w = torch.full((b, d), 127, dtype=torch.int8)
        w[1::2] = -127
        out = torch.ops.onednn.qlinear_pointwise(x, 1.0, 128, torch.ops.onednn.qlinear_prepack(w, None),
                                                 torch.ones(b), torch.zeros(b, dtype=torch.long), None,
                                                 1.0, 0, torch.float32, "none", [], "")
        exact = (x.double() - 128) @ w.double().T
        return bool(torch.equal(out.double(), exact))
    except (AttributeError, RuntimeError):  # no oneDNN int8 ops in this torch build
        return False


_local = threading.local()


def scratch(name: str, size: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of ``size`` elements owned by this thread (grown, never shrunk): the search
    threads' reusable outputs."""
    buffers = _local.__dict__.setdefault("buffers", {})
    buf = buffers.get(name)
    if buf is None or buf.numel() < size:
        buf = buffers[name] = torch.empty(size, dtype=dtype)
    return buf[:size]


def sparse_nonzero(mask: np.ndarray) -> np.ndarray:
    """``np.flatnonzero`` of a 1-D array with few non-zero values, faster: pack 8 per byte, find
    the non-zero bytes (a scan 8x shorter), unpack only those."""
    packed = np.packbits(mask)
    at = np.flatnonzero(packed.view(np.bool_))
    bits = np.flatnonzero(np.unpackbits(packed[at]).view(np.bool_))
    return at[bits >> 3] * 8 + (bits & 7)
