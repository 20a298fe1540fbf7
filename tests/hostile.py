"""A structured, seeded fuzzer for the fgc-bank wire protocol, and a harness that runs it against a
real ``fgc-bank serve`` process on loopback.

Every message starts as a valid request of one op in ``protocol.OPS``; then exactly one thing in it
is replaced by a hostile value: a header field (``v``, ``id``, ``client``, ``op``, ``bank``,
``args``, ``arrays``), one argument, one array entry or a part of it (name, dtype, shape, one
dimension), the frames (missing, extra, a byte short or long, an array named twice, nine arrays),
or the array data (float32 edge values, ids at and past the edges, zero rows, a wrong width).
Hostile values are wrong types, huge and negative integers, NaN / inf / -0.0, bools where ints go,
lists and maps nested 1000 deep (written as msgpack bytes by hand: msgpack-python will not pack
them), 60 KB and 100 KB strings, long lists and maps, msgpack extension types, invalid UTF-8. A
share of the messages are plain valid requests, so hostile ones are queued beside real work, and
some are garbage (random bytes, truncated or non-map headers, int keys, duplicate keys).

The cases (op x site x value) are enumerated, shuffled with ``random.Random(seed)`` and cycled:
the same seed always gives the same messages. Each message knows the id its reply must carry (or
that it cannot be known: it is then sent alone) and whether the server must refuse it.

The harness (:func:`run_fuzz`) starts ``fgc-bank serve`` through ``conftest.start_server``, creates
a fuzzed bank ``fz`` (8192 x 8, large enough for k up to 8192) and an ``oracle`` bank of known rows
that no fuzzed message names, sends the messages in windows on a raw DEALER socket, and checks:
one reply per message, a known error code or ok, no ``internal``, error messages of bounded size,
every message that must fail refused; the server alive, ``hello`` answered within 1 s afterwards,
its RSS growth bounded; then ``knn`` on the oracle bank (and on ``fz``, overwritten with known
rows) equal to the numpy float64 oracle. A death or hang is narrowed to one message by replaying
the suspects one at a time on a fresh server.

Full run (20,000 messages; prints a summary; exits 1 if anything failed)::

    cd <repo> && PYTHONPATH=. python -m tests.hostile --messages 20000 --seed 1

By default the full run restarts the server after a death or hang and goes on, skipping further
messages of a signature (site=value) that already killed or froze it; ``--stop-at-first`` stops at
the first one instead (what ``tests/test_hostile.py`` does, on a seeded slice). ``--skip SIG``
(repeatable) leaves out messages of a known signature, e.g. ``--skip 'args.k=5962'``; ``--json FILE``
writes the summary as JSON; ``--list-cases`` prints the cases.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import math
import random
import re
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import zmq

from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.protocol import MAX_HEADER_BYTES, MAX_NAME_CHARS, OPS, PROTOCOL_VERSION

try:  # under pytest, tests/ is on sys.path
    from conftest import TIME_FACTOR, assert_same_knn, brute_force_knn, server_log, start_server
except ModuleNotFoundError:  # python -m tests.hostile
    from tests.conftest import (
        TIME_FACTOR,
        assert_same_knn,
        brute_force_knn,
        server_log,
        start_server,
    )

# -- the banks the harness sets up ---------------------------------------------------------------

FZ_BANK, FZ_ROWS, FZ_DIM = "fz", 8192, 8  # fuzzed; 8192 rows so that k in 5962..8192 is valid
FZ_CONFIG = {"momentum": 0.5, "init": "uniform", "seed": 7}
ORACLE_BANK, ORACLE_ROWS, ORACLE_DIM = "oracle", 2000, 16  # known rows; no fuzzed message names it
SCRATCH_BANKS = tuple(f"s{i}" for i in range(6))  # what fuzzed create / drop requests name
MAX_BANK_GIB = "0.01"  # the fuzzed server's --max-bank-gib: hostile creates cannot take much
ID_BASE = 3 * 10**12  # request ids of fuzzed messages: above every hostile id value but 2**53+1
KNOWN_CODES = frozenset(code.value for code in ErrorCode)
MAX_ERROR_MESSAGE = 4096  # characters; values quoted in error messages must be bounded
RSS_GROWTH_LIMIT_MIB = 200.0


def oracle_rows() -> np.ndarray:
    return np.random.default_rng(11).standard_normal((ORACLE_ROWS, ORACLE_DIM)).astype(np.float32)


def fz_known_rows() -> np.ndarray:
    return np.random.default_rng(12).standard_normal((FZ_ROWS, FZ_DIM)).astype(np.float32)


# -- msgpack by hand -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    """Bytes that are already msgpack: what msgpack-python cannot or will not pack (nesting 1000
    deep, invalid UTF-8, a map with an int key or a key twice)."""

    data: bytes


def _container_header(n: int, fix: int, short: int, long: int) -> bytes:
    if n < 16:
        return bytes([fix | n])
    if n < 2**16:
        return bytes([short]) + struct.pack(">H", n)
    return bytes([long]) + struct.pack(">I", n)


def pack(value: Any) -> bytes:
    """msgpack ``value``; ``Raw`` parts are copied as they are, at any depth."""
    if isinstance(value, Raw):
        return value.data
    if isinstance(value, dict):
        return _container_header(len(value), 0x80, 0xDE, 0xDF) + b"".join(pack(k) + pack(v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return _container_header(len(value), 0x90, 0xDC, 0xDD) + b"".join(pack(v) for v in value)
    return msgpack.packb(value, use_bin_type=True)


_RAW_EXPR: dict[Raw, str] = {}  # how a reproducer writes each Raw value


def deep_list(depth: int) -> Raw:
    """A list nested ``depth`` deep around a 0: ``[[[...[0]...]]]``."""
    raw = Raw(b"\x91" * depth + b"\x00")
    _RAW_EXPR[raw] = f"deep_list({depth})"
    return raw


def deep_map(depth: int) -> Raw:
    """A map nested ``depth`` deep: ``{"k": {"k": ... 0}}``."""
    raw = Raw(b"\x81\xa1k" * depth + b"\x00")
    _RAW_EXPR[raw] = f"deep_map({depth})"
    return raw


def expr(value: Any) -> str:
    """Python source for ``value``, short: long strings, lists and maps are abbreviated."""
    if isinstance(value, Raw):
        return _RAW_EXPR.get(value, f"Raw({value.data[:40]!r})")
    if isinstance(value, str) and len(value) > 40:
        return f"{value[:1]!r} * {len(value)}" if value == value[:1] * len(value) else f"{value[:40]!r}..."
    if isinstance(value, list):
        if len(value) > 16:
            return f"list(range({len(value)}))" if value == list(range(len(value))) else f"[... {len(value)} items]"
        return "[" + ", ".join(expr(v) for v in value) + "]"
    if isinstance(value, dict):
        if len(value) > 16:
            return f"{{... {len(value)} entries}}"
        return "{" + ", ".join(f"{expr(k)}: {expr(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"float({str(value)!r})"
    return repr(value)


# -- hostile values ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Hostile:
    """A named hostile value (the name goes into reports and signatures)."""

    name: str
    value: Any


def _h(*pairs: tuple[str, Any]) -> tuple[Hostile, ...]:
    return tuple(Hostile(n, v) for n, v in pairs)


NAN, INF = float("nan"), float("inf")
GENERIC: tuple[Hostile, ...] = _h(
    ("None", None), ("True", True), ("False", False),
    ("0", 0), ("1", 1), ("-1", -1), ("2**31", 2**31), ("2**32", 2**32), ("2**53+1", 2**53 + 1),
    ("2**63-1", 2**63 - 1), ("2**63", 2**63), ("2**64-1", 2**64 - 1), ("-2**31", -(2**31)), ("-2**63", -(2**63)),
    ("0.0", 0.0), ("-0.0", -0.0), ("0.5", 0.5), ("1.0", 1.0), ("nan", NAN), ("inf", INF), ("-inf", -INF),
    ("2.0**64", 2.0**64), ("1e308", 1e308), ("5e-324", 5e-324),
    ("''", ""), ("'\\x00'", "\x00"), ("'é'", "é"), ("'a'*129", "a" * 129), ("'a'*60000", "a" * 60_000),
    ("'a'*100000", "a" * 100_000), ("b''", b""), ("b'\\xff'*16", b"\xff" * 16), ("bad-utf8", Raw(b"\xa2\xff\xfe")),
    ("[]", []), ("{}", {}), ("[1,2,3]", [1, 2, 3]), ("{'a':1}", {"a": 1}), ("range(10000)", list(range(10_000))),
    ("map-3000", {f"k{i}": i for i in range(3000)}), ("ext42", msgpack.ExtType(42, b"x")),
    ("timestamp", Raw(b"\xd6\xff\x00\x00\x00\x00")), ("int-key-map", Raw(b"\x81\x01\x02")),
    ("deep_list_500", deep_list(500)), ("deep_list_1000", deep_list(1000)), ("deep_map_1000", deep_map(1000)),
    ("deep_list_5000", deep_list(5000)),
)

K_VALUES = _h(*((str(v), v) for v in (0, -1, 1, 2047, 2048, 2049, 5961, 5962, 8191, 8192, 8193, 10**9)))
ARG_VALUES: dict[str, tuple[Hostile, ...]] = {
    "k": K_VALUES,
    "m": _h(*((str(v), v) for v in (0, -1, 1, 8191, 8192, 8193, 65536, 65537, 10**9))),
    "seed": _h(*((str(v), v) for v in (-1, -(2**62), 2**32, 2**63 - 1, 2**63))),
    "rows": _h(*((str(v), v) for v in (0, -1, 1, 2**31 - 1, 2**31, 2**40, 10**6))),
    "dim": _h(*((str(v), v) for v in (0, -1, 1, 65536, 65537, 2**31))),
    "momentum": _h(("0", 0), ("1", 1), ("-0.0", -0.0), ("0.9999999", 0.9999999), ("1.0000001", 1.0000001),
                   ("-1e-300", -1e-300), ("2.0", 2.0)),
    "init": _h(("'UNIT'", "UNIT"), ("'normal'", "normal"), ("'unit\\x00'", "unit\x00"), ("'uniform '", "uniform ")),
    "dtype": _h(("'float64'", "float64"), ("'float16'", "float16"), ("'bfloat16'", "bfloat16"), ("'<f4'", "<f4"),
                ("'float32\\x00'", "float32\x00")),
    "exist_ok": _h(("'yes'", "yes")),
    "mode": _h(("'swap'", "swap"), ("'MOMENTUM'", "MOMENTUM"), ("'overwrite\\x00'", "overwrite\x00"),
               ("'momentum '", "momentum ")),
    "name": _h(("'.'", "."), ("'..'", ".."), ("'/'", "/"), ("'snapshot-'", "snapshot-"),
               ("'snapshot-\\x00'", "snapshot-\x00"), ("'snapshot-'+'9'*300", "snapshot-" + "9" * 300),
               ("'snapshot-../../x'", "snapshot-../../x"), ("'snapshot-99999999'", "snapshot-99999999"),
               ("'../snapshot-1'", "../snapshot-1")),
}
HEADER_VALUES: dict[str, tuple[Hostile, ...]] = {
    "v": _h(("2", 2), ("'1'", "1")),
    # never "drop" or "restore": a fuzzed message must not remove the banks the harness checks
    "op": _h(*((repr(v), v) for v in ("KNN", "knn\x00", " hello", "evil", "__class__", "_handle", "hello",
                                      "stats", "info", "gather", "sample", "knn", "update", "knn_update",
                                      "snapshot", "create"))),
    "bank": _h(("'a'*128", "a" * MAX_NAME_CHARS), ("'fz\\x00'", "fz\x00"), ("'FZ'", "FZ"),
               ("'../../etc/passwd'", "../../etc/passwd"), ("'é'*128", "é" * MAX_NAME_CHARS), ("'missing'", "missing")),
}
DTYPE_VALUES = _h(*((repr(v), v) for v in ("float64", ">f4", "<f4", "f4", "object", "", "float16", "int64",
                                           "int32", "uint64", "bool", "V8", "U4", "float32\x00", "FLOAT32")))
SHAPE_VALUES = _h(("[]", []), ("[0]", [0]), ("[1]", [1]), ("[-1,D]", [-1, FZ_DIM]), ("[2**40,D]", [2**40, FZ_DIM]),
                  ("[2**39,2**39]", [2**39, 2**39]), ("[2**32,2**32]", [2**32, 2**32]), ("[2**39]*4", [2**39] * 4),
                  ("[1]*5", [1] * 5), ("[2**63,1]", [2**63, 1]), ("[2**64-1,2**64-1]", [2**64 - 1, 2**64 - 1]),
                  ("[-2**63]", [-(2**63)]), ("[True,D]", [True, FZ_DIM]), ("[1,True]", [1, True]),
                  ("[True]", [True]), ("[1.0,D]", [1.0, FZ_DIM]), ("[None,D]", [None, FZ_DIM]),
                  ("[deep]", [deep_list(1000)]))
DIM_VALUES = _h(("0", 0), ("-1", -1), ("2**40", 2**40), ("2**40-1", 2**40 - 1), ("2**63", 2**63), ("True", True),
                ("False", False), ("1.0", 1.0), ("None", None), ("'1'", "1"), ("[]", []), ("deep_list_1000", deep_list(1000)))
F32_MAX = float(np.finfo(np.float32).max)
FLOAT_EDGES = _h(("3e38", 3e38), ("-3e38", -3e38), ("f32max", F32_MAX), ("1e-40", 1e-40), ("1e-45", 1e-45),
                 ("1e-24", 1e-24), ("1e-20", 1e-20), ("-0.0", -0.0), ("0.0", 0.0), ("f32tiny", 1.1754944e-38),
                 ("nan", NAN), ("inf", INF), ("-inf", -INF))
ID_EDGES = _h(("-1", -1), ("-2", -2), ("rows", FZ_ROWS), ("rows+1", FZ_ROWS + 1), ("2**63-1", 2**63 - 1),
              ("-2**63", -(2**63)), ("dup", "dup"))


# -- messages ------------------------------------------------------------------------------------


@dataclass
class Message:
    """One fuzzed message, ready to send, and what its reply must look like."""

    index: int
    op: str
    site: str  # where the hostile value went: "header.v", "args.k", "arrays[1].shape", "frames.extra"...
    value: str  # the hostile value's name
    frames: list[bytes]
    expect_id: int | None  # the id its reply must carry; None: not known in advance (sent alone)
    must_fail: bool  # the server must refuse it (an ok reply is a finding)
    header_expr: str | None = None  # Python source of the header (None: garbage, see the frames)

    @property
    def signature(self) -> str:
        """The site (without array positions) and the value: what a death or hang is blamed on."""
        site = re.sub(r"\[\d+\]", "[]", self.site)
        return f"{site}={self.value}"

    @property
    def label(self) -> str:
        return f"#{self.index} {self.op}: {self.site} = {self.value}"

    def reproducer(self, limit: int = 1500) -> str:
        """The frames to send on a DEALER, as Python (``pack``, ``deep_list``... from tests.hostile);
        long frames are cut."""
        parts = []
        for n, frame in enumerate(self.frames):
            if n == 0 and self.header_expr is not None:
                parts.append(f"pack({self.header_expr})")
                continue
            text = repr(frame)
            parts.append(text if len(text) <= limit else f"{text[:limit]}...  # {len(frame)} bytes in all")
        return "frames = [" + ",\n          ".join(parts) + "]"


@dataclass
class Template:
    """A request under construction: header values (hostile ones allowed) and array frames."""

    op: str
    rid: int
    header: dict[str, Any]
    entries: list[list[Any]]  # the header's "arrays": [name, dtype, shape] each
    frames: list[bytes]
    extra_frames: list[bytes] = field(default_factory=list)

    def pack(self) -> list[bytes]:
        return [pack(self.header), *self.frames, *self.extra_frames]

    @property
    def args(self) -> dict[str, Any]:
        return self.header["args"]


@dataclass(frozen=True)
class Case:
    """One mutation of one op's base request: ``kind`` with its parameters and hostile value."""

    op: str
    kind: str
    param: Any = None  # a header field, argument name or array position
    value: Hostile | None = None

    @property
    def site(self) -> str:
        if self.kind in ("header", "header-delete"):
            return f"header.{self.param}" + (" (deleted)" if self.kind == "header-delete" else "")
        if self.kind in ("arg", "arg-delete"):
            return f"args.{self.param}" + (" (deleted)" if self.kind == "arg-delete" else "")
        if self.kind == "shape-dim":
            return f"arrays[{self.param[0]}].shape[{self.param[1]}]"
        if self.kind in ("array-name", "array-dtype", "array-shape", "array-entry"):
            return f"arrays[{self.param}].{self.kind.removeprefix('array-')}"
        if self.param is not None:
            return f"{self.kind}[{self.param}]"
        return self.kind


def _uniq(rnd: random.Random, n: int, high: int) -> list[int]:
    return rnd.sample(range(high), n)


class Fuzzer:
    """Seeded, deterministic hostile messages: every (op, site, value) case, shuffled and cycled."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.rnd = random.Random(seed)
        self.np = np.random.default_rng(seed)
        self._ids = itertools.count(ID_BASE)
        self.cases = self._all_cases()

    # the cases ---------------------------------------------------------------------------------

    def _all_cases(self) -> list[Case]:
        cases: list[Case] = []
        for op, spec in OPS.items():
            cases += [Case(op, "valid")] * 12
            for name in ("v", "id", "client", "op", "bank", "args", "arrays"):
                for value in (*GENERIC, *HEADER_VALUES.get(name, ())):
                    cases.append(Case(op, "header", name, value))
                cases.append(Case(op, "header-delete", name))
            cases.append(Case(op, "header-extra", None, Hostile("deep_list_1000", deep_list(1000))))
            cases.append(Case(op, "header-extra", None, Hostile("'a'*60000", "a" * 60_000)))
            for name in (*spec.args, *spec.optional_args):
                for value in (*GENERIC, *ARG_VALUES.get(name, ())):
                    cases.append(Case(op, "arg", name, value))
                cases.append(Case(op, "arg-delete", name))
            for value in _h(("'zzz'", "zzz"), ("''", ""), ("'k'*1000", "k" * 1000), ("b'k'", b"k")):
                cases.append(Case(op, "arg-extra", None, value))
            arrays = [*spec.arrays, *spec.optional_arrays]
            for i, _ in enumerate(arrays):
                for value in (*GENERIC, *_h(*((repr(n), n) for n in (*spec.arrays, *spec.optional_arrays, "x")))):
                    cases.append(Case(op, "array-name", i, value))
                for value in (*GENERIC, *DTYPE_VALUES):
                    cases.append(Case(op, "array-dtype", i, value))
                for value in (*GENERIC, *SHAPE_VALUES):
                    cases.append(Case(op, "array-shape", i, value))
                for axis in (0, 1):
                    for value in DIM_VALUES:
                        cases.append(Case(op, "shape-dim", (i, axis), value))
                for value in (*GENERIC[:12], Hostile("[name,dtype]", "short"), Hostile("[name,dtype,shape,x]", "long")):
                    cases.append(Case(op, "array-entry", i, value))
                for kind in ("frame-drop", "frame-empty", "frame-short", "frame-long", "array-dup", "entry-drop",
                             "shape-wrap"):
                    cases.append(Case(op, kind, i))
            if arrays:
                for value in FLOAT_EDGES:
                    cases += [Case(op, "float-edge", "all", value), Case(op, "float-edge", "one", value)]
                cases += [Case(op, "zero-rows"), Case(op, "arrays-many")]
                if op != "gather":
                    cases.append(Case(op, "width"))
                for value in ID_EDGES:
                    cases.append(Case(op, "id-edge", None, value))
            else:
                cases.append(Case(op, "array-add"))
            for value in (Hostile("momentum=0.9", 0.9), Hostile("init='unit'", "unit"), Hostile("seed=8", 8)):
                if op == "create":
                    cases.append(Case(op, "exist-ok-conflict", None, value))
            cases.append(Case(op, "frame-extra"))
        for kind in ("random-bytes", "empty-frame", "truncated-header", "header-list", "header-int", "header-str",
                     "header-nil", "header-deep", "header-huge", "int-key", "dup-keys", "garbage-frames"):
            cases += [Case("-", kind)] * 4
        return cases

    def messages(self, count: int) -> Iterator[Message]:
        """``count`` messages: the cases in a seeded order, reshuffled at each pass."""
        index = 0
        while True:
            order = list(self.cases)
            self.rnd.shuffle(order)
            for case in order:
                if index == count:
                    return
                yield self.build(case, index)
                index += 1

    # building one ------------------------------------------------------------------------------

    def base(self, op: str) -> Template:
        """A valid request of ``op`` (on ``fz``, or a scratch bank for create / drop)."""
        rnd, spec = self.rnd, OPS[op]
        rid = next(self._ids)
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "op": op}
        if rnd.random() < 0.3:
            header["client"] = rnd.getrandbits(63) + 1
        args: dict[str, Any] = {}
        arrays: dict[str, np.ndarray] = {}
        b = rnd.choice((1, 2, 4, 16))
        data = np.random.default_rng(rnd.getrandbits(32))
        bank = FZ_BANK
        if op == "create":
            bank = rnd.choice(SCRATCH_BANKS)
            args = {"rows": rnd.choice((1, 16, 100)), "dim": rnd.choice((1, 4, FZ_DIM)), "momentum": 0.5,
                    "init": "unit", "seed": 3, "exist_ok": rnd.random() < 0.5}
        elif op == "drop":
            bank = rnd.choice(SCRATCH_BANKS)
        elif op == "update":
            args = {"mode": rnd.choice(("momentum", "overwrite"))}
            arrays = {"ids": np.array(_uniq(rnd, b, FZ_ROWS), np.int64),
                      "rows": data.standard_normal((b, FZ_DIM)).astype(np.float32)}
        elif op == "knn":
            args = {"k": rnd.choice((1, 10, 100))}
            arrays = {"queries": data.standard_normal((b, FZ_DIM)).astype(np.float32)}
            if rnd.random() < 0.5:
                arrays["exclude"] = np.array([rnd.choice((-1, rnd.randrange(FZ_ROWS))) for _ in range(b)], np.int64)
        elif op == "knn_update":
            args = {"k": rnd.choice((1, 10, 100))}
            arrays = {"ids": np.array(_uniq(rnd, b, FZ_ROWS), np.int64),
                      "features": data.standard_normal((b, FZ_DIM)).astype(np.float32)}
        elif op == "gather":
            arrays = {"ids": np.array([rnd.randrange(FZ_ROWS) for _ in range(b)], np.int64)}
        elif op == "sample":
            args = {"m": rnd.choice((1, 10, 100)), "seed": rnd.randrange(1000)}
        elif op == "restore":
            args = {"name": "snapshot-99999999"}  # never a real one: a restore replaces every bank
        if spec.needs_bank:
            header["bank"] = bank
        header["args"] = args
        entries = [[name, "int64" if a.dtype == np.int64 else "float32", list(a.shape)] for name, a in arrays.items()]
        header["arrays"] = entries
        return Template(op, rid, header, entries, [a.tobytes() for a in arrays.values()])

    def build(self, case: Case, index: int) -> Message:
        if case.op == "-":
            frames = self._garbage(case.kind)
            return Message(index, "-", case.kind, "-", frames, None, True)
        t = self.base(case.op)
        must_fail = self._apply(t, case)
        frames = t.pack()
        value = case.value.name if case.value is not None else "-"
        return Message(index, case.op, case.site, value, frames, _expected_id(frames[0], t.rid), must_fail,
                       expr(t.header))

    def _apply(self, t: Template, case: Case) -> bool:
        """Mutate ``t`` as ``case`` says; return whether the server must refuse the result."""
        spec, kind, param = OPS[t.op], case.kind, case.param
        value = case.value.value if case.value is not None else None
        h = t.header
        if kind == "valid":
            return t.op == "restore"  # the base restore names a snapshot that does not exist
        if kind == "header":
            if param in ("id", "client"):
                h.pop("client", None)  # a reused (client, id) is deduplicated by design: keep them apart
            h[param] = value
            return _header_must_fail(t, param, value)
        if kind == "header-delete":
            h.pop(param, None)
            return {"v": True, "id": True, "client": False, "op": True, "bank": spec.needs_bank,
                    "args": bool(spec.args), "arrays": bool(t.entries)}[param]
        if kind == "header-extra":
            h["zzz"] = value
            return t.op == "restore"
        if kind == "arg":
            t.args[param] = value
            return not _arg_may_pass(t, param, value)
        if kind == "arg-delete":
            t.args.pop(param, None)
            return param in spec.args or t.op == "restore"
        if kind == "arg-extra":
            t.args[value] = 1
            return True
        if kind == "array-add":
            t.entries.append(["queries", "float32", [1, FZ_DIM]])
            t.frames.append(np.zeros((1, FZ_DIM), np.float32).tobytes())
            return True
        if kind == "exist-ok-conflict":  # fz exists with FZ_CONFIG: ask for it with one field changed
            h["bank"] = FZ_BANK
            h["args"] = {"rows": FZ_ROWS, "dim": FZ_DIM, **FZ_CONFIG, "exist_ok": True}
            h["args"][case.value.name.split("=")[0]] = value
            return True
        if kind == "frame-extra":
            t.extra_frames.append(self.rnd.randbytes(self.rnd.randrange(1, 33)))
            return True
        if kind in ("float-edge", "zero-rows", "width", "id-edge", "arrays-many"):
            return self._data(t, kind, param, case.value)
        i = param[0] if kind == "shape-dim" else param
        if i >= len(t.entries):  # an optional array the base left out: add it first
            self._add_optional(t)
            if i >= len(t.entries):
                return t.op == "restore"
        entry, original = t.entries[i], list(t.entries[i][2])
        if kind == "array-name":
            same = isinstance(value, str) and value == entry[0]
            entry[0] = value
            return not same
        if kind == "array-dtype":
            same = isinstance(value, str) and value == entry[1]
            entry[1] = value
            return not same
        if kind == "array-shape":
            entry[2] = value
            return not _same_shape(value, original)
        if kind == "shape-dim":
            axis = param[1]
            if axis >= len(entry[2]):
                entry[2] = [*entry[2], value]  # an extra dimension
                return True
            entry[2][axis] = value
            return not _same_shape(entry[2], original)
        if kind == "array-entry":
            t.entries[i] = entry[:2] if value == "short" else [*entry, 0] if value == "long" else value
            return True
        if kind == "frame-drop":
            del t.frames[i]
        elif kind == "frame-empty":
            t.frames[i] = b""
            return bool(math.prod(original))
        elif kind == "frame-short":
            t.frames[i] = t.frames[i][:-1]
        elif kind == "frame-long":
            t.frames[i] += b"\x00"
        elif kind == "array-dup":
            t.entries.append(list(entry))
            t.frames.append(t.frames[i])
        elif kind == "entry-drop":
            del t.entries[i]
        elif kind == "shape-wrap":  # a product that wraps to 0 in int64 arithmetic, and an empty frame
            entry[2] = [2**32, 2**32] if len(original) == 2 else [2**61]
            t.frames[i] = b""
        return True

    def _add_optional(self, t: Template) -> None:
        for name, (dtype, _) in OPS[t.op].optional_arrays.items():
            if all(e[0] != name for e in t.entries):
                b = t.entries[0][2][0]
                ids = np.array([self.rnd.randrange(FZ_ROWS) for _ in range(b)], np.int64)
                t.entries.append([name, dtype, [b]])
                t.frames.append(ids.tobytes())

    def _data(self, t: Template, kind: str, param: Any, value: Hostile | None) -> bool:
        """Mutations of the array data, with every header entry kept consistent with its frame."""
        arrays = {e[0]: np.frombuffer(f, np.float32 if e[1] == "float32" else np.int64).reshape(e[2]).copy()
                  for e, f in zip(t.entries, t.frames)}
        must_fail = t.op == "restore"
        floats = [n for n, a in arrays.items() if a.dtype == np.float32]
        ints = [n for n, a in arrays.items() if a.dtype == np.int64]
        if kind == "float-edge" and floats:
            a = arrays[floats[0]]
            if param == "all":
                a[...] = value.value
            else:
                a.flat[self.rnd.randrange(a.size)] = value.value
            must_fail = not math.isfinite(value.value)
        elif kind == "zero-rows":
            arrays = {n: a[:0] for n, a in arrays.items()}
        elif kind == "width":
            arrays = {n: (np.zeros((a.shape[0], FZ_DIM + 1), np.float32) if a.ndim == 2 else a) for n, a in arrays.items()}
            must_fail = bool(floats)
        elif kind == "id-edge" and ints:
            name = self.rnd.choice(ints)
            a = arrays[name]
            if value.value == "dup":
                if a.size < 2:
                    arrays = {n: np.concatenate([x, x[:1]]) for n, x in arrays.items()}
                    a = arrays[name]
                a[-1] = a[0]
                must_fail = t.op in ("update", "knn_update") and name == "ids"
            else:
                a[self.rnd.randrange(a.size)] = value.value
                must_fail = not (name == "exclude" and value.value == -1)
        elif kind == "arrays-many":
            name = next(iter(arrays), "ids")
            extra = {f"{name}{i}": arrays.get(name, np.zeros(1, np.int64)) for i in range(9)}
            arrays = {**arrays, **extra}
            must_fail = True
        t.entries[:] = [[n, "float32" if a.dtype == np.float32 else "int64", list(a.shape)] for n, a in arrays.items()]
        t.frames[:] = [a.tobytes() for a in arrays.values()]
        return must_fail

    def _garbage(self, kind: str) -> list[bytes]:
        rnd = self.rnd
        if kind == "random-bytes":
            return [rnd.randbytes(rnd.randrange(1, 65))]
        if kind == "empty-frame":
            return [b""]
        if kind == "truncated-header":
            header = self.base(rnd.choice(list(OPS))).pack()[0]
            return [header[: rnd.randrange(len(header))]]
        if kind == "header-list":
            return [pack([1, 2, 3])]
        if kind == "header-int":
            return [pack(2**64 - 1)]
        if kind == "header-str":
            return [pack("knn")]
        if kind == "header-nil":
            return [pack(None)]
        if kind == "header-deep":
            return [deep_list(1000).data]
        if kind == "header-huge":
            return [pack({"v": 1, "id": 5, "op": "hello", "pad": "x" * (MAX_HEADER_BYTES + 10)})]
        if kind == "int-key":
            return [Raw(b"\x83\xa1v\x01\xa2id\x05\x07\x08").data]  # {"v": 1, "id": 5, 7: 8}
        if kind == "dup-keys":  # {"v": 1, "id": 5, "op": "hello", "op": "evil"}
            return [b"\x84" + pack("v") + pack(1) + pack("id") + pack(5) + pack("op") + pack("hello")
                    + pack("op") + pack("evil")]
        return [rnd.randbytes(rnd.randrange(64)) for _ in range(rnd.randrange(2, 5))]  # garbage-frames


def _expected_id(header: bytes, rid: int) -> int | None:
    """The id a reply to this header must carry, or None where the server cannot read it."""
    if len(header) > MAX_HEADER_BYTES:
        return None
    try:
        decoded = msgpack.unpackb(header, raw=False, strict_map_key=True)
    except Exception:  # noqa: BLE001 - any failure: the id cannot be read
        return None
    if not isinstance(decoded, dict):
        return None
    got = decoded.get("id")
    return rid if type(got) is int and got == rid else None


def _same_shape(shape: Any, original: list[int]) -> bool:
    return isinstance(shape, list) and len(shape) == len(original) and all(
        type(s) in (int, bool) and s == o for s, o in zip(shape, original))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_must_fail(t: Template, name: str, value: Any) -> bool:
    spec = OPS[t.op]
    if t.op == "restore" and name != "op":
        return True
    if name == "v":
        return not (type(value) in (int, float, bool) and value == PROTOCOL_VERSION)
    if name in ("id", "client"):
        return not (isinstance(value, int) and 0 <= value < 2**64)
    if name == "op":
        return not (isinstance(value, str) and value in OPS)
    if name == "bank":  # a valid name may have been created by an earlier fuzzed create
        return spec.needs_bank and not (isinstance(value, str) and 0 < len(value) <= MAX_NAME_CHARS)
    if name == "args":
        allowed = {**spec.args, **spec.optional_args}
        return not (isinstance(value, dict) and all(k in allowed for k in value) and all(k in value for k in spec.args))
    if name == "arrays":
        return not (isinstance(value, list) and value == [] and not t.entries)
    return False


def _arg_may_pass(t: Template, name: str, value: Any) -> bool:
    """Whether argument ``name`` = ``value`` can be valid (False: the server must refuse it)."""
    spec = OPS[t.op]
    if t.op == "restore":
        return False
    kind = {**spec.args, **spec.optional_args}[name]
    if isinstance(value, Raw) or not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        return False
    if name == "k":
        excluding = t.op == "knn_update" or any(e[0] == "exclude" for e in t.entries)
        return 1 <= value <= FZ_ROWS - excluding
    if name == "m":
        return 1 <= value <= FZ_ROWS
    if name == "seed":
        return 0 <= value < (2**63 if t.op == "create" else 2**64)
    if name == "rows":
        return 1 <= value < 2**31 and value * t.args.get("dim", 1) * 4 <= float(MAX_BANK_GIB) * 2**30
    if name == "dim":
        return 1 <= value <= 65536 and value * t.args.get("rows", 1) * 4 <= float(MAX_BANK_GIB) * 2**30
    if name == "momentum":
        return 0.0 <= value < 1.0
    if name == "init":
        return value in ("uniform", "unit")
    if name == "dtype":
        return value == "float32"
    if name == "mode":
        return value in ("momentum", "overwrite")
    return True


# -- the server under test ------------------------------------------------------------------------


class ServerProcess:
    """``fgc-bank serve`` started by ``conftest.start_server`` (its output goes to a log file)."""

    def __init__(self, tmp: Path, *extra: str) -> None:
        self.proc, self.address = start_server(tmp, *extra)

    @property
    def tail(self) -> list[str]:
        """The last lines the server wrote."""
        return server_log(self.proc).splitlines()[-300:]

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def terminate(self, timeout_s: float) -> int | None:
        """SIGTERM; the exit status if it exits within ``timeout_s``, else None (it is then killed)."""
        if not self.alive():
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass

    def errors_logged(self, last: int = 40) -> str:
        return "\n".join(list(self.tail)[-last:])


def dealer(address: str) -> zmq.Socket:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDTIMEO, int(5000 * TIME_FACTOR))
    sock.connect(address)
    return sock


_probe_ids = itertools.count(1)


def probe(address: str, op: str = "hello", bank: str | None = None, timeout_s: float = 1.0) -> float | None:
    """Seconds until ``op`` is answered on a fresh DEALER, or None if not within ``timeout_s``."""
    sock = dealer(address)
    try:
        rid = next(_probe_ids)
        header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "op": op, "args": {}, "arrays": []}
        if bank is not None:
            header["bank"] = bank
        started = time.monotonic()
        try:
            sock.send(pack(header))
        except zmq.Again:
            return None
        deadline = started + timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(left * 1000) + 1):
                break
            reply = msgpack.unpackb(sock.recv_multipart()[0], raw=False)
            if isinstance(reply, dict) and reply.get("id") == rid:
                return time.monotonic() - started
        return None
    finally:
        sock.close(linger=0)


# -- running the fuzzer ---------------------------------------------------------------------------


@dataclass
class Incident:
    """The server died or froze; ``culprit`` is the message that does it alone, on a fresh server."""

    kind: str  # "death", "loop hang" (hello unanswered), "worker hang" (info on fz unanswered)
    window: list[Message]
    unanswered: list[Message]
    culprit: Message | None
    detail: str  # exit status and the exception the server logged, if it did

    def render(self, reproducer: bool = True) -> str:
        if self.culprit is None:
            return (f"{self.kind}, not reproduced by one message alone ({self.detail}); unanswered: "
                    + "; ".join(m.label for m in self.unanswered[:8]))
        text = f"{self.kind} by {self.culprit.label} ({self.detail})"
        if reproducer:
            text += "\n    " + self.culprit.reproducer(300).replace("\n", "\n    ")
        return text


def _exception_of(log: str) -> str:
    """The last exception line of a traceback in ``log``, with the source line that raised it."""
    lines = [line for line in log.splitlines() if line.strip()]
    for i in range(len(lines) - 1, -1, -1):
        if re.match(r"^[A-Za-z_.]+(Error|Exception)\b", lines[i]):
            where = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].lstrip().startswith("File ")), "")
            return f"{lines[i][:200]} at {where}"
    return "no exception logged"


@dataclass
class Summary:
    """What a fuzz run saw. Findings keep their message, so they can be grouped by signature."""

    seed: int
    requested: int
    sent: int = 0
    answered: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    internal: list[tuple[Message | None, str]] = field(default_factory=list)  # (message, error message)
    unknown_codes: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    accepted: list[Message] = field(default_factory=list)  # must fail, answered ok
    long_messages: list[tuple[Message | None, int]] = field(default_factory=list)  # (message, characters)
    stray: int = 0  # replies matching no message
    unanswered: list[Message] = field(default_factory=list)  # with the server still healthy
    incidents: list[Incident] = field(default_factory=list)
    skipped: collections.Counter = field(default_factory=collections.Counter)
    restarts: int = 0
    rss_kib: list[tuple[int, int]] = field(default_factory=list)  # (after warm-up, at the end) per server
    alive_at_end: bool = False
    hello_after_s: float | None = None
    exact_problems: list[str] = field(default_factory=list)
    sigterm_exit: int | None = None
    final_checked: bool = False  # False when the run stopped at a death or hang
    seconds: float = 0.0

    @property
    def rss_growth_mib(self) -> float:
        return max(((after - before) / 1024 for before, after in self.rss_kib), default=0.0)

    def failures(self, reproducers: bool = True) -> list[str]:
        """Every broken guarantee, one line per cause (signature), with how often it was seen;
        empty if the run passed."""
        out = [f"{i.kind.upper()}: {i.render(reproducers)}" for i in self.incidents]
        out += _by_signature("INTERNAL", [(m, f"answered internal: {text[:200]}") for m, text in self.internal])
        out += _by_signature("ACCEPTED", [(m, "answered ok, must be refused") for m in self.accepted])
        out += _by_signature("UNBOUNDED", [(m, f"error message of {n} characters (limit {MAX_ERROR_MESSAGE})")
                                           for m, n in self.long_messages])
        out += _by_signature("UNANSWERED", [(m, "no reply, server healthy") for m in self.unanswered])
        out += [f"UNKNOWN CODE: {c}" for c in self.unknown_codes] + [f"MALFORMED REPLY: {m}" for m in self.malformed]
        if self.stray:
            out.append(f"STRAY: {self.stray} replies matched no message")
        if self.rss_growth_mib > RSS_GROWTH_LIMIT_MIB:
            out.append(f"MEMORY: RSS grew {self.rss_growth_mib:.0f} MiB (limit {RSS_GROWTH_LIMIT_MIB:.0f})")
        if self.final_checked and not self.alive_at_end:
            out.append("DEAD: the server was not alive at the end")
        if self.final_checked and self.alive_at_end and self.hello_after_s is None:
            out.append("SLOW: hello was not answered within 1 s after the run")
        out += [f"NOT EXACT: {p}" for p in self.exact_problems]
        return out

    def render(self) -> str:
        deaths = sum(i.kind == "death" for i in self.incidents)
        hangs = len(self.incidents) - deaths
        growth = ", ".join(f"{b / 1024:.0f} -> {a / 1024:.0f}" for b, a in self.rss_kib) or "not measured"
        if not self.final_checked:
            end = "final checks skipped: the run stopped at its first death or hang"
        else:
            hello = "none within 1 s" if self.hello_after_s is None else f"{self.hello_after_s * 1000:.1f} ms"
            end = (f"at the end: alive {self.alive_at_end}, hello in {hello}, knn equal to numpy "
                   f"{'yes' if not self.exact_problems else 'NO'}, exit status after SIGTERM {self.sigterm_exit}")
        lines = [
            (f"hostile fuzz, seed {self.seed}: {self.sent} messages sent of {self.requested} "
             f"({sum(self.skipped.values())} skipped as known killers), {self.answered} answered, "
             f"{self.seconds:.1f} s"),
            "codes seen: " + ", ".join(f"{c} {n}" for c, n in self.codes.most_common()),
            (f"internal errors: {len(self.internal)}; deaths: {deaths}; hangs: {hangs}; restarts: {self.restarts}; "
             f"unanswered with the server healthy: {len(self.unanswered)}; accepted but must fail: "
             f"{len(self.accepted)}; overlong error messages: {len(self.long_messages)}; stray replies: {self.stray}"),
            f"server RSS (MiB), after warm-up -> at the end: {growth}; growth {self.rss_growth_mib:.1f} MiB",
            end,
        ]
        if self.skipped:
            lines.append("skipped as known killers: " + ", ".join(f"{s} x{n}" for s, n in self.skipped.most_common()))
        failures = self.failures()
        lines.append(f"{len(failures)} failures (by cause)" + (":" if failures else ""))
        lines += [f"- {f}" for f in failures]
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "sent": self.sent, "answered": self.answered, "codes": dict(self.codes),
                "internal": [(m.label if m else None, t) for m, t in self.internal],
                "incidents": [i.render() for i in self.incidents], "accepted": [m.label for m in self.accepted],
                "unanswered": [m.label for m in self.unanswered],
                "long_messages": [(m.label if m else None, n) for m, n in self.long_messages],
                "rss_kib": self.rss_kib, "skipped": dict(self.skipped), "exact_problems": self.exact_problems,
                "failures": self.failures(reproducers=False)}


def _by_signature(kind: str, findings: list[tuple[Message | None, str]]) -> list[str]:
    """One line per signature: what happened, how often, and the first message it happened to."""
    groups: dict[str, list[tuple[Message | None, str]]] = {}
    for message, text in findings:
        groups.setdefault(message.signature if message is not None else "?", []).append((message, text))
    out = []
    for signature, items in groups.items():
        first, text = items[0]
        ops = sorted({m.op for m, _ in items if m is not None})
        out.append(f"{kind}: {signature} x{len(items)} (ops {', '.join(ops)}): {text}; "
                   f"first {first.label if first else '?'}")
    return out


class FuzzRun:
    """Sends fuzzed messages to a real server in windows and checks every reply."""

    def __init__(self, tmp: Path, summary: Summary, window: int = 64, max_incidents: int = 1000) -> None:
        self.tmp = tmp
        self.summary = summary
        self.window = window
        self.max_incidents = max_incidents  # stop after this many deaths or hangs
        self.reply_timeout_s = 10.0 * TIME_FACTOR  # a window's replies
        self.isolate_timeout_s = 3.0 * TIME_FACTOR  # one suspect's reply, replayed alone
        self.rss_before = 0
        self.known_killers: set[str] = set()
        self.server: ServerProcess | None = None
        self.sock: zmq.Socket | None = None
        self._lives = 0

    # the server -------------------------------------------------------------------------------

    def start(self, warm_up: bool = True) -> None:
        self._lives += 1
        tmp = self.tmp / f"server-{self._lives}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.server = ServerProcess(tmp, "--max-bank-gib", MAX_BANK_GIB, "--snapshot-dir", str(tmp / "snapshots"),
                                    "--snapshot-keep", "2")
        setup_banks(self.server.address)
        self.sock = dealer(self.server.address)
        if warm_up:  # valid requests of every op, so lazily built pools count in the "before" RSS
            fuzzer = Fuzzer(12345)
            self._exchange([fuzzer.build(Case(op, "valid"), -1) for op in OPS for _ in range(4)], record=False)
            self.rss_before = self.server.rss_kib()

    def stop(self, timeout_s: float = 5.0) -> int | None:
        status = None
        if self.sock is not None:
            self.sock.close(linger=0)
            self.sock = None
        if self.server is not None:
            status = self.server.terminate(timeout_s)
            self.server = None
        return status

    def _restart(self) -> None:
        self.stop()
        self.summary.restarts += 1
        self.start()

    # sending ----------------------------------------------------------------------------------

    def run(self, messages: Iterable[Message]) -> None:
        queue: collections.deque[Message] = collections.deque()
        source = iter(messages)
        while True:
            while len(queue) < self.window:
                message = next(source, None)
                if message is None:
                    break
                queue.append(message)
            window = []
            while queue and len(window) < self.window:
                message = queue.popleft()
                if message.signature in self.known_killers:
                    self.summary.skipped[message.signature] += 1
                else:
                    window.append(message)
            if not window:
                if not queue:
                    return
                continue
            unanswered, unsent = self._exchange(window)
            queue.extendleft(reversed(unsent))
            if not unanswered:
                continue
            incident = self._diagnose(window, unanswered)
            if incident is None:
                self.summary.unanswered += unanswered
                continue
            self.summary.incidents.append(incident)
            if len(self.summary.incidents) >= self.max_incidents:
                return
            after = [m for m in unanswered if m is not incident.culprit]
            queue.extendleft(reversed(after))
            self._restart()

    def _exchange(self, window: list[Message], record: bool = True,
                  timeout_s: float | None = None) -> tuple[list[Message], list[Message]]:
        """Send ``window``, collect the replies; return (unanswered, not sent)."""
        assert self.sock is not None
        timeout_s = self.reply_timeout_s if timeout_s is None else timeout_s
        outstanding: dict[int, Message] = {}
        sent: list[Message] = []
        for n, message in enumerate(window):
            try:
                self.sock.send_multipart(message.frames)
            except zmq.Again:  # the server stopped reading
                return list(outstanding.values()), window[n:]
            sent.append(message)
            if record:
                self.summary.sent += 1
            if message.expect_id is not None:
                outstanding[message.expect_id] = message
                continue
            # its reply cannot be matched by id: wait for it before sending anything else
            if not self._collect(outstanding, message, time.monotonic() + timeout_s, record):
                return [message, *outstanding.values()], window[n + 1:]
        self._collect(outstanding, None, time.monotonic() + timeout_s, record)
        return list(outstanding.values()), []

    def _collect(self, outstanding: dict[int, Message], anonymous: Message | None, deadline: float,
                 record: bool) -> bool:
        """Take replies until ``anonymous`` is answered (or, if None, all ``outstanding`` are)."""
        assert self.sock is not None
        while anonymous is not None or outstanding:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1):
                return False
            frames = self.sock.recv_multipart()
            header = _reply_header(frames[0])
            rid = header.get("id") if isinstance(header, dict) else None
            if type(rid) is int and rid in outstanding:
                message = outstanding.pop(rid)
            elif anonymous is not None:
                message, anonymous = anonymous, None
            else:
                message = None
            if record:
                self._check_reply(message, header, frames)
        return True

    def _check_reply(self, message: Message | None, header: Any, frames: list[bytes]) -> None:
        s = self.summary
        label = message.label if message is not None else "a reply that matched no message"
        if message is None:
            s.stray += 1
        else:
            s.answered += 1
        if not isinstance(header, dict) or header.get("v") != PROTOCOL_VERSION or not isinstance(header.get("ok"), bool):
            s.malformed.append(f"{label}: {str(header)[:200]}")
            return
        if header["ok"]:
            s.codes["ok"] += 1
            if message is not None and message.must_fail:
                s.accepted.append(message)
            return
        error = header.get("error")
        if not isinstance(error, dict) or not isinstance(error.get("message"), str):
            s.malformed.append(f"{label}: error {str(error)[:200]}")
            return
        code = error.get("code")
        s.codes[str(code)] += 1
        if code not in KNOWN_CODES:
            s.unknown_codes.append(f"{code!r:.100} for {label}")
        if code == ErrorCode.INTERNAL.value:
            s.internal.append((message, error["message"]))
        if len(error["message"]) > MAX_ERROR_MESSAGE:
            s.long_messages.append((message, len(error["message"])))

    # when replies do not come ---------------------------------------------------------------------

    def _health(self) -> str | None:
        """None if the server serves; else "death", "loop hang" or "worker hang"."""
        assert self.server is not None
        if not self.server.alive():
            return "death"
        if probe(self.server.address, "hello", timeout_s=2.0 * TIME_FACTOR) is None:
            try:  # a loop that died may take a moment to end the process (the final snapshot)
                self.server.proc.wait(timeout=5.0 * TIME_FACTOR)
                return "death"
            except subprocess.TimeoutExpired:
                return "loop hang"
        if probe(self.server.address, "info", FZ_BANK, timeout_s=2.0 * TIME_FACTOR) is None:
            return "worker hang"
        return None

    def _diagnose(self, window: list[Message], unanswered: list[Message]) -> Incident | None:
        assert self.server is not None
        kind = self._health()
        if kind is None:
            return None
        detail = f"{len(unanswered)} of a window of {len(window)} unanswered"
        if kind == "death":
            detail += f"; exit status {self.server.proc.returncode}; {_exception_of(self.server.errors_logged(60))}"
        else:
            status = self.stop(timeout_s=5.0 * TIME_FACTOR)
            detail += "; SIGTERM " + ("stopped it" if status is not None else "did not stop it within 5 s (killed)")
        culprit = self._isolate(sorted(unanswered, key=lambda m: m.index))
        if culprit is not None:
            self.known_killers.add(culprit.signature)
        return Incident(kind, window, unanswered, culprit, detail)

    def _isolate(self, suspects: list[Message]) -> Message | None:
        """Replay ``suspects`` one at a time on a fresh server; the first that kills or freezes it."""
        self._restart()  # stops the old server if it is still there
        for message in suspects[:64]:
            unanswered, _ = self._exchange([message], record=False, timeout_s=self.isolate_timeout_s)
            if unanswered and self._health() is not None:
                return message
        return None

    # the end ----------------------------------------------------------------------------------

    def finish(self) -> None:
        """The final checks: alive, hello within 1 s, RSS, exact knn; then SIGTERM."""
        s, server = self.summary, self.server
        assert server is not None
        if len(s.incidents) >= self.max_incidents:  # stopped early: this is the isolation's server
            s.sigterm_exit = self.stop(timeout_s=1.0)
            return
        s.final_checked = True
        s.alive_at_end = server.alive()
        if s.alive_at_end:
            s.rss_kib.append((self.rss_before, server.rss_kib()))
            s.hello_after_s = probe(server.address, "hello", timeout_s=1.0 * TIME_FACTOR)
            if s.hello_after_s is not None:
                s.exact_problems = check_exact(server.address)
        s.sigterm_exit = self.stop(timeout_s=30 * TIME_FACTOR)


def setup_banks(address: str) -> None:
    from fgc_bank import connect

    with connect(address, timeout=30 * TIME_FACTOR) as client:
        client.create(FZ_BANK, FZ_ROWS, FZ_DIM, **FZ_CONFIG)
        client.create(ORACLE_BANK, ORACLE_ROWS, ORACLE_DIM, seed=1)
        client.update(ORACLE_BANK, np.arange(ORACLE_ROWS), oracle_rows(), mode="overwrite")


def check_exact(address: str) -> list[str]:
    """knn on the untouched oracle bank, and on fz once overwritten with known rows, against numpy."""
    from fgc_bank import connect

    problems = []
    queries = np.random.default_rng(5).standard_normal((64, ORACLE_DIM)).astype(np.float32)
    known = oracle_rows()
    try:
        with connect(address, timeout=30 * TIME_FACTOR) as client:
            if not np.array_equal(client.gather(ORACLE_BANK, np.arange(ORACLE_ROWS)), known):
                problems.append("the oracle bank's rows changed, though no fuzzed message names it")
            for exclude in (None, np.arange(64)):
                result = client.knn(ORACLE_BANK, queries, 50, exclude=exclude)
                problems += _compare(result, known, queries, 50, exclude, "oracle bank")
            fz_rows = fz_known_rows()
            client.update(FZ_BANK, np.arange(FZ_ROWS), fz_rows, mode="overwrite")
            fz_queries = np.random.default_rng(6).standard_normal((64, FZ_DIM)).astype(np.float32)
            problems += _compare(client.knn(FZ_BANK, fz_queries, 40), fz_rows, fz_queries, 40, None, "fz bank")
    except BankError as exc:
        problems.append(f"{exc}")
    return problems


def _compare(result: Any, rows: np.ndarray, queries: np.ndarray, k: int, exclude: np.ndarray | None,
             what: str) -> list[str]:
    try:
        assert_same_knn(result.scores, result.ids, *brute_force_knn(rows, queries, k, exclude))
    except AssertionError as exc:
        return [f"knn on the {what} (exclude={exclude is not None}) differs from numpy: {str(exc)[:300]}"]
    return []


def _reply_header(frame: bytes) -> Any:
    try:
        return msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - a garbage reply is a finding, not a crash of the harness
        return f"undecodable reply header ({exc.__class__.__name__})"


def run_fuzz(tmp: Path, messages: int, seed: int, max_incidents: int = 1, window: int = 64,
             skip: Iterable[str] = (), on_progress: Callable[[Summary], None] | None = None) -> Summary:
    """Start a server, fuzz it with ``messages`` messages of ``seed``, run the final checks.

    After a death or hang the server is restarted and the run goes on, up to ``max_incidents``
    (the default 1: stop at the first, skip the final checks). Messages whose signature is in
    ``skip`` are not sent (counted as skipped)."""
    started = time.monotonic()
    summary = Summary(seed=seed, requested=messages)
    run = FuzzRun(tmp, summary, window=window, max_incidents=max_incidents)
    run.known_killers.update(skip)
    try:
        run.start()
        stream = Fuzzer(seed).messages(messages)
        if on_progress is not None:
            stream = _reporting(stream, summary, on_progress)
        run.run(stream)
        run.finish()
    finally:
        run.stop(timeout_s=1.0)
        summary.seconds = time.monotonic() - started
    return summary


def _reporting(stream: Iterator[Message], summary: Summary, report: Callable[[Summary], None]) -> Iterator[Message]:
    for n, message in enumerate(stream):
        if n and n % 2000 == 0:
            report(summary)
        yield message


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.hostile", description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--window", type=int, default=64, help="messages in flight at once")
    parser.add_argument("--stop-at-first", action="store_true", help="stop at the first death or hang")
    parser.add_argument("--skip", action="append", default=[], metavar="SIGNATURE",
                        help="do not send messages of this signature (site=value, as the summary prints them)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    parser.add_argument("--list-cases", action="store_true", help="print the cases and exit")
    args = parser.parse_args(argv)
    if args.list_cases:
        for case in Fuzzer(args.seed).cases:
            print(case.op, case.site, case.value.name if case.value else "-")
        return 0
    with tempfile.TemporaryDirectory(prefix="fgc-hostile-") as tmp:
        summary = run_fuzz(Path(tmp), args.messages, args.seed, max_incidents=1 if args.stop_at_first else 1000,
                           window=args.window, skip=args.skip,
                           on_progress=lambda s: print(f"... {s.sent} sent, {s.answered} answered, "
                                                       f"{len(s.incidents)} incidents, {len(s.internal)} internal",
                                                       file=sys.stderr, flush=True))
    print(summary.render())
    if args.json is not None:
        args.json.write_text(json.dumps(summary.to_json(), indent=2, default=str))
    return 1 if summary.failures() else 0


if __name__ == "__main__":
    sys.exit(main())
