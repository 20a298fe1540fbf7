"""A seeded slice of the structured hostile fuzzer (tests/hostile.py) against a real server, and the
float32 edge values it sends, checked for their results.

The full run (20,000+ messages, restarting the server after each death or hang to find them all)::

    PYTHONPATH=. python -m tests.hostile --messages 20000 --seed 1
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import TIME_FACTOR
from hostile import ServerProcess, run_fuzz

from fgc_bank import connect
from fgc_bank.errors import BankError, ErrorCode

MESSAGES = 3_000
SEED = 20260520


@pytest.mark.timeout(180)
def test_hostile_messages_are_all_answered_and_leave_the_server_healthy_and_exact(tmp_path: Path) -> None:
    """Every message answered once with a known code (never internal), those that must be refused
    refused, no death or hang, hello within 1 s after, RSS growth bounded, knn equal to numpy."""
    summary = run_fuzz(tmp_path, MESSAGES, SEED, max_incidents=1)
    print(summary.render())
    if summary.failures():
        pytest.fail(summary.render(), pytrace=False)
    assert summary.sent == MESSAGES
    assert len(summary.codes) >= 10, summary.codes  # the slice reached many different checks


EDGE_ROWS, EDGE_DIM = 8192, 16  # big enough for the prefilter path (int8 or bf16 where the CPU has it)
MOMENTUM_EDGES = {"3e38": 3e38, "-3e38": -3e38, "float32 max": float(np.finfo(np.float32).max),
                  "1e-24": 1e-24, "1e-40 (denormal)": 1e-40, "1e-45 (smallest denormal)": 1e-45}


def _unit_or_refused(client: object, bank: str, name: str, value: float, ids: np.ndarray) -> str | None:
    values = np.full((len(ids), EDGE_DIM), value, np.float32)
    values[1::2] *= -1  # rows of both signs
    values[:, ::3] = 0.0
    what = f"momentum update of bank {bank!r} with values {name}"
    try:
        client.update(bank, ids, values)
    except BankError as exc:
        if exc.code in (ErrorCode.NOT_FINITE, ErrorCode.BAD_ARGUMENT):
            return None
        return f"{what}: answered {exc.code.value}: {exc.message[:200]}"
    norms = np.linalg.norm(client.gather(bank, ids).astype(np.float64), axis=1)
    if not np.allclose(norms, 1.0, atol=1e-3):
        return f"{what}: accepted, rows now have norms {[float(f'{x:.4g}') for x in norms]}"
    return None


def _knn_matches(result: object, rows: np.ndarray, queries: np.ndarray, k: int, what: str) -> str | None:
    """Scale-free comparison: every id returned must be among the true top k (ties within 1e-5 of
    the query's largest |score|), and its score must be the true one to the same tolerance."""
    true = queries.astype(np.float64) @ rows.astype(np.float64).T
    scale = np.abs(true).max(axis=1, keepdims=True)
    kth = -np.sort(-true, axis=1)[:, k - 1 : k]
    got = np.take_along_axis(true, result.ids, 1)
    wrong = (got < kth - 1e-5 * scale).any(axis=1)
    off = (np.abs(result.scores.astype(np.float64) - got) > 1e-4 * scale + 1e-44).any(axis=1)
    if wrong.any() or off.any():
        q = int(np.flatnonzero(wrong | off)[0])
        return (f"{what}: {int(wrong.sum())} queries miss true top-{k} rows, {int(off.sum())} have wrong scores "
                f"(query {q}: ids {result.ids[q, :5].tolist()}..., true top {np.argsort(-true[q])[:5].tolist()}...)")
    return None


@pytest.mark.timeout(120)
def test_float32_edge_values_give_unit_rows_and_exact_knn(tmp_path: Path) -> None:
    """The fuzzer's float32 edge values, checked for what they do to the rows and the search:
    a momentum update makes unit rows for every finite input (or refuses it with not_finite /
    bad_argument), and knn stays exact for tiny rows (squares that underflow float32) and for
    queries at denormal scale."""
    server = ServerProcess(tmp_path)
    problems: list[str] = []
    try:
        with connect(server.address, timeout=30 * TIME_FACTOR) as client:
            client.create("edge", EDGE_ROWS, EDGE_DIM, momentum=0.5, init="unit", seed=3)
            client.create("edge0", 128, EDGE_DIM, momentum=0.0, init="unit", seed=3)  # rows become the values
            for n, (name, value) in enumerate(MOMENTUM_EDGES.items()):
                for bank in ("edge", "edge0"):
                    problems.append(_unit_or_refused(client, bank, name, value, np.arange(8 * n, 8 * n + 8)))
            rng = np.random.default_rng(9)
            base = rng.standard_normal((EDGE_ROWS, EDGE_DIM)).astype(np.float32)
            queries = rng.standard_normal((64, EDGE_DIM)).astype(np.float32)
            for row_scale, query_scale in ((1e-20, 1.0), (1e-19, 1e-19), (1.0, 1e-39), (1e18, 1.0)):
                rows = (base * np.float32(row_scale)).astype(np.float32)
                q = (queries.astype(np.float64) * query_scale).astype(np.float32)
                client.update("edge", np.arange(EDGE_ROWS), rows, mode="overwrite")
                what = f"rows x {row_scale:g}, queries x {query_scale:g}"
                try:
                    problems.append(_knn_matches(client.knn("edge", q, 32), rows, q, 32, what))
                except BankError as exc:
                    problems.append(f"{what}: knn answered {exc.code.value}: {exc.message[:200]}")
        assert server.alive()
    finally:
        server.terminate(30 * TIME_FACTOR)
    problems = [p for p in problems if p is not None]
    assert not problems, "\n".join(problems)
