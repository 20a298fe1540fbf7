"""Replies handed to ZeroMQ and not yet delivered, bounded in bytes per peer and in total.

ZeroMQ keeps a reply in the peer's pipe until the peer reads it, so a client that stops reading
(a bug, a SIGSTOP, an attacker) makes the server hold every reply sent to it. The socket loop
never waits on such a peer (sends are non-blocking: a full pipe drops the reply, counted); this
ledger bounds the bytes it may pile up before that. Each buffer of ``ZERO_COPY_BYTES`` or more
leaves zero-copy (the server sets the ROUTER's ``copy_threshold`` to it), wrapped in a view whose
release ZeroMQ reports (pyzmq drops its reference once the message is freed, which runs a
``weakref.finalize``), so the ledger knows what is still held. Smaller frames are copied by pyzmq:
per connection they are bounded by the socket's SNDHWM, in messages.
"""

from __future__ import annotations

import collections
import threading
import weakref
from typing import Any

import numpy as np

ZERO_COPY_BYTES = 4096  # the ROUTER's copy_threshold: smaller buffers are copied at send, untracked


class Delivery:
    """Bytes of reply buffers ZeroMQ still holds, by peer; admits a reply only within budget."""

    def __init__(self, total_bytes: int, peer_bytes: int) -> None:
        self.total_bytes = total_bytes
        self.peer_bytes = peer_bytes
        self._held: dict[bytes, int] = {}
        self._total = 0
        self._released: collections.deque[tuple[bytes, int]] = collections.deque()  # from any thread
        self._lock = threading.Lock()

    def held(self, peer: Any = None) -> int:
        """Bytes held for ``peer``, or for everyone."""
        with self._lock:
            self._settle()
            return self._total if peer is None else self._held.get(bytes(peer), 0)

    def blocked(self, peer: Any) -> bool:
        """Whether ``peer`` already holds its whole budget of unread replies."""
        return self.held(peer) >= self.peer_bytes

    def admit(self, peer: Any, frames: list[Any]) -> list[Any] | None:
        """``frames`` with their large buffers tracked, or None when sending them would take the
        peer or the server past its budget (the reply is then dropped)."""
        sizes = [memoryview(f).nbytes for f in frames]
        size = sum(n for n in sizes if n >= ZERO_COPY_BYTES)
        if not size:
            return frames
        key = bytes(peer)
        with self._lock:
            self._settle()
            if self._held.get(key, 0) + size > self.peer_bytes or self._total + size > self.total_bytes:
                return None
            self._held[key] = self._held.get(key, 0) + size
            self._total += size
        return [self._track(key, f) if n >= ZERO_COPY_BYTES else f for f, n in zip(frames, sizes)]

    def _track(self, key: bytes, frame: Any) -> np.ndarray:
        view = np.frombuffer(frame, dtype=np.uint8)  # a new object that only ZeroMQ will hold
        weakref.finalize(view, self._released.append, (key, view.nbytes))
        return view

    def _settle(self) -> None:
        """Take in the releases ZeroMQ reported (under the lock)."""
        while self._released:
            key, size = self._released.popleft()
            left = self._held.get(key, 0) - size
            if left > 0:
                self._held[key] = left
            else:
                self._held.pop(key, None)
            self._total -= size
