"""Benchmarks for fgc-bank: kNN throughput of the bank beside the alternatives, in one run.

``fgc-bank bench`` (``benchmarks.cli:bench``) is the entry point; ``benchmarks/README.md`` says
what each module does and what the measurements found.
"""
