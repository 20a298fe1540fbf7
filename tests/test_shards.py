"""One bank over shard servers answers as one server does: real `fgc-bank serve --shard I/S`
processes on loopback, fed the same operations as a plain server, compared bit for bit."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TIME_FACTOR, start_server, stop_server, unused_port

from fgc_bank import connect
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.shards import Shard, merge_topk, owners, split

N, D = 1003, 24  # rows not divisible by 3: shards of 335, 334, 334


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory):
    """A plain server and three shard servers (given to clients in a scrambled order)."""
    root = tmp_path_factory.mktemp("shards")
    plain, plain_address = start_server(root)
    shards = [start_server(root, "--shard", f"{i}/3") for i in range(3)]
    yield plain_address, [address for _, address in shards]
    for proc, _ in [(plain, plain_address), *shards]:
        assert proc.poll() is None, "a server died"
        stop_server(proc)


def test_the_split_covers_every_id_once_and_owners_agree() -> None:
    for rows, count in [(10, 3), (1003, 3), (7, 7), (2**31 - 1, 5)]:
        parts = split(rows, count)
        assert parts[0][0] == 0 and parts[-1][1] == rows
        assert all(a[1] == b[0] for a, b in itertools.pairwise(parts))
        assert max(hi - lo for lo, hi in parts) - min(hi - lo for lo, hi in parts) <= 1
    ids = np.arange(1003)
    np.testing.assert_array_equal(owners(ids, 1003, 3), np.repeat([0, 1, 2], [335, 334, 334]))
    assert Shard.parse(" 2/4 ") == Shard(2, 4)
    for bad in ("4/4", "1", "-1/2", "a/b", "1/0"):
        with pytest.raises(BankError):
            Shard.parse(bad)


def test_merge_topk_is_the_top_k_of_everything() -> None:
    rng = np.random.default_rng(0)
    scores = rng.standard_normal((5, 90)).astype(np.float32)
    ids = np.tile(np.arange(90), (5, 1))
    parts = [(np.sort(scores[:, a:b])[:, ::-1][:, :7],
              np.take_along_axis(ids[:, a:b], np.argsort(-scores[:, a:b], axis=1), 1)[:, :7]) for a, b in split(90, 4)]
    merged_scores, merged_ids = merge_topk([p[0] for p in parts], [p[1] for p in parts], 7)
    order = np.argsort(-scores.astype(np.float64), axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(merged_ids, order)
    np.testing.assert_array_equal(merged_scores, np.take_along_axis(scores, order, 1))


def test_three_shards_answer_exactly_as_one_server(servers) -> None:
    plain_address, shard_addresses = servers
    rng = np.random.default_rng(7)
    scrambled = ",".join([shard_addresses[2], shard_addresses[0], shard_addresses[1]])
    with connect(plain_address) as one, connect(scrambled) as sharded:
        for bank in (one, sharded):
            bank.create("same", N, D, momentum=0.5, seed=11)
        assert sharded.info("same")["ids"] == [0, N] and sharded.info("same")["shards"] == 3
        np.testing.assert_array_equal(sharded.gather("same", np.arange(N)), one.gather("same", np.arange(N)))
        for step in range(12):
            ids = rng.choice(N, 64, replace=False)
            values = rng.standard_normal((64, D)).astype(np.float32)
            queries = rng.standard_normal((16, D)).astype(np.float32)
            k = int(rng.integers(1, 300))
            exclude = np.where(rng.random(16) < 0.5, rng.integers(0, N, 16), -1)
            calls = [
                ("update", (ids, values), {"mode": "overwrite" if step % 4 == 0 else "momentum"}),
                ("knn", (queries, k), {}),
                ("knn", (queries, k), {"exclude": exclude}),
                ("knn_update", (ids[:16], queries, k), {}),
                ("gather", (ids[::-1],), {}),
                ("sample", (40,), {"seed": step}),
            ]
            for op, args, kwargs in calls:
                _assert_same(getattr(one, op)("same", *args, **kwargs), getattr(sharded, op)("same", *args, **kwargs))
            # several in flight at once: the servers coalesce them into one search
            futures = [[b.knn_update_async("same", ids[16 * j:16 * (j + 1)], values[16 * j:16 * (j + 1)], 20)
                        for j in range(4)] for b in (one, sharded)]
            for a, b in zip(*futures):
                _assert_same(a.result(), b.result())
        final = one.gather("same", np.arange(N))
        np.testing.assert_array_equal(sharded.gather("same", np.arange(N)), final)
        assert sharded.info("same")["updates"] == one.info("same")["updates"]
        assert sharded.info("same")["rows_updated"] == one.info("same")["rows_updated"]
        for bank in (one, sharded):
            bank.drop("same")


def _assert_same(a, b) -> None:
    if hasattr(a, "scores"):
        np.testing.assert_array_equal(a.ids, b.ids)
        # float32 rounding: a score comes from the search's kernel or from the rescoring of rows
        # changed within a coalesced batch, whichever path each server's timing took (one server
        # run twice differs the same way)
        np.testing.assert_allclose(a.scores, b.scores, rtol=4e-7, atol=0)
        assert a.version == b.version
    elif isinstance(a, tuple):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    else:
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_shard_refuses_ids_it_does_not_hold_and_says_which(servers) -> None:
    _, shard_addresses = servers
    with connect(",".join(shard_addresses)) as sharded:
        sharded.create("held", 30, 4, exist_ok=True)
    with connect(shard_addresses[1]) as one_shard:
        with pytest.raises(BankError) as info:
            one_shard.update("held", [0], np.ones((1, 4), np.float32))
        assert info.value.code is ErrorCode.ID_OUT_OF_RANGE and "holds ids 10..19" in info.value.message
        assert one_shard.hello()["shard"] == [1, 3]
    with connect(",".join(shard_addresses)) as sharded:
        with pytest.raises(BankError) as info:
            sharded.gather("held", [30])
        assert info.value.code is ErrorCode.ID_OUT_OF_RANGE
        sharded.drop("held")


@pytest.mark.parametrize(("pick", "why"), [([0, 0, 1], "[0] given twice, [2] missing"),
                                           ([0, 1], "2 addresses were given but"),
                                           (["plain", 1, 2], "is shard 0/1")])
def test_a_set_of_servers_that_is_not_every_shard_once_is_refused(servers, pick, why) -> None:
    plain_address, shard_addresses = servers
    addresses = [plain_address if p == "plain" else shard_addresses[p] for p in pick]
    if pick == [0, 0, 1]:  # the same server under another name
        addresses[1] = addresses[1].replace("127.0.0.1", "localhost")
    with pytest.raises(BankError) as info:
        connect(",".join(addresses), timeout=10 * TIME_FACTOR)
    assert info.value.code is ErrorCode.BAD_ARGUMENT
    assert why in info.value.message, info.value.message


def test_shards_with_different_banks_are_refused(servers) -> None:
    _, shard_addresses = servers
    for i, dim in ((0, 4), (1, 5)):
        with connect(shard_addresses[i]) as shard:
            shard.create("odd", 30, dim)
    try:
        with pytest.raises(BankError) as info:
            connect(",".join(shard_addresses))
        assert info.value.code is ErrorCode.BANK_MISMATCH and "'odd' has different configurations" in info.value.message
        with connect(shard_addresses[1]) as shard:
            shard.drop("odd")
        with connect(",".join(shard_addresses)) as sharded:  # on some shards only: being created, say
            with pytest.raises(BankError) as info:
                sharded.knn("odd", np.ones((1, 4), np.float32), 1)
            # shards 1 and 2 lack it: the error is whichever of theirs came first, named
            assert info.value.code is ErrorCode.UNKNOWN_BANK
            assert info.value.message.startswith(("shard 1/3 (", "shard 2/3 (")), info.value.message
    finally:
        for address in shard_addresses:
            with connect(address) as shard:
                if "odd" in shard.hello()["banks"]:
                    shard.drop("odd")


def start_shard(root: Path, index: int, count: int, *extra: str) -> tuple[subprocess.Popen, str]:
    """Shard ``index`` of ``count``, snapshotting into ``root/s{index}/snaps`` (kept across restarts)."""
    home = root / f"s{index}"
    home.mkdir(exist_ok=True)
    return start_server(home, "--shard", f"{index}/{count}", "--snapshot-dir", str(home / "snaps"), *extra)


def test_snapshot_of_every_shard_restores_bit_for_bit_and_a_killed_shard_resumes(tmp_path: Path) -> None:
    ports = [str(unused_port()) for _ in range(2)]
    procs = [start_shard(tmp_path, i, 2, "--port", ports[i]) for i in range(2)]
    address = ",".join(a for _, a in procs)
    rng = np.random.default_rng(3)
    try:
        with connect(address, timeout=30 * TIME_FACTOR, retry_interval=1.0) as bank:
            bank.create("feat", 501, 8, seed=2)
            bank.knn_update("feat", rng.choice(501, 50, replace=False), rng.standard_normal((50, 8)).astype(np.float32), 5)
            saved = bank.snapshot()
            assert saved["name"].startswith("shards2-") and len(saved["shards"]) == 2
            before = bank.gather("feat", np.arange(501))
            bank.update("feat", np.arange(501), rng.standard_normal((501, 8)).astype(np.float32))
            assert not np.array_equal(bank.gather("feat", np.arange(501)), before)
            listing = bank.snapshots()
            assert any(s["name"] == saved["name"] and s["complete"] for s in listing["snapshots"])
            bank.restore(saved["name"])
            np.testing.assert_array_equal(bank.gather("feat", np.arange(501)), before)

            # shard 1 killed: a call fails naming it; restarted from its snapshot, the bank resumes
            with connect(address, timeout=2 * TIME_FACTOR) as quick:
                procs[1][0].send_signal(signal.SIGKILL)
                procs[1][0].wait()
                with pytest.raises(BankError) as info:
                    quick.gather("feat", [500])
                assert "shard 1/2" in info.value.message and procs[1][1] in info.value.message
                np.testing.assert_array_equal(quick.gather("feat", [0]), before[:1])  # shard 0 serves on
        with pytest.raises(BankError) as info:
            connect(address, timeout=2 * TIME_FACTOR)
        assert procs[1][1] in info.value.message
    except BaseException:
        for proc, _ in procs:
            proc.kill()
        raise
    with connect(procs[0][1]) as shard0:
        shard0.snapshot()  # shard 0's newest state is its restored one, like shard 1's snapshot
    procs[1] = start_shard(tmp_path, 1, 2, "--port", ports[1])
    try:
        with connect(address, timeout=30 * TIME_FACTOR) as bank:
            np.testing.assert_array_equal(bank.gather("feat", np.arange(501)), before)
            with pytest.raises(BankError) as info:
                bank.restore("shards2-0000000000000000")
            assert "not complete" in info.value.message
    finally:
        for proc, _ in procs:
            stop_server(proc)


def test_a_snapshot_of_one_shard_is_refused_by_another(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--shard", "0/2", "--snapshot-dir", str(snaps))
    with connect(address) as bank:
        bank.create("b", 10, 4)
    stop_server(proc)
    with pytest.raises(RuntimeError) as info:
        start_server(tmp_path, "--shard", "1/2", "--snapshot-dir", str(snaps))
    assert "a snapshot of shard 0/2; this server is shard 1/2" in str(info.value)


@pytest.mark.parametrize("engine", ["faiss", "torch"])
@pytest.mark.parametrize(("rows", "k_max"), [(203, 80), (20, 19)])  # 20 rows: k beyond a shard's 7 rows
def test_parts_of_a_bank_merge_to_the_whole_bank(engine: str, rows: int, k_max: int) -> None:
    """In process, every store: S parts of a bank, fed the same ops (an update split by owner),
    give the whole bank's neighbours and, after the ops, its rows."""
    from fgc_bank.bank import BankConfig, MemoryBank, Search, SearchUpdate, Update
    from fgc_bank.stores import Placement

    placement = Placement.resolve(engine, "cpu")
    config = BankConfig("b", rows, 16, 0.5, "unit", 3)
    whole = MemoryBank(config, placement=placement)
    parts = [MemoryBank(config, placement=placement, part=p) for p in split(rows, 3)]
    rng = np.random.default_rng(0)
    for t in range(24):
        ids = rng.choice(rows, 8, replace=False).astype(np.int64)
        values = rng.standard_normal((8, 16)).astype(np.float32)
        k = int(rng.integers(1, k_max))
        if t % 3 == 2:
            own = owners(ids, rows, 3)
            whole.execute([Update(ids, values)])
            for i, part in enumerate(parts):
                part.execute([Update(ids[own == i], values[own == i])])
            continue
        op = SearchUpdate(ids, values, k, step=t if t % 2 else None) if t % 3 == 0 else \
            Search(values, k, np.where(rng.random(8) < 0.5, ids, -1))
        want = whole.execute([op])[0].knn
        got = [part.execute([op])[0].knn for part in parts]
        scores, found = merge_topk([g.scores for g in got], [g.ids for g in got], k)
        np.testing.assert_array_equal(found, want.ids)
        np.testing.assert_allclose(scores, want.scores, rtol=4e-7, atol=0)
    np.testing.assert_array_equal(np.concatenate([part.export() for part in parts]), whole.export())
    assert {part.counters["updates"] for part in parts} == {whole.counters["updates"]}


@pytest.mark.parametrize("shard", [None, Shard(1, 2)])
def test_a_bank_split_over_devices_answers_as_one_bank(shard: Shard | None) -> None:
    """`--device cpu,cpu,cpu`: each bank (or this shard's share of it) split over three devices,
    searched in parallel and merged, coalesced batches included, equals one bank."""
    from fgc_bank.bank import BankConfig, Search, SearchUpdate, Update
    from fgc_bank.layout import Layout, SplitBank

    one = Layout.resolve("auto", "cpu", shard or Shard())
    three = Layout.resolve("auto", "cpu,cpu,cpu", shard or Shard())
    config = BankConfig("b", 301, 16, 0.5, "uniform", 5)
    whole, split_bank = one.make(config), three.make(config)
    assert isinstance(split_bank, SplitBank) and split_bank.info()["ids"] == whole.info()["ids"]
    lo, hi = one.held(301)
    rng = np.random.default_rng(1)
    for t in range(10):
        ids = rng.choice(np.arange(lo, hi), 12, replace=False).astype(np.int64)
        values = rng.standard_normal((12, 16)).astype(np.float32)
        batch = [Update(ids[:4], values[:4]), SearchUpdate(ids[4:], values[4:], 30, step=t if t % 2 else None),
                 Search(values, 40, np.where(rng.random(12) < 0.5, ids, -1)), Update(ids[8:], values[8:], "overwrite")]
        for op in batch:
            whole.validate(op)
            split_bank.validate(op)
        for want, got in zip(whole.execute(batch), split_bank.execute(batch)):
            assert want.version == got.version
            if want.knn is not None:
                np.testing.assert_array_equal(got.knn.ids, want.knn.ids)
                np.testing.assert_allclose(got.knn.scores, want.knn.scores, rtol=4e-7, atol=0)
    np.testing.assert_array_equal(split_bank.export(), whole.export())
    np.testing.assert_array_equal(split_bank.gather(np.arange(lo, hi)[::-1]), whole.gather(np.arange(lo, hi)[::-1]))
    np.testing.assert_array_equal(split_bank.sample(9, 4)[1], whole.sample(9, 4)[1])
    assert split_bank.counters == whole.counters
    with pytest.raises(BankError):
        split_bank.validate(Update(np.array([hi]) if hi < 301 else np.array([lo - 1]), np.ones((1, 16), np.float32)))


def test_a_server_on_several_devices_serves_and_snapshots_as_one(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--device", "cpu,cpu", "--snapshot-dir", str(snaps))
    rng = np.random.default_rng(2)
    queries = rng.standard_normal((8, 12)).astype(np.float32)
    try:
        with connect(address) as bank:
            bank.create("b", 97, 12, seed=4)
            assert bank.info("b")["device"] == "cpu,cpu"
            bank.knn_update("b", np.arange(40, 48), queries, 5)
            answer = bank.knn("b", queries, 20, exclude=np.arange(40, 48))
            rows = bank.gather("b", np.arange(97))
    finally:
        stop_server(proc)  # writes the final snapshot
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snaps))  # one device now
    try:
        with connect(address) as bank:
            np.testing.assert_array_equal(bank.gather("b", np.arange(97)), rows)
            again = bank.knn("b", queries, 20, exclude=np.arange(40, 48))
            np.testing.assert_array_equal(again.ids, answer.ids)
            np.testing.assert_allclose(again.scores, answer.scores, rtol=4e-7, atol=0)
    finally:
        stop_server(proc)


@pytest.mark.timeout(180)
def test_shard_servers_launched_by_torchrun_are_found_through_the_rendezvous(tmp_path: Path) -> None:
    """`torchrun --nproc_per_node 2 -m bank_server --shard auto --rendezvous E`: two shard
    servers take their shards from torchrun and publish themselves; rdzv://E finds both."""
    endpoint = f"127.0.0.1:{unused_port()}"
    log = tmp_path / "torchrun.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
                                 "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "-m", "bank_server",
                                 "--shard", "auto", "--rendezvous", endpoint, "--port", "0"],
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        with connect(f"rdzv://{endpoint}", timeout=60 * TIME_FACTOR) as bank:
            assert bank.count == 2
            bank.create("found", 11, 4, seed=1)
            with connect(bank.address.split(",")[1]) as second:
                assert second.hello()["shard"] == [1, 2]
                assert second.info("found")["ids"] == [6, 11]
            with connect("local://") as one:
                one.create("found", 11, 4, seed=1)
                np.testing.assert_array_equal(bank.gather("found", np.arange(11)), one.gather("found", np.arange(11)))
    except BaseException:
        print(log.read_text())
        raise
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 30
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_serve_refuses_shard_specs_it_cannot_use(monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fgc_bank.cli import main

    monkeypatch.delenv("RANK", raising=False)
    for spec, why in [("auto", "launch with torchrun"), ("3/3", "0 <= I < S"), ("half", "of the form I/S")]:
        result = CliRunner().invoke(main, ["serve", "--shard", spec, "--port", "0"])
        assert result.exit_code == 2 and why in result.output and "Traceback" not in result.output, result.output


@pytest.mark.slow
def test_a_trainer_checkpoint_pairs_with_a_snapshot_of_every_shard(tmp_path: Path) -> None:
    """fgc-train against two shard servers: its checkpoint names the snapshot group, and a resume
    restores every shard's banks to it while the banks had moved on."""
    import torch
    from click.testing import CliRunner

    from trainer.builder import StartFrom, build_trainer
    from trainer.checkpoint import load_checkpoint
    from trainer.cli import train
    from trainer.config import TrainConfig
    from trainer.distributed import DistContext

    procs = [start_shard(tmp_path, i, 2) for i in range(2)]
    address = ",".join(a for _, a in procs)
    try:
        out = tmp_path / "run"
        args = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--max-steps", "2",
                "--no-progress", "--log-level", "WARNING", "--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1",
                "--contrast-blocks", "7,8", "--epochs", "2", "--bank", address, "--out-dir", str(out)]
        result = CliRunner().invoke(train, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        saved = load_checkpoint(out / "checkpoint.pt")
        assert saved.bank_snapshot is not None and saved.bank_snapshot.startswith("shards2-")
        with connect(address) as bank:
            paired = {name: bank.gather(name, np.arange(64)) for name in ("feat/7", "feat/8")}
            bank.update("feat/7", np.arange(64), np.ones((64, 64), np.float32), mode="overwrite")
        trainer = build_trainer(TrainConfig.from_dict(saved.config), DistContext(0, 1, 0, torch.device("cpu")),
                                StartFrom(saved, resume=True))
        client = trainer.banks.features.client
        for name, rows in paired.items():
            np.testing.assert_array_equal(client.gather(name, np.arange(64)), rows)
    finally:
        for proc, _ in procs:
            stop_server(proc)


@pytest.mark.parametrize("init", ["uniform", "unit"])
def test_the_parts_of_a_bank_start_as_the_whole_bank_does(init: str) -> None:
    import torch

    from fgc_bank.bank import initial_rows

    for rows, dim in [(1000, 37), (70_000, 64), (10, 3)]:  # 70,000 x 64: parts cross the draw's chunks
        whole = initial_rows(rows, dim, init, 5)
        for count in (2, 3, 7):
            parts = torch.cat([initial_rows(rows, dim, init, 5, part) for part in split(rows, count)])
            assert torch.equal(parts, whole), (rows, dim, count)
    if init == "uniform":  # FGC's init, as the authors draw it: one call for the whole bank
        gen = torch.Generator().manual_seed(3)
        bound = 1 / (64 / 3) ** 0.5
        assert torch.equal(initial_rows(5000, 64, "uniform", 3), torch.rand(5000, 64, generator=gen) * (2 * bound) - bound)
    else:
        torch.testing.assert_close(whole.norm(dim=1), torch.ones(10))


def test_the_cli_commands_take_a_list_of_shards(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from fgc_bank.cli import main

    procs = [start_shard(tmp_path, i, 2) for i in range(2)]
    address = ",".join(a for _, a in procs)
    try:
        with connect(address) as bank:
            bank.create("feat/7", 100, 8)
        run = CliRunner()
        made = run.invoke(main, ["snapshot", address])
        assert made.exit_code == 0 and made.output.startswith("shards2-"), made.output
        group = made.output.split()[0]
        listed = run.invoke(main, ["ls", address])
        assert listed.exit_code == 0 and group in listed.output and "feat/7" in listed.output, listed.output
        shown = run.invoke(main, ["info", address])
        assert shown.exit_code == 0 and "-- shard 0/2" in shown.output and "-- shard 1/2" in shown.output, shown.output
        assert run.invoke(main, ["drop", address, "feat/7"]).exit_code == 0
        restored = run.invoke(main, ["restore", address, group])
        assert restored.exit_code == 0 and f"restored {group}: 1 banks" in restored.output, restored.output
        with connect(address) as bank:
            assert bank.info("feat/7")["rows"] == 100
        refused = run.invoke(main, ["restore", address, "shards2-nothing"])
        assert refused.exit_code == 1 and "not complete" in refused.output and "Traceback" not in refused.output
    finally:
        for proc, _ in procs:
            stop_server(proc)
