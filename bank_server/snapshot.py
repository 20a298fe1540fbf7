"""Snapshots: consistent, atomic, self-describing, verified copies of every bank on disk.

Layout of ``DIR/snapshot-00000042/``::

    manifest.json   format, sequence number, time, and per bank: config, counters, row file,
                    shape and sha256 of the rows; plus the dedup table of applied request ids
    bank-000.npy    rows of the first bank (float32, N x D), one file per bank

Consistent: rows are copied while every bank worker is paused between requests, so no request is
half applied and every request acknowledged before the snapshot op is in it. Atomic: written into
``.tmp-*``, each file fsynced, then renamed into place and the directory fsynced; a crash leaves a
temporary directory that is ignored and cleaned, never a partial snapshot. Verified: loading checks
the manifest, shapes and checksums, and a snapshot that fails is reported and skipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fgc_bank.bank import BankConfig, MemoryBank
from fgc_bank.errors import BankError, ErrorCode

logger = logging.getLogger(__name__)

FORMAT = 1
PREFIX = "snapshot-"
MANIFEST = "manifest.json"


class SnapshotError(Exception):
    """A snapshot on disk is incomplete, corrupt or of an unknown format."""


@dataclass
class Capture:
    """What a snapshot holds, copied out of the live banks at one consistent point."""

    banks: list[tuple[BankConfig, dict[str, int], np.ndarray]]
    applied: dict[str, list[int]]


def capture(banks: dict[str, MemoryBank], applied: dict[str, list[int]]) -> Capture:
    """Copy rows and counters; call it while the bank workers are paused."""
    return Capture([(b.config, dict(b.counters), b.rows_np.copy()) for _, b in sorted(banks.items())], applied)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _digest(rows: np.ndarray) -> str:
    return hashlib.sha256(memoryview(np.ascontiguousarray(rows)).cast("B")).hexdigest()


def snapshots(directory: Path) -> list[Path]:
    """Complete-looking snapshot directories, newest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith(PREFIX)
             and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]), reverse=True)


def write(directory: Path, data: Capture, keep: int = 3) -> Path:
    """Write ``data`` as the next snapshot in ``directory``, atomically; prune to ``keep``."""
    directory.mkdir(parents=True, exist_ok=True)
    existing = snapshots(directory)
    seq = int(existing[0].name[len(PREFIX):]) + 1 if existing else 1
    final = directory / f"{PREFIX}{seq:08d}"
    tmp = directory / f".tmp-{PREFIX}{seq:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    entries = []
    for i, (config, counters, rows) in enumerate(data.banks):
        name = f"bank-{i:03d}.npy"
        with open(tmp / name, "wb") as f:
            np.save(f, rows, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        entries.append({"config": asdict(config), "counters": counters, "file": name,
                        "shape": list(rows.shape), "sha256": _digest(rows)})
    manifest = {"format": FORMAT, "seq": seq, "created": time.time(), "banks": entries,
                "applied_requests": data.applied}
    with open(tmp / MANIFEST, "w") as f:
        json.dump(manifest, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    os.rename(tmp, final)
    _fsync_dir(directory)
    for old in snapshots(directory)[keep:]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read(path: Path) -> tuple[list[MemoryBank], dict[str, Any]]:
    """Load and verify one snapshot; raise SnapshotError naming what is wrong."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{path.name}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise SnapshotError(f"{path.name}: unknown snapshot format {manifest.get('format') if isinstance(manifest, dict) else manifest!r}")
    banks = []
    try:
        for entry in manifest["banks"]:
            config = BankConfig(**entry["config"])
            rows = np.load(path / entry["file"], allow_pickle=False)
            if rows.dtype != np.float32 or list(rows.shape) != [config.rows, config.dim] or entry["shape"] != list(rows.shape):
                raise SnapshotError(f"{path.name}: bank {config.name!r} rows have shape {rows.shape} {rows.dtype}")
            if _digest(rows) != entry["sha256"]:
                raise SnapshotError(f"{path.name}: bank {config.name!r} fails its sha256 checksum")
            bank = MemoryBank(config, torch.from_numpy(np.ascontiguousarray(rows)))
            bank.counters.update(entry["counters"])
            banks.append(bank)
    except SnapshotError:
        raise
    except (OSError, ValueError, KeyError, TypeError, BankError) as exc:
        raise SnapshotError(f"{path.name}: {exc.__class__.__name__}: {exc}") from None
    return banks, manifest


def load_latest(directory: Path) -> tuple[list[MemoryBank], dict[str, Any]] | None:
    """The newest snapshot that verifies, skipping (and logging) any that do not."""
    for tmp in directory.glob(f".tmp-{PREFIX}*") if directory.is_dir() else ():
        logger.warning("removing unfinished snapshot %s", tmp.name)
        shutil.rmtree(tmp, ignore_errors=True)
    for path in snapshots(directory):
        try:
            return read(path)
        except SnapshotError as exc:
            logger.error("skipping snapshot: %s", exc)
    return None


class Snapshotter:
    """Takes snapshots on request, every ``every`` seconds, and at shutdown, on its own thread.

    ``pause(action)`` must run ``action`` while every bank worker is paused (Dispatcher.barrier).
    """

    def __init__(self, directory: Path, pause: Callable[[Callable[[], Any]], Any],
                 take: Callable[[], Capture], every: float = 0.0, keep: int = 3) -> None:
        self.directory, self.every, self.keep = directory, every, keep
        self._pause, self._take = pause, take
        self._lock = threading.Lock()  # one snapshot at a time
        self.last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._periodic, daemon=True, name="fgc-bank-snapshots")
        if every > 0:
            self._thread.start()

    def snapshot(self) -> dict[str, Any]:
        """Capture at a consistent point, then write; returns where and what was written."""
        with self._lock:
            started = time.perf_counter()
            data = self._pause(self._take)
            paused = time.perf_counter() - started
            try:
                path = write(self.directory, data, self.keep)
            except OSError as exc:
                raise BankError(ErrorCode.INTERNAL, f"cannot write a snapshot in {self.directory}: {exc}") from None
            self.last = {"name": path.name, "path": str(path), "time": time.time(),
                         "banks": {c.name: {"rows": c.rows, "dim": c.dim, "updates": n["updates"]}
                                   for c, n, _ in data.banks},
                         "paused_s": paused, "seconds": time.perf_counter() - started}
            logger.info("snapshot %s written (%d banks, %.2f s, workers paused %.3f s)", path.name,
                        len(data.banks), self.last["seconds"], paused)
            return self.last

    def _periodic(self) -> None:
        while not self._stop.wait(self.every):
            try:
                self.snapshot()
            except Exception:
                logger.exception("periodic snapshot failed")

    def stop(self) -> None:
        """Stop the periodic thread (the final snapshot is the server's call)."""
        self._stop.set()
