"""Recent requests per client, so a request sent again is answered but never run or applied twice.

Clients resend a request with the same (client id, request id) after a reconnection or a long
wait. A request seen before is still queued (the copy is dropped, and the queued job is pointed at
the connection the copy came on, so its reply reaches the client) or done (its cached reply is sent
again; a mutating request whose reply is no longer cached is acknowledged without being applied
again, ``BankServer._replay``). A copy whose content differs from the original's (another op,
bank, argument or array) is refused with ``id_reused``: the id names one request, not a slot.

The exactly-once window. A client numbers its requests with increasing ids (``BankClient`` does).
For each client the server keeps the records of its last ``window`` requests, and remembers the
highest id it has let go of (the client's floor). A copy is recognised as long as fewer than
``window`` later requests of the same client have reached the server and the client has not been
forgotten; a mutating request at or below the floor and no longer recorded is answered
``stale_request`` and not applied (it may have been), and a read there is simply run again.
A client is forgotten only after ``ttl_s`` without a request, and only when room is needed for a
new one; no client's records are ever evicted by another client's traffic. When the table holds
``max_clients`` clients that are all active, a mutating request from a new client is answered
``busy``.

Memory: at most ``max_clients * window`` records (``RECORD_BYTES`` each, an estimate measured with
tracemalloc in tests) plus cached replies within ``reply_budget`` bytes, counted with what their
table entries take.
"""

from __future__ import annotations

import collections
import enum
import threading
import time
import zlib
from typing import Any

import msgpack

from fgc_bank.protocol import Reply, Request

MUTATING_OPS = frozenset({"create", "drop", "update", "knn_update"})
RECORD_BYTES = 200  # one request's record: its table slot, its id and its digest
CACHE_ENTRY_BYTES = 400  # a cached reply beyond its arrays: the Reply, its dicts and header values


class Seen(enum.Enum):
    NEW = "new"
    QUEUED = "queued"  # a copy of a request still queued: drop it
    DONE = "done"  # a copy of a request answered before: answer it again, never apply it again
    REUSED = "reused"  # the id of an earlier request, with other content
    STALE = "stale"  # older than the client's window: a mutating request is refused
    FULL = "full"  # a new client while the table is full of active ones: not tracked


def digest(request: Request) -> int:
    """A checksum of what a request asks (op, bank, args, arrays), to tell a copy from a reuse."""
    head = msgpack.packb([request.op, request.bank, sorted(request.args.items())], use_bin_type=True)
    value = zlib.crc32(head)
    for name, array in sorted(request.arrays.items()):
        value = zlib.crc32(name.encode(), value)
        value = zlib.crc32(memoryview(array).cast("B") if array.size else b"", value)
    return value


class _Queued:
    """Marks a queued request; holds its job so a resent copy can redirect the reply."""

    __slots__ = ("digest", "job")

    def __init__(self, job: Any, digest: int) -> None:
        self.job = job
        self.digest = digest


class _Client:
    """One client's records: request id -> ``_Queued``, or (digest, mutating) once done."""

    __slots__ = ("floor", "last_seen", "records")

    def __init__(self) -> None:
        self.records: collections.OrderedDict[int, Any] = collections.OrderedDict()
        self.floor = 0  # the highest request id let go of
        self.last_seen = time.monotonic()


class RecentRequests:
    """The table (client, request id) -> queued job, or done with its digest and cached reply."""

    def __init__(self, window: int = 512, max_clients: int = 1024, reply_budget: int = 64 * 2**20,
                 ttl_s: float = 600.0) -> None:
        self.window = window
        self.max_clients = max_clients
        self.reply_budget = reply_budget
        self.ttl_s = ttl_s
        self._clients: collections.OrderedDict[int, _Client] = collections.OrderedDict()  # idlest first
        self._cached: collections.OrderedDict[tuple[int, int], tuple[Reply, int]] = collections.OrderedDict()
        self._cached_bytes = 0
        self._records = 0
        self._lock = threading.Lock()
        self.copies_seen = 0

    def check(self, client: int, rid: int, sum_: int, op: str, peer: Any = None) -> tuple[Seen, Reply | None]:
        """What (client, rid) is to the server, with the cached reply of a DONE one when kept.

        A queued job's reply is redirected to ``peer``, the connection the latest copy came on.
        """
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                return (Seen.NEW if self._room_for_one() else Seen.FULL), None
            state = entry.records.get(rid)
            if state is None:
                return (Seen.STALE if rid <= entry.floor else Seen.NEW), None
            self.copies_seen += 1
            if isinstance(state, _Queued):
                if state.digest != sum_:
                    return Seen.REUSED, None
                if peer is not None:
                    state.job.peer = peer
                return Seen.QUEUED, None
            if state[0] is not None and state[0] != sum_:  # None: restored without a digest
                return Seen.REUSED, None
            cached = self._cached.get((client, rid))
            return Seen.DONE, None if cached is None else cached[0]

    def begin(self, client: int, rid: int, sum_: int, job: Any) -> None:
        """Record that (client, rid) is queued as ``job``."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is None:
                self._room_for_one()
                entry = self._clients[client] = _Client()
            self._clients.move_to_end(client)
            entry.last_seen = time.monotonic()
            if rid not in entry.records:
                self._records += 1
            entry.records[rid] = _Queued(job, sum_)
            while len(entry.records) > self.window:
                old_rid, _ = entry.records.popitem(last=False)
                entry.floor = max(entry.floor, old_rid)
                self._records -= 1
                self._uncache((client, old_rid))

    def forget(self, client: int, rid: int) -> None:
        """Drop (client, rid): it was refused before being queued (busy), so a copy is new."""
        with self._lock:
            entry = self._clients.get(client)
            if entry is not None and entry.records.pop(rid, None) is not None:
                self._records -= 1
            self._uncache((client, rid))

    def done(self, client: int, rid: int, op: str, reply: Reply) -> None:
        """Record that (client, rid) was answered, caching its reply within the byte budget."""
        with self._lock:
            entry = self._clients.get(client)
            state = None if entry is None else entry.records.get(rid)
            if not isinstance(state, _Queued):
                return
            entry.records[rid] = (state.digest, op in MUTATING_OPS)
            size = reply_bytes(reply)
            if size > self.reply_budget:
                return
            self._cached[(client, rid)] = (reply, size)
            self._cached_bytes += size
            while self._cached_bytes > self.reply_budget:
                _, (_, old_size) = self._cached.popitem(last=False)
                self._cached_bytes -= old_size

    def held_bytes(self) -> int:
        """What the table takes: its records (estimated) and its cached replies."""
        with self._lock:
            return self._records * RECORD_BYTES + self._cached_bytes

    def _room_for_one(self) -> bool:
        """Whether a new client fits, forgetting clients idle past the TTL if that makes room."""
        if len(self._clients) < self.max_clients:
            return True
        now = time.monotonic()
        while self._clients:
            client, entry = next(iter(self._clients.items()))
            if now - entry.last_seen < self.ttl_s or any(isinstance(s, _Queued) for s in entry.records.values()):
                return False
            del self._clients[client]
            self._records -= len(entry.records)
            for rid in entry.records:
                self._uncache((client, rid))
            if len(self._clients) < self.max_clients:
                return True
        return True

    def _uncache(self, key: tuple[int, int]) -> None:
        cached = self._cached.pop(key, None)
        if cached is not None:
            self._cached_bytes -= cached[1]

    def export(self) -> dict[str, Any]:
        """Per client: its floor and its done mutating requests with their digests (JSON-ready),
        for a snapshot taken while the workers are paused."""
        with self._lock:
            return {str(c): {"floor": e.floor,
                             "done": [[r, s[0]] for r, s in e.records.items() if isinstance(s, tuple) and s[1]]}
                    for c, e in self._clients.items()}

    def restore(self, table: dict[str, Any]) -> None:
        """Remember a snapshot's applied requests as done, with no cached reply (merged into the
        table: a scoped restore leaves other runs' clients as they are). Snapshots of format 1
        listed bare request ids, restored without a digest."""
        with self._lock:
            for client, saved in list(table.items())[-self.max_clients:]:
                if isinstance(saved, list):
                    saved = {"floor": 0, "done": [[rid, None] for rid in saved]}
                entry = self._clients.get(int(client))
                if entry is None:
                    entry = self._clients[int(client)] = _Client()
                entry.floor = max(entry.floor, int(saved["floor"]))
                for rid, sum_ in saved["done"][-self.window:]:
                    if int(rid) not in entry.records:
                        self._records += 1
                    entry.records[int(rid)] = (None if sum_ is None else int(sum_), True)


def reply_bytes(reply: Reply) -> int:
    """Memory a cached reply holds: its arrays and its table entry."""
    return CACHE_ENTRY_BYTES + sum(a.nbytes for a in reply.arrays.values())
