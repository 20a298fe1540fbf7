"""The operations: decoded requests in, replies out, over a set of named MemoryBanks.

The in-process bank calls this directly and the server calls it from its bank workers, so both
answer every request with the same code. No sockets and no threads of its own here.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from fgc_bank import __version__
from fgc_bank.bank import BankConfig, MemoryBank, Op, OpResult, Search, SearchUpdate, Update
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.layout import Layout, SplitBank
from fgc_bank.protocol import MAX_FRAME_BYTES, PROTOCOL_VERSION, Reply, Request
from fgc_bank.shards import Shard
from fgc_bank.stores import Placement

logger = logging.getLogger(__name__)

BATCHABLE_OPS = frozenset({"update", "knn", "knn_update"})


def physical_memory() -> int:
    """Bytes of RAM on this machine (0 where the OS does not say)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def device_memory(device: str) -> int:
    """Bytes of memory on ``device`` (a GPU's own, or the machine's RAM); 0 where unknown."""
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(torch.device(device)).total_memory)
    return physical_memory()


@dataclass(frozen=True)
class Limits:
    """What a client may ask of a service. Checked before any allocation or search."""

    max_batch: int = 65536  # rows or queries per request
    max_bank_bytes: int = 64 * 2**30
    max_banks: int = 64
    max_total_bytes: int = 0  # all banks together; 0: 3/4 of the memory of the banks' device
    max_reply_bytes: int = MAX_FRAME_BYTES  # one reply's arrays, checked before computing them


class BankService:
    """Named banks and the operations on them, placed as ``layout`` says (the CPU by default):
    on one device or split over several, and as shard I of S every bank holds only the ids shard
    I owns (``fgc_bank.shards``); ids on the wire stay the bank's."""

    def __init__(self, limits: Limits = Limits(), layout: Layout | None = None) -> None:
        self.limits = limits
        self.layout = layout or Layout()
        memory = sum(device_memory(d) for d in dict.fromkeys(p.device for p in self.layout.placements))
        self.max_total_bytes = limits.max_total_bytes or int(0.75 * memory) or 2**40
        self.banks: dict[str, MemoryBank | SplitBank] = {}
        self._lock = threading.Lock()  # guards the bank table, not the rows
        self.started = time.time()
        self.extra_stats: Callable[[], dict[str, Any]] = dict

    @property
    def placement(self) -> Placement:
        """Where banks live (the first device's, on a server with several) and what searches them."""
        return self.layout.placement

    @property
    def shard(self) -> Shard:
        return self.layout.shard

    def bank(self, name: str | None) -> MemoryBank | SplitBank:
        """The bank called ``name``, or an UNKNOWN_BANK error that lists the ones there are."""
        bank = self.banks.get(name or "")
        if bank is None:
            known = ", ".join(sorted(self.banks)) or "none"
            raise BankError(ErrorCode.UNKNOWN_BANK, f"no bank named {name!r} (banks: {known}); create it first")
        return bank

    def handle(self, request: Request) -> Reply:
        """Answer one request; every failure becomes an error reply, never an exception."""
        if request.op in BATCHABLE_OPS:
            return self.handle_batch(request.bank, [request])[0]
        try:
            return self._handle(request)
        except BankError as exc:
            return Reply(request.id, error=exc)
        except Exception as exc:  # a bug: log it, answer it, keep serving
            logger.exception("internal error in %s", request.op)
            return Reply(request.id, error=BankError(ErrorCode.INTERNAL, f"{exc.__class__.__name__}: {exc}"))

    def handle_batch(self, bank_name: str | None, requests: Sequence[Request]) -> list[Reply]:
        """Answer a run of update/knn/knn_update requests on one bank with one search call.

        Results are those of applying the requests one at a time, in order (see MemoryBank.execute).
        A request that fails validation gets its error and is left out; the rest still run.
        """
        replies: list[Reply | None] = [None] * len(requests)
        try:
            bank = self.bank(bank_name)
        except BankError as exc:
            return [Reply(r.id, error=exc) for r in requests]
        valid: list[tuple[int, Op]] = []
        for i, request in enumerate(requests):
            try:
                valid.append((i, self._to_op(bank, request)))
            except BankError as exc:
                replies[i] = Reply(request.id, error=exc)
        if valid:
            try:
                results = bank.execute([op for _, op in valid])
            except Exception as exc:
                logger.exception("internal error in a batch of %d on %s", len(valid), bank_name)
                results = [BankError(ErrorCode.INTERNAL, f"{exc.__class__.__name__}: {exc}")] * len(valid)
            for (i, op), result in zip(valid, results):
                replies[i] = self._result_reply(requests[i].id, op, result)
        return replies  # type: ignore[return-value]

    def _check_reply(self, op: str, nbytes: int) -> None:
        """Refuse a request whose reply would be larger than the limit, before computing it."""
        if nbytes > self.limits.max_reply_bytes:
            raise BankError(ErrorCode.TOO_LARGE, f"the reply to this {op} would be {nbytes} bytes; "
                            f"this server sends at most {self.limits.max_reply_bytes}: ask for fewer "
                            "rows or a smaller k")

    def _to_op(self, bank: MemoryBank, request: Request) -> Op:
        a, args = request.arrays, request.args
        rows = next(iter(a.values())).shape[0] if a else 0
        if rows > self.limits.max_batch:
            raise BankError(ErrorCode.TOO_LARGE, f"{rows} rows in one {request.op}; this server takes at most {self.limits.max_batch}")
        if request.op != "update" and isinstance(args.get("k"), int):
            self._check_reply(request.op, rows * max(args["k"], 0) * 12)  # float32 score + int64 id
        if request.op == "update":
            op: Op = Update(a["ids"], a["rows"], args.get("mode", "momentum"))
        elif request.op == "knn":
            op = Search(a["queries"], args["k"], a.get("exclude"))
        else:
            op = SearchUpdate(a["ids"], a["features"], args["k"], args.get("step"))
        bank.validate(op)
        return op

    @staticmethod
    def _result_reply(rid: int, op: Op, result: OpResult | BankError) -> Reply:
        if isinstance(result, BankError):
            return Reply(rid, error=result)
        if result.knn is None:
            return Reply(rid, result={"rows_updated": int(op.ids.shape[0]), "version": result.version})
        return Reply(rid, result={"version": result.version},
                     arrays={"scores": result.knn.scores, "ids": result.knn.ids})

    def _handle(self, request: Request) -> Reply:
        op, args, rid = request.op, request.args, request.id
        if op == "hello":
            return Reply(rid, result={"protocol": PROTOCOL_VERSION, "version": __version__,
                                      "shard": [self.shard.index, self.shard.count],
                                      "banks": {n: b.info() for n, b in list(self.banks.items())}})
        if op == "stats":
            return Reply(rid, result=self.stats())
        if op == "create":
            return Reply(rid, result=self.create(request.bank, args))
        if op in ("snapshot", "restore"):  # a server with --snapshot-dir handles these itself
            raise BankError(ErrorCode.BAD_ARGUMENT, f"{op} needs a server started with --snapshot-dir")
        if op == "snapshots":
            return Reply(rid, result={"directory": None, "snapshots": []})
        if op == "drop":
            with self._lock:
                self.bank(request.bank)
                del self.banks[request.bank]
            logger.info("dropped bank %r", request.bank)
            return Reply(rid, result={"dropped": request.bank})
        bank = self.bank(request.bank)
        if op == "info":
            return Reply(rid, result=bank.info())
        if op == "gather":
            ids = request.arrays["ids"]
            if ids.shape[0] > self.limits.max_batch:
                raise BankError(ErrorCode.TOO_LARGE, f"gather of {ids.shape[0]} rows; at most {self.limits.max_batch}")
            self._check_reply(op, ids.shape[0] * bank.config.dim * 4)
            return Reply(rid, arrays={"rows": bank.gather(ids)})
        if op == "sample":
            if args["m"] > self.limits.max_batch:
                raise BankError(ErrorCode.TOO_LARGE, f"sample of {args['m']} rows; at most {self.limits.max_batch}")
            self._check_reply(op, max(args["m"], 0) * (bank.config.dim * 4 + 8))
            ids, rows = bank.sample(args["m"], args.get("seed", 0))
            return Reply(rid, arrays={"ids": ids, "rows": rows})
        raise BankError(ErrorCode.UNKNOWN_OP, f"op {op!r} is not served here")

    def create(self, name: str | None, args: dict[str, Any]) -> dict[str, Any]:
        """Create bank ``name``; with ``exist_ok`` an existing bank of the same config is fine."""
        config = BankConfig(name=name or "", rows=args["rows"], dim=args["dim"],
                            momentum=float(args.get("momentum", 0.5)), init=args.get("init", "uniform"),
                            seed=args.get("seed", 0), dtype=args.get("dtype", "float32"))
        store = self.placement.store
        self.layout.check(config)
        held = None
        if isinstance(config.rows, int) and config.rows > 0:
            lo, hi = self.layout.held(config.rows)
            held = hi - lo
        config.validate(self.limits.max_bank_bytes, store, held)  # before anything: exist_ok checks arguments too
        with self._lock:
            existing = self.banks.get(config.name)
            if existing is not None:
                if not args.get("exist_ok", False):
                    raise BankError(ErrorCode.BANK_EXISTS, f"bank {config.name!r} exists; drop it first or pass exist_ok")
                _check_same(existing.config, config)
                return existing.info()
            if len(self.banks) >= self.limits.max_banks:
                raise BankError(ErrorCode.TOO_LARGE, f"this server holds at most {self.limits.max_banks} banks")
            used, need = self.held_bytes(), self.layout.nbytes(config)
            if used + need > self.max_total_bytes:
                raise BankError(ErrorCode.TOO_LARGE, f"bank {config.name!r} needs {need / 2**30:.2f} GiB "
                                f"and the server's banks hold {used / 2**30:.2f} GiB of the "
                                f"{self.max_total_bytes / 2**30:.2f} GiB it allows for all banks")
            self.banks[config.name] = bank = self.layout.make(config)
        logger.info("created bank %r: %d x %d, momentum %.3g, init %s", config.name, config.rows,
                    config.dim, config.momentum, config.init)
        return bank.info()

    def held_bytes(self) -> int:
        """Memory all banks take."""
        return sum(b.nbytes() for b in list(self.banks.values()))

    def replace_banks(self, banks: Sequence[MemoryBank | SplitBank], prefix: str = "") -> None:
        """Install banks built elsewhere (a restored snapshot) in place of the current ones whose
        names start with ``prefix`` (all of them for ""); other banks stay as they are."""
        if any(not bank.config.name.startswith(prefix) for bank in banks):
            raise BankError(ErrorCode.BAD_ARGUMENT, f"a restored bank lies outside the prefix {prefix!r}")
        with self._lock:
            kept = {n: b for n, b in self.banks.items() if not n.startswith(prefix)}
            if len(kept) + len(banks) > self.limits.max_banks:
                raise BankError(ErrorCode.TOO_LARGE, f"restoring {len(banks)} banks beside the {len(kept)} "
                                f"others would pass this server's limit of {self.limits.max_banks} banks")
            self.banks = {**kept, **{bank.config.name: bank for bank in banks}}

    def stats(self) -> dict[str, Any]:
        """Banks and their counters, plus whatever the host (the server) adds."""
        return {"uptime_s": time.time() - self.started,
                "banks": {n: b.info() for n, b in list(self.banks.items())}, **self.extra_stats()}


def _check_same(existing: BankConfig, wanted: BankConfig) -> None:
    """Raise BANK_MISMATCH naming every field in which an existing bank differs from a create."""
    old, new = asdict(existing), asdict(wanted)
    differ = [f"{key} {old[key]!r} (asked {new[key]!r})" for key in old if old[key] != new[key]]
    if differ:
        raise BankError(ErrorCode.BANK_MISMATCH, f"bank {existing.name!r} exists with another "
                        f"configuration: {', '.join(differ)}; drop it or create it as it is")
