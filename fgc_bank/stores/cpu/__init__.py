"""The CPU store (:class:`CpuStore`): exact search on host memory at close to the GEMM rate."""

from fgc_bank.stores.cpu.store import CpuStore

__all__ = ["CpuStore"]
