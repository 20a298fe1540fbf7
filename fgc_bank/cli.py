"""The ``fgc-bank`` command line: serve, info, bench. Heavy imports happen inside each command."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import click

logger = logging.getLogger("fgc_bank")


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")


@click.group(context_settings={"auto_envvar_prefix": "FGC_BANK", "show_default": True,
                               "help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              help="Logging verbosity (to stderr).")
def main(log_level: str) -> None:
    """fgc-bank: a shared kNN memory-bank server for Feature-Gate Coupling training.

    Environment variables FGC_BANK_<COMMAND>_<OPTION> set any option (e.g. FGC_BANK_SERVE_PORT).
    """
    _setup_logging(log_level)


@main.command()
@click.option("--host", default="127.0.0.1",
              help="Interface to bind. The default serves this machine only; 0.0.0.0 opens the bank "
                   "to every host that can reach this one (there is no authentication).")
@click.option("--port", type=click.IntRange(0, 65535), default=5555,
              help="TCP port; 0 picks a free port (the address is printed and written to --address-file).")
@click.option("--endpoint", default=None, help="A full ZeroMQ endpoint (e.g. ipc:///tmp/bank.sock); overrides --host/--port.")
@click.option("--workers", type=click.IntRange(1, 64), default=1,
              help="Bank worker threads; each bank is served by one, in order.")
@click.option("--faiss-threads", type=click.IntRange(0, 1024), default=0,
              help="OpenMP threads per FAISS search; 0 uses every core.")
@click.option("--max-queue", type=click.IntRange(1, 1 << 20), default=1024,
              help="Requests queued per worker before the server answers 'busy'.")
@click.option("--max-batch", type=click.IntRange(1, 1 << 24), default=65536,
              help="Most rows or queries in one request.")
@click.option("--max-frame-mib", type=click.FloatRange(0.001), default=256.0,
              help="Largest array frame a client may send, in MiB; larger ones get 'too_large'.")
@click.option("--max-bank-gib", type=click.FloatRange(0.001), default=64.0,
              help="Largest bank a client may create, in GiB of float32 rows.")
@click.option("--address-file", type=click.Path(dir_okay=False, writable=True, path_type=Path), default=None,
              help="Write the bound address here once the server is ready (for scripts and port 0).")
def serve(host: str, port: int, endpoint: str | None, workers: int, faiss_threads: int, max_queue: int,
          max_batch: int, max_frame_mib: float, max_bank_gib: float, address_file: Path | None) -> None:
    """Serve memory banks over ZeroMQ until Ctrl-C or SIGTERM."""
    from bank_server.server import BankServer, ServerConfig
    from fgc_bank.errors import BankError
    from fgc_bank.service import Limits

    limits = Limits(max_batch=max_batch, max_bank_bytes=int(max_bank_gib * 2**30))
    config = ServerConfig(host=host, port=port, endpoint=endpoint, workers=workers,
                          faiss_threads=faiss_threads, max_queue=max_queue,
                          max_frame_bytes=int(max_frame_mib * 2**20), limits=limits)
    try:
        server = BankServer(config)
    except BankError as exc:
        raise click.ClickException(exc.message) from None
    server.install_signal_handlers()
    if address_file is not None:
        tmp = address_file.with_suffix(address_file.suffix + ".tmp")
        tmp.write_text(server.address + "\n")
        os.replace(tmp, address_file)  # readers never see a half-written address
    click.echo(f"fgc-bank serving on {server.address}", err=False)
    sys.stdout.flush()
    server.serve_forever()


def _open(address: str, timeout: float) -> Any:
    from fgc_bank.api import connect
    from fgc_bank.errors import BankError

    try:
        return connect(address, timeout=timeout)
    except BankError as exc:
        raise click.BadParameter(exc.message, param_hint="ADDRESS") from None


@main.command()
@click.argument("address")
@click.option("--timeout", type=click.FloatRange(0.01), default=5.0, help="Seconds to wait for the server.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
def info(address: str, timeout: float, as_json: bool) -> None:
    """Print the banks and counters of the server at ADDRESS (e.g. tcp://127.0.0.1:5555)."""
    from fgc_bank.errors import BankError

    with _open(address, timeout) as bank:
        try:
            stats = bank.stats()
        except BankError as exc:
            raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    click.echo(f"server {stats.get('address', address)}  up {stats['uptime_s']:.0f} s  "
               f"queue {stats.get('queue_depth', 0)}")
    click.echo(f"{'bank':<20} {'rows':>10} {'dim':>5} {'momentum':>8} {'updates':>9} {'searches':>9} {'queries':>10}")
    for name, b in sorted(stats["banks"].items()):
        click.echo(f"{name:<20} {b['rows']:>10} {b['dim']:>5} {b['momentum']:>8.3g} {b['updates']:>9} "
                   f"{b['searches']:>9} {b['queries']:>10}")
    for op, n in sorted(stats.get("requests", {}).items()):
        lat = stats.get("latency", {}).get(op)
        tail = f"  p50 {lat['p50_ms']:.2f} ms  p99 {lat['p99_ms']:.2f} ms" if lat else ""
        click.echo(f"  {op:<12} {n:>9} requests{tail}")
    if stats.get("errors"):
        click.echo("  errors: " + ", ".join(f"{c} {n}" for c, n in sorted(stats["errors"].items())))


if __name__ == "__main__":
    main()
