"""Recent mutating requests per client, so a retried request is answered but never applied twice.

Clients retry with the same (client id, request id) after a timeout or a server restart. A request
seen before is either still queued (the retry is dropped: the first copy will be answered) or done
(the cached reply is sent again). Replies are cached for the newest few requests of each client;
older entries keep only the id, as do entries restored from a snapshot, and a retry of those is
answered without being applied again (see ``BankServer._replay``). Memory is bounded by the
per-client window and the number of clients remembered.
"""

from __future__ import annotations

import collections
import enum
import threading

from fgc_bank.protocol import Reply

MUTATING_OPS = frozenset({"create", "drop", "update", "knn_update"})


class Seen(enum.Enum):
    NEW = "new"
    QUEUED = "queued"
    DONE = "done"


class RecentRequests:
    """A bounded table of (client, request id) -> queued, or done with an optional cached reply."""

    def __init__(self, window: int = 1024, cached_replies: int = 8, max_clients: int = 4096) -> None:
        self.window = window
        self.cached_replies = cached_replies
        self.max_clients = max_clients
        self._clients: collections.OrderedDict[int, collections.OrderedDict[int, Reply | None | Seen]] = \
            collections.OrderedDict()
        self._lock = threading.Lock()
        self.retries_answered = 0

    def check(self, client: int, rid: int) -> tuple[Seen, Reply | None]:
        """Whether (client, rid) is new, queued, or done (with its cached reply, if kept)."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None or rid not in entries:
                return Seen.NEW, None
            self.retries_answered += 1
            state = entries[rid]
            return (Seen.QUEUED, None) if state is Seen.QUEUED else (Seen.DONE, state)

    def begin(self, client: int, rid: int) -> None:
        """Record that (client, rid) is queued."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None:
                entries = self._clients[client] = collections.OrderedDict()
                while len(self._clients) > self.max_clients:
                    self._clients.popitem(last=False)
            self._clients.move_to_end(client)
            entries[rid] = Seen.QUEUED
            while len(entries) > self.window:
                entries.popitem(last=False)

    def forget(self, client: int, rid: int) -> None:
        """Drop (client, rid): it was refused before being queued (busy), so a retry is new."""
        with self._lock:
            self._clients.get(client, {}).pop(rid, None)

    def done(self, client: int, rid: int, reply: Reply) -> None:
        """Record that (client, rid) was applied, caching its reply; older replies are let go."""
        with self._lock:
            entries = self._clients.get(client)
            if entries is None or rid not in entries:
                return
            entries[rid] = reply
            done = [r for r, v in entries.items() if isinstance(v, Reply)]
            for old in done[: max(0, len(done) - self.cached_replies)]:
                entries[old] = None

    def export(self) -> dict[str, list[int]]:
        """Done request ids per client (JSON-ready), for a snapshot taken while workers are paused."""
        with self._lock:
            return {str(c): [r for r, v in e.items() if v is not Seen.QUEUED] for c, e in self._clients.items()}

    def restore(self, table: dict[str, list[int]]) -> None:
        """Remember ids from a snapshot as done, with no cached reply."""
        with self._lock:
            for client, ids in table.items():
                entries = self._clients.setdefault(int(client), collections.OrderedDict())
                for rid in ids[-self.window:]:
                    entries[int(rid)] = None
