"""Fault injection: a client updates a bank through a real server while the server is restarted
(SIGTERM: final snapshot, then a new process on the same port) and frozen (SIGSTOP, then
SIGCONT, past the client's retry interval); every acknowledged update must be in the bank exactly once.

The client keeps several updates in flight and resends on its own (reconnections, retry
intervals), so every fault exercises the server's exactly-once table and its snapshots. An
in-process mirror applies the acknowledged updates in the order they were sent (one client, one
bank: the order the server applies them); at the end the served rows must equal the mirror's bit
for bit and the bank's update count must equal the number of updates acknowledged.

``tests/test_chaos.py`` runs a short slice in ``make test``; the full run::

    python -m tests.chaos --updates 3000 --faults 30 --seed 1
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import TIME_FACTOR, start_server, stop_server, unused_port

from fgc_bank import connect

ROWS, DIM, BATCH, IN_FLIGHT = 2000, 16, 32, 8
FAULTS = ("restart", "freeze")


@dataclass
class Outcome:
    """What a run did and found."""

    updates_acknowledged: int = 0
    faults: Counter = field(default_factory=Counter)
    lost: int = 0  # acknowledged updates missing from the bank (or applied twice)
    rows_equal: bool = False
    resends: int = 0
    reconnects: int = 0
    seconds: float = 0.0


class Server:
    """One `fgc-bank serve` with a snapshot directory, restartable on the same port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = str(unused_port())  # restarted on it: outside the ephemeral range (see unused_port)
        self.proc, self.address = start_server(workdir, "--snapshot-dir", str(workdir / "snaps"), "--port", self.port)

    def restart(self) -> None:
        stop_server(self.proc)
        if self.proc.returncode != 0:
            raise AssertionError(f"the server exited {self.proc.returncode} at SIGTERM")
        self.proc, _ = start_server(self.workdir, "--snapshot-dir", str(self.workdir / "snaps"), "--port", self.port)

    def freeze(self, seconds: float) -> None:
        os.kill(self.proc.pid, signal.SIGSTOP)
        time.sleep(seconds)
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        stop_server(self.proc)


def run(updates: int, faults: int, seed: int, workdir: Path) -> Outcome:
    """``updates`` momentum updates with ``faults`` faults spread over them; see the module doc."""
    rnd, rng = random.Random(seed), np.random.default_rng(seed)
    fault_at = sorted(rnd.sample(range(IN_FLIGHT, updates), min(faults, updates - IN_FLIGHT)))
    outcome, started = Outcome(), time.monotonic()
    server = Server(workdir)
    bank = connect(server.address, timeout=120 * TIME_FACTOR, retry_interval=1.0)
    mirror = connect("local://")
    try:
        for b in (bank, mirror):
            b.create("feat/7", ROWS, DIM, momentum=0.5, seed=seed)
        flying: deque = deque()
        for step in range(updates):
            if fault_at and step == fault_at[0]:
                fault_at.pop(0)
                outcome.faults[_inject(rnd.choice(FAULTS), server)] += 1
            ids = rng.choice(ROWS, BATCH, replace=False)
            values = rng.standard_normal((BATCH, DIM)).astype(np.float32)
            flying.append((bank.update_async("feat/7", ids, values), ids, values))
            if len(flying) >= IN_FLIGHT:
                _settle(flying.popleft(), mirror, outcome)
        while flying:
            _settle(flying.popleft(), mirror, outcome)
        served, wanted = bank.gather("feat/7", np.arange(ROWS)), mirror.gather("feat/7", np.arange(ROWS))
        outcome.rows_equal = bool(np.array_equal(served, wanted))
        outcome.lost = abs(outcome.updates_acknowledged - bank.info("feat/7")["updates"])
        outcome.resends, outcome.reconnects = bank.resends, bank.reconnects
    finally:
        bank.close()
        mirror.close()
        server.stop()
    outcome.seconds = time.monotonic() - started
    return outcome


def _settle(item: tuple, mirror, outcome: Outcome) -> None:
    future, ids, values = item
    future.result()  # raises if the update was refused or timed out: the run fails
    mirror.update("feat/7", ids, values)
    outcome.updates_acknowledged += 1


def _inject(kind: str, server: Server) -> str:
    """Restart the server (its client reconnects and resends what is unanswered), or freeze it
    past the client's retry interval (the client resends; the server sees copies of requests it
    has queued or answered)."""
    if kind == "restart":
        server.restart()
    else:
        server.freeze(1.5)
    return kind


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--updates", type=int, default=3000)
    parser.add_argument("--faults", type=int, default=30)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        outcome = run(args.updates, args.faults, args.seed, Path(tmp))
    print(f"updates acknowledged {outcome.updates_acknowledged}, faults {dict(outcome.faults)}, "
          f"client resends {outcome.resends}, reconnects {outcome.reconnects}, "
          f"rows equal to the mirror: {outcome.rows_equal}, lost or doubled: {outcome.lost}, "
          f"{outcome.seconds:.0f} s")
    sys.exit(0 if outcome.rows_equal and outcome.lost == 0 else 1)


if __name__ == "__main__":
    main()
