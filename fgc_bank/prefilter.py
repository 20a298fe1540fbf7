"""A bfloat16 copy of the bank's rows: a cheap first pass that the exact search then checks.

On CPUs with bfloat16 dot-product instructions (AVX512-BF16, AMX) a bfloat16 ``torch.mm`` runs
about twice as fast as the float32 one (0.0047 against 0.011 ns per flop and core on the 2-core
EPYC this was built on). The search uses it to *find* candidates and float32 to *rank* them, so
answers stay those of a float32 brute force:

- ``Bf16Rows`` keeps ``bf16(rows)`` and the row norms; the bank refreshes the rows it writes.
- :func:`margin` bounds how far a bfloat16 score can be from the float32 score of the same pair:
  inputs rounded to 8 significant bits (relative error ``u = 2^-8`` each), products exact in float32,
  sums accumulated in float32 in any order (``gamma_D``), denormals flushed. By Cauchy-Schwarz all of
  it is below ``(2u + u^2 + 2 gamma_D) |q| max|r|`` plus a tiny absolute term.
- A row whose float32 score beats a query's threshold ``t`` therefore has a bfloat16 score of at
  least ``t - margin``; :func:`threshold_bits` rounds that bound *down* to a bfloat16 value, so a
  comparison of the rounded output (rounding is monotone) can only keep more rows, never fewer.
  Every kept pair is scored again in float32 before anything is ranked.
"""

from __future__ import annotations

import functools
import os
import sys

import numpy as np
import torch

U_BF16 = 2.0**-8  # unit roundoff of bfloat16: 8 significant bits
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


class Bf16Rows:
    """``bf16(rows)`` and each row's norm, for rows (N, D) float32 that the owner keeps writing.

    The copy is only sound while it matches ``rows``: whoever writes rows calls :meth:`refresh`
    with their ids before the next search (the bank does, under its lock).
    """

    def __init__(self, rows: np.ndarray) -> None:
        if rows.dtype != np.float32 or rows.ndim != 2:
            raise ValueError(f"rows must be (N, D) float32, got {rows.dtype} {rows.shape}")
        self.source = rows
        self.rows = torch.from_numpy(rows).to(torch.bfloat16)
        self.norms = np.linalg.norm(rows, axis=1)

    def refresh(self, ids: np.ndarray) -> None:
        """Copy rows ``ids`` of the source again, after they were written."""
        index = torch.from_numpy(np.asarray(ids, dtype=np.int64))
        self.rows.index_copy_(0, index, torch.from_numpy(self.source).index_select(0, index).to(torch.bfloat16))
        self.norms[ids] = np.linalg.norm(self.source[ids], axis=1)

    def max_norm(self) -> float:
        """An upper bound of every row's norm (float32 norms are inflated by their own error)."""
        return float(self.norms.max(initial=0.0)) * (1.0 + (self.source.shape[1] + 4) * U_FP32)


def margin(query_norms: np.ndarray, max_row_norm: float, d: int) -> np.ndarray:
    """Per query, a bound on |bf16 score - float32 score| over every row, (B,) float64.

    float32 scores are themselves within ``gamma_D |q||r|`` of the exact ones, hence two
    ``gamma_D``: one for the bfloat16 GEMM's sums, one for the float32 rescoring.
    """
    gamma = 1.01 * d * U_FP32
    scale = np.asarray(query_norms, dtype=np.float64) * (1.0 + (d + 4) * U_FP32) * max_row_norm
    relative = 2 * U_BF16 + U_BF16**2 + 2 * gamma * (1 + U_BF16) ** 2
    flushed = FLUSH * (2 * d + np.sqrt(d) * (scale + 1.0))  # denormal inputs and sums taken as 0
    return relative * scale + flushed


def threshold_bits(thresholds: np.ndarray) -> np.ndarray | None:
    """Positive thresholds (B,) float64 -> bfloat16 bit patterns (B,) int16 of values at most them.

    For positive bfloat16 values the int16 patterns order like the values, and every negative
    value's pattern is negative, so ``scores.view(int16) >= bits`` keeps exactly the scores at or
    above each threshold. Returns None if some threshold is not positive (the caller searches in
    float32 instead).
    """
    if not (thresholds > 0).all() or not np.isfinite(thresholds).all():
        return None
    down = thresholds.astype(np.float32)
    down = np.where(down.astype(np.float64) > thresholds, np.nextafter(down, np.float32(0)), down)
    return (down.view(np.int32) >> 16).astype(np.int16)  # truncation rounds positive values down
