"""The ZeroMQ client: one DEALER socket, futures for every call, and no call that can hang.

Async calls (``knn_update_async`` mid-forward, collected later) go through an I/O thread, which
sends them, matches replies to futures by request id, and fails calls that outlive their timeout
with :class:`BankTimeout`. A blocking call made while nothing else is using the socket skips the
I/O thread: the calling thread sends and waits on the socket itself, with the same resends and
timeouts, two thread hand-offs (~0.3 ms a call) fewer. Every call sends a copy of the caller's
arrays taken when it is made, so the caller may reuse its buffers at once (see ``_encoded``).

Ownership of the socket: ZeroMQ sockets are not thread-safe, so whoever uses it holds
``_io_lock`` (a lock is the full memory barrier ZeroMQ asks for when a socket changes threads).
The I/O thread holds it from the moment it takes requests to send until every one is answered or
expired; a blocking call takes it only if it is free and no request waits to be sent. So requests
from one client leave on one connection in the order they were issued, whichever path they take.

Restarts: ZeroMQ reconnects the DEALER by itself, but requests that were in the dead connection
are gone. A socket monitor tells the socket's owner when the connection comes back, and it sends
every unanswered request again with the same (client id, request id); so does a request that has
waited ``retry_interval`` seconds (the ZeroMQ Guide's "Lazy Pirate", on the same socket so the
original reply can still arrive). The server drops a copy of a request it still has queued and
answers a copy of an applied update from its memory: nothing runs twice, nothing is applied twice.
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import logging
import secrets
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import zmq
import zmq.auth
from zmq.utils.monitor import recv_monitor_message

from fgc_bank.api import DEFAULT_TIMEOUT_S, BankHandle
from fgc_bank.errors import BankError, BankTimeout, BankUnavailable, ErrorCode
from fgc_bank.frames import NOBLOCK, recv_frames, send_frames
from fgc_bank.protocol import Reply, Request, decode_reply, encode_request

logger = logging.getLogger(__name__)
T = TypeVar("T")
UNSENT_RETRY_S = 0.05  # how soon a request that could not be queued for sending is tried again
CLOSED_CHECK_S = 0.1  # a blocking call waiting on the socket notices close() within this
IDLE_WAIT_S = 1.0  # the I/O thread's longest sleep with nothing to watch


@dataclass
class _Connection:
    """One server endpoint: its DEALER socket, the socket's monitor, and whether it is down."""

    address: str
    socket: zmq.Socket
    monitor: zmq.Socket
    disconnected: bool = False  # lost and not back yet (the socket owner's)
    label: str | None = None  # what errors from this endpoint are prefixed with (a shard's name)
    refused: str | None = None  # why the server refused our CURVE handshake, once it has


@dataclass
class _Pending:
    request: Request
    frames: list[Any]
    future: concurrent.futures.Future | None  # None: a blocking call on the socket owner's thread
    decode: Callable[[Reply], Any]
    deadline: float
    retry_at: float
    conn: _Connection
    sent: bool = False  # handed to ZeroMQ at least once
    sent_at: float = 0.0  # perf_counter when first handed to ZeroMQ


class BankClient(BankHandle):
    """A connection to one ``fgc-bank serve`` endpoint, or to several (the shards of a bank,
    driven by ``fgc_bank.sharded``) from one I/O thread.

    Parameters
    ----------
    address : ``tcp://host:port`` or ``ipc://path``; several, comma-separated, open one socket
        each (calls made through :class:`BankHandle` go to the first).
    timeout : seconds a call may wait for its reply before it fails with BankTimeout.
    retry_interval : seconds without a reply before a request is sent again (reconnections
        resend at once, whatever this is).
    curve_secret, curve_server : key files (from ``fgc-bank keys``) for a CURVE server: this
        client's secret key file and the server's public key file.
    max_in_flight : calls issued and not yet answered before new ones fail with BUSY (bounds
        this process's memory when the server falls behind). At most the server's exactly-once
        window (512 requests per client), so that every resend falls inside it.
    """

    def __init__(self, address: str, timeout: float = DEFAULT_TIMEOUT_S, retry_interval: float = 10.0,
                 curve_secret: str | Path | None = None, curve_server: str | Path | None = None,
                 max_in_flight: int = 512) -> None:
        if timeout <= 0 or retry_interval <= 0:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"timeout and retry_interval must be positive, "
                            f"got {timeout} and {retry_interval}")
        self.address = address
        self.timeout = timeout
        self.retry_interval = retry_interval
        self.client_id = secrets.randbits(63) + 1
        self.reconnects = 0  # connections lost and made again
        self.resends = 0  # requests sent again
        self.round_trips: list[float] = []  # seconds from send to reply of each call of the last direct call_all
        self.max_in_flight = max_in_flight
        self._in_flight = 0
        self._curve = _load_curve(curve_secret, curve_server)
        self._ids = itertools.count(1)
        self._outbox: collections.deque[_Pending] = collections.deque()
        self._lock = threading.Lock()  # guards _outbox, _in_flight, _closed and _wake_tx
        self._io_lock = threading.Lock()  # held by whoever uses the connections' sockets
        self._closed = False
        ctx = zmq.Context.instance()
        wake_addr = f"inproc://fgc-bank-client-{uuid.uuid4().hex}"
        self._wake_rx = ctx.socket(zmq.PAIR)
        self._wake_rx.bind(wake_addr)
        self._wake_tx = ctx.socket(zmq.PAIR)
        self._wake_tx.connect(wake_addr)
        self._conns: list[_Connection] = []
        try:
            for endpoint in address.split(","):
                socket = self._new_socket(endpoint.strip())
                monitor = socket.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                                                    | zmq.EVENT_HANDSHAKE_FAILED_AUTH)
                self._conns.append(_Connection(endpoint.strip(), socket, monitor))
        except zmq.ZMQError as exc:
            self._close_sockets()
            raise BankError(ErrorCode.BAD_ARGUMENT, f"cannot connect to {address!r}: {exc}") from None
        self._idle = zmq.Poller()  # the I/O thread when it does not own the sockets
        self._idle.register(self._wake_rx, zmq.POLLIN)
        self._owning = zmq.Poller()  # the I/O thread when it does
        self._owning.register(self._wake_rx, zmq.POLLIN)
        self._direct = zmq.Poller()  # a blocking call on its own thread
        for conn in self._conns:
            for poller in (self._owning, self._direct):
                poller.register(conn.socket, zmq.POLLIN)
                poller.register(conn.monitor, zmq.POLLIN)
        self._thread = threading.Thread(target=self._run, name=f"fgc-bank-client {address}", daemon=True)
        self._thread.start()

    def label(self, index: int, label: str) -> None:
        """Prefix the errors of endpoint ``index`` with ``label`` (which shard failed a call)."""
        self._conns[index].label = label

    def _submit(self, request: Request, decode: Callable[[Reply], T]) -> concurrent.futures.Future[T]:
        """Queue ``request`` for the I/O thread, to the first endpoint."""
        return self.submit_to(0, request, decode)

    def submit_to(self, index: int, request: Request, decode: Callable[[Reply], T]) -> concurrent.futures.Future[T]:
        """Queue ``request`` for the I/O thread, to endpoint ``index``."""
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            try:
                item = self._admit(request, decode, future, self._conns[index])
            except BankError as exc:
                future.set_exception(exc)
                return future
            self._outbox.append(item)
            self._wake()
        return future

    def _wake(self) -> None:
        """Tell the I/O thread to look again (under ``_lock``). A full wake-up pipe means it has
        unread wake-ups already: it will look, so this one is not needed (and never blocks)."""
        try:
            self._wake_tx.send(b"", NOBLOCK)
        except zmq.Again:
            pass

    def _call(self, request: Request, decode: Callable[[Reply], T]) -> T:
        """A blocking call to the first endpoint."""
        return self.call_all([(0, request, decode)])[0]

    def call_all(self, calls: list[tuple[int, Request, Callable[[Reply], Any]]]) -> list[Any]:
        """Blocking calls, all sent at once, each to its endpoint; their results in order, or the
        first error. On this thread when the sockets are free and nothing waits to be sent
        (nothing issued earlier can then be overtaken), else through the I/O thread."""
        if not self._io_lock.acquire(blocking=False):
            return self._through_io_thread(calls)
        try:
            with self._lock:
                direct = not self._outbox
                if direct:
                    items = self._number_all(calls)
            if direct:
                try:
                    return self._exchange(items)
                finally:
                    for _ in items:
                        self._landed(None)
        finally:
            self._io_lock.release()
        return self._through_io_thread(calls)

    def _through_io_thread(self, calls: list[tuple[int, Request, Callable[[Reply], Any]]]) -> list[Any]:
        futures = [self.submit_to(index, request, decode) for index, request, decode in calls]
        return [future.result() for future in futures]

    def _number_all(self, calls: list[tuple[int, Request, Callable[[Reply], Any]]]) -> list[_Pending]:
        """Direct calls numbered and counted (under ``_lock``); none if one cannot be made."""
        if self._closed:
            raise BankUnavailable(f"client for {self.address} is closed")
        if self._in_flight + len(calls) > self.max_in_flight:
            raise BankError(ErrorCode.BUSY, f"{self._in_flight} calls to {self.address} "
                            "are waiting for replies; collect some before issuing more")
        now = time.monotonic()
        items = []
        for index, request, decode in calls:
            frames = self._number(request)
            items.append(_Pending(request, frames, None, decode, now + self.timeout, now + self.retry_interval,
                                  self._conns[index]))
        return items

    def _number(self, request: Request) -> list[Any]:
        """Number, encode and count a new call (under ``_lock``); BankError if it cannot be made."""
        if self._closed:
            raise BankUnavailable(f"client for {self.address} is closed")
        if self._in_flight >= self.max_in_flight:
            raise BankError(ErrorCode.BUSY, f"{self._in_flight} calls to {self.address} "
                            "are waiting for replies; collect some before issuing more")
        request.id = next(self._ids)
        request.client = self.client_id
        frames = _encoded(request)
        self._in_flight += 1
        return frames

    def _admit(self, request: Request, decode: Callable[[Reply], Any], future: concurrent.futures.Future,
               conn: _Connection) -> _Pending:
        """A new call for the I/O thread (under ``_lock``); BankError if it cannot be made."""
        frames = self._number(request)
        future.add_done_callback(self._landed)
        now = time.monotonic()
        return _Pending(request, frames, future, decode, now + self.timeout, now + self.retry_interval, conn)

    def _exchange(self, items: list[_Pending]) -> list[Any]:
        """Send calls and wait for their replies on this thread, which owns the sockets: the I/O
        thread's resends and timeouts, without its futures (their cost, with the caches a search
        has just emptied, was ~1% of a 10 ms cifar call on a 2-core machine)."""
        pending = {item.request.id: item for item in items}
        results: dict[int, Any] = {}
        trips: dict[int, float] = {}
        for item in items:
            self._send(item)
        while pending:
            now = time.monotonic()
            wait = min(min(min(p.deadline, p.retry_at) for p in pending.values()), now + CLOSED_CHECK_S) - now
            events = dict(self._direct.poll(max(0.0, wait) * 1000 + 1))
            for conn in self._conns:
                if conn.socket in events:  # read only while a call waits: an empty read raises Again
                    while pending and (reply := self._next_reply(conn)) is not None:
                        item = pending.pop(reply.id, None)
                        if item is not None:  # else a late reply to an earlier call: dropped
                            trips[reply.id] = time.perf_counter() - item.sent_at
                            results[reply.id] = _decoded(item, reply)
                if conn.monitor in events:
                    self._connection_event(conn, pending)
                    if conn.refused and any(p.conn is conn for p in pending.values()):
                        raise BankUnavailable(conn.refused)
            if self._closed:
                raise BankUnavailable(f"client for {self.address} was closed before the reply came")
            now = time.monotonic()
            for item in pending.values():
                if now >= item.deadline:
                    raise self._timed_out(item)
            self._retry([p for p in pending.values() if p.retry_at <= now])
        self.round_trips = [trips[item.request.id] for item in items]
        return [results[item.request.id] for item in items]

    def _landed(self, _: concurrent.futures.Future | None) -> None:
        with self._lock:
            self._in_flight -= 1

    def close(self) -> None:
        """Stop the I/O thread; calls still waiting fail with BankUnavailable."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake()
        self._thread.join()

    def _new_socket(self, address: str) -> zmq.Socket:
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # notice a silent, dead peer, not only a closed one
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 10000)
        if self._curve is not None:
            public, secret, server_public = self._curve
            sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public
        try:
            sock.connect(address)
        except zmq.ZMQError:
            sock.close(linger=0)
            raise
        return sock

    def _run(self) -> None:
        """The I/O thread: owns the sockets while any call it sent is unanswered."""
        pending: dict[int, _Pending] = {}
        owner = False
        try:
            while True:
                events = self._turn(self._owning if owner else self._idle, pending, IDLE_WAIT_S)
                if self._wake_rx in events:
                    while self._wake_rx.poll(0):
                        self._wake_rx.recv()
                    if self._closed:
                        break
                    if self._outbox and not owner:  # (one queued later has its own wake-up)
                        self._io_lock.acquire()  # waits out a blocking call on another thread
                        owner = True
                        for conn in self._conns:
                            self._connection_event(conn, {})
                    if owner:
                        self._send_outbox(pending)
                if owner and not pending:
                    self._io_lock.release()
                    owner = False
        finally:
            error = BankUnavailable(f"client for {self.address} was closed before the reply came")
            for item in [*pending.values(), *self._outbox]:
                if not item.future.done():
                    item.future.set_exception(error)
            if not owner:
                self._io_lock.acquire()  # a blocking call sees _closed and lets go
            self._close_sockets()
            self._io_lock.release()

    def _turn(self, poller: zmq.Poller, pending: dict[int, _Pending], longest: float) -> dict[Any, int]:
        """Wait (at most ``longest`` s) for replies, connection events or the next deadline; then
        resolve replies, resend after a reconnection or ``retry_interval``, fail overdue calls."""
        now = time.monotonic()
        wait = min((min(p.deadline, p.retry_at) for p in pending.values()), default=now + longest)
        events = dict(poller.poll(max(0.0, min(wait, now + longest) - now) * 1000 + 1))
        for conn in self._conns:
            if conn.socket in events:
                self._receive(conn, pending)
            if conn.monitor in events:
                self._connection_event(conn, pending)
                if conn.refused:
                    for rid in [rid for rid, p in pending.items() if p.conn is conn]:
                        pending.pop(rid).future.set_exception(BankUnavailable(conn.refused))
        self._expire(pending)
        now = time.monotonic()
        self._retry([p for p in pending.values() if p.retry_at <= now])
        return events

    def _retry(self, due: list[_Pending]) -> None:
        """Send again the calls due for it: one sent and unanswered is resent (and counted), one
        that never left is tried again, quietly."""
        self._resend([p for p in due if p.sent], "no reply yet")
        for item in due:
            if not item.sent:
                self._send(item)

    def _send_outbox(self, pending: dict[int, _Pending]) -> None:
        """Send what callers queued (the I/O thread, owning the sockets)."""
        while True:
            with self._lock:
                if not self._outbox:
                    return
                item = self._outbox.popleft()
            pending[item.request.id] = item
            self._send(item)

    def _receive(self, conn: _Connection, pending: dict[int, _Pending]) -> None:
        """Resolve the calls whose replies have come from ``conn`` (a late reply, to a call that
        timed out, can wait in the socket until the next owner drops it)."""
        while pending and (reply := self._next_reply(conn)) is not None:
            item = pending.pop(reply.id, None)
            if item is None:  # a late reply to a call that already timed out
                continue
            try:
                item.future.set_result(_decoded(item, reply))
            except BankError as exc:
                item.future.set_exception(exc)

    def _next_reply(self, conn: _Connection) -> Reply | None:
        """The next well-formed reply waiting in ``conn``'s socket, or None when there is none."""
        while True:
            try:
                frames = recv_frames(conn.socket, NOBLOCK)
            except zmq.Again:
                return None
            try:
                return decode_reply(frames)
            except BankError as exc:
                logger.warning("dropping a malformed reply from %s: %s", conn.address, exc)

    def _expire(self, pending: dict[int, _Pending]) -> None:
        now = time.monotonic()
        for rid in [rid for rid, p in pending.items() if p.deadline <= now]:
            item = pending.pop(rid)
            item.future.set_exception(self._timed_out(item))

    def _timed_out(self, item: _Pending) -> BankTimeout:
        bank = f" on bank {item.request.bank!r}" if item.request.bank else ""
        return BankTimeout(f"no reply to {item.request.op}{bank} from {item.conn.label or item.conn.address} within {self.timeout:g} s; "
                           "is `fgc-bank serve` running there, and reachable?")

    def _connection_event(self, conn: _Connection, pending: dict[int, _Pending]) -> None:
        """Track ``conn``; when it comes back after a loss, resend what is unanswered on it."""
        while conn.monitor.poll(0):
            event = recv_monitor_message(conn.monitor)["event"]
            if event == zmq.EVENT_DISCONNECTED:
                conn.disconnected = True
                logger.warning("lost the connection to %s; ZeroMQ is reconnecting", conn.address)
            elif event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                conn.refused = None
                if conn.disconnected:
                    conn.disconnected = False
                    self.reconnects += 1
                    self._resend([p for p in pending.values() if p.conn is conn], "reconnected")
            elif event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
                conn.refused = (f"authentication refused by {conn.address}: the server does not accept this "
                                "client's CURVE key (is its public key in the server's --curve-clients "
                                "directory, and is --curve-server the server's public key?)")
                if not conn.disconnected:  # ZeroMQ retries the handshake: say it once
                    logger.warning(conn.refused)
                conn.disconnected = True

    def _resend(self, items: list[_Pending], why: str) -> None:
        """Send requests again with their original ids; the server drops or answers duplicates."""
        if not items:
            return
        logger.info("%s: resending %d request(s) to %s", why, len(items),
                    ", ".join(sorted({item.conn.address for item in items})))
        for item in items:
            self.resends += 1
            self._send(item)

    def _send(self, item: _Pending) -> None:
        """Send without ever blocking this thread: a DEALER with no live peer (a server that is
        down, or a handshake refused) would block a plain send forever. An unsent request stays
        pending and is tried again shortly; its deadline still ends it."""
        try:
            send_frames(item.conn.socket, item.frames, NOBLOCK)
            if not item.sent:
                item.sent_at = time.perf_counter()
            item.sent = True
            item.retry_at = time.monotonic() + self.retry_interval
        except zmq.Again:
            item.retry_at = time.monotonic() + UNSENT_RETRY_S

    def _close_sockets(self) -> None:
        for conn in self._conns:
            conn.socket.disable_monitor()
            conn.monitor.close(linger=0)
            conn.socket.close(linger=0)
        for sock in (self._wake_rx, self._wake_tx):
            sock.close(linger=0)


def _encoded(request: Request) -> list[Any]:
    """``request``'s frames, its arrays copied into ZeroMQ's own messages. ZeroMQ reads a
    zero-copy frame when its I/O thread writes it out: for an async call, a resend, or a call
    that timed out while the server was away (its message still queued), that is after the
    caller may have written over its buffers (a training step's features), and the server would
    get those rows. A copy made here, once, is also cheaper than a zero-copy frame, which pyzmq
    registers with its garbage-collector thread and that thread must later wake to release."""
    header, *buffers = encode_request(request)
    return [header, *(zmq.Frame(buffer, copy=True) for buffer in buffers)]


def _decoded(item: _Pending, reply: Reply) -> Any:
    """What the call returns for ``reply``; its BankError, or BAD_MESSAGE for a reply that lacks
    what its op promises."""
    try:
        return item.decode(reply.unwrap())
    except BankError as exc:
        if item.conn.label is None:
            raise
        raise BankError.from_wire({"code": exc.code.value, "message": f"{item.conn.label}: {exc.message}"}) from None
    except Exception as exc:  # noqa: BLE001 - a reply that lacks what its op promises
        raise BankError(ErrorCode.BAD_MESSAGE, f"malformed {item.request.op} reply: {exc!r}") from None


def _load_curve(secret: str | Path | None, server: str | Path | None) -> tuple[bytes, bytes, bytes] | None:
    """(public, secret, server public) keys from ``fgc-bank keys`` files, or None without CURVE."""
    if secret is None and server is None:
        return None
    if secret is None or server is None:
        raise BankError(ErrorCode.BAD_ARGUMENT, "CURVE needs both curve_secret (this client's secret "
                        "key file) and curve_server (the server's public key file)")
    try:
        public, secret_key = zmq.auth.load_certificate(secret)
        server_public, _ = zmq.auth.load_certificate(server)
    except (OSError, ValueError) as exc:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"cannot read CURVE key files: {exc}") from None
    if secret_key is None:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"{secret} holds no secret key; pass the .key_secret file")
    return public, secret_key, server_public
