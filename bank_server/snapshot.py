"""Snapshots: consistent, atomic, self-describing, verified copies of banks on disk.

Layout of ``DIR/snapshot-00000042/``::

    manifest.json     format, sequence number, time, scope (``prefix``), pairing (``retain``), and
                      per bank: config, counters, row file, shape and sha256 of the rows; plus the
                      dedup table of applied request ids (opaque here)
    manifest.sha256   sha256 of manifest.json's bytes: the manifest is verified too, so a snapshot
                      whose momentum, counters or dedup table were edited is refused
    bank-000.npy      rows of the first bank (float32, N x D), one file per bank

Consistent: rows are copied while every bank worker is paused between requests, so no request is
half applied and every request acknowledged before the snapshot op is in it. Atomic: written into
``.tmp-*``, each file fsynced, then renamed into place and the directory fsynced; a failed write
removes its temporary directory, and one left by a crash is removed at the next start. Verified:
loading checks both checksums, the manifest's structure and the shapes.

Scoped: a snapshot holds the banks whose names start with its ``prefix`` ("" = every bank), and
restoring it replaces only the banks under that prefix, so runs sharing a server never touch
each other's banks. Sequence numbers are shared by all prefixes, so names stay unique.

Pruning (after each write, for the prefix just written; see :func:`prunable`): a snapshot goes
only when ``keep`` newer snapshots of its prefix are known good (written or verified by this
server process), it is not pinned by a pairing, and it never failed to load (``unloadable.json``
records those across restarts; a later successful load takes one off the record).
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgc_bank.bank import BankConfig, MemoryBank
from fgc_bank.errors import BankError, ErrorCode, quote
from fgc_bank.layout import Layout, SplitBank
from fgc_bank.shards import WHOLE, Shard

logger = logging.getLogger(__name__)

FORMAT = 2  # 2: manifest.sha256, prefix and retain; format 1 had no manifest checksum
PREFIX = "snapshot-"
MANIFEST = "manifest.json"
CHECKSUM = "manifest.sha256"
UNLOADABLE = "unloadable.json"  # snapshots that failed to load, and why: never pruned, by any process
NAME_RE = re.compile(r"snapshot-\d{8,18}")  # a sequence number, never a path the OS refuses
_BANK_FILE_RE = re.compile(r"bank-\d{3,}\.npy")
MAX_PENDING_SCOPES = 16  # distinct (prefix, retain) snapshots waiting; beyond: busy
MAX_WAITERS = 4096  # snapshot requests waiting in all; beyond: busy


class SnapshotError(Exception):
    """A snapshot on disk is incomplete, corrupt or of an unknown format."""


@dataclass
class Capture:
    """What a snapshot holds, copied out of the live banks at one consistent point."""

    banks: list[tuple[BankConfig, dict[str, int], np.ndarray, list[int]]]  # ..., the ids held [lo, hi)
    applied: Any  # the server's dedup table, JSON-able; carried as it is
    prefix: str = ""
    retain: str | None = None  # paired snapshots: the snapshot the caller's checkpoint names now
    shard: Shard = WHOLE  # the server's shard: a snapshot is restored only on the same shard
    group: str | None = None  # a snapshot of every shard at once: the same group on each


def capture(banks: dict[str, MemoryBank | SplitBank], applied: Any, prefix: str = "", retain: str | None = None,
            shard: Shard = WHOLE, group: str | None = None) -> Capture:
    """Copy rows and counters of the banks under ``prefix``; call it while the workers are paused."""
    chosen = [(b.config, dict(b.counters), b.export(), b.info()["ids"]) for name, b in sorted(banks.items())
              if name.startswith(prefix)]
    return Capture(chosen, applied, prefix, retain, shard, group)


@dataclass(frozen=True)
class Summary:
    """What pruning and listing need from one verified manifest (rows not read)."""

    name: str
    seq: int
    prefix: str
    created: float
    retain: str | None
    banks: dict[str, dict[str, int]]  # name -> rows, dim, updates
    shard: tuple[int, int] = (0, 1)
    group: str | None = None

    def to_wire(self, now: float) -> dict[str, Any]:
        return {"name": self.name, "seq": self.seq, "prefix": self.prefix, "created": self.created,
                "age_s": now - self.created, "retain": self.retain, "banks": self.banks,
                "shard": list(self.shard), "group": self.group}


@dataclass
class Loaded:
    """A snapshot read and verified in full: its banks, ready to install."""

    summary: Summary
    banks: list[MemoryBank | SplitBank]
    manifest: dict[str, Any]


@dataclass
class Startup:
    """What :func:`load_latest` found: snapshots to install (oldest first) and those that failed."""

    loaded: list[Loaded] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # name -> why


def covers(outer: str, inner: str | None) -> bool:
    """Whether restoring a snapshot of prefix ``outer`` replaces every bank of prefix ``inner``
    (None: unknown, the manifest could not be read; only "" covers it)."""
    return outer == "" if inner is None else inner.startswith(outer)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(rows: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(rows)).cast("B")).hexdigest()


def seq_of(path: Path | str) -> int:
    return int(Path(path).name[len(PREFIX):])


def snapshots(directory: Path) -> list[Path]:
    """Complete-looking snapshot directories, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and NAME_RE.fullmatch(p.name)]
    return sorted(found, key=seq_of, reverse=True)


def _write_file(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _write_rows(path: Path, rows: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, rows, allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _fill(tmp: Path, data: Capture, seq: int) -> None:
    """Write the rows, the manifest and its checksum into ``tmp``."""
    entries = []
    for i, (config, counters, rows, held) in enumerate(data.banks):
        name = f"bank-{i:03d}.npy"
        _write_rows(tmp / name, rows)
        entries.append({"config": asdict(config), "counters": counters, "file": name, "ids": held,
                        "shape": list(rows.shape), "sha256": _digest(rows)})
    manifest = {"format": FORMAT, "seq": seq, "created": time.time(), "prefix": data.prefix,
                "retain": data.retain, "shard": [data.shard.index, data.shard.count], "group": data.group,
                "banks": entries, "applied_requests": data.applied}
    raw = json.dumps(manifest).encode()
    _write_file(tmp / MANIFEST, raw)
    _write_file(tmp / CHECKSUM, (hashlib.sha256(raw).hexdigest() + "\n").encode())
    _fsync_dir(tmp)


def write(directory: Path, data: Capture) -> Path:
    """Write ``data`` as the next snapshot in ``directory``, atomically. On any failure the
    temporary directory is removed and the exception propagates; nothing is pruned here."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = snapshots(directory)
    seq = seq_of(existing[0]) + 1 if existing else 1
    final = directory / f"{PREFIX}{seq:08d}"
    tmp = directory / f".tmp-{PREFIX}{seq:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        _fill(tmp, data, seq)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(directory)
    return final


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of snapshot ``path``, its checksum and structure verified; rows not read."""
    try:
        raw = (path / MANIFEST).read_bytes()
        recorded = (path / CHECKSUM).read_text().strip()
    except OSError as exc:
        raise SnapshotError(f"{path.name}: unreadable manifest ({exc})") from None
    if hashlib.sha256(raw).hexdigest() != recorded:
        raise SnapshotError(f"{path.name}: manifest fails its sha256 checksum (edited or corrupt)")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise SnapshotError(f"{path.name}: unreadable manifest ({exc})") from None
    _check_manifest(path, manifest)
    return manifest


def _check_manifest(path: Path, manifest: Any) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise SnapshotError(f"{path.name}: unknown snapshot format {found!r:.40} (this server reads {FORMAT})")
    if manifest.get("seq") != seq_of(path) or not isinstance(manifest.get("prefix"), str):
        raise SnapshotError(f"{path.name}: manifest names another snapshot or has no prefix")
    retain = manifest.get("retain")
    if retain is not None and not (retain == "" or (isinstance(retain, str) and NAME_RE.fullmatch(retain))):
        raise SnapshotError(f"{path.name}: manifest retains {retain!r:.60}, not a snapshot name")
    entries = manifest.get("banks")
    if not isinstance(entries, list) or not all(
            isinstance(e, dict) and isinstance(e.get("file"), str) and _BANK_FILE_RE.fullmatch(e["file"])
            for e in entries):
        raise SnapshotError(f"{path.name}: manifest's bank list is malformed")


def summarize(path: Path, manifest: dict[str, Any]) -> Summary:
    """The :class:`Summary` of a manifest that :func:`read_manifest` verified."""
    try:
        banks = {e["config"]["name"]: {"rows": e["config"]["rows"], "dim": e["config"]["dim"],
                                       "updates": e["counters"].get("updates", 0)} for e in manifest["banks"]}
        index, count = manifest.get("shard", [0, 1])
        return Summary(path.name, manifest["seq"], manifest["prefix"], float(manifest["created"]),
                       manifest.get("retain"), banks, (int(index), int(count)), manifest.get("group"))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise SnapshotError(f"{path.name}: malformed manifest ({exc.__class__.__name__}: {exc})") from None


def _load_bank(path: Path, entry: dict[str, Any], layout: Layout) -> MemoryBank | SplitBank:
    config = BankConfig(**entry["config"])
    lo, hi = entry.get("ids", [0, config.rows])
    if (lo, hi) != layout.held(config.rows):
        raise SnapshotError(f"{path.name}: bank {config.name!r} holds ids [{lo}, {hi}), not those of shard {layout.shard}")
    rows = np.load(path / entry["file"], allow_pickle=False)
    if rows.dtype != np.float32 or list(rows.shape) != [hi - lo, config.dim] or entry["shape"] != list(rows.shape):
        raise SnapshotError(f"{path.name}: bank {config.name!r} rows have shape {rows.shape} {rows.dtype}")
    if _digest(rows) != entry["sha256"]:
        raise SnapshotError(f"{path.name}: bank {config.name!r} fails its sha256 checksum")
    bank = layout.make(config, torch.from_numpy(np.ascontiguousarray(rows)))
    bank.load_counters(entry["counters"])
    return bank


def load(path: Path, layout: Layout | None = None) -> Loaded:
    """Load and verify one snapshot in full, its banks held as ``layout`` says (the CPU store
    by default, unsharded); raise SnapshotError naming what is wrong."""
    layout = layout or Layout()
    shard = layout.shard
    manifest = read_manifest(path)
    summary = summarize(path, manifest)
    if summary.shard != (shard.index, shard.count):
        raise SnapshotError(f"{path.name}: a snapshot of shard {summary.shard[0]}/{summary.shard[1]}; "
                            f"this server is shard {shard}")
    try:
        banks = [_load_bank(path, entry, layout) for entry in manifest["banks"]]
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, BankError) as exc:
        raise SnapshotError(f"{path.name}: {exc.__class__.__name__}: {exc}") from None
    outside = [b.config.name for b in banks if not b.config.name.startswith(summary.prefix)]
    if outside:
        raise SnapshotError(f"{path.name}: banks {outside} lie outside its prefix {summary.prefix!r}")
    return Loaded(summary, banks, manifest)


def read(path: Path, layout: Layout | None = None) -> tuple[list[MemoryBank | SplitBank], dict[str, Any]]:
    """:func:`load`, as (banks, manifest)."""
    loaded = load(path, layout)
    return loaded.banks, loaded.manifest


def remove_unfinished(directory: Path) -> None:
    """Remove temporary directories a crash left behind (never a finished snapshot)."""
    for tmp in directory.glob(f".tmp-{PREFIX}*") if directory.is_dir() else ():
        logger.warning("removing unfinished snapshot %s", tmp.name)
        shutil.rmtree(tmp, ignore_errors=True)


def read_unloadable(directory: Path) -> dict[str, str]:
    """The record of snapshots that failed to load (name -> why); empty if none or unreadable."""
    try:
        record = json.loads((directory / UNLOADABLE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("cannot read %s (%s): pruning treats every snapshot as loadable", UNLOADABLE, exc)
        return {}
    return {str(k): str(v) for k, v in record.items()} if isinstance(record, dict) else {}


def update_unloadable(directory: Path, failed: dict[str, str], loaded: Iterable[str] = ()) -> dict[str, str]:
    """Add ``failed`` to the record and take ``loaded`` off it (atomically); returns the record."""
    record = read_unloadable(directory)
    changed = {**record, **failed}
    for name in [*loaded, *(n for n in changed if not (directory / n).is_dir())]:  # loaded, or removed by hand
        changed.pop(name, None)
    if changed != record:
        tmp = directory / f".{UNLOADABLE}.tmp"
        try:
            tmp.write_text(json.dumps(changed, indent=1, sort_keys=True))
            os.replace(tmp, directory / UNLOADABLE)
        except OSError as exc:
            logger.error("cannot record unloadable snapshots in %s: %s", directory / UNLOADABLE, exc)
    return changed


def load_latest(directory: Path, keep_going: bool = False, layout: Layout | None = None) -> Startup:
    """The snapshots that restore the newest state of every bank: newest first, each snapshot not
    covered by a newer one already loaded is loaded and verified. A snapshot that fails is
    recorded; the scan then stops, unless ``keep_going`` (then an older snapshot of the same
    prefix takes its place). ``loaded`` comes back oldest first: install it in that order."""
    remove_unfinished(directory)
    found = Startup()
    for path in snapshots(directory):
        if any(covers(done.summary.prefix, _prefix_or_none(path)) for done in found.loaded):
            continue
        try:
            found.loaded.append(load(path, layout))
        except SnapshotError as exc:
            logger.warning("cannot load snapshot: %s", exc)
            found.failed[path.name] = str(exc)
            if not keep_going:
                break
    found.loaded.reverse()
    update_unloadable(directory, found.failed, (done.summary.name for done in found.loaded))
    return found


def _prefix_or_none(path: Path) -> str | None:
    try:
        return str(read_manifest(path)["prefix"])
    except SnapshotError:
        return None


def pinned(summaries: Iterable[Summary]) -> set[str]:
    """Snapshots no pruning removes: for each prefix, its newest paired snapshot (written with
    ``retain``) and the snapshot that one retains (what the pairing checkpoint named before)."""
    newest: dict[str, Summary] = {}
    for s in summaries:
        if s.retain is not None and (s.prefix not in newest or s.seq > newest[s.prefix].seq):
            newest[s.prefix] = s
    return {name for s in newest.values() for name in (s.name, s.retain) if name}


def prunable(summaries: list[Summary], prefix: str, keep: int, good: set[str], bad: Iterable[str]) -> list[str]:
    """Snapshots of ``prefix`` that may be removed: older than the newest ``keep`` of that prefix
    known to be good, not pinned (:func:`pinned`), and never one that failed to load."""
    group = sorted((s for s in summaries if s.prefix == prefix), key=lambda s: s.seq, reverse=True)
    known = [s for s in group if s.name in good]
    if len(known) < keep:
        return []
    cutoff, keep_too = known[keep - 1].seq, pinned(summaries) | set(bad)
    return [s.name for s in group if s.seq < cutoff and s.name not in keep_too]


Outcome = dict[str, Any] | BankError
Done = Callable[[Outcome], None]


class Snapshotter:
    """Takes snapshots on request, every ``every`` seconds and at shutdown, on its own thread.

    Requests for the same (prefix, retain) that arrive while a snapshot is being taken or waits
    share the next one: each is captured after every request waiting for it arrived, so one
    write answers them all. ``pause(action)`` must run ``action`` while every bank worker is
    paused (Dispatcher.barrier); ``take(prefix, retain, group)`` captures the banks under ``prefix``.
    """

    def __init__(self, directory: Path, pause: Callable[[Callable[[], Any]], Any],
                 take: Callable[[str, str | None, str | None], Capture], every: float = 0.0, keep: int = 3,
                 layout: Layout | None = None) -> None:
        self.directory, self.every, self.keep, self.layout = directory, every, keep, layout
        self._pause, self._take = pause, take
        self._lock = threading.Lock()  # one writer or reader of the directory at a time
        self._cond = threading.Condition()
        self._pending: collections.OrderedDict[tuple[str, str | None, str | None], list[Done]] = collections.OrderedDict()
        self._waiters = 0
        self._stopping = False
        self._good: set[str] = set()  # written or verified in full by this process
        self._bad: dict[str, str] = read_unloadable(directory)  # failed to load: never pruned
        self._summaries: dict[str, Summary | str] = {}  # name -> summary, or why its manifest fails
        self.last: dict[str, Any] | None = None
        self.written = self.failures = self.coalesced = 0
        self.last_failure: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="fgc-bank-snapshots")
        self._thread.start()

    def remember(self, startup: Startup | None) -> None:
        """Record what the start restored (good) and could not load (never pruned)."""
        if startup is not None:
            with self._lock:
                self._good.update(done.summary.name for done in startup.loaded)
                self._bad.update(startup.failed)

    def submit(self, prefix: str, retain: str | None, done: Done, group: str | None = None) -> None:
        """Queue a snapshot request; ``done(outcome)`` is called once it is written or failed."""
        with self._cond:
            if self._stopping:
                raise BankError(ErrorCode.BUSY, "the server is shutting down; its final snapshot follows")
            key = (prefix, retain, group)
            if self._waiters >= MAX_WAITERS or (key not in self._pending and len(self._pending) >= MAX_PENDING_SCOPES):
                raise BankError(ErrorCode.BUSY, f"{self._waiters} snapshot requests are waiting; retry later")
            self._pending.setdefault(key, []).append(done)
            self._waiters += 1
            self._cond.notify()

    def snapshot(self, prefix: str = "", retain: str | None = None, group: str | None = None) -> dict[str, Any]:
        """Capture at a consistent point, write, prune; returns where and what was written.
        Raises BankError(SNAPSHOT_FAILED) when the write fails (the temporary files are gone)."""
        with self._lock:
            started = time.perf_counter()
            try:
                data = self._pause(lambda: self._take(prefix, retain, group))
                paused = time.perf_counter() - started
                path = write(self.directory, data)
            except Exception as exc:
                self._failed(prefix, exc)
                if isinstance(exc, OSError):
                    raise BankError(ErrorCode.SNAPSHOT_FAILED, f"cannot write a snapshot in {self.directory}: {exc}") from None
                raise
            self._written(path, data, started, paused)
            self._prune(prefix)
            return self.last  # type: ignore[return-value]

    def _written(self, path: Path, data: Capture, started: float, paused: float) -> None:
        banks = {c.name: {"rows": c.rows, "dim": c.dim, "updates": n.get("updates", 0)} for c, n, _, _ in data.banks}
        self._good.add(path.name)
        self._summaries[path.name] = Summary(path.name, seq_of(path), data.prefix, time.time(), data.retain, banks,
                                             (data.shard.index, data.shard.count), data.group)
        self.written += 1
        self.last = {"name": path.name, "path": str(path), "prefix": data.prefix, "time": time.time(),
                     "banks": banks, "paused_s": paused, "seconds": time.perf_counter() - started,
                     "shard": [data.shard.index, data.shard.count], "group": data.group}
        logger.info("snapshot %s written (prefix %r, %d banks, %.2f s, workers paused %.3f s)", path.name,
                    data.prefix, len(data.banks), self.last["seconds"], paused)

    def _failed(self, prefix: str, exc: Exception) -> None:
        self.failures += 1
        self.last_failure = {"prefix": prefix, "time": time.time(), "error": f"{exc.__class__.__name__}: {exc}"}
        logger.error("snapshot of prefix %r in %s failed: %s", prefix, self.directory, self.last_failure["error"])

    def _summaries_now(self) -> list[Summary]:
        """Summaries of every snapshot on disk whose manifest verifies (cached: they never change)."""
        out = []
        for path in snapshots(self.directory):
            known = self._summaries.get(path.name)
            if known is None:
                try:
                    known = summarize(path, read_manifest(path))
                except SnapshotError as exc:
                    known = str(exc)
                self._summaries[path.name] = known
            if isinstance(known, Summary):
                out.append(known)
        return out

    def _prune(self, prefix: str) -> None:
        for name in prunable(self._summaries_now(), prefix, self.keep, self._good, self._bad):
            shutil.rmtree(self.directory / name, ignore_errors=True)
            self._summaries.pop(name, None)
            logger.info("pruned snapshot %s (prefix %r)", name, prefix)

    def load(self, name: str) -> Loaded:
        """Snapshot ``name`` read and verified in full (for a restore); no prune runs meanwhile."""
        path = self.directory / name
        if not NAME_RE.fullmatch(name) or not path.is_dir():
            raise BankError(ErrorCode.BAD_ARGUMENT, f"no snapshot named {quote(name)} in {self.directory}")
        with self._lock:
            try:
                loaded = load(path, self.layout)
            except SnapshotError as exc:
                self._bad = update_unloadable(self.directory, {name: str(exc)})
                raise BankError(ErrorCode.BAD_ARGUMENT, f"snapshot {name} does not verify: {exc}") from None
            self._good.add(name)
            if name in self._bad:
                self._bad = update_unloadable(self.directory, {}, [name])
            return loaded

    def listing(self) -> list[dict[str, Any]]:
        """Every snapshot on disk, newest first: its summary, or why its manifest fails."""
        with self._lock:
            self._summaries_now()
            now = time.time()
            out = []
            for path in snapshots(self.directory):
                known = self._summaries.get(path.name)
                entry = known.to_wire(now) if isinstance(known, Summary) else {"name": path.name, "error": known}
                entry["verified"] = path.name in self._good
                if path.name in self._bad:
                    entry.setdefault("error", f"failed to load, never pruned: {self._bad[path.name]}")
                out.append(entry)
            pins = pinned(s for s in self._summaries.values() if isinstance(s, Summary))
            for entry in out:
                entry["pinned"] = entry["name"] in pins
            return out

    def stats(self) -> dict[str, Any]:
        """The snapshot part of the server's ``stats``."""
        last, failure, now = self.last, self.last_failure, time.time()
        return {"snapshot": None if last is None else {"name": last["name"], "prefix": last["prefix"],
                                                       "age_s": now - last["time"]},
                "snapshots_written": self.written, "snapshot_failures": self.failures,
                "snapshot_last_failure": None if failure is None else {**failure, "age_s": now - failure["time"]},
                "snapshots_coalesced": self.coalesced}

    def _run(self) -> None:
        """The snapshot thread: answers waiting requests, one write per (prefix, retain), and
        takes the periodic snapshots; at stop it answers what waits, then ends."""
        due = time.monotonic() + self.every if self.every > 0 else float("inf")
        while True:
            with self._cond:
                while not self._pending and not self._stopping and time.monotonic() < due:
                    self._cond.wait(None if due == float("inf") else max(0.0, due - time.monotonic()))
                if not self._pending and self._stopping:
                    return
                if not self._pending:  # the periodic one is due
                    self._pending[("", None, None)] = []
                    due = time.monotonic() + self.every
                (prefix, retain, group), waiters = self._pending.popitem(last=False)
                self._waiters -= len(waiters)
            self.coalesced += max(0, len(waiters) - 1)
            outcome = self._attempt(prefix, retain, group)
            for done in waiters:
                done(outcome)

    def _attempt(self, prefix: str, retain: str | None, group: str | None) -> Outcome:
        try:
            return self.snapshot(prefix, retain, group)
        except BankError as exc:
            return exc
        except Exception as exc:  # a bug: logged, answered internal, the thread goes on
            logger.exception("snapshot failed")
            return BankError(ErrorCode.INTERNAL, f"{exc.__class__.__name__}: {exc}")

    def stop(self) -> None:
        """Answer the requests still waiting, then stop the thread (the final snapshot is the
        server's call)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()
