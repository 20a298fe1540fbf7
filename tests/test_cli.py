"""The `fgc-bank` command line, driven with click's CliRunner and as a real process."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TIME_FACTOR, server_log, start_server

from fgc_bank import connect
from fgc_bank.cli import main


@pytest.mark.parametrize("command", [[], *[[name] for name in sorted(main.commands)]])
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output


def test_info_prints_banks_and_counters(server: str) -> None:
    with connect(server) as bank:
        bank.create("cli/feat", 300, 8)
        bank.knn("cli/feat", np.ones((4, 8), np.float32), 3)
    result = CliRunner().invoke(main, ["info", server])
    assert result.exit_code == 0, result.output
    line = next(l for l in result.output.splitlines() if l.startswith("cli/feat"))
    assert line.split()[1:3] == ["300", "8"]
    as_json = json.loads(CliRunner().invoke(main, ["info", server, "--json"]).output)
    assert as_json["banks"]["cli/feat"]["queries"] == 4
    assert as_json["requests"]["knn"] >= 1


def test_info_on_a_dead_address_fails_cleanly() -> None:
    result = CliRunner().invoke(main, ["info", "tcp://127.0.0.1:9", "--timeout", "0.3"])
    assert result.exit_code != 0
    assert "no reply" in result.output and "Traceback" not in result.output
    result = CliRunner().invoke(main, ["info", "http://example"])
    assert result.exit_code == 2 and "must start with" in result.output


def test_serve_refuses_a_bad_bind_address() -> None:
    result = CliRunner().invoke(main, ["serve", "--host", "256.1.1.1", "--port", "1"])
    assert result.exit_code != 0 and "cannot bind" in result.output


def test_serve_stops_cleanly_on_sigterm(tmp_path) -> None:
    proc, address = start_server(tmp_path)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30 * TIME_FACTOR)
    assert proc.returncode == 0, server_log(proc)
    assert f"fgc-bank serving on {address}" in server_log(proc)


def test_module_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "--help"], capture_output=True, text=True, check=True)
    assert "serve" in out.stdout and "info" in out.stdout


def test_ls_snapshot_restore_and_drop_with_prefixes(tmp_path) -> None:
    """`fgc-bank ls`, `snapshot --prefix`, `restore --prefix` and `drop` on a server with a
    snapshot directory: a scoped snapshot and its restore leave the other run's bank alone."""
    proc, address = start_server(tmp_path, "--snapshot-dir", str(tmp_path / "snaps"))
    try:
        with connect(address) as bank:
            bank.create("runA/7", 300, 8, momentum=0.25)
            bank.create("runB/7", 200, 4)
            bank.update("runA/7", np.arange(3), np.ones((3, 8), np.float32))
        runner = CliRunner()
        result = runner.invoke(main, ["snapshot", address, "--prefix", "runA/"])
        assert result.exit_code == 0 and "prefix 'runA/'" in result.output, result.output
        name = result.output.split()[0]
        result = runner.invoke(main, ["ls", address])
        assert result.exit_code == 0, result.output
        lines = result.output.splitlines()
        assert next(l for l in lines if l.startswith("runA/7")).split()[1:5] == ["300", "8", "0.25", "1"]
        snap = next(l for l in lines if name in l).split()
        assert snap[:2] == [name, "runA/"] and snap[-2:] == ["1", "verified"]  # 1 bank, written here
        listed = json.loads(runner.invoke(main, ["ls", address, "--json"]).output)
        assert listed["snapshots"][0]["prefix"] == "runA/" and set(listed["banks"]) == {"runA/7", "runB/7"}
        result = runner.invoke(main, ["drop", address, "runA/7"])
        assert result.exit_code == 0 and "dropped runA/7" in result.output
        result = runner.invoke(main, ["drop", address, "runA/7"])
        assert result.exit_code == 1 and "no bank named" in result.output
        result = runner.invoke(main, ["restore", address, name, "--prefix", "runB/"])
        assert result.exit_code == 1 and "only the banks under 'runA/'" in result.output
        result = runner.invoke(main, ["restore", address, name])
        assert result.exit_code == 0 and "1 banks under 'runA/'" in result.output, result.output
        with connect(address) as bank:
            assert set(bank.hello()["banks"]) == {"runA/7", "runB/7"} and bank.info("runA/7")["updates"] == 1
    finally:
        proc.terminate()
        proc.wait(timeout=30 * TIME_FACTOR)


def test_ls_on_a_server_without_snapshots(server: str) -> None:
    result = CliRunner().invoke(main, ["ls", server])
    assert result.exit_code == 0 and "no snapshot directory" in result.output


def test_both_commands_report_the_installed_version() -> None:
    from importlib.metadata import version

    from click.testing import CliRunner

    import fgc_bank
    from fgc_bank.cli import main
    from trainer.cli import train

    for command in (main, train):
        result = CliRunner().invoke(command, ["--version"])
        assert result.exit_code == 0 and version("fgc-bank") in result.output, result.output
    assert fgc_bank.__version__ == version("fgc-bank")


def test_info_takes_host_and_port_as_users_type_them(server: str) -> None:
    result = CliRunner().invoke(main, ["info", server.removeprefix("tcp://")])
    assert result.exit_code == 0 and result.output.startswith("server tcp://"), result.output


def test_serve_setup_errors_are_one_line(tmp_path) -> None:
    missing = CliRunner().invoke(main, ["serve", "--port", "0", "--address-file", str(tmp_path / "no" / "addr")])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "serve", "--port", "0", "--metrics-port",
                               str(port)], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "Address already in use" in done.stderr.strip().splitlines()[-1]


def test_serve_logs_its_settings_and_warns_when_banks_are_thrown_away(tmp_path) -> None:
    address_file = tmp_path / "address"
    proc = subprocess.Popen([sys.executable, "-m", "fgc_bank.cli", "--log-level", "info", "serve", "--port", "0",
                             "--address-file", str(address_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 60 * TIME_FACTOR
        while not (address_file.exists() and address_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        with connect(address_file.read_text().strip()) as bank:
            bank.create("lost", 10, 4)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30 * TIME_FACTOR)
    assert err.count("engine faiss") == 1 and "unread replies 1024 MiB" in err, err
    assert "the rows of 1 bank(s) are thrown away" in err


def test_keys_never_overwrite_a_pair_without_force(tmp_path) -> None:
    first = CliRunner().invoke(main, ["keys", "--dir", str(tmp_path), "--name", "server"])
    assert first.exit_code == 0, first.output
    public = (tmp_path / "server.key").read_bytes()
    again = CliRunner().invoke(main, ["keys", "--dir", str(tmp_path), "--name", "server"])
    assert again.exit_code == 1 and "--force" in again.output
    assert (tmp_path / "server.key").read_bytes() == public
    forced = CliRunner().invoke(main, ["keys", "--dir", str(tmp_path), "--name", "server", "--force"])
    assert forced.exit_code == 0 and (tmp_path / "server.key").read_bytes() != public
