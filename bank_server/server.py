"""The socket loop: a ROUTER socket, frames -> decode -> dispatch; replies -> frames -> ROUTER.

One thread, the loop, receives: it decodes headers (arrays stay in the received frames:
``np.frombuffer`` views), answers cheap requests inline and queues the rest for the bank workers,
so it keeps receiving while they search. Replies leave from the thread that made them: a worker
sends its replies on the ROUTER itself, frames by reference, never copied, saving the hand-off
back to the loop (~0.2 ms a request on a 2-core machine).

A ZeroMQ socket is not thread-safe, so every use of the ROUTER holds ``_router_lock`` (a lock is
the full memory barrier ZeroMQ asks for when a socket changes threads). The loop waits on the
socket's file descriptor, not inside ``zmq_poll``, so it holds no lock while it waits. That
descriptor only signals new activity, and a send from a worker can take in the news of a request
before the loop sees it, so after sending a worker checks for waiting requests and, if there are
any, wakes the loop through a pipe.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from bank_server import snapshot as snapshots
from bank_server.dedup import MUTATING_OPS, RecentRequests, Seen, digest
from bank_server.delivery import ZERO_COPY_BYTES, Delivery
from bank_server.dispatch import Dispatcher, Job
from bank_server.metrics import ServerMetrics
from fgc_bank.bank import MemoryBank
from fgc_bank.errors import BankError, ErrorCode, quote
from fgc_bank.frames import NOBLOCK, readable, recv_bounded, send_frames
from fgc_bank.layout import Layout
from fgc_bank.protocol import (
    MAX_ARRAYS,
    MAX_FRAME_BYTES,
    MAX_HEADER_BYTES,
    MAX_NAME_CHARS,
    Reply,
    Request,
    decode_request,
    encode_reply,
    peek_request_id,
)
from fgc_bank.service import BankService, Limits
from fgc_bank.shards import WHOLE, Shard

logger = logging.getLogger(__name__)

INLINE_OPS = frozenset({"hello", "stats"})
ADMIN_OPS = frozenset({"snapshot", "restore", "snapshots"})  # disk work: run on the admin thread
RECEIVE_BATCH = 256  # messages the loop takes in before it lets replies have the ROUTER
GROUP_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")  # a snapshot group, as a sharded client names one
MAX_ADMIN_JOBS = 8  # restore/snapshots requests waiting for the admin thread before 'busy'


@dataclass(frozen=True)
class ServerConfig:
    """How ``fgc-bank serve`` runs. Built by the CLI; the library never sees click."""

    host: str = "127.0.0.1"
    port: int = 0  # 0: pick a free port
    endpoint: str | None = None  # a full ZeroMQ endpoint (ipc://...), overrides host/port
    workers: int = 1
    faiss_threads: int = 0  # 0: FAISS's default, one per core
    coalesce_wait_s: float = 0.002  # a worker's wait for the clients it just answered (dispatch._wait_for)
    max_queue: int = 1024
    max_frame_bytes: int = MAX_FRAME_BYTES
    max_queued_bytes: int = 2**30  # request bytes held for the bank workers, over all workers
    max_unread_bytes: int = 2**30  # reply bytes ZeroMQ may hold for clients that do not read
    limits: Limits = field(default_factory=Limits)
    device: str = "cpu"  # where banks live: cpu, cuda, cuda:N, or auto (the first GPU, else cpu)
    engine: str = "auto"  # what searches them: faiss (the CPU store), torch, or auto
    snapshot_dir: Path | None = None
    snapshot_every: float = 0.0  # seconds; 0: only on request and at shutdown
    snapshot_keep: int = 3  # per prefix (see bank_server.snapshot.prunable)
    skip_unloadable_snapshots: bool = False  # start even if the newest snapshot of a prefix fails to load
    curve_secret: Path | None = None  # the server's secret key file: enables CURVE
    curve_clients: Path | None = None  # directory of authorised clients' public key files
    shard: Shard = WHOLE  # this server's share of every bank's ids

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
        self.service = service or BankService(config.limits, Layout.resolve(config.engine, config.device, config.shard))
        self.metrics = ServerMetrics()
        self.recent = RecentRequests()
        self.delivery = Delivery(config.max_unread_bytes, max(config.max_unread_bytes // 4, 1))
        self._admin_jobs = 0  # snapshot/restore requests accepted and not yet answered
        self._admin_lock = threading.Lock()
        self._ctx = zmq.Context.instance()
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = os.pipe()  # "look at the ROUTER again", from any thread
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._router_lock = threading.Lock()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._auth = None
        try:
            self._configure_router(config)
        except (zmq.ZMQError, OSError, ValueError) as exc:
            self.close()
            raise BankError(ErrorCode.BAD_ARGUMENT, f"cannot bind {config.bind_address}: {exc}") from None
        self.address = self._router.getsockopt_string(zmq.LAST_ENDPOINT)
        if self.service.placement.engine == "faiss":
            from fgc_bank.stores.cpu.search import set_threads

            set_threads(config.faiss_threads)
        self.shutdown_error: str | None = None  # why the final snapshot failed: serve exits non-zero
        try:
            startup = self._restore_latest()
        except BaseException:
            self.close()
            raise
        names = [done.summary.name for done in startup.loaded] if startup is not None else []
        self.restored = ", ".join(names) or None  # the snapshots restored at start, oldest first
        self.service.extra_stats = self._server_stats
        self.dispatcher = Dispatcher(self.service, self._respond, config.workers, config.max_queue,
                                     config.coalesce_wait_s, config.max_queued_bytes)
        self._admin = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="fgc-bank-admin")
        self.snapshotter = None
        if config.snapshot_dir is not None:
            self.snapshotter = snapshots.Snapshotter(config.snapshot_dir, self.dispatcher.barrier, self._capture,
                                                     config.snapshot_every, config.snapshot_keep,
                                                     self.service.layout)
            self.snapshotter.remember(startup)

    def _configure_router(self, config: ServerConfig) -> None:
        router = self._router
        router.setsockopt(zmq.LINGER, 0)
        router.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply to a vanished client is counted, not silently lost
        # Frames up to twice the limit are answered with too_large; larger ones ZeroMQ refuses
        # outright (it drops the connection) so they never reach memory.
        router.setsockopt(zmq.MAXMSGSIZE, 2 * config.max_frame_bytes + MAX_HEADER_BYTES)
        router.setsockopt(zmq.RCVHWM, 4 * config.max_queue)  # past this, TCP pushes back on senders
        # Replies waiting per peer, in messages: above the largest burst one peer can be sent (the
        # loop's answers to a batch it took in, each worker's run of queued requests), so only a
        # peer that stops reading reaches it; then replies are dropped. Its small frames are
        # bounded by this, the rest in bytes (Delivery).
        router.setsockopt(zmq.SNDHWM, RECEIVE_BATCH + config.workers * config.max_queue)
        router.copy_threshold = ZERO_COPY_BYTES
        if config.curve_secret is not None:
            from bank_server.auth import start_curve

            self._auth = start_curve(self._ctx, router, config.curve_secret, config.curve_clients)
        router.bind(config.bind_address)

    def _respond(self, replies: list[tuple[Job, Reply]]) -> None:
        """Send replies, from any thread (a worker, the admin thread)."""
        messages = []
        for job, reply in replies:
            self.metrics.observe(job.request.op, reply.error, time.perf_counter() - job.arrived)
            if job.request.client:
                self.recent.done(job.request.client, job.request.id, job.request.op, reply)
            messages.append([job.peer, *encode_reply(reply)])
        self._route(messages)

    def serve_forever(self) -> None:
        """Run the socket loop in this thread until :meth:`stop` (or SIGINT/SIGTERM)."""
        poller = zmq.Poller()
        poller.register(self._router.getsockopt(zmq.FD), zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        logger.info("serving on %s", self.address)
        try:
            while not self._stopping.is_set():
                # The pipe is read only when it has something: reading an empty one raises, and
                # an exception raised after a search has emptied the caches costs ~20 us.
                if not self._receive() and self._wake_r in dict(poller.poll(100)):
                    self._drain_wake()
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        self.dispatcher.stop()
        self._admin.shutdown(wait=True)
        if self.snapshotter is not None:
            self.snapshotter.stop()
            try:
                self.snapshotter.snapshot()
            except BankError as exc:
                self.shutdown_error = f"the final snapshot failed: {exc.message}"
            except Exception as exc:
                logger.exception("final snapshot failed")
                self.shutdown_error = f"the final snapshot failed: {exc.__class__.__name__}: {exc}"
        elif self.service.banks:
            logger.warning("stopping without --snapshot-dir: the rows of %d bank(s) are thrown away",
                           len(self.service.banks))
        self.close()
        logger.info("stopped")

    def stop(self) -> None:
        """Ask the loop to finish (safe from any thread or a signal handler)."""
        self._stopping.set()

    def install_signal_handlers(self) -> None:
        """Stop cleanly on SIGINT and SIGTERM (main thread only)."""
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda signum, frame: self.stop())

    def _receive(self) -> bool:
        """Take in and handle the requests waiting (at most RECEIVE_BATCH, so replies get the lock too);
        False if there were none."""
        with self._router_lock:
            batch = []
            while len(batch) < RECEIVE_BATCH and readable(self._router):
                batch.append(recv_bounded(self._router, MAX_ARRAYS + 2, self.config.max_queued_bytes))
        for frames, cut in batch:
            self._handle_safely(frames[0], frames[1:], cut)
        return bool(batch)

    def _handle_safely(self, peer: Any, frames: list[Any], cut: bool) -> None:
        """Handle one message; whatever goes wrong becomes an error reply, never the loop's end."""
        try:
            if self.delivery.blocked(peer):  # it reads no replies: the work would be wasted
                self.metrics.dropped_requests += 1
                return
            if cut:
                raise BankError(ErrorCode.TOO_LARGE, f"message has more than {MAX_ARRAYS} arrays or "
                                f"{self.config.max_queued_bytes} bytes")
            self._handle(peer, frames)
        except BankError as exc:
            self._send(peer, Reply(peek_request_id(frames), error=exc), "invalid")
        except Exception as exc:  # a bug: log it, answer it, keep serving
            logger.exception("internal error handling a message")
            self._send(peer, Reply(peek_request_id(frames), error=BankError(
                ErrorCode.INTERNAL, f"{exc.__class__.__name__} while handling the message")), "invalid")

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass

    def _handle(self, peer: Any, frames: list[Any]) -> None:
        """Decode one request and dispatch it; a request refused after decoding is answered
        under its op (metrics count it there) and id."""
        request = decode_request(frames, self.config.max_frame_bytes)
        try:
            self._dispatch(peer, request)
        except BankError as exc:  # busy, stale, reused: answered under the request's own op and id
            self._send(peer, Reply(request.id, error=exc), request.op)

    def _dispatch(self, peer: Any, request: Request) -> None:
        """Answer a decoded request inline, or queue it for the admin thread or a worker."""
        if request.op in INLINE_OPS:
            self._send(peer, self.service.handle(request), request.op)
            return
        if request.op in ADMIN_OPS:
            self._submit_admin(Job(peer, request))
            return
        tracked, sum_ = bool(request.client), 0
        if tracked:
            sum_ = digest(request)
            request, tracked = self._check_copy(peer, request, sum_)
            if request is None:
                return
        job = Job(peer, request)
        if tracked:  # before submit: the worker may finish before this thread runs again
            self.recent.begin(request.client, request.id, sum_, job)
        try:
            self.dispatcher.submit(job)
        except BankError:
            if tracked:
                self.recent.forget(request.client, request.id)
            raise

    def _check_copy(self, peer: Any, request: Request, sum_: int) -> tuple[Request | None, bool]:
        """Whether ``request`` was seen before (dedup): the request to run and whether to track
        it, or (None, False) when it has been answered here."""
        seen, cached = self.recent.check(request.client, request.id, sum_, request.op, peer)
        if seen is Seen.NEW:
            return request, True
        if seen is Seen.QUEUED:
            return None, False  # the first copy is still queued; its reply now goes to this connection
        if seen is Seen.REUSED:
            raise BankError(ErrorCode.ID_REUSED, f"request id {request.id} of client {request.client} "
                            "was used before for another request; ids name one request each")
        mutating = request.op in MUTATING_OPS
        if seen is Seen.STALE and mutating:
            raise BankError(ErrorCode.STALE_REQUEST, f"request id {request.id} of client {request.client} "
                            f"is older than the last {self.recent.window} requests the server remembers "
                            "for this client; it may have been applied, and is not applied again")
        if seen is Seen.FULL and mutating:
            raise BankError(ErrorCode.BUSY, f"the server is tracking {self.recent.max_clients} active "
                            "clients; retry after a short back-off")
        if seen is Seen.DONE and cached is not None:
            self._send(peer, cached, request.op)
            return None, False
        if seen is Seen.DONE and mutating:
            return self._replay(peer, request)
        return request, False  # a read no longer remembered, or from a client not tracked: run it

    def _submit_admin(self, job: Job) -> None:
        """Queue a restore or a listing for the admin thread, at most MAX_ADMIN_JOBS at a time.
        A snapshot request is only handed to the snapshotter, which bounds its own waiting ones."""
        if job.request.op == "snapshot":
            self._run_admin(job)
            return
        with self._admin_lock:
            if self._admin_jobs >= MAX_ADMIN_JOBS:
                raise BankError(ErrorCode.BUSY, f"{MAX_ADMIN_JOBS} snapshot or restore requests are "
                                "waiting; retry when they are done")
            self._admin_jobs += 1
        self._admin.submit(self._admin_turn, job)

    def _admin_turn(self, job: Job) -> None:
        try:
            self._run_admin(job)
        finally:
            with self._admin_lock:
                self._admin_jobs -= 1

    def _replay(self, peer: Any, request: Request) -> tuple[Request | None, bool]:
        """A retry of a request already applied whose reply is no longer cached: answer it
        without applying it again (an update is acknowledged; a knn_update becomes the search
        alone, on the current rows; a create becomes exist_ok)."""
        if request.op == "update":
            result = {"rows_updated": int(request.arrays["ids"].shape[0]), "retry": True}
            self._send(peer, Reply(request.id, result=result), request.op)
            return None, False
        if request.op == "drop":
            self._send(peer, Reply(request.id, result={"dropped": request.bank, "retry": True}), request.op)
            return None, False
        if request.op == "knn_update":
            arrays = {"queries": request.arrays["features"], "exclude": request.arrays["ids"]}
            return Request("knn", request.bank, request.args, arrays, request.id, request.client), False
        args = {**request.args, "exist_ok": True}
        return Request("create", request.bank, args, {}, request.id, request.client), False

    def _run_admin(self, job: Job) -> None:
        """snapshot / restore / snapshots, on the admin thread so the socket loop keeps serving.
        A snapshot request is handed to the snapshotter, which answers it from its own thread
        (with the other requests it shares a write with)."""
        request = job.request
        try:
            if request.op == "snapshots":
                reply = Reply(request.id, result=self._snapshot_listing())
            elif self.snapshotter is None:
                raise BankError(ErrorCode.BAD_ARGUMENT, "this server has no snapshot directory; "
                                "start it with --snapshot-dir DIR")
            elif request.op == "snapshot":
                prefix, retain = _scope(request.args.get("prefix", "")), _retained(request.args.get("retain"))
                self.snapshotter.submit(prefix, retain, lambda outcome: self._respond([(job, _answer(request.id, outcome))]),
                                        _group(request.args.get("group")))
                return
            else:
                prefix = request.args.get("prefix")
                reply = Reply(request.id, result=self._restore(str(request.args["name"]),
                                                                None if prefix is None else _scope(prefix)))
        except BankError as exc:
            reply = Reply(request.id, error=exc)
        except Exception as exc:
            logger.exception("%s failed", request.op)
            reply = Reply(request.id, error=BankError(ErrorCode.INTERNAL, f"{exc.__class__.__name__}: {exc}"))
        self._respond([(job, reply)])

    def _snapshot_listing(self) -> dict[str, Any]:
        if self.snapshotter is None:
            return {"directory": None, "snapshots": []}
        return {"directory": str(self.config.snapshot_dir), "keep": self.config.snapshot_keep,
                "snapshots": self.snapshotter.listing()}

    def _capture(self, prefix: str = "", retain: str | None = None, group: str | None = None) -> snapshots.Capture:
        return snapshots.capture(self.service.banks, self.recent.export(), prefix, retain, self.service.shard, group)

    def _restore_latest(self) -> snapshots.Startup | None:
        """At start: install the newest snapshot of every bank, or refuse to start (BankError
        SNAPSHOT_FAILED, one line) if one could not be loaded, unless told to skip it."""
        directory = self.config.snapshot_dir
        if directory is None:
            return None
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise BankError(ErrorCode.SNAPSHOT_FAILED, f"cannot use --snapshot-dir {directory}: {exc}") from None
        skip = self.config.skip_unloadable_snapshots
        startup = snapshots.load_latest(directory, keep_going=skip, layout=self.service.layout)
        if startup.failed and not skip:
            name, why = next(iter(startup.failed.items()))
            raise BankError(ErrorCode.SNAPSHOT_FAILED, f"cannot restore {name} from {directory} ({why}); fix it "
                            "or move it away, or start with --skip-unloadable-snapshots to serve without it")
        for done in startup.loaded:
            self._install(done.banks, done.summary.prefix, None)
            logger.info("restored %s (prefix %r): %s", done.summary.name, done.summary.prefix,
                        ", ".join(f"{b.config.name} ({b.config.rows} x {b.config.dim})" for b in done.banks) or "no banks")
        if startup.loaded:  # the newest dedup table: it knows the most recent requests
            self.recent.restore(startup.loaded[-1].manifest.get("applied_requests", {}))
        elif not startup.failed:
            logger.info("no snapshot to restore in %s", directory)
        return startup

    def _install(self, banks: list[MemoryBank], prefix: str, table: Any) -> None:
        """Replace the banks under ``prefix`` (every bank for "") by ``banks``; restore the dedup
        table only when given (a restore of every bank), so a scoped restore leaves other runs'
        request records alone."""
        self.service.replace_banks(banks, prefix)
        if table is not None:
            self.recent.restore(table)

    def _restore(self, name: str, prefix: str | None) -> dict[str, Any]:
        """Replace the banks under ``prefix`` (default: the snapshot's own prefix) by those of
        snapshot ``name`` (verified first), with the workers paused; other banks are untouched."""
        loaded = self.snapshotter.load(name)
        scope = loaded.summary.prefix if prefix is None else prefix
        if not snapshots.covers(loaded.summary.prefix, scope):
            raise BankError(ErrorCode.BAD_ARGUMENT, f"snapshot {name} holds only the banks under "
                            f"{loaded.summary.prefix!r}; it cannot restore those under {scope!r}")
        banks = [b for b in loaded.banks if b.config.name.startswith(scope)]
        table = loaded.manifest.get("applied_requests", {}) if scope == "" else None
        self.dispatcher.barrier(lambda: self._install(banks, scope, table))
        logger.info("restored %s (prefix %r) on request", name, scope)
        return {"name": name, "prefix": scope, "banks": {b.config.name: b.info() for b in banks}}

    def _send(self, peer: Any, reply: Reply, op: str) -> None:
        self.metrics.observe(op, reply.error, 0.0)
        self._route([[peer, *encode_reply(reply)]])

    def _route(self, messages: list[list[Any]]) -> None:
        """Send ``messages`` on the ROUTER from any thread, under its lock, never waiting: a reply
        to a client that is gone, or that holds its budget of unread replies, is dropped and
        counted (the client's resend is answered from the reply cache)."""
        admitted = [self.delivery.admit(frames[0], frames) for frames in messages]
        with self._router_lock:
            for frames in admitted:
                if frames is None:
                    self.metrics.dropped_replies += 1
                    continue
                try:
                    send_frames(self._router, frames, NOBLOCK)
                except zmq.ZMQError as exc:  # EHOSTUNREACH: gone; EAGAIN: its pipe is full
                    self.metrics.dropped_replies += 1
                    logger.debug("reply dropped: %s", exc)
            waiting = readable(self._router)
        if waiting:  # the send may have taken in the only sign of it the loop would see
            try:
                os.write(self._wake_w, b"x")
            except BlockingIOError:  # the pipe is full: the loop is already due to wake
                pass

    def _server_stats(self) -> dict[str, Any]:
        return {"address": self.address, "queue_depth": self.dispatcher.queue_depth(),
                "batches": self.dispatcher.batches, "coalesced_requests": self.dispatcher.coalesced,
                "coalesce_wait_s": self.dispatcher.waited_s,
                "copies_seen": self.recent.copies_seen, "restored_from": self.restored,
                "held_bytes": {"banks": self.service.held_bytes(), "queued_requests": self.dispatcher.queued_bytes,
                               "unread_replies": self.delivery.held(), "dedup_table": self.recent.held_bytes()},
                **(self.snapshotter.stats() if self.snapshotter is not None else {"snapshot": None}),
                **self.metrics.summary()}

    def close(self) -> None:
        """Close the sockets (the loop calls this when it ends)."""
        with self._router_lock:
            if self._router.closed:
                return
            self._router.close(linger=0)
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        if self._auth is not None:
            self._auth.stop()


def _scope(prefix: Any) -> str:
    """A snapshot or restore ``prefix`` argument, checked (bank names are at most MAX_NAME_CHARS)."""
    if not isinstance(prefix, str) or len(prefix) > MAX_NAME_CHARS:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"prefix must be a string of at most {MAX_NAME_CHARS} characters")
    return prefix


def _retained(retain: Any) -> str | None:
    """A snapshot's ``retain`` argument: "" or the name of a snapshot (None: not a paired snapshot)."""
    if retain is None or retain == "" or (isinstance(retain, str) and snapshots.NAME_RE.fullmatch(retain)):
        return retain
    raise BankError(ErrorCode.BAD_ARGUMENT, f"retain must be '' or a snapshot name such as snapshot-00000001, "
                    f"got {str(retain)[:80]!r}")


def _group(group: Any) -> str | None:
    """A snapshot's ``group`` argument (the same on every shard of a snapshot of them all)."""
    if group is None or (isinstance(group, str) and GROUP_RE.fullmatch(group)):
        return group
    raise BankError(ErrorCode.BAD_ARGUMENT, f"group must be 1 to 64 letters, digits, '-' or '_', got {quote(group)}")


def _answer(rid: int, outcome: snapshots.Outcome) -> Reply:
    return Reply(rid, error=outcome) if isinstance(outcome, BankError) else Reply(rid, result=outcome)
