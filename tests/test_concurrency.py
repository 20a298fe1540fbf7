"""Several client processes writing and searching one bank at once lose nothing: the final bank
equals a serial replay, in the server's order, of every acknowledged update."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np

from fgc_bank import connect

ROWS, DIM, SHARED = 2000, 16, 64  # ids < SHARED are written by every process


def writer(address: str, worker: int, steps: int, out: mp.Queue) -> None:
    rng = np.random.default_rng(100 + worker)
    own = np.arange(SHARED + worker * 300, SHARED + (worker + 1) * 300)  # disjoint per process
    log = []
    with connect(address, timeout=120) as bank:
        for step in range(steps):
            ids = np.concatenate([rng.choice(own, 24, replace=False), rng.choice(SHARED, 8, replace=False)])
            values = rng.standard_normal((ids.size, DIM)).astype(np.float32)
            if step % 3 == 0:
                version = bank.update("shared", ids, values)
                log.append((version, "update", ids, values, None))
            else:
                futures = [bank.knn_update_async("shared", ids, values, 10)]
                result = futures[0].result()
                log.append((result.version, "knn_update", ids, values, result.ids.copy()))
            bank.knn("shared", values[:4], 5)  # searches interleaved with the writes
    out.put(log)


def test_concurrent_writers_equal_a_serial_replay_in_server_order(server: str) -> None:
    workers, steps = 4, 40
    with connect(server) as bank:
        bank.create("shared", ROWS, DIM, seed=9)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=writer, args=(server, w, steps, out)) for w in range(workers)]
    for p in procs:
        p.start()
    logs = [out.get(timeout=300) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    entries = sorted((e for log in logs for e in log), key=lambda e: e[0])
    versions = [e[0] for e in entries]
    assert versions == list(range(1, workers * steps + 1)), "every update applied exactly once, none lost"
    with connect("local://") as replay, connect(server) as bank:
        replay.create("shared", ROWS, DIM, seed=9)
        for version, op, ids, values, neighbours in entries:
            if op == "update":
                assert replay.update("shared", ids, values) == version
            else:
                result = replay.knn_update("shared", ids, values, 10)
                assert result.version == version
                assert np.array_equal(result.ids, neighbours)  # each saw exactly its predecessors
        final = bank.gather("shared", np.arange(ROWS))
        expected = replay.gather("shared", np.arange(ROWS))
        assert np.array_equal(final, expected)  # disjoint and shared ids alike, bit for bit
        stats = bank.stats()
        assert stats["banks"]["shared"]["updates"] == workers * steps
        bank.drop("shared")
