"""Step-consistent banks: ranks' knn_update requests tagged with the training step give exactly
what one process with the global batch gives, whatever order they arrive in."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from conftest import start_server, stop_server

from fgc_bank import connect
from fgc_bank.bank import BankConfig, MemoryBank, SearchUpdate
from fgc_bank.errors import BankError, ErrorCode

N, D, B, K, RANKS, STEPS = 3000, 32, 64, 20, 2, 5


def batches(seed: int = 0) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """For each step, each rank's (ids, features): distinct ids within a step, like a sampler's."""
    rng = np.random.default_rng(seed)
    steps = []
    for _ in range(STEPS):
        ids = rng.choice(N, RANKS * B, replace=False)
        features = rng.standard_normal((RANKS * B, D)).astype(np.float32)
        steps.append([(ids[r * B:(r + 1) * B], features[r * B:(r + 1) * B]) for r in range(RANKS)])
    return steps


def global_batch_run(steps) -> tuple[list[np.ndarray], np.ndarray]:
    """One process, the global batch: one untagged knn_update a step."""
    bank = MemoryBank(BankConfig("b", N, D, seed=1))
    found = []
    for ranks in steps:
        ids, features = np.concatenate([r[0] for r in ranks]), np.concatenate([r[1] for r in ranks])
        found.append(bank.execute([SearchUpdate(ids, features, K)])[0].knn.ids)
    return found, bank.export()


def ranked_run(steps, order_seed: int, coalesce: bool) -> tuple[list[np.ndarray], np.ndarray]:
    """RANKS ranks' tagged requests, each step's in a shuffled order (and, with ``coalesce``,
    a step's requests executed as one coalesced run, as a server's worker does)."""
    rng = np.random.default_rng(order_seed)
    bank = MemoryBank(BankConfig("b", N, D, seed=1))
    found = []
    for step, ranks in enumerate(steps):
        answers = [None] * RANKS
        order = rng.permutation(RANKS)
        ops = [SearchUpdate(*ranks[r], K, step=step) for r in order]
        results = bank.execute(ops) if coalesce else [bank.execute([op])[0] for op in ops]
        for r, result in zip(order, results):
            answers[r] = result.knn.ids
        found.append(np.concatenate(answers))
    return found, bank.export()


@pytest.mark.parametrize("order_seed, coalesce", [(0, False), (1, False), (2, True), (3, True)])
def test_ranks_tagged_with_the_step_equal_one_process_with_the_global_batch(order_seed: int, coalesce: bool) -> None:
    steps = batches()
    want_found, want_rows = global_batch_run(steps)
    found, rows = ranked_run(steps, order_seed, coalesce)
    for step in range(STEPS):
        assert np.array_equal(found[step], want_found[step]), f"positives differ at step {step}"
    assert np.array_equal(rows, want_rows)  # bit for bit


def test_a_row_written_twice_in_a_step_ends_the_same_in_any_order() -> None:
    rng = np.random.default_rng(5)
    ids = np.arange(10)
    a, b = rng.standard_normal((10, D)).astype(np.float32), rng.standard_normal((10, D)).astype(np.float32)
    ends = []
    for first, second in ((a, b), (b, a)):
        bank = MemoryBank(BankConfig("b", N, D, seed=1))
        bank.execute([SearchUpdate(ids, first, K, step=0)])
        bank.execute([SearchUpdate(ids, second, K, step=0)])
        ends.append(bank.export())
    assert np.array_equal(ends[0], ends[1])


def test_a_closed_step_is_refused_and_a_step_holds_at_most_a_banks_worth() -> None:
    bank = MemoryBank(BankConfig("b", 200, D, seed=1))
    rng = np.random.default_rng(2)
    features = rng.standard_normal((150, D)).astype(np.float32)
    assert isinstance(bank.execute([SearchUpdate(np.arange(150), features, K, step=3)])[0].knn.ids, np.ndarray)
    full = bank.execute([SearchUpdate(np.arange(100), features[:100], K, step=3)])[0]
    assert isinstance(full, BankError) and full.code is ErrorCode.TOO_LARGE
    bank.execute([SearchUpdate(np.arange(10), features[:10], K, step=4)])  # closes step 3
    stale = bank.execute([SearchUpdate(np.arange(10), features[:10], K, step=3)])[0]
    assert isinstance(stale, BankError) and stale.code is ErrorCode.STEP_CLOSED
    assert bank.info()["closed_step"] == 3
    before = bank.info()["updates"]
    bank.export()  # a snapshot closes the open step: its updates are in it
    assert bank.info()["updates"] == before + 1 and bank.info()["closed_step"] == 4


def test_through_a_server_ranks_in_any_order_equal_the_global_batch(tmp_path) -> None:
    steps = batches(seed=7)
    want_found, want_rows = global_batch_run(steps)
    proc, address = start_server(tmp_path)
    clients = [connect(address) for _ in range(RANKS)]
    try:
        clients[0].create("b", N, D, seed=1)
        for step, ranks in enumerate(steps):
            futures = {}
            order = list(itertools.permutations(range(RANKS)))[step % 2]
            for r in order:  # both in flight at once: the server may coalesce them
                futures[r] = clients[r].knn_update_async("b", *ranks[r], K, step=step)
            found = np.concatenate([futures[r].result().ids for r in range(RANKS)])
            assert np.array_equal(found, want_found[step]), f"positives differ at step {step}"
        assert np.array_equal(clients[0].gather("b", np.arange(N)), want_rows)
        with pytest.raises(BankError) as info:
            clients[1].knn_update("b", *steps[0][1], K, step=0)
        assert info.value.code is ErrorCode.STEP_CLOSED
    finally:
        for client in clients:
            client.close()
        stop_server(proc)


def test_threads_racing_their_requests_still_give_the_same_bank(tmp_path) -> None:
    """Ranks as threads that send as soon as they can: arrival order is up to the scheduler."""
    steps = batches(seed=11)
    _, want_rows = global_batch_run(steps)
    with connect("local://") as bank:
        bank.create("b", N, D, seed=1)
        for step, ranks in enumerate(steps):
            threads = [threading.Thread(target=bank.knn_update, args=("b", *ranks[r], K), kwargs={"step": step})
                       for r in range(RANKS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        assert np.array_equal(bank.gather("b", np.arange(N)), want_rows)
