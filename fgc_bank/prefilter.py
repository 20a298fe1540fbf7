"""A bfloat16 copy of the bank's rows: a cheap first pass that the exact search then checks.

On CPUs with bfloat16 dot-product instructions (AVX512-BF16, AMX) a bfloat16 ``torch.mm`` runs
about twice as fast as the float32 one (0.0047 against 0.011 ns per flop and core on the 2-core
EPYC this was built on). The search uses it to *find* candidates and float32 to *rank* them, so
answers stay those of a float32 brute force.

How a query's threshold ``t`` (its k-th best score is above it) becomes a bfloat16 test:

- ``Bf16Rows`` keeps ``[bf16(r), 1]`` for every row, with ``|r|`` and the rounding error
  ``|r - bf16(r)|``; the bank refreshes the rows it writes.
- :func:`biased_queries` returns ``[bf16(q), -tau]`` with ``tau = t - margin`` rounded down to a
  bfloat16 value, so one GEMM gives ``bf16(q).bf16(r) - tau`` and a row is a candidate when that
  is ``>= 0``: a sign test, the same for every query.
- The margin bounds ``|q.r - bf16(q).bf16(r)|``: since ``q.r - q'.r' = (q - q').r + q'.(r - r')``,
  it is at most ``|q - q'| max|r| + |q'| max|r - r'|`` (the query's own rounding error is known
  exactly; the rows' is tracked), plus float32 accumulation in any order (``gamma``) for the GEMM
  and for the float32 rescoring, plus flushed denormals. Typical rounding errors are about half
  the worst case ``u = 2^-8`` per value, so this margin is about half of ``2u |q| max|r|``.
- Rounding the GEMM's float32 sum to bfloat16 keeps its sign, so the test on the stored bfloat16
  output keeps every row whose float32 score beats ``t``. Every kept pair is scored again in
  float32 before anything is ranked.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

U_FP32 = 2.0**-24
FLUSH = 2.0**-126  # smallest normal float32; smaller inputs and partial sums may become 0
ENV = "FGC_BANK_BF16"  # "1" / "0": force the prefilter on or off (tests, comparisons)


@functools.cache
def bf16_is_fast() -> bool:
    """Whether this CPU multiplies bfloat16 natively (else the copy would only cost memory)."""
    forced = os.environ.get(ENV)
    if forced in ("0", "1"):
        return forced == "1"
    if not sys.platform.startswith("linux") or not torch.backends.mkldnn.is_available():
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _inflate(norms: np.ndarray | np.floating, d: int) -> np.ndarray:
    """float32 norms (computed in float32, of d values) -> float64 upper bounds of the exact ones."""
    return np.asarray(norms, dtype=np.float64) * (1.0 + (d + 4) * U_FP32)


class Bf16Rows:
    """``[bf16(r), 1]`` for rows (N, D) float32 that the owner keeps writing, with each row's
    norm and rounding error.

    The copy is only sound while it matches ``rows``: whoever writes rows calls :meth:`refresh`
    with their ids before the next search (the bank does, under its lock).
    """

    def __init__(self, rows: np.ndarray) -> None:
        if rows.dtype != np.float32 or rows.ndim != 2:
            raise ValueError(f"rows must be (N, D) float32, got {rows.dtype} {rows.shape}")
        n, d = rows.shape
        self.source = rows
        self.rows = torch.ones(n, d + 1, dtype=torch.bfloat16)  # the last column carries -tau
        self.norms = np.empty(n, dtype=np.float32)
        self.errors = np.empty(n, dtype=np.float32)
        step = max(1, (1 << 22) // max(d, 1))  # bounded temporaries for big banks
        for lo in range(0, n, step):
            self.refresh(np.arange(lo, min(n, lo + step)))

    def refresh(self, ids: np.ndarray) -> None:
        """Copy rows ``ids`` of the source again, after they were written."""
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        exact = torch.from_numpy(self.source).index_select(0, index)
        low = exact.to(torch.bfloat16)
        self.rows[index, :-1] = low
        self.norms[ids] = torch.linalg.vector_norm(exact, dim=1).numpy()
        self.errors[ids] = torch.linalg.vector_norm(exact - low.float(), dim=1).numpy()  # exact difference

    def bounds(self) -> tuple[float, float]:
        """Upper bounds of every row's norm and of every row's rounding error's norm."""
        d = self.source.shape[1]
        return float(_inflate(self.norms.max(initial=0.0), d)), float(_inflate(self.errors.max(initial=0.0), d))


def margin(queries: np.ndarray, rounded: np.ndarray, row_norm: float, row_error: float,
           thresholds: np.ndarray) -> np.ndarray:
    """Per query (B,) float64: how far below its float32 score a row's bfloat16 GEMM sum (with the
    ``-tau`` column) can fall. ``rounded`` is bf16(queries) as float32."""
    d = queries.shape[1]
    gamma = 1.01 * (d + 1) * U_FP32  # float32 sums of d + 1 terms, in any order
    q = _inflate(np.linalg.norm(queries, axis=1), d)
    q_low = _inflate(np.linalg.norm(rounded, axis=1), d)
    q_error = _inflate(np.linalg.norm(queries - rounded, axis=1), d)  # the difference is exact
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


def biased_queries(queries: np.ndarray, thresholds: np.ndarray, low: Bf16Rows,
                   max_scale: float = 1e30) -> torch.Tensor | None:
    """``[bf16(q), -tau]`` (B, D + 1) bfloat16: against ``low.rows``, a sum ``>= 0`` for every row
    whose float32 score with ``q`` beats its threshold (B,). None when ``|q| max|r|`` is so large
    that bfloat16 sums could overflow (the caller searches in float32)."""
    row_norm, row_error = low.bounds()
    norms = np.linalg.norm(queries.astype(np.float64), axis=1)
    if not float(norms.max(initial=0.0)) * row_norm < max_scale or not np.isfinite(thresholds).all():
        return None
    q16 = torch.from_numpy(queries).to(torch.bfloat16)
    rounded = q16.float().numpy()
    tau = round_down_bf16(thresholds.astype(np.float64) - margin(queries, rounded, row_norm, row_error, thresholds))
    return torch.cat([q16, -tau[:, None]], dim=1)
