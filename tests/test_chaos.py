"""A short slice of the fault-injection run (tests/chaos.py): restarts and freezes of a real
server under a client's pipelined updates lose nothing acknowledged and apply nothing twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from chaos import run


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_restarts_and_freezes_lose_no_acknowledged_update_and_double_none(tmp_path: Path) -> None:
    outcome = run(updates=240, faults=4, seed=3, workdir=tmp_path)
    assert outcome.faults["restart"] >= 1 and outcome.faults["freeze"] >= 1, outcome.faults
    assert outcome.updates_acknowledged == 240
    assert outcome.rows_equal and outcome.lost == 0
    assert outcome.resends >= 1  # the faults made the client send copies
