"""Encode/decode without sockets: round trips, zero-copy, every malformed-message error, the doc."""

from __future__ import annotations

import re
from pathlib import Path

import msgpack
import numpy as np
import pytest

from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.protocol import (
    OPS,
    PROTOCOL_VERSION,
    Reply,
    Request,
    decode_reply,
    decode_request,
    encode_reply,
    encode_request,
)

ROOT = Path(__file__).resolve().parents[1]


def sample_request(op: str) -> Request:
    rng = np.random.default_rng(0)
    spec = OPS[op]
    args = {name: {int: 3, str: "momentum", bool: True}.get(kind, 0.5) if isinstance(kind, type) else 0.5
            for name, kind in spec.args.items()}
    arrays = {}
    for name, (dtype, ndim) in spec.arrays.items():
        shape = (4, 8)[:ndim]
        arrays[name] = (rng.standard_normal(shape) * 10).astype(dtype)
    return Request(op, "bank/1" if spec.needs_bank else None, args, arrays, id=42)


@pytest.mark.parametrize("op", sorted(OPS))
def test_request_round_trip(op: str) -> None:
    request = sample_request(op)
    decoded = decode_request(encode_request(request))
    assert (decoded.op, decoded.bank, decoded.args, decoded.id) == (op, request.bank, request.args, 42)
    assert decoded.arrays.keys() == request.arrays.keys()
    for name, array in request.arrays.items():
        assert decoded.arrays[name].dtype == array.dtype
        np.testing.assert_array_equal(decoded.arrays[name], array)


def test_reply_round_trip_and_errors() -> None:
    ids = np.arange(12, dtype=np.int64).reshape(3, 4)
    reply = decode_reply(encode_reply(Reply(9, {"n": 1}, {"ids": ids})))
    assert reply.id == 9 and reply.result == {"n": 1} and reply.error is None
    np.testing.assert_array_equal(reply.arrays["ids"], ids)
    error = decode_reply(encode_reply(Reply(10, error=BankError(ErrorCode.BAD_K, "k too big")))).error
    assert error is not None and error.code is ErrorCode.BAD_K and error.message == "k too big"


def test_arrays_are_not_copied_either_way() -> None:
    queries = np.ones((256, 64), np.float32)
    frames = encode_request(Request("knn", "b", {"k": 5}, {"queries": queries}))
    assert np.shares_memory(np.frombuffer(frames[1], np.float32), queries)
    decoded = decode_request(frames)
    assert np.shares_memory(decoded.arrays["queries"], queries)


@pytest.mark.parametrize("dtype", ["<f4", "<f2", "<i8"])
def test_arrays_go_out_under_their_wire_dtype_name(dtype: str) -> None:
    frames = encode_reply(Reply(1, arrays={"a": np.zeros((2, 3), dtype)}))
    assert msgpack.unpackb(frames[0])["arrays"] == [["a", np.dtype(dtype).name, [2, 3]]]
    assert decode_reply(frames).arrays["a"].dtype == np.dtype(dtype)


@pytest.mark.parametrize("dtype", [">f4", "<f8", "<i4", "<u8", "?"])
def test_arrays_the_wire_does_not_carry_are_refused_when_encoded(dtype: str) -> None:
    with pytest.raises(BankError) as info:
        encode_request(Request("knn", "b", {"k": 1}, {"queries": np.zeros((2, 3), dtype)}))
    assert info.value.code is ErrorCode.BAD_DTYPE


def header(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "id": 1, "op": "knn", "bank": "b", "args": {"k": 1},
            "arrays": [["queries", "float32", [1, 2]]]}
    base.update(fields)
    return msgpack.packb({k: v for k, v in base.items() if v is not None})


QUERY = np.zeros((1, 2), np.float32).tobytes()


@pytest.mark.parametrize("frames,code", [
    ([], ErrorCode.BAD_MESSAGE),
    ([b"\xc1\xff garbage"], ErrorCode.BAD_MESSAGE),
    ([msgpack.packb([1, 2, 3])], ErrorCode.BAD_MESSAGE),
    ([header()[:-5], QUERY], ErrorCode.BAD_MESSAGE),  # truncated msgpack
    ([header(v=2), QUERY], ErrorCode.VERSION),
    ([header(id=-1), QUERY], ErrorCode.BAD_MESSAGE),
    ([header(op="drop_table"), QUERY], ErrorCode.UNKNOWN_OP),
    ([header(bank=""), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(bank="x" * 500), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(args={"k": "5"}), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(args={"k": True}), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(args={}), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(args={"k": 1, "evil": 1}), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(), QUERY, QUERY], ErrorCode.BAD_MESSAGE),  # more frames than arrays
    ([header()], ErrorCode.BAD_MESSAGE),  # fewer frames than arrays
    ([header(), QUERY[:-1]], ErrorCode.BAD_SHAPE),  # frame shorter than its shape
    ([header(arrays=[["queries", "float64", [1, 2]]]), QUERY], ErrorCode.BAD_DTYPE),
    ([header(arrays=[["queries", "object", [1, 2]]]), QUERY], ErrorCode.BAD_DTYPE),
    ([header(arrays=[["queries", "int64", [1, 1]]]), QUERY], ErrorCode.BAD_DTYPE),
    ([header(arrays=[["queries", "float32", [2]]]), QUERY], ErrorCode.BAD_SHAPE),
    ([header(arrays=[["queries", "float32", [-1, 2]]]), QUERY], ErrorCode.BAD_SHAPE),
    ([header(arrays=[["rows", "float32", [1, 2]]]), QUERY], ErrorCode.BAD_ARGUMENT),
    ([header(arrays=[]),], ErrorCode.BAD_ARGUMENT),  # knn without queries
    ([header(arrays="queries"), QUERY], ErrorCode.BAD_MESSAGE),
    ([msgpack.packb({"v": 1, "id": 1, "op": "hello", "pad": "x" * 70000})], ErrorCode.TOO_LARGE),
])
def test_malformed_requests_get_stable_codes(frames: list, code: ErrorCode) -> None:
    with pytest.raises(BankError) as info:
        decode_request(frames)
    assert info.value.code is code, info.value.message
    assert len(info.value.message) > 10


def test_protocol_doc_lists_every_op() -> None:
    doc = (ROOT / "docs" / "protocol.md").read_text()
    documented = set(re.findall(r"^\| `(\w+)` \|", doc, flags=re.MULTILINE))
    codes = {c.value for c in ErrorCode}
    assert documented - codes == set(OPS), "docs/protocol.md and protocol.OPS disagree"
    assert codes <= documented, f"undocumented error codes: {codes - documented}"
