"""Recent requests per client, so a resent request is answered but never run or applied twice.

Clients resend with the same (client id, request id) after a reconnection or a long wait. A
request seen before is either still queued (the copy is dropped, and the queued job is pointed at
the connection the copy came on, so its reply reaches the client) or done (its cached reply is
sent again). Replies are cached within a global byte budget, newest kept; an entry whose reply
was evicted, or that was restored from a snapshot, keeps only its id: a resent mutating request is
then answered without being applied again (``BankServer._replay``) and a read is simply run again.
Memory is bounded by the per-client window, the number of clients and the reply budget.
"""

from __future__ import annotations

import collections
import enum
import threading
from typing import Any

from fgc_bank.protocol import Reply

MUTATING_OPS = frozenset({"create", "drop", "update", "knn_update"})


class Seen(enum.Enum):
    NEW = "new"
    QUEUED = "queued"
    DONE = "done"


class _Queued:
    """Marks a queued request; holds its job so a resent copy can redirect the reply."""

    __slots__ = ("job",)

    def __init__(self, job: Any) -> None:
        self.job = job


def _reply_bytes(reply: Reply) -> int:
    return 256 + sum(a.nbytes for a in reply.arrays.values())


class RecentRequests:
    """A bounded table (client, request id) -> queued job, or done with its reply if still cached."""

    def __init__(self, window: int = 1024, max_clients: int = 4096, reply_budget: int = 64 * 2**20) -> None:
        self.window = window
        self.max_clients = max_clients
        self.reply_budget = reply_budget
        self._clients: collections.OrderedDict[int, collections.OrderedDict[int, Any]] = collections.OrderedDict()
        self._cached: collections.OrderedDict[tuple[int, int], int] = collections.OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()
        self.copies_seen = 0

    def check(self, client: int, rid: int, peer: Any = None) -> tuple[Seen, Reply | None]:
        """Whether (client, rid) is new, queued, or done (with its cached reply, if kept). A queued
        job's reply is redirected to ``peer``, the connection the latest copy came on."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None or rid not in entries:
                return Seen.NEW, None
            self.copies_seen += 1
            state = entries[rid]
            if isinstance(state, _Queued):
                if peer is not None:
                    state.job.peer = peer
                return Seen.QUEUED, None
            return Seen.DONE, state

    def begin(self, client: int, rid: int, job: Any) -> None:
        """Record that (client, rid) is queued as ``job``."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None:
                entries = self._clients[client] = collections.OrderedDict()
                while len(self._clients) > self.max_clients:
                    old, dropped = self._clients.popitem(last=False)
                    for old_rid in dropped:
                        self._uncache((old, old_rid))
            self._clients.move_to_end(client)
            entries[rid] = _Queued(job)
            while len(entries) > self.window:
                old_rid, _ = entries.popitem(last=False)
                self._uncache((client, old_rid))

    def forget(self, client: int, rid: int) -> None:
        """Drop (client, rid): it was refused before being queued (busy), so a copy is new."""
        with self._lock:
            self._clients.get(client, {}).pop(rid, None)
            self._uncache((client, rid))

    def done(self, client: int, rid: int, reply: Reply) -> None:
        """Record that (client, rid) was answered, caching its reply within the byte budget."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None or rid not in entries:
                return
            entries[rid] = reply
            size = _reply_bytes(reply)
            self._cached[(client, rid)] = size
            self._cached_bytes += size
            while self._cached_bytes > self.reply_budget and self._cached:
                (old_client, old_rid), old_size = self._cached.popitem(last=False)
                self._cached_bytes -= old_size
                old_entries = self._clients.get(old_client)
                if old_entries is not None and isinstance(old_entries.get(old_rid), Reply):
                    old_entries[old_rid] = None

    def _uncache(self, key: tuple[int, int]) -> None:
        size = self._cached.pop(key, None)
        if size is not None:
            self._cached_bytes -= size

    def export(self) -> dict[str, list[int]]:
        """Done request ids per client (JSON-ready), for a snapshot taken while workers are paused."""
        with self._lock:
            return {str(c): [r for r, v in e.items() if not isinstance(v, _Queued)]
                    for c, e in self._clients.items()}

    def restore(self, table: dict[str, list[int]]) -> None:
        """Remember ids from a snapshot as done, with no cached reply."""
        with self._lock:
            for client, ids in table.items():
                entries = self._clients.setdefault(int(client), collections.OrderedDict())
                for rid in ids[-self.window:]:
                    entries[int(rid)] = None
