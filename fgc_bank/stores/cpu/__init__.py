"""The CPU store (``store.CpuStore``): exact search on host memory at close to the GEMM rate.

Nothing is imported here, so that ``prefilter`` (numpy and torch only) loads on machines without
FAISS; ``store`` and ``search`` need FAISS.
"""
