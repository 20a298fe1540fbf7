"""The `fgc-bank` command line, driven with click's CliRunner and as a real process."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import TIME_FACTOR, start_server

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
    out, err = proc.communicate(timeout=30 * TIME_FACTOR)
    assert proc.returncode == 0, err
    assert f"fgc-bank serving on {address}" in out


def test_module_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "fgc_bank.cli", "--help"], capture_output=True, text=True, check=True)
    assert "serve" in out.stdout and "info" in out.stdout
