"""A real 2-process torchrun (gloo, CPU) FGC run against a real bank server."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data.distributed import DistributedSampler

from fgc_bank import connect
from fgc_bank.bank import initial_rows
from trainer.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parent.parent
SIZE, GLOBAL_BATCH, STEPS, EPOCHS = 64, 16, 3, 2


def ids_seen(world: int = 2) -> set[int]:
    """Every dataset index the two ranks train on: the sampler's order, STEPS batches each."""
    seen: set[int] = set()
    for epoch in range(EPOCHS):
        for rank in range(world):
            sampler = DistributedSampler(range(SIZE), num_replicas=world, rank=rank, seed=0)
            sampler.set_epoch(epoch)
            seen.update(list(sampler)[: STEPS * GLOBAL_BATCH // world])
    return seen


@pytest.mark.slow
def test_two_rank_torchrun_keeps_gate_banks_identical(tmp_path: Path, server: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "trainer", "--phase", "fgc", "--dataset", "synthetic",
               "--synthetic-size", str(SIZE), "--batch-size", str(GLOBAL_BATCH),
               "--epochs", str(EPOCHS), "--max-steps", str(STEPS), "--nn-epoch", "1",
               "--nn-num", "4", "--bank", server, "--bank-prefix", "ddp", "--dump-gate-banks",
               "--no-progress", "--out-dir", str(tmp_path)]
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert "final: top-1" in done.stdout

    rank0 = torch.load(tmp_path / "gate_bank.rank0.pt")
    rank1 = torch.load(tmp_path / "gate_bank.rank1.pt")
    saved = load_checkpoint(tmp_path / "checkpoint.pt").gate_bank
    expected_changed = ids_seen()
    for block in ("7", "8"):
        assert torch.equal(rank0[block], rank1[block])
        assert torch.equal(rank0[block], saved[block])
        initial = initial_rows(SIZE, 64, "uniform", seed=int(block))  # seed 0 + block
        changed = (rank0[block] != initial).any(dim=1).nonzero().flatten().tolist()
        assert set(changed) == expected_changed  # both ranks' updates reached both replicas
        norms = rank0[block][changed].norm(dim=1)
        torch.testing.assert_close(norms, torch.ones_like(norms))

    with connect(server) as client:
        stats = client.stats()["banks"]
    for block in ("7", "8"):
        info = stats[f"ddp/{block}"]
        assert info["rows_updated"] == EPOCHS * STEPS * GLOBAL_BATCH  # both ranks, shared bank
        assert info["searches"] == STEPS * 2  # kNN only after the one warm-up epoch


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_two_ranks_train_identically_against_two_shards_and_one_server(tmp_path: Path) -> None:
    """The same 2-rank torchrun FGC run on digits, once against one server and once against two
    shard servers: step-consistent banks make the runs identical, weights and banks bit for bit."""
    import numpy as np
    from conftest import start_server, stop_server

    plain = start_server(tmp_path)
    shards = [start_server(tmp_path, "--shard", f"{i}/2") for i in range(2)]
    runs = {"one": plain[1], "shards": ",".join(address for _, address in shards)}
    try:
        for name, bank in runs.items():
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                       "-m", "trainer", "--phase", "fgc", "--dataset", "digits", "--arch", "resnet20",
                       "--batch-size", "32", "--epochs", "2", "--max-steps", "4", "--nn-epoch", "1",
                       "--nn-num", "4", "--bank", bank, "--bank-prefix", "same", "--no-progress",
                       "--out-dir", str(tmp_path / name)]
            env = dict(os.environ, OMP_NUM_THREADS="1",
                       PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
            done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=300, check=False)
            assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
        one, sharded = (load_checkpoint(tmp_path / name / "checkpoint.pt") for name in runs)
        assert one.model.keys() == sharded.model.keys()
        for key in one.model:
            assert torch.equal(one.model[key], sharded.model[key]), key
        for block, rows in one.gate_bank.items():
            assert torch.equal(rows, sharded.gate_bank[block])
        with connect(runs["one"]) as a, connect(runs["shards"]) as b:
            names = [n for n in a.hello()["banks"] if n.startswith("same/")]
            assert names and sorted(names) == sorted(b.hello()["banks"])
            for name in names:
                rows = a.info(name)["rows"]
                np.testing.assert_array_equal(a.gather(name, np.arange(rows)), b.gather(name, np.arange(rows)))
                assert a.info(name)["updates"] == b.info(name)["updates"] > 0
    finally:
        for proc, _ in [plain, *shards]:
            stop_server(proc)
