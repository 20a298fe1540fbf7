"""The wire protocol: message schema, encode/decode, limits. Pure functions; no sockets here.

A message is one ZeroMQ multipart message. Frame 0 is a msgpack header (a map); frames 1.. are the
raw buffers of the arrays the header lists, C-contiguous and little-endian, in the header's order::

    request header: {"v": 1, "id": 7, "op": "knn", "bank": "feat/7",
                     "args": {"k": 200}, "arrays": [["queries", "float32", [256, 64]]]}
    reply header:   {"v": 1, "id": 7, "ok": true, "result": {...}, "arrays": [...]}
                    {"v": 1, "id": 7, "ok": false, "error": {"code": "bad_k", "message": "..."}}

Arrays are decoded with ``np.frombuffer`` straight from the received frames (no copy)
and encoded as buffers of the caller's arrays (no copy when they are already contiguous
little-endian). ``docs/protocol.md`` describes each operation; a test checks it against ``OPS``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from fgc_bank.errors import BankError, ErrorCode, quote

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_FRAME_BYTES = 256 * 1024 * 1024
MAX_ARRAYS = 8
MAX_NAME_CHARS = 128

# Wire dtype names -> explicit little-endian numpy dtypes.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "int64": np.dtype("<i8"),
}
_WIRE_NAMES = {dtype: name for name, dtype in DTYPES.items()}  # a dtype's wire name, by lookup


@dataclass(frozen=True)
class OpSpec:
    """What one operation takes: scalar args (name -> type) and arrays (name -> (dtype, ndim))."""

    needs_bank: bool
    args: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    optional_args: dict[str, type | tuple[type, ...]] = field(default_factory=dict)
    arrays: dict[str, tuple[str, int]] = field(default_factory=dict)
    optional_arrays: dict[str, tuple[str, int]] = field(default_factory=dict)
    mutates: bool = False


_NUM = (int, float)
OPS: dict[str, OpSpec] = {
    "hello": OpSpec(needs_bank=False),
    "stats": OpSpec(needs_bank=False),
    "create": OpSpec(
        needs_bank=True,
        args={"rows": int, "dim": int},
        optional_args={"momentum": _NUM, "init": str, "seed": int, "dtype": str, "exist_ok": bool},
        mutates=True,
    ),
    "drop": OpSpec(needs_bank=True, mutates=True),
    "info": OpSpec(needs_bank=True),
    "update": OpSpec(
        needs_bank=True,
        optional_args={"mode": str},
        arrays={"ids": ("int64", 1), "rows": ("float32", 2)},
        mutates=True,
    ),
    "knn": OpSpec(
        needs_bank=True,
        args={"k": int},
        arrays={"queries": ("float32", 2)},
        optional_arrays={"exclude": ("int64", 1)},
    ),
    "knn_update": OpSpec(
        needs_bank=True,
        args={"k": int},
        optional_args={"step": int},
        arrays={"ids": ("int64", 1), "features": ("float32", 2)},
        mutates=True,
    ),
    "gather": OpSpec(needs_bank=True, arrays={"ids": ("int64", 1)}),
    "sample": OpSpec(needs_bank=True, args={"m": int}, optional_args={"seed": int}),
    "snapshot": OpSpec(needs_bank=False, optional_args={"prefix": str, "retain": str, "group": str}),
    "restore": OpSpec(needs_bank=False, args={"name": str}, optional_args={"prefix": str}),
    "snapshots": OpSpec(needs_bank=False),
}


@dataclass
class Request:
    """An application-level request: what the client asks, before or after the wire."""

    op: str
    bank: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    id: int = 0
    client: int = 0  # a random id per client, stable across reconnects: (client, id) names a request


@dataclass
class Reply:
    """An application-level reply: a result (scalars + arrays) or an error."""

    id: int
    result: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    error: BankError | None = None

    def unwrap(self) -> Reply:
        """Return self, or raise the error it carries."""
        if self.error is not None:
            raise self.error
        return self


def _fail(code: ErrorCode, message: str) -> BankError:
    return BankError(code, message)


def _pack(header: dict[str, Any]) -> bytes:
    return msgpack.packb(header, use_bin_type=True)


def _unpack_header(frame: Any) -> dict[str, Any]:
    buf = memoryview(frame)
    if buf.nbytes > MAX_HEADER_BYTES:
        raise _fail(ErrorCode.TOO_LARGE, f"header is {buf.nbytes} bytes; limit {MAX_HEADER_BYTES}")
    try:
        header = msgpack.unpackb(
            buf, raw=False, strict_map_key=True  # limits default to the (bounded) buffer size
        )
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types for garbage
        raise _fail(ErrorCode.BAD_MESSAGE, f"header is not valid msgpack ({exc.__class__.__name__})")
    if not isinstance(header, dict):
        raise _fail(ErrorCode.BAD_MESSAGE, f"header must be a map, got {type(header).__name__}")
    return header


def _array_buffers(arrays: dict[str, np.ndarray]) -> tuple[list[list[Any]], list[memoryview]]:
    meta, buffers = [], []
    for name, array in arrays.items():
        array = np.asarray(array)
        kind = _WIRE_NAMES.get(array.dtype)
        if kind is None:
            raise _fail(ErrorCode.BAD_DTYPE, f"array {name!r} has dtype {array.dtype}; "
                        f"the wire carries {sorted(DTYPES)}")
        array = np.ascontiguousarray(array, dtype=DTYPES[kind])
        meta.append([name, kind, list(array.shape)])
        buffers.append(memoryview(array).cast("B") if array.size else memoryview(b""))
    return meta, buffers


def _decode_arrays(meta: Any, frames: Sequence[Any], max_frame_bytes: int = MAX_FRAME_BYTES) -> dict[str, np.ndarray]:
    if not isinstance(meta, list) or len(meta) > MAX_ARRAYS:
        raise _fail(ErrorCode.BAD_MESSAGE, f"'arrays' must be a list of at most {MAX_ARRAYS} entries")
    if len(meta) != len(frames):
        raise _fail(ErrorCode.BAD_MESSAGE,
                    f"header lists {len(meta)} arrays but {len(frames)} array frames arrived")
    arrays: dict[str, np.ndarray] = {}
    for entry, frame in zip(meta, frames):
        if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)
                and isinstance(entry[1], str) and isinstance(entry[2], list)):
            raise _fail(ErrorCode.BAD_MESSAGE, f"array entry must be [name, dtype, shape], got {quote(entry)}")
        name, kind, shape = entry
        if name in arrays:  # a second frame of the same name would silently replace the first
            raise _fail(ErrorCode.BAD_MESSAGE, f"array {quote(name)} is listed twice")
        if kind not in DTYPES:
            raise _fail(ErrorCode.BAD_DTYPE, f"array {quote(name)} has dtype {quote(kind)}; expected one of {sorted(DTYPES)}")
        if len(shape) > 4 or not all(type(s) is int and 0 <= s < 2**40 for s in shape):  # not bool
            raise _fail(ErrorCode.BAD_SHAPE, f"array {quote(name)} has an invalid shape {quote(shape)}")
        buf = memoryview(frame)
        expected = math.prod(shape) * DTYPES[kind].itemsize
        if buf.nbytes > max_frame_bytes:
            raise _fail(ErrorCode.TOO_LARGE, f"array {quote(name)} is {buf.nbytes} bytes; limit {max_frame_bytes}")
        if buf.nbytes != expected:
            raise _fail(ErrorCode.BAD_SHAPE, f"array {quote(name)} declares shape {shape} of {kind} "
                        f"({expected} bytes) but its frame has {buf.nbytes} bytes")
        arrays[name] = np.frombuffer(buf, dtype=DTYPES[kind]).reshape(shape)
    return arrays


def encode_request(request: Request) -> list[Any]:
    """Request -> frames (header bytes, then one buffer per array, not copied)."""
    meta, buffers = _array_buffers(request.arrays)
    header = {"v": PROTOCOL_VERSION, "id": request.id, "op": request.op, "args": request.args,
              "arrays": meta}
    if request.client:
        header["client"] = request.client
    if request.bank is not None:
        header["bank"] = request.bank
    return [_pack(header), *buffers]


def peek_request_id(frames: Sequence[Any]) -> int:
    """Best-effort request id of a message that failed to decode (0 when unknown)."""
    try:
        header = msgpack.unpackb(memoryview(frames[0])[:MAX_HEADER_BYTES], raw=False)
        rid = header.get("id", 0) if isinstance(header, dict) else 0
        return rid if isinstance(rid, int) and 0 <= rid < 2**64 else 0
    except Exception:  # noqa: BLE001 - best effort on garbage: any failure means "unknown"
        return 0


def decode_request(frames: Sequence[Any], max_frame_bytes: int = MAX_FRAME_BYTES) -> Request:
    """Frames -> a validated Request. Raises BankError with a stable code for anything malformed.

    Checks the header's shape, version, op, bank name, scalar argument types and array dtypes and
    ranks against ``OPS``; semantic checks (ids in range, dims, finiteness) belong to the bank.
    """
    if not frames:
        raise _fail(ErrorCode.BAD_MESSAGE, "empty message: expected a msgpack header frame")
    header = _unpack_header(frames[0])
    version = header.get("v")
    if version != PROTOCOL_VERSION:
        raise _fail(ErrorCode.VERSION, f"protocol version {quote(version)} is not supported; "
                    f"this server speaks version {PROTOCOL_VERSION}")
    rid = header.get("id")
    if not isinstance(rid, int) or not 0 <= rid < 2**64:
        raise _fail(ErrorCode.BAD_MESSAGE, f"request id must be an unsigned 64-bit int, got {quote(rid)}")
    client = header.get("client", 0)
    if not isinstance(client, int) or not 0 <= client < 2**64:
        raise _fail(ErrorCode.BAD_MESSAGE, f"client id must be an unsigned 64-bit int, got {quote(client)}")
    op, bank, args = header.get("op"), header.get("bank"), header.get("args", {})
    spec = _check_op(op, bank, args)
    arrays = _decode_arrays(header.get("arrays", []), frames[1:], max_frame_bytes)
    _check_arrays(op, spec, arrays)
    return Request(op=op, bank=bank if spec.needs_bank else None, args=args, arrays=arrays, id=rid,
                   client=client)


def check_request(request: Request, max_frame_bytes: int = MAX_FRAME_BYTES) -> Request:
    """The checks :func:`decode_request` makes, on a request that never became frames: the
    in-process bank's request whose arrays are torch tensors (kept where they are, on any
    device). Arrays must be of a wire dtype and no larger than a frame; ``request`` is returned."""
    for name, array in request.arrays.items():
        kind = wire_name(array)
        if kind is None:
            raise _fail(ErrorCode.BAD_DTYPE, f"array {quote(name)} has dtype {array.dtype}; the wire carries {sorted(DTYPES)}")
        nbytes = math.prod(array.shape) * DTYPES[kind].itemsize
        if nbytes > max_frame_bytes:
            raise _fail(ErrorCode.TOO_LARGE, f"array {quote(name)} is {nbytes} bytes; limit {max_frame_bytes}")
    _check_arrays(request.op, _check_op(request.op, request.bank, request.args), request.arrays)
    return request


def _check_op(op: Any, bank: Any, args: Any) -> OpSpec:
    """The op, its bank name and scalar arguments against ``OPS``; the op's spec."""
    spec = OPS.get(op) if isinstance(op, str) else None
    if spec is None:
        raise _fail(ErrorCode.UNKNOWN_OP, f"unknown op {quote(op)}; known ops: {', '.join(sorted(OPS))}")
    if spec.needs_bank and not (isinstance(bank, str) and 0 < len(bank) <= MAX_NAME_CHARS):
        raise _fail(ErrorCode.BAD_ARGUMENT, f"op {op!r} needs a bank name of 1 to {MAX_NAME_CHARS} characters, got {quote(bank)}")
    if not isinstance(args, dict):
        raise _fail(ErrorCode.BAD_MESSAGE, "'args' must be a map")
    _check_args(op, spec, args)
    return spec


def wire_name(array: Any) -> str | None:
    """The wire dtype name of a numpy array or a torch tensor ("float32", ...); None if the wire
    has no such dtype. Torch is never imported here: its dtypes print as ``torch.<name>``."""
    if isinstance(array, np.ndarray):
        return _WIRE_NAMES.get(array.dtype)
    name = str(array.dtype).removeprefix("torch.")
    return name if name in DTYPES else None


def _check_args(op: str, spec: OpSpec, args: dict[str, Any]) -> None:
    allowed = {**spec.args, **spec.optional_args}
    for name in args:
        if name not in allowed:
            raise _fail(ErrorCode.BAD_ARGUMENT, f"op {op!r} takes no argument {quote(name)}; it takes {sorted(allowed) or 'none'}")
    for name, kind in allowed.items():
        if name not in args:
            if name in spec.args:
                raise _fail(ErrorCode.BAD_ARGUMENT, f"op {op!r} needs argument {name!r}")
            continue
        value = args[name]
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if not ok:
            raise _fail(ErrorCode.BAD_ARGUMENT, f"argument {name!r} of op {op!r} must be "
                        f"{getattr(kind, '__name__', kind)}, got {type(value).__name__}")


def _check_arrays(op: str, spec: OpSpec, arrays: dict[str, np.ndarray]) -> None:
    allowed = {**spec.arrays, **spec.optional_arrays}
    for name, array in arrays.items():
        if name not in allowed:
            raise _fail(ErrorCode.BAD_ARGUMENT, f"op {op!r} takes no array {quote(name)}; it takes {sorted(allowed) or 'none'}")
        kind, ndim = allowed[name]
        if wire_name(array) != kind:
            raise _fail(ErrorCode.BAD_DTYPE, f"array {name!r} of op {op!r} must be {kind}, got {array.dtype}")
        if array.ndim != ndim:
            raise _fail(ErrorCode.BAD_SHAPE, f"array {name!r} of op {op!r} must have {ndim} dimensions, got shape {list(array.shape)}")
    for name in spec.arrays:
        if name not in arrays:
            raise _fail(ErrorCode.BAD_ARGUMENT, f"op {op!r} needs array {name!r}")


def encode_reply(reply: Reply) -> list[Any]:
    """Reply -> frames."""
    header: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": reply.id}
    if reply.error is not None:
        header.update(ok=False, error=reply.error.to_wire(), arrays=[])
        return [_pack(header)]
    meta, buffers = _array_buffers(reply.arrays)
    header.update(ok=True, result=reply.result, arrays=meta)
    return [_pack(header), *buffers]


def decode_reply(frames: Sequence[Any]) -> Reply:
    """Frames -> Reply. A malformed reply raises BankError(BAD_MESSAGE)."""
    if not frames:
        raise _fail(ErrorCode.BAD_MESSAGE, "empty reply")
    header = _unpack_header(frames[0])
    rid = header.get("id")
    if header.get("v") != PROTOCOL_VERSION or not isinstance(rid, int):
        raise _fail(ErrorCode.BAD_MESSAGE, f"reply has a bad version or id: {quote(header)}")
    if not header.get("ok"):
        return Reply(id=rid, error=BankError.from_wire(header.get("error")))
    arrays = _decode_arrays(header.get("arrays", []), frames[1:])
    result = header.get("result", {})
    return Reply(id=rid, result=result if isinstance(result, dict) else {}, arrays=arrays)
