"""The socket loop: a ROUTER socket, frames -> decode -> dispatch; replies -> frames -> ROUTER.

One thread owns the ROUTER socket and does nothing slow: it decodes headers (arrays stay in the
received frames: ``np.frombuffer`` views), answers cheap requests inline and queues the rest for
the bank workers. Workers hand replies back over an inproc PUSH/PULL pair, since a ZeroMQ socket
belongs to one thread; the frames travel by reference, never copied.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from dataclasses import dataclass
from typing import Any

import zmq

from bank_server.dispatch import Dispatcher, Job
from bank_server.metrics import ServerMetrics
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.protocol import MAX_FRAME_BYTES, MAX_HEADER_BYTES, Reply, decode_request, encode_reply, peek_request_id
from fgc_bank.search import set_threads
from fgc_bank.service import BankService, Limits

logger = logging.getLogger(__name__)

INLINE_OPS = frozenset({"hello", "stats"})


@dataclass(frozen=True)
class ServerConfig:
    """How ``fgc-bank serve`` runs. Built by the CLI; the library never sees click."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    endpoint: str | None = None  # a full ZeroMQ endpoint (ipc://...), overrides host/port
    workers: int = 1
    faiss_threads: int = 0  # 0: FAISS's default, one per core
    max_queue: int = 1024
    max_frame_bytes: int = MAX_FRAME_BYTES
    limits: Limits = Limits()

    @property
    def bind_address(self) -> str:
        if self.endpoint:
            return self.endpoint
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port or '*'}"


class BankServer:
    """Serve a :class:`BankService` on one ROUTER endpoint until :meth:`stop`."""

    def __init__(self, config: ServerConfig, service: BankService | None = None) -> None:
        self.config = config
        self.service = service or BankService(config.limits)
        self.metrics = ServerMetrics()
        self._ctx = zmq.Context.instance()
        self._stopping = threading.Event()
        self._replies_addr = f"inproc://fgc-bank-replies-{id(self)}"
        self._replies = self._ctx.socket(zmq.PULL)
        self._replies.bind(self._replies_addr)
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client is counted, not silently lost
        # Frames up to twice the limit are answered with too_large; larger ones ZeroMQ refuses
        # outright (it drops the connection) so they never reach memory.
        self._router.setsockopt(zmq.MAXMSGSIZE, 2 * config.max_frame_bytes + MAX_HEADER_BYTES)
        self._router.setsockopt(zmq.RCVHWM, 0)  # the dispatcher's bounded queues do the backpressure
        try:
            self._router.bind(config.bind_address)
        except zmq.ZMQError as exc:
            self.close()
            raise BankError(ErrorCode.BAD_ARGUMENT, f"cannot bind {config.bind_address}: {exc}") from None
        self.address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        set_threads(config.faiss_threads)
        self.service.extra_stats = self._server_stats
        self.dispatcher = Dispatcher(self.service, self._responder, config.workers, config.max_queue)

    def _responder(self):
        """A reply sender for one worker thread: its own PUSH socket into the socket thread."""
        push = self._ctx.socket(zmq.PUSH)
        push.connect(self._replies_addr)

        def respond(replies: list[tuple[Job, Reply]]) -> None:
            for job, reply in replies:
                self.metrics.observe(job.request.op, reply.error, time.perf_counter() - job.arrived)
                push.send_multipart([job.peer, *encode_reply(reply)], copy=False)

        return respond

    def serve_forever(self) -> None:
        """Run the socket loop in this thread until :meth:`stop` (or SIGINT/SIGTERM via install_signal_handlers)."""
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._replies, zmq.POLLIN)
        logger.info("serving on %s", self.address)
        try:
            while not self._stopping.is_set():
                events = dict(poller.poll(100))
                if self._replies in events:
                    self._forward_replies()
                if self._router in events:
                    self._receive()
        finally:
            self.dispatcher.stop()
            self._forward_replies()
            self.close()
            logger.info("stopped")

    def stop(self) -> None:
        """Ask the loop to finish (safe from any thread or a signal handler)."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGINT and SIGTERM (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.stop())

    def _receive(self) -> None:
        for _ in range(256):  # bounded so replies keep flowing under a flood
            try:
                frames = self._router.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._handle(frames[0], frames[1:])

    def _handle(self, peer: Any, frames: list[Any]) -> None:
        buffers = [f.buffer for f in frames]
        try:
            request = decode_request(buffers, self.config.max_frame_bytes)
        except BankError as exc:
            self._send(peer, Reply(peek_request_id(buffers), error=exc), "invalid")
            return
        if request.op in INLINE_OPS:
            self._send(peer, self.service.handle(request), request.op)
            return
        try:
            self.dispatcher.submit(Job(peer, request))
        except BankError as exc:
            self._send(peer, Reply(request.id, error=exc), request.op)

    def _send(self, peer: Any, reply: Reply, op: str) -> None:
        self.metrics.observe(op, reply.error, 0.0)
        self._route([peer, *encode_reply(reply)])

    def _forward_replies(self) -> None:
        while True:
            try:
                frames = self._replies.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            self._route(frames)

    def _route(self, frames: list[Any]) -> None:
        try:
            self._router.send_multipart(frames, copy=False)
        except zmq.ZMQError as exc:  # EHOSTUNREACH: the client is gone
            self.metrics.dropped_replies += 1
            logger.warning("reply dropped: %s", exc)

    def _server_stats(self) -> dict[str, Any]:
        return {"address": self.address, "queue_depth": self.dispatcher.queue_depth(),
                "batches": self.dispatcher.batches, "coalesced_requests": self.dispatcher.coalesced,
                **self.metrics.summary()}

    def close(self) -> None:
        """Close the sockets (the loop calls this when it ends)."""
        for sock in (self._router, self._replies):
            sock.close(linger=0)
