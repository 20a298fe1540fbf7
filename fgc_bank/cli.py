"""The ``fgc-bank`` command line: serve, info, ls, snapshot, restore, drop, keys, bench.

Heavy imports (torch, faiss, the server, the benchmarks) happen inside each command, so ``--help``
is instant; ``bench`` is loaded from ``benchmarks.cli`` only when it is run (click's LazyGroup).
"""

from __future__ import annotations

import importlib
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


class LazyGroup(click.Group):
    """A group whose listed subcommands are imported on first use ("module:attribute")."""

    def __init__(self, *args: Any, lazy: dict[str, str] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy or {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            module, attribute = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)


@click.group(cls=LazyGroup, lazy={"bench": "benchmarks.cli:bench"},
             context_settings={"auto_envvar_prefix": "FGC_BANK", "show_default": True,
                               "help_option_names": ["-h", "--help"]})
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              help="Logging verbosity (to stderr).")
@click.version_option(package_name="fgc-bank", prog_name="fgc-bank")
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
@click.option("--device", default="cpu", show_default=True,
              help="Where banks live: cpu, cuda, cuda:N, or auto (the first GPU torch sees, else cpu); "
                   "several, comma-separated (cuda:0,cuda:1), split every bank over them, searched in "
                   "parallel and merged exactly.")
@click.option("--engine", type=click.Choice(["auto", "faiss", "torch", "faiss-gpu"]), default="auto",
              help="What searches them: faiss (the CPU store: torch.mm, FAISS heaps, int8/bf16 "
                   "prefilter), torch (the torch store, on any device), faiss-gpu (the torch store "
                   "searched by faiss.knn_gpu: a CUDA device and FAISS built for GPUs; never picked "
                   "by auto), auto (faiss on a CPU when installed, else torch).")
@click.option("--workers", type=click.IntRange(1, 64), default=1,
              help="Bank worker threads; each bank is served by one, in order.")
@click.option("--faiss-threads", type=click.IntRange(0, 1024), default=0,
              help="Search threads, each running torch and FAISS single-threaded; 0 = one per core.")
@click.option("--coalesce-wait-ms", type=click.FloatRange(0, 1000), default=2.0,
              help="How long a worker may wait for the clients it just answered to send again, so that "
                   "their searches go into one call (never more than a tenth of the last search); 0 = never.")
@click.option("--max-queue", type=click.IntRange(1, 1 << 20), default=1024,
              help="Requests queued per worker before the server answers 'busy'.")
@click.option("--max-batch", type=click.IntRange(1, 1 << 24), default=65536,
              help="Most rows or queries in one request.")
@click.option("--max-frame-mib", type=click.FloatRange(0.001), default=256.0,
              help="Largest array frame a client may send, and largest reply, in MiB; larger ones get "
                   "'too_large'.")
@click.option("--max-bank-gib", type=click.FloatRange(0.001), default=64.0,
              help="Largest bank a client may create, in GiB of float32 rows.")
@click.option("--max-total-gib", type=click.FloatRange(0.001), default=None,
              help="Memory all banks together may take, in GiB  [default: 3/4 of this machine's memory]")
@click.option("--max-queued-mib", type=click.FloatRange(1), default=1024.0,
              help="Request bytes held for the bank workers, over all of them, in MiB; beyond, 'busy'.")
@click.option("--max-unread-mib", type=click.FloatRange(1), default=1024.0,
              help="Reply bytes held for clients that have not read them, in MiB (a quarter of it per "
                   "connection); replies beyond are dropped and counted, never waited for.")
@click.option("--address-file", type=click.Path(dir_okay=False, writable=True, path_type=Path), default=None,
              help="Write the bound address here once the server is ready (for scripts and port 0).")
@click.option("--snapshot-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Restore the newest verified snapshot from here at start; write snapshots here "
                   "on request, every --snapshot-every seconds, and at shutdown.")
@click.option("--snapshot-every", type=click.FloatRange(0), default=0.0,
              help="Seconds between periodic snapshots; 0 = only on request and at shutdown.")
@click.option("--snapshot-keep", type=click.IntRange(1), default=3,
              help="Snapshots kept per prefix; older ones are pruned (never one that failed to load, "
                   "nor one a run's checkpoint pairs with).")
@click.option("--skip-unloadable-snapshots", is_flag=True, default=False,
              help="Start even when the newest snapshot of some prefix cannot be loaded: restore the "
                   "newest ones that load (or nothing). Without it such a server refuses to start. "
                   "Unloadable snapshots are left on disk, never pruned.")
@click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The server's secret key file (from `fgc-bank keys`): turns on CURVE encryption "
                   "and authentication.")
@click.option("--curve-clients", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --curve-secret: directory of the public key files of the clients allowed in.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None,
              help="Serve Prometheus metrics over HTTP on this port (bound to --host); 0 picks one.")
@click.option("--shard", default=None, metavar="I/S",
              help="Serve shard I of S of every bank: its contiguous share of the ids (ids on the wire "
                   "stay global). Clients connect to all S servers at once (tcp://a,tcp://b,...). "
                   "'auto': shard RANK of WORLD_SIZE, as torchrun sets them.")
@click.option("--rendezvous", default=None, metavar="HOST:PORT",
              help="Publish this server's address in the torchrun rendezvous store at HOST:PORT (the "
                   "launch's --rdzv-endpoint), where clients find the shards with rdzv://HOST:PORT.")
def serve(host: str, port: int, endpoint: str | None, device: str, engine: str, workers: int, faiss_threads: int, coalesce_wait_ms: float,
          max_queue: int, max_batch: int, max_frame_mib: float, max_bank_gib: float, max_total_gib: float | None,
          max_queued_mib: float, max_unread_mib: float, address_file: Path | None,
          snapshot_dir: Path | None, snapshot_every: float, snapshot_keep: int, skip_unloadable_snapshots: bool,
          curve_secret: Path | None, curve_clients: Path | None, metrics_port: int | None, shard: str | None,
          rendezvous: str | None) -> None:
    """Serve memory banks over ZeroMQ until Ctrl-C or SIGTERM."""
    from bank_server.server import BankServer, ServerConfig
    from fgc_bank.errors import BankError
    from fgc_bank.rendezvous import shard_from_env
    from fgc_bank.service import Limits
    from fgc_bank.shards import WHOLE, Shard

    try:
        part = WHOLE if shard is None else shard_from_env() if shard == "auto" else Shard.parse(shard)
    except BankError as exc:
        raise click.BadParameter(exc.message, param_hint="--shard") from None

    if (curve_secret is None) != (curve_clients is None):
        raise click.UsageError("--curve-secret and --curve-clients go together")
    total = {} if max_total_gib is None else {"max_total_bytes": int(max_total_gib * 2**30)}
    limits = Limits(max_batch=max_batch, max_bank_bytes=int(max_bank_gib * 2**30),
                    max_reply_bytes=int(max_frame_mib * 2**20), **total)
    config = ServerConfig(host=host, port=port, endpoint=endpoint, device=device, engine=engine, workers=workers,
                          faiss_threads=faiss_threads, coalesce_wait_s=coalesce_wait_ms / 1000, max_queue=max_queue,
                          max_frame_bytes=int(max_frame_mib * 2**20), limits=limits,
                          max_queued_bytes=int(max_queued_mib * 2**20), max_unread_bytes=int(max_unread_mib * 2**20),
                          snapshot_dir=snapshot_dir, snapshot_every=snapshot_every, snapshot_keep=snapshot_keep,
                          skip_unloadable_snapshots=skip_unloadable_snapshots, curve_secret=curve_secret,
                          curve_clients=curve_clients, shard=part)
    if address_file is not None and not address_file.parent.is_dir():
        raise click.BadParameter(f"directory {address_file.parent} does not exist", param_hint="--address-file")
    try:
        server = BankServer(config)
    except BankError as exc:
        raise click.ClickException(exc.message) from None
    server.install_signal_handlers()
    try:
        _announce(server, metrics_port, host, address_file)
        if rendezvous is not None:
            from fgc_bank.rendezvous import publish

            publish(rendezvous, part, server.address)
    except OSError as exc:  # a busy metrics port, an address file that cannot be written
        server.close()
        raise click.ClickException(str(exc)) from None
    except BankError as exc:  # an unreachable rendezvous store
        server.close()
        raise click.ClickException(exc.message) from None
    click.echo(f"fgc-bank serving on {server.address}", err=False)
    sys.stdout.flush()
    server.serve_forever()
    if server.shutdown_error is not None:  # the banks' last state is not on disk: say so in the exit code
        raise click.ClickException(server.shutdown_error)


def _announce(server: Any, metrics_port: int | None, host: str, address_file: Path | None) -> None:
    """Log the effective settings once, start the metrics endpoint, write the address file."""
    from fgc_bank import __version__

    cfg, placement = server.config, server.service.placement
    logger.info("fgc-bank %s: shard %s, device %s, engine %s, %d worker(s), limits: frame %d MiB, queued %d MiB, "
                "unread replies %d MiB, bank %.1f GiB, all banks %.1f GiB; snapshots %s", __version__,
                cfg.shard, server.service.layout.device, placement.engine, cfg.workers, cfg.max_frame_bytes >> 20,
                cfg.max_queued_bytes >> 20, cfg.max_unread_bytes >> 20, cfg.limits.max_bank_bytes / 2**30,
                server.service.max_total_bytes / 2**30, cfg.snapshot_dir or "off (banks are lost at shutdown)")
    if metrics_port is not None:
        from bank_server.prometheus import serve_metrics

        bound = serve_metrics(server.service.stats, metrics_port, host, placement)
        click.echo(f"fgc-bank metrics on http://{host}:{bound}/metrics")
    if address_file is not None:
        tmp = address_file.with_suffix(address_file.suffix + ".tmp")
        tmp.write_text(server.address + "\n")
        os.replace(tmp, address_file)  # readers never see a half-written address


def _open(address: str, timeout: float, curve_secret: Path | None, curve_server: Path | None) -> Any:
    from fgc_bank.api import connect
    from fgc_bank.errors import BankError

    curve = {"curve_secret": curve_secret, "curve_server": curve_server} if curve_secret or curve_server else {}
    if "://" not in address:  # host:port, as users type it
        address = f"tcp://{address}"
    try:
        return connect(address, timeout=timeout, **curve)
    except (BankError, TypeError) as exc:
        raise click.BadParameter(getattr(exc, "message", str(exc)), param_hint="ADDRESS") from None


def client_options(command: Any) -> Any:
    """The options every command that talks to a server takes."""
    command = click.option("--curve-server", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                           default=None, help="The server's public key file, for a CURVE server.")(command)
    command = click.option("--curve-secret", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                           default=None, help="This client's secret key file, for a CURVE server.")(command)
    return click.option("--timeout", type=click.FloatRange(0.01), default=5.0,
                        help="Seconds to wait for the server.")(command)


def _call(address: str, timeout: float, curve_secret: Path | None, curve_server: Path | None, method: str,
          *args: Any, **kwargs: Any) -> Any:
    from fgc_bank.errors import BankError

    with _open(address, timeout, curve_secret, curve_server) as bank:
        try:
            return getattr(bank, method)(*args, **kwargs)
        except BankError as exc:
            raise click.ClickException(exc.message) from None


@main.command()
@click.argument("address")
@client_options
@click.option("--json", "as_json", is_flag=True, help="Print the raw stats as JSON.")
def info(address: str, timeout: float, curve_secret: Path | None, curve_server: Path | None, as_json: bool) -> None:
    """Print the banks, counters and snapshot age of the server at ADDRESS (tcp://host:port,
    ipc://path, or host:port)."""
    from fgc_bank.errors import BankError

    with _open(address, timeout, curve_secret, curve_server) as bank:
        try:
            stats = bank.stats()
        except BankError as exc:
            raise click.ClickException(exc.message) from None
        listing = None
        if stats.get("snapshot") is None and "snapshot_failures" in stats:
            # Only a server that wrote no snapshot since it started needs the (slower) disk listing.
            try:
                listing = bank.snapshots()
            except BankError as exc:  # the stats are still worth printing
                listing = {"error": exc.message}
    if as_json:
        click.echo(json.dumps(stats, indent=2, sort_keys=True))
        return
    for i, shard in enumerate(stats.get("shards", [])):  # a sharded bank: each shard server in turn
        click.echo(f"-- shard {i}/{len(stats['shards'])}")
        _print_stats(shard, None, address)
    if "shards" not in stats:
        _print_stats(stats, listing, address)


def _print_stats(stats: dict[str, Any], listing: dict[str, Any] | None, address: str) -> None:
    """``info``'s human output for one server."""
    click.echo(f"server {stats.get('address', address)}  up {stats['uptime_s']:.0f} s  "
               f"queue {stats.get('queue_depth', 0)}")
    click.echo(_snapshot_age_line(stats, listing))
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


def _snapshot_age_line(stats: dict[str, Any], listing: dict[str, Any] | None) -> str:
    """How old the newest snapshot is: the last one this server wrote (``stats``), else the newest
    on disk (``snapshots``, e.g. the one restored at start), and how many writes failed."""
    if "snapshot_failures" not in stats:
        return "snapshots off (started without --snapshot-dir)"
    last = stats.get("snapshot")
    on_disk = [s for s in (listing or {}).get("snapshots", []) if "age_s" in s]
    if last is not None:
        line = f"snapshot {last['name']} ({_scope_name(last['prefix'])}) written {_age(last['age_s'])} ago"
    elif listing is not None and "error" in listing:
        line = f"snapshot unknown: the snapshot directory cannot be listed: {listing['error']}"
    elif on_disk:
        line = (f"snapshot {on_disk[0]['name']} ({_scope_name(on_disk[0]['prefix'])}) on disk, "
                f"{_age(on_disk[0]['age_s'])} old; none written since the server started")
    else:
        line = "snapshot none yet"
    failure = stats.get("snapshot_last_failure")
    if stats["snapshot_failures"] and failure is not None:
        line += (f"; {stats['snapshot_failures']} failed, the last {_age(failure['age_s'])} ago: "
                 f"{failure.get('error', '?')}")
    return line


def _scope_name(prefix: str) -> str:
    return f"prefix {prefix!r}" if prefix else "every bank"


@main.command()
@click.argument("address")
@client_options
@click.option("--json", "as_json", is_flag=True, help="Print the banks and snapshots as JSON.")
def ls(address: str, timeout: float, curve_secret: Path | None, curve_server: Path | None, as_json: bool) -> None:
    """List the banks of the server at ADDRESS, and the snapshots in its --snapshot-dir."""
    with _open(address, timeout, curve_secret, curve_server) as bank:
        from fgc_bank.errors import BankError

        try:
            banks, found = bank.hello()["banks"], bank.snapshots()
        except BankError as exc:
            raise click.ClickException(exc.message) from None
    if as_json:
        click.echo(json.dumps({"banks": banks, **found}, indent=2, sort_keys=True))
        return
    click.echo(f"{'bank':<24} {'rows':>10} {'dim':>5} {'momentum':>8} {'updates':>9}")
    for name, b in sorted(banks.items()):
        click.echo(f"{name:<24} {b['rows']:>10} {b['dim']:>5} {b['momentum']:>8.3g} {b['updates']:>9}")
    if found["directory"] is None:
        click.echo("no snapshot directory (the server was started without --snapshot-dir)")
        return
    click.echo(f"snapshots in {found['directory']} (newest first):")
    click.echo(f"  {'name':<20} {'prefix':<16} {'age':>10} {'banks':>5}  notes")
    for snap in found["snapshots"]:
        click.echo("  " + _snapshot_line(snap))


def _snapshot_line(snap: dict[str, Any]) -> str:
    """One line of ``ls``: name, prefix ("*" for every bank), age, bank count and its state."""
    if "prefix" not in snap:
        return f"{snap['name']:<20} {'?':<16} {'?':>10} {'?':>5}  unreadable: {snap['error']}"
    notes = [n for n, on in (("pinned", snap["pinned"]), ("verified", snap["verified"])) if on]
    if snap.get("error"):
        notes.append(snap["error"])
    return (f"{snap['name']:<20} {snap['prefix'] or '*':<16} {_age(snap['age_s']):>10} {len(snap['banks']):>5}  "
            + ", ".join(notes))


def _age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


@main.command()
@click.argument("address")
@client_options
@click.option("--prefix", default=None,
              help="Only the banks whose names start with this (end it with '/', e.g. 'feat/'); a "
                   "restore of this snapshot then touches only those. Default: every bank.")
def snapshot(address: str, timeout: float, curve_secret: Path | None, curve_server: Path | None,
             prefix: str | None) -> None:
    """Make the server at ADDRESS write a snapshot now (it needs --snapshot-dir)."""
    result = _call(address, timeout, curve_secret, curve_server, "snapshot", prefix)
    scope = f"prefix {result['prefix']!r}" if result.get("prefix") else "every bank"
    click.echo(f"{result['name']}  {result['path']}  ({len(result['banks'])} banks, {scope}, "
               f"{result['seconds']:.2f} s)")


@main.command()
@click.argument("address")
@click.argument("name")
@client_options
@click.option("--prefix", default=None,
              help="Replace only the banks whose names start with this; default: the snapshot's own "
                   "prefix (every bank for a snapshot of every bank).")
def restore(address: str, name: str, timeout: float, curve_secret: Path | None, curve_server: Path | None,
            prefix: str | None) -> None:
    """Put back the banks of snapshot NAME on the server at ADDRESS; banks outside its prefix
    are left as they are."""
    result = _call(address, timeout, curve_secret, curve_server, "restore", name, prefix)
    click.echo(f"restored {result['name']}: {len(result['banks'])} banks under {result['prefix'] or 'every name'!r}")


@main.command()
@click.argument("address")
@click.argument("name")
@client_options
def drop(address: str, name: str, timeout: float, curve_secret: Path | None, curve_server: Path | None) -> None:
    """Delete bank NAME and its rows on the server at ADDRESS (snapshots on disk keep theirs)."""
    _call(address, timeout, curve_secret, curve_server, "drop", name)
    click.echo(f"dropped {name}")


@main.command()
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Where to write the key files.")
@click.option("--name", default="server", help="Key pair name: NAME.key (public) and NAME.key_secret.")
@click.option("--force", is_flag=True, help="Overwrite an existing key pair of that name.")
def keys(directory: Path, name: str, force: bool) -> None:
    """Make a CURVE key pair. Give the server its .key_secret and each client's .key (in the
    --curve-clients directory); give each client its .key_secret and the server's .key."""
    from bank_server.auth import make_keys

    existing = [p for p in (directory / f"{name}.key", directory / f"{name}.key_secret") if p.exists()]
    if existing and not force:
        raise click.ClickException(f"{existing[0]} exists; servers and clients may hold its keys. "
                                   "Pass --force to replace the pair")
    public, secret = make_keys(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret} (keep it private)")


if __name__ == "__main__":
    main()
