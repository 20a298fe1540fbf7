"""Snapshots: atomic, verified, restored at start, written at shutdown; and a kill -9 fault test."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TIME_FACTOR, start_server, stop_server

from bank_server import snapshot as snapshots
from bank_server.dedup import RecentRequests
from fgc_bank import connect
from fgc_bank.bank import BankConfig, MemoryBank, Update
from fgc_bank.errors import BankError, ErrorCode


def banks_with_updates() -> dict[str, MemoryBank]:
    banks = {}
    for name, rows in (("feat/7", 300), ("feat/8", 200)):
        bank = MemoryBank(BankConfig(name, rows, 8, seed=len(name) + rows))
        bank.execute([Update(np.arange(10), np.ones((10, 8), np.float32))])
        banks[name] = bank
    return banks


def test_write_then_read_gives_back_every_row_config_counter_and_request_id(tmp_path: Path) -> None:
    banks = banks_with_updates()
    path = snapshots.write(tmp_path, snapshots.capture(banks, {"17": [1, 2, 3]}))
    loaded, manifest = snapshots.read(path)
    assert {b.config.name for b in loaded} == set(banks)
    for bank in loaded:
        original = banks[bank.config.name]
        assert bank.config == original.config and bank.counters == original.counters
        assert np.array_equal(bank.rows_np, original.rows_np)
    assert manifest["applied_requests"] == {"17": [1, 2, 3]}
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_or_partial_snapshots_stop_the_scan_or_are_skipped_when_told(tmp_path: Path, caplog) -> None:
    banks = banks_with_updates()
    good = snapshots.write(tmp_path, snapshots.capture(banks, {}))
    expected = banks["feat/7"].rows_np.copy()
    banks["feat/7"].execute([Update(np.array([5]), np.full((1, 8), 3.0, np.float32))])
    flipped = snapshots.write(tmp_path, snapshots.capture(banks, {}))
    truncated = snapshots.write(tmp_path, snapshots.capture(banks, {}))
    raw = bytearray((flipped / "bank-000.npy").read_bytes())
    raw[-1] ^= 0xFF  # one flipped bit in the rows
    (flipped / "bank-000.npy").write_bytes(bytes(raw))
    (truncated / snapshots.MANIFEST).write_text('{"format": 2, "banks": [')
    (tmp_path / ".tmp-snapshot-00000099-1").mkdir()  # a crash mid-write
    refused = snapshots.load_latest(tmp_path)  # the default: stop at the first that fails
    assert refused.loaded == [] and list(refused.failed) == [truncated.name]
    skipped = snapshots.load_latest(tmp_path, keep_going=True)
    assert [d.summary.name for d in skipped.loaded] == [good.name]
    assert list(skipped.failed) == [truncated.name, flipped.name]
    assert np.array_equal({b.config.name: b for b in skipped.loaded[0].banks}["feat/7"].rows_np, expected)
    assert "checksum" in caplog.text and "manifest fails its sha256" in caplog.text
    assert not (tmp_path / ".tmp-snapshot-00000099-1").exists()


def test_old_snapshots_are_pruned_to_keep(tmp_path: Path) -> None:
    banks = banks_with_updates()
    snapper = snapshots.Snapshotter(tmp_path, lambda action: action(),
                                    lambda prefix, retain: snapshots.capture(banks, {}, prefix, retain), keep=2)
    try:
        for _ in range(5):
            snapper.snapshot()
    finally:
        snapper.stop()
    assert [p.name for p in snapshots.snapshots(tmp_path)] == ["snapshot-00000005", "snapshot-00000004"]


def test_dedup_table_round_trips_and_stays_bounded() -> None:
    from fgc_bank.protocol import Reply

    class Job:
        peer = b"old"

    table = RecentRequests(window=4, reply_budget=600)
    jobs = {}
    for rid in range(1, 8):
        jobs[rid] = Job()
        table.begin(5, rid, jobs[rid])
    assert table.export() == {"5": []}  # queued, not applied: a snapshot must not claim them
    assert table.check(5, 7, b"new")[0].value == "queued" and jobs[7].peer == b"new"  # reply redirected
    for rid in range(4, 8):
        table.done(5, rid, Reply(rid, arrays={"x": np.zeros(10, np.float32)}))  # 296 bytes each
    assert table.export() == {"5": [4, 5, 6, 7]}
    seen, cached = table.check(5, 7)
    assert seen.value == "done" and cached is not None and cached.id == 7
    seen, cached = table.check(5, 5)
    assert seen.value == "done" and cached is None  # reply evicted by the byte budget, id remembered
    assert table.check(5, 1)[0].value == "new"  # beyond the window
    fresh = RecentRequests()
    fresh.restore(table.export())
    assert fresh.check(5, 4)[0].value == "done"


def test_server_snapshots_on_request_and_at_sigterm_and_restores_at_start(tmp_path: Path) -> None:
    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    with connect(address) as bank:
        bank.create("feat/7", 500, 16, seed=3)
        bank.update("feat/7", np.arange(20), np.ones((20, 16), np.float32))
        first = bank.snapshot()
        assert first["name"] == "snapshot-00000001" and first["banks"]["feat/7"]["updates"] == 1
        bank.update("feat/7", np.arange(20, 40), np.ones((20, 16), np.float32))
        rows = bank.gather("feat/7", np.arange(500)).copy()
        assert bank.stats()["snapshot"]["name"] == "snapshot-00000001"
    stop_server(proc)  # SIGTERM: a final snapshot holds the second update too
    assert proc.returncode == 0
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    try:
        with connect(address) as bank:
            assert np.array_equal(bank.gather("feat/7", np.arange(500)), rows)
            assert bank.info("feat/7")["updates"] == 2
            assert bank.stats()["restored_from"] == "snapshot-00000002"
            restored = bank.restore("snapshot-00000001")  # a trainer resuming an older checkpoint
            assert restored["banks"]["feat/7"]["updates"] == 1
            assert not np.array_equal(bank.gather("feat/7", np.arange(500)), rows)
            with pytest.raises(BankError) as info:
                bank.restore("../../etc")
            assert info.value.code is ErrorCode.BAD_ARGUMENT
    finally:
        stop_server(proc)


def test_snapshot_without_a_directory_is_a_clear_error(server: str) -> None:
    with connect(server) as bank:
        with pytest.raises(BankError) as info:
            bank.snapshot()
        assert info.value.code is ErrorCode.BAD_ARGUMENT and "--snapshot-dir" in info.value.message


def test_kill_9_then_restart_loses_nothing_acknowledged_before_the_last_snapshot(tmp_path: Path) -> None:
    """Training steps against a server with a snapshot dir; kill -9 it with a knn_update in flight;
    restart it on the same port. The client reconnects and resends, the step completes, and the
    banks are exactly the last snapshot plus what came after: checked row by row against an
    in-process mirror that applied the same acknowledged steps."""
    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    port = address.rsplit(":", 1)[1]
    rng = np.random.default_rng(0)
    steps = [(rng.choice(4000, 128, replace=False), rng.standard_normal((128, 32)).astype(np.float32))
             for _ in range(16)]
    mirror = connect("local://")
    bank = connect(address, timeout=120 * TIME_FACTOR, retry_interval=600)  # only a reconnection resends
    try:
        for b in (bank, mirror):
            b.create("feat/7", 4000, 32, seed=1)
        snapshot_rows = None
        for step, (ids, feats) in enumerate(steps[:12]):
            got, want = bank.knn_update("feat/7", ids, feats, 50), mirror.knn_update("feat/7", ids, feats, 50)
            assert np.array_equal(got.ids, want.ids)
            if step % 5 == 4:
                bank.snapshot()
                snapshot_rows = mirror.gather("feat/7", np.arange(4000)).copy()
        in_flight = bank.knn_update_async("feat/7", *steps[12], 50)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        proc, _ = start_server(tmp_path, "--snapshot-dir", str(snap_dir), "--port", port)
        # The restarted server holds the last snapshot (steps 0-9), verified by checksum.
        mirror.update("feat/7", np.arange(4000), snapshot_rows, mode="overwrite")
        result = in_flight.result()
        want = mirror.knn_update("feat/7", *steps[12], 50)
        assert np.array_equal(result.ids, want.ids)
        for ids, feats in steps[13:]:
            assert np.array_equal(bank.knn_update("feat/7", ids, feats, 50).ids,
                                  mirror.knn_update("feat/7", ids, feats, 50).ids)
        assert np.array_equal(bank.gather("feat/7", np.arange(4000)), mirror.gather("feat/7", np.arange(4000)))
        stats = bank.stats()
        assert stats["restored_from"] == "snapshot-00000002"
        assert bank.reconnects >= 1 and bank.resends >= 1
        banks, _ = snapshots.read(snap_dir / "snapshot-00000002")  # checksums verify
        assert np.array_equal(banks[0].rows_np, snapshot_rows)
    finally:
        bank.close()
        stop_server(proc)


def test_a_retried_update_is_applied_once(server: str) -> None:
    """The same (client id, request id) sent twice: the second is answered, not applied."""
    import zmq

    from fgc_bank.protocol import Request, decode_reply, encode_request

    with connect(server) as bank, connect("local://") as mirror:
        for b in (bank, mirror):
            b.create("dedup", 50, 4, seed=2)
        request = Request("update", "dedup", {}, {"ids": np.arange(5), "rows": np.full((5, 4), 2.0, np.float32)},
                          id=1, client=987654321)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(server)
        try:
            for _ in range(3):
                sock.send_multipart(encode_request(request))
                assert sock.poll(int(10_000 * TIME_FACTOR))
                assert decode_reply(sock.recv_multipart()).unwrap().result["rows_updated"] == 5
        finally:
            sock.close()
        mirror.update("dedup", np.arange(5), np.full((5, 4), 2.0, np.float32))  # once
        assert np.array_equal(bank.gather("dedup", np.arange(50)), mirror.gather("dedup", np.arange(50)))
        assert bank.info("dedup")["updates"] == 1
        assert bank.stats()["copies_seen"] >= 2


def test_trainer_checkpoint_pairs_with_a_bank_snapshot_and_resume_restores_it(tmp_path: Path) -> None:
    import torch
    from click.testing import CliRunner

    from trainer.builder import StartFrom, build_trainer
    from trainer.checkpoint import load_checkpoint
    from trainer.cli import train
    from trainer.config import TrainConfig
    from trainer.distributed import DistContext

    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    try:
        out = tmp_path / "run"
        args = ["--dataset", "synthetic", "--synthetic-size", "64", "--batch-size", "16", "--max-steps", "2",
                "--no-progress", "--log-level", "WARNING", "--phase", "fgc", "--nn-num", "4", "--nn-epoch", "1",
                "--contrast-blocks", "7,8", "--epochs", "2", "--bank", address, "--out-dir", str(out)]
        result = CliRunner().invoke(train, args, catch_exceptions=False)
        assert result.exit_code == 0, result.output
        saved = load_checkpoint(out / "checkpoint.pt")
        assert saved.bank_snapshot is not None and saved.feature_banks is None  # paired, not copied
        paired_rows = {b.config.name: b.rows_np for b in snapshots.read(snap_dir / saved.bank_snapshot)[0]}
        with connect(address) as bank:  # the banks move on after the checkpoint (a later epoch, a crash)
            bank.update("feat/7", np.arange(64), np.ones((64, 64), np.float32), mode="overwrite")
            bank.snapshot()
        trainer = build_trainer(TrainConfig.from_dict(saved.config), DistContext(0, 1, 0, torch.device("cpu")),
                                StartFrom(saved, resume=True))
        client = trainer.banks.features.client
        for name in ("feat/7", "feat/8"):
            assert np.array_equal(client.gather(name, np.arange(64)), paired_rows[name])
    finally:
        stop_server(proc)


def test_periodic_snapshots_are_written_and_pruned(tmp_path: Path) -> None:
    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir), "--snapshot-every", "0.3",
                                 "--snapshot-keep", "2")
    try:
        with connect(address) as bank:
            bank.create("tick", 100, 4)
            deadline = time.monotonic() + 30 * TIME_FACTOR
            while (bank.stats()["snapshot"] or {}).get("name", "") < "snapshot-00000004":
                assert time.monotonic() < deadline, "no periodic snapshots"
                time.sleep(0.1)
            age = bank.stats()["snapshot"]["age_s"]
            assert 0 <= age < 30 * TIME_FACTOR
    finally:
        stop_server(proc)
    assert len(snapshots.snapshots(snap_dir)) == 2  # pruned after each write, the final one too
