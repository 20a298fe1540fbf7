"""Snapshots: atomic, verified, restored at start, written at shutdown; and a kill -9 fault test."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest.mock import ANY

import numpy as np
import pytest
import zmq
from conftest import TIME_FACTOR, server_log, start_server, stop_server, unused_port

from bank_server import snapshot as snapshots
from bank_server.server import BankServer, ServerConfig
from fgc_bank import connect
from fgc_bank.bank import BankConfig, MemoryBank, Update
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.protocol import Reply, Request, decode_reply, encode_request


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
        assert np.array_equal(bank.export(), original.export())
    assert manifest["applied_requests"] == {"17": [1, 2, 3]}
    assert not list(tmp_path.glob(".tmp-*"))


def test_corrupt_or_partial_snapshots_stop_the_scan_or_are_skipped_when_told(tmp_path: Path, caplog) -> None:
    banks = banks_with_updates()
    good = snapshots.write(tmp_path, snapshots.capture(banks, {}))
    expected = banks["feat/7"].export().copy()
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
    assert np.array_equal({b.config.name: b for b in skipped.loaded[0].banks}["feat/7"].export(), expected)
    assert "checksum" in caplog.text and "manifest fails its sha256" in caplog.text
    assert not (tmp_path / ".tmp-snapshot-00000099-1").exists()


def test_old_snapshots_are_pruned_to_keep(tmp_path: Path) -> None:
    banks = banks_with_updates()
    snapper = snapshots.Snapshotter(tmp_path, lambda action: action(),
                                    lambda prefix, retain, group: snapshots.capture(banks, {}, prefix, retain, group=group), keep=2)
    try:
        for _ in range(5):
            snapper.snapshot()
    finally:
        snapper.stop()
    assert [p.name for p in snapshots.snapshots(tmp_path)] == ["snapshot-00000005", "snapshot-00000004"]


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
    port = str(unused_port())  # restarted on it: outside the ephemeral range (see unused_port)
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir), "--port", port)
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
        assert np.array_equal(banks[0].export(), snapshot_rows)
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
        paired_rows = {b.config.name: b.export() for b in snapshots.read(snap_dir / saved.bank_snapshot)[0]}
        assert snapshots.load(snap_dir / saved.bank_snapshot).summary.prefix == "feat/"  # its own banks only
        with connect(address) as bank:  # the banks move on after the checkpoint (a later epoch, a crash)
            bank.update("feat/7", np.arange(64), np.ones((64, 64), np.float32), mode="overwrite")
            bank.snapshot()
            bank.create("runB/7", 64, 8)  # another run shares the server meanwhile
            bank.update("runB/7", np.arange(4), np.ones((4, 8), np.float32))
            other_rows = bank.gather("runB/7", np.arange(64)).copy()
        trainer = build_trainer(TrainConfig.from_dict(saved.config), DistContext(0, 1, 0, torch.device("cpu")),
                                StartFrom(saved, resume=True))
        client = trainer.banks.features.client
        for name in ("feat/7", "feat/8"):
            assert np.array_equal(client.gather(name, np.arange(64)), paired_rows[name])
        assert np.array_equal(client.gather("runB/7", np.arange(64)), other_rows)  # the resume left it alone
        assert trainer.banks.features.paired == saved.bank_snapshot  # the next pairing retains it
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


# --- Issue 20, items 9 and 11-14 ------------------------------------------------------------------


@contextlib.contextmanager
def in_process_server(snap_dir: Path, **options: Any) -> Iterator[BankServer]:
    """A BankServer on a loopback port, its socket loop on a thread (for faults injected by
    monkeypatching); stopped, final snapshot included, on exit."""
    server = BankServer(ServerConfig(port=0, snapshot_dir=snap_dir, **options))
    loop = threading.Thread(target=server.serve_forever, daemon=True)
    loop.start()
    try:
        yield server
    finally:
        server.stop()
        loop.join(timeout=60 * TIME_FACTOR)


def raw_requests(address: str, requests: list[Request]) -> list[Reply]:
    """Send every request at once on one DEALER socket, then collect every reply (any order)."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)
    try:
        for request in requests:
            sock.send_multipart(encode_request(request))
        replies = []
        while len(replies) < len(requests):
            assert sock.poll(int(60_000 * TIME_FACTOR)), f"{len(requests) - len(replies)} requests unanswered"
            replies.append(decode_reply(sock.recv_multipart()))
        return replies
    finally:
        sock.close()


def test_concurrent_snapshot_requests_share_one_write(tmp_path: Path) -> None:
    """Item 9: requests that arrive while a snapshot is written wait for the next one, together."""
    banks = banks_with_updates()
    first_paused, release = threading.Event(), threading.Event()

    def pause(action: Callable[[], Any]) -> Any:
        if not first_paused.is_set():  # the first write holds the workers until released
            first_paused.set()
            release.wait(30)
        return action()

    snapper = snapshots.Snapshotter(tmp_path, pause, lambda p, r, g: snapshots.capture(banks, {}, p, r, group=g), keep=50)
    answers: list[Any] = []
    try:
        snapper.submit("", None, answers.append)
        assert first_paused.wait(30)
        for _ in range(20):
            snapper.submit("", None, answers.append)
        snapper.submit("feat/7", None, answers.append)  # another scope: its own write
        release.set()
    finally:
        snapper.stop()  # answers whatever still waits
    assert len(answers) == 22 and all(isinstance(a, dict) for a in answers)
    assert sorted({a["name"] for a in answers}) == ["snapshot-00000001", "snapshot-00000002", "snapshot-00000003"]
    assert Counter(a["name"] for a in answers).most_common(1)[0][1] == 20
    assert snapper.written == 3 and snapper.coalesced == 19


def test_waiting_snapshot_requests_are_bounded_and_answered_busy_beyond(tmp_path: Path) -> None:
    """Item 9: distinct waiting snapshots are bounded (each is a write); beyond, busy."""
    release = threading.Event()
    snapper = snapshots.Snapshotter(tmp_path, lambda action: release.wait(30) and action(),
                                    lambda p, r, g: snapshots.capture({}, {}, p, r, group=g), keep=50)
    answers: list[Any] = []
    try:
        for i in range(snapshots.MAX_PENDING_SCOPES + 1):  # the first is taken at once, then blocks
            snapper.submit(f"run{i}/", None, answers.append)
            if i == 0:
                while snapper._pending:
                    time.sleep(0.01)
        with pytest.raises(BankError) as info:
            snapper.submit("one-too-many/", None, answers.append)
        assert info.value.code is ErrorCode.BUSY
        snapper.submit("run5/", None, answers.append)  # joins a waiting one: no new write
        release.set()
    finally:
        snapper.stop()
    assert len(answers) == snapshots.MAX_PENDING_SCOPES + 2 and all(isinstance(a, dict) for a in answers)
    assert snapper.written == snapshots.MAX_PENDING_SCOPES + 1


def test_a_burst_of_snapshot_requests_on_a_server_writes_few_snapshots(tmp_path: Path) -> None:
    """Item 9, on a real server: 60 snapshot requests at once -> every one answered, few written."""
    proc, address = start_server(tmp_path, "--snapshot-dir", str(tmp_path / "snaps"), "--snapshot-keep", "100")
    try:
        with connect(address) as bank:
            bank.create("feat/7", 20000, 64)
        replies = raw_requests(address, [Request("snapshot", id=i + 1) for i in range(60)])
        assert sorted(r.id for r in replies) == list(range(1, 61))
        names = {r.unwrap().result["name"] for r in replies}
        assert len(names) <= 6, names  # one write was under way when the burst came; the rest shared
        assert len(snapshots.snapshots(tmp_path / "snaps")) == len(names)
    finally:
        stop_server(proc)


def test_a_server_that_cannot_restore_refuses_to_start_and_never_prunes_it(tmp_path: Path) -> None:
    """Item 11: a bank file missing at start -> exit 1 with one line; with the flag the server
    starts empty, and its own snapshots never prune the one it could not load."""
    snap_dir = tmp_path / "snaps"
    good = snapshots.write(snap_dir, snapshots.capture(banks_with_updates(), {}))
    hidden = tmp_path / "bank-000.npy"
    (good / "bank-000.npy").rename(hidden)  # e.g. a mount not there yet
    proc = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "--log-level", "error", "serve", "--port", "0",
                           "--snapshot-dir", str(snap_dir)], check=False, capture_output=True, text=True,
                          timeout=60 * TIME_FACTOR)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and good.name in lines[0] and "--skip-unloadable-snapshots" in lines[0], proc.stderr
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir), "--skip-unloadable-snapshots",
                                 "--snapshot-keep", "1")
    try:
        with connect(address) as bank:
            assert bank.hello()["banks"] == {}
            for _ in range(3):
                bank.snapshot()
            listed = {s["name"]: s for s in bank.snapshots()["snapshots"]}
            assert "failed to load" in listed[good.name]["error"]
    finally:
        stop_server(proc)
    assert proc.returncode == 0
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir), "--snapshot-keep", "1")
    try:  # a later server, which never tried it, does not prune it either (unloadable.json)
        with connect(address) as bank:
            for _ in range(2):
                bank.snapshot()
            assert good.is_dir()
            hidden.rename(good / "bank-000.npy")  # the mount is back
            assert set(bank.restore(good.name)["banks"]) == {"feat/7", "feat/8"}
    finally:
        stop_server(proc)
    assert snapshots.read_unloadable(snap_dir) == {}  # loaded: off the record, an old snapshot like any other


@pytest.mark.parametrize("edit", ["momentum", "counter", "dedup table", "no checksum file"])
def test_an_edited_manifest_is_refused(tmp_path: Path, edit: str) -> None:
    """Item 12: the manifest is checksummed: edits to what it alone holds are caught."""
    path = snapshots.write(tmp_path, snapshots.capture(banks_with_updates(), {"17": [1, 2, 3]}))
    manifest = json.loads((path / snapshots.MANIFEST).read_text())
    if edit == "momentum":
        manifest["banks"][0]["config"]["momentum"] = 0.9
    elif edit == "counter":
        manifest["banks"][0]["counters"]["updates"] += 1
    elif edit == "dedup table":
        manifest["applied_requests"]["17"].append(4)
    else:
        (path / snapshots.CHECKSUM).unlink()
    (path / snapshots.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(snapshots.SnapshotError, match="manifest"):
        snapshots.read(path)
    assert snapshots.load_latest(tmp_path).failed == {path.name: ANY}


def test_a_failed_snapshot_is_snapshot_failed_cleaned_up_and_counted(tmp_path: Path, monkeypatch) -> None:
    """Item 13 in-process: a full disk mid-write -> snapshot_failed, no .tmp left, stats and
    Prometheus report it; the next snapshot works."""
    from bank_server.prometheus import StatsCollector

    def disk_full(f: Any, rows: np.ndarray, **kwargs: Any) -> None:
        f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    snap_dir = tmp_path / "snaps"
    with in_process_server(snap_dir) as server, connect(server.address) as bank:
        bank.create("feat/7", 100, 8)
        monkeypatch.setattr(np, "save", disk_full)
        with pytest.raises(BankError) as info:
            bank.snapshot()
        assert info.value.code is ErrorCode.SNAPSHOT_FAILED and "No space left" in info.value.message
        assert not list(snap_dir.iterdir())  # no .tmp-*, no snapshot
        stats = bank.stats()
        assert stats["snapshot_failures"] == 1 and "No space left" in stats["snapshot_last_failure"]["error"]
        assert stats["errors"]["snapshot_failed"] == 1
        metrics = {m.name: m for m in StatsCollector(server.service.stats).collect()}
        assert metrics["fgc_bank_snapshot_failures"].samples[0].value == 1
        monkeypatch.undo()
        assert bank.snapshot()["name"] == "snapshot-00000001"
        assert bank.stats()["snapshot_failures"] == 1


def test_a_failed_final_snapshot_makes_serve_exit_non_zero(tmp_path: Path) -> None:
    """Item 13 on a real server: its snapshot directory replaced by a file -> snapshot_failed on
    request, visible in stats, and SIGTERM exits 1 naming the final snapshot."""
    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    try:
        with connect(address) as bank:
            bank.create("feat/7", 100, 8)
            shutil.rmtree(snap_dir, ignore_errors=True)
            snap_dir.write_text("not a directory")
            with pytest.raises(BankError) as info:
                bank.snapshot()
            assert info.value.code is ErrorCode.SNAPSHOT_FAILED
            assert bank.stats()["snapshot_failures"] == 1
    finally:
        stop_server(proc)
    assert proc.returncode == 1
    assert "final snapshot failed" in server_log(proc)


def test_scoped_snapshots_and_restores_leave_other_runs_alone(tmp_path: Path) -> None:
    """Item 14: runs A (feat/) and B (runB/) share a server; A's restore and A's snapshots
    (pruning with --snapshot-keep 1) never touch B's banks or B's paired snapshot."""
    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir), "--snapshot-keep", "1")
    ones = np.ones((10, 8), np.float32)
    try:
        with connect(address) as a, connect(address) as b:
            a.create("feat/7", 100, 8, seed=1)
            b.create("runB/7", 100, 8, seed=2)
            b_paired = b.snapshot("runB/", retain="")
            assert set(b_paired["banks"]) == {"runB/7"} and b_paired["prefix"] == "runB/"
            a_paired = a.snapshot("feat/", retain="")
            assert set(a_paired["banks"]) == {"feat/7"}
            a_rows = a.gather("feat/7", np.arange(100)).copy()
            a.update("feat/7", np.arange(10), ones)
            a.create("feat/extra", 10, 4)  # created after the snapshot: the restore removes it
            b.update("runB/7", np.arange(10), ones)
            b_rows = b.gather("runB/7", np.arange(100)).copy()
            restored = a.restore(a_paired["name"], prefix="feat/")
            assert restored["prefix"] == "feat/" and set(restored["banks"]) == {"feat/7"}
            assert np.array_equal(a.gather("feat/7", np.arange(100)), a_rows)
            assert set(a.hello()["banks"]) == {"feat/7", "runB/7"}
            assert np.array_equal(b.gather("runB/7", np.arange(100)), b_rows)  # B untouched
            assert b.info("runB/7")["updates"] == 1
            with pytest.raises(BankError) as info:  # a snapshot of feat/ cannot reach runB/
                a.restore(a_paired["name"], prefix="runB/")
            assert info.value.code is ErrorCode.BAD_ARGUMENT
            with pytest.raises(BankError):
                a.restore(a_paired["name"], prefix="")
            for _ in range(3):  # A's unpaired snapshots prune only A's unpinned ones
                a.snapshot("feat/")
            on_disk = {s["name"]: s for s in a.snapshots()["snapshots"]}
            assert b_paired["name"] in on_disk and on_disk[b_paired["name"]]["pinned"]
            assert a_paired["name"] in on_disk and on_disk[a_paired["name"]]["prefix"] == "feat/"
            assert len([s for s in on_disk.values() if s["prefix"] == "feat/"]) == 2  # the pinned + the newest
    finally:
        stop_server(proc)


def test_pruning_keeps_the_snapshot_a_checkpoint_names_until_the_next_pairing(tmp_path: Path) -> None:
    """Item 14's pruning rule, in-process, keep=1: a trainer pairs S1, S2, S3 with checkpoints;
    the one its checkpoint on disk names always survives, whatever else writes that prefix."""
    banks = banks_with_updates()
    snapper = snapshots.Snapshotter(tmp_path, lambda action: action(),
                                    lambda p, r, g: snapshots.capture(banks, {}, p, r, group=g), keep=1)
    try:
        s1 = snapper.snapshot("feat/", "")["name"]  # checkpoint 1 will name s1
        s2 = snapper.snapshot("feat/", s1)["name"]  # checkpoint 1 still on disk: s1 kept
        snapper.snapshot("feat/")  # an operator's snapshot of the same prefix
        snapper.snapshot("")  # a snapshot of every bank: another group
        on_disk = {p.name for p in snapshots.snapshots(tmp_path)}
        assert {s1, s2} <= on_disk
        s5 = snapper.snapshot("feat/", s2)["name"]  # checkpoint 2 (naming s2) was written
        on_disk = {p.name for p in snapshots.snapshots(tmp_path)}
        assert s1 not in on_disk and {s2, s5} <= on_disk
    finally:
        snapper.stop()


def test_a_restart_restores_each_bank_from_the_newest_snapshot_holding_it(tmp_path: Path) -> None:
    """Item 14: a snapshot of every bank, then a newer one of feat/; kill -9; the restart takes
    feat/ from the newer one and runB/ from the older one."""
    snap_dir = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    try:
        with connect(address) as bank:
            bank.create("feat/7", 100, 8, seed=1)
            bank.create("runB/7", 100, 8, seed=2)
            bank.snapshot()
            bank.update("feat/7", np.arange(5), np.ones((5, 8), np.float32))
            bank.update("runB/7", np.arange(5), np.ones((5, 8), np.float32))  # after both: lost
            bank.snapshot("feat/")
            feat = bank.gather("feat/7", np.arange(100)).copy()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snap_dir))
    try:
        with connect(address) as bank:
            assert bank.stats()["restored_from"] == "snapshot-00000001, snapshot-00000002"
            assert np.array_equal(bank.gather("feat/7", np.arange(100)), feat)
            assert bank.info("feat/7")["updates"] == 1 and bank.info("runB/7")["updates"] == 0
    finally:
        stop_server(proc)
