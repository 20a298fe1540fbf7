"""`fgc-bank info`'s human output: the snapshot age, from a real server with --snapshot-dir."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import start_server, stop_server

from fgc_bank import connect
from fgc_bank.cli import main
from fgc_bank.errors import BankError, ErrorCode


def _snapshot_line(address: str) -> str:
    """The snapshot line of `fgc-bank info host:port` (the address as users type it)."""
    result = CliRunner().invoke(main, ["info", address.removeprefix("tcp://")])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].startswith("server tcp://"), result.output
    return lines[1]


def test_info_shows_the_newest_snapshots_age(tmp_path: Path) -> None:
    snaps = tmp_path / "snaps"
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snaps))
    try:
        assert _snapshot_line(address) == "snapshot none yet"
        with connect(address) as bank:
            bank.create("feat/1", 100, 8)
            bank.snapshot("feat/")
        line = _snapshot_line(address)
        assert line.startswith("snapshot snapshot-00000001 (prefix 'feat/') written ") and line.endswith(" s ago"), line
    finally:
        stop_server(proc)  # writes a final snapshot of every bank: snapshot-00000002
    proc, address = start_server(tmp_path, "--snapshot-dir", str(snaps))
    try:
        # Restored at start, written by the previous server: its age comes from the disk listing.
        line = _snapshot_line(address)
        assert line.startswith("snapshot snapshot-00000002 (every bank) on disk, ") and \
            line.endswith(" old; none written since the server started"), line
        snaps.rename(tmp_path / "elsewhere")
        snaps.write_text("a file where the snapshot directory was")  # the next write fails
        with connect(address) as bank, pytest.raises(BankError) as failed:
            bank.snapshot()
        assert failed.value.code is ErrorCode.SNAPSHOT_FAILED, failed.value.message
        line = _snapshot_line(address)
        assert "; 1 failed, the last " in line and "Error" in line, line
    finally:
        stop_server(proc)


def test_info_says_when_a_server_keeps_no_snapshots(server: str) -> None:
    assert _snapshot_line(server) == "snapshots off (started without --snapshot-dir)"
