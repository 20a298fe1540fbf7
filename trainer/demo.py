"""``python -m trainer.demo`` (``make demo``): BAS then FGC on digits, two CPU ranks, a real bank.

It starts ``fgc-bank serve`` on loopback (port 0, address read from ``--address-file``), trains a
gated ResNet-20 on scikit-learn's bundled digits with ``torchrun --nproc_per_node 2`` (gloo), first
the BAS phase and then FGC initialised from BAS's checkpoint with its feature banks on the server,
prints accuracy, MACs kept and the server's bank statistics, and stops the server.

Small-data recipe (FGC's CIFAR-10 schedule scaled to 1,437 training images; CIFAR values in
brackets): 50 epochs [500], BAS for epochs 0-9 with batch-shaping decaying to 0 at epoch 10 [100];
FGC from epoch 10, L0 ramp 10 -> 30 [100 -> 300], lr 0.1 x0.1 at 30/38/45 [300/375/450];
nn_num = 6 ~ 200 * 1437 / 50000 neighbours [200]; nn_epoch = 2 warm-up epochs [20 of 400];
global batch 64 [256] so an epoch still has 22 steps; rho 0.4, kappa 0.003, T 0.07, bank momentum
0.5, weight decay 5e-4, Nesterov, contrasted blocks 7 and 8: as published.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

REPO = Path(__file__).resolve().parent.parent
COMMON = ["--dataset", "digits", "--arch", "resnet20", "--batch-size", "64",
          "--lr", "0.1", "--milestones", "30,38,45", "--rho", "0.4", "--l0-start", "10",
          "--l0-end", "30", "--weight-decay", "5e-4", "--seed", "0"]
BAS = ["--phase", "bas", "--epochs", "10", "--bs-weight", "0.75", "--bs-end", "10"]
FGC = ["--phase", "fgc", "--epochs", "50", "--kappa", "0.003", "--nn-num", "6", "--nn-epoch", "2",
       "--contrast-blocks", "7,8", "--temperature", "0.07", "--bank-momentum", "0.5"]


def child_env() -> dict[str, str]:
    """The children import this checkout and use one thread each (2 ranks on 2 cores)."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def start_server(address_file: Path, log_path: Path, timeout: float = 60.0
                 ) -> tuple[subprocess.Popen, str]:
    """Start ``fgc-bank serve`` on a free loopback port; return it and its address when ready."""
    log = log_path.open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "fgc_bank.cli", "serve", "--host", "127.0.0.1", "--port", "0",
         "--address-file", str(address_file), "--faiss-threads", "1"],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise click.ClickException(f"fgc-bank serve exited with {server.returncode}; see "
                                       f"{log_path}")
        if address_file.is_file() and address_file.read_text().strip():
            return server, address_file.read_text().strip()
        time.sleep(0.1)
    stop_server(server)
    raise click.ClickException(f"fgc-bank serve was not ready after {timeout:.0f} s; see {log_path}")


def stop_server(server: subprocess.Popen) -> None:
    """SIGTERM (a clean stop), then SIGKILL if it does not exit."""
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def torchrun(nproc: int, args: list[str]) -> None:
    """``torchrun --standalone --nproc_per_node N -m trainer ARGS``; raise if it fails."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}", "-m", "trainer", *args]
    click.echo("$ " + " ".join(command[1:]), err=True)
    done = subprocess.run(command, env=child_env(), cwd=REPO, check=False)
    if done.returncode != 0:
        raise click.ClickException(f"training failed with exit status {done.returncode}")


def final_record(out_dir: Path) -> dict[str, Any]:
    """The ``final`` record of a run's metrics.jsonl."""
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    finals = [json.loads(line) for line in lines if '"event": "final"' in line]
    if not finals:
        raise click.ClickException(f"no final record in {out_dir / 'metrics.jsonl'}")
    return finals[-1]


def bank_report(address: str) -> list[str]:
    """One line per bank on the server, from its ``stats``."""
    from fgc_bank import connect

    with connect(address, timeout=10.0) as bank:
        stats = bank.stats()
    lines = []
    for name, info in sorted(stats.get("banks", {}).items()):
        lines.append(f"  {name}: {info['rows']} x {info['dim']}, {info['updates']} update "
                     f"requests ({info['rows_updated']} rows), {info['searches']} searches "
                     f"({info['queries']} queries)")
    return lines


def report(bas: dict[str, Any], fgc: dict[str, Any], banks: list[str]) -> None:
    """Print the demo's results."""
    click.echo("\n=== fgc-bank demo: gated ResNet-20 on digits, 2 CPU ranks ===")
    for name, rec in (("BAS (epochs 0-9)", bas), ("FGC (epochs 10-49)", fgc)):
        click.echo(f"{name:>19}: top-1 {100 * rec['test_top1']:.2f}% | gate density "
                   f"{100 * rec['test_density']:.1f}% | MACs kept {100 * rec['macs_kept']:.1f}% "
                   f"({rec['gated_macs'] / 1e6:.2f}M of {rec['dense_macs'] / 1e6:.2f}M, gate "
                   "MLPs included)")
    click.echo("bank server statistics:")
    for line in banks:
        click.echo(line)
    ok = fgc["test_top1"] >= 0.9 and fgc["macs_kept"] < 1.0
    click.echo("result: " + ("OK, >= 90% top-1 with gates closed" if ok else
                             "BELOW TARGET (>= 90% top-1 and MACs kept < 100%)"))


@click.command()
@click.option("--workdir", type=click.Path(file_okay=False, path_type=Path),
              default=REPO / "runs" / "demo", show_default=True,
              help="Checkpoints, metrics and the server log go here (emptied first).")
@click.option("--nproc", type=click.IntRange(min=1), default=2, show_default=True,
              help="torchrun processes (ranks) per phase.")
def main(workdir: Path, nproc: int) -> None:
    """Run the end-to-end demo: bank server, BAS, then FGC with bank positives."""
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    started = time.monotonic()
    server, address = start_server(workdir / "bank.address", workdir / "bank-server.log")
    click.echo(f"bank server ready at {address}", err=True)
    try:
        torchrun(nproc, COMMON + BAS + ["--out-dir", str(workdir / "bas")])
        torchrun(nproc, COMMON + FGC + ["--bank", address, "--out-dir", str(workdir / "fgc"),
                                        "--init-from", str(workdir / "bas" / "checkpoint.pt")])
        banks = bank_report(address)
    finally:
        stop_server(server)
    report(final_record(workdir / "bas"), final_record(workdir / "fgc"), banks)
    click.echo(f"total time {time.monotonic() - started:.0f} s; outputs in {workdir}")


if __name__ == "__main__":
    main()
