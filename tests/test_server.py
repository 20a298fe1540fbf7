"""A real `fgc-bank serve` process on loopback: same answers as the in-process bank, and every
kind of bad input answered with its code while the server keeps serving and the bank stays intact."""

from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq
from conftest import (
    TIME_FACTOR,
    assert_same_knn,
    brute_force_knn,
    start_server,
    stop_server,
    unused_port,
)

from fgc_bank import connect
from fgc_bank.errors import BankError, BankTimeout, ErrorCode
from fgc_bank.protocol import PROTOCOL_VERSION, Request, encode_request


def run_script(bank, rng: np.random.Generator) -> list:
    """A fixed sequence of every op; returns everything the bank answered."""
    out = [bank.create("feat/7", 2000, 32, seed=5), bank.create("gate/7", 2000, 32, init="unit", seed=6)]
    for step in range(6):
        ids = rng.choice(2000, 64, replace=False)
        features = rng.standard_normal((64, 32)).astype(np.float32)
        r = bank.knn_update("feat/7", ids, features, 50)
        out += [r.scores, r.ids]
        bank.update("gate/7", ids, features * 2)
        q = bank.knn("gate/7", features[:8], 10, exclude=ids[:8])
        out += [q.scores, q.ids]
    bank.update("feat/7", np.array([1, 2, 3]), np.ones((3, 32), np.float32), mode="overwrite")
    ids, rows = bank.sample("feat/7", 100, seed=9)
    out += [ids, rows, bank.gather("feat/7", np.arange(2000)), bank.gather("gate/7", np.arange(2000))]
    out.append({k: v for k, v in bank.info("feat/7").items()})
    bank.drop("gate/7")
    out.append(sorted(bank.hello()["banks"]))
    return out


def test_server_and_in_process_bank_give_identical_answers(server: str) -> None:
    with connect("local://") as local, connect(server) as remote:
        want = run_script(local, np.random.default_rng(3))
        got = run_script(remote, np.random.default_rng(3))
        remote.drop("feat/7")
    assert len(got) == len(want)
    for g, w in zip(got, want):
        if isinstance(w, np.ndarray):
            assert g.dtype == w.dtype and np.array_equal(g, w)
        else:
            assert g == w


def test_async_calls_overlap_and_stay_in_order(server: str, rng: np.random.Generator) -> None:
    """Many knn_updates in flight at once (coalesced by the server) answer as if run one by one."""
    with connect(server) as remote, connect("local://") as local:
        for bank in (remote, local):
            bank.create("order", 3000, 16, init="unit", seed=1)
        batches = [(rng.choice(3000, 128, replace=False), rng.standard_normal((128, 16)).astype(np.float32))
                   for _ in range(20)]
        futures = [remote.knn_update_async("order", ids, f, 30) for ids, f in batches]
        results = [f.result() for f in futures]
        for (ids, features), got in zip(batches, results):
            want = local.knn_update("order", ids, features, 30)
            assert_same_knn(got.scores, got.ids, want.scores, want.ids)
        np.testing.assert_allclose(remote.gather("order", np.arange(3000)), local.gather("order", np.arange(3000)),
                                   rtol=1e-6, atol=1e-7)
        assert remote.stats()["coalesced_requests"] >= 20
        remote.drop("order")


def test_knn_over_the_wire_matches_brute_force(server: str, rng: np.random.Generator) -> None:
    with connect(server) as bank:
        bank.create("oracle", 5000, 64, init="unit", seed=2)
        rows = bank.gather("oracle", np.arange(5000))
        queries = rng.standard_normal((256, 64)).astype(np.float32)
        exclude = rng.choice(5000, 256, replace=False)
        result = bank.knn("oracle", queries, 200, exclude=exclude)
        assert_same_knn(result.scores, result.ids, *brute_force_knn(rows, queries, 200, exclude))
        bank.drop("oracle")


# -- hostile input: raw frames, each answered with its code, the server still serving -------------

def raw(op: str = "knn", bank: str | None = "target", args: dict | None = None, arrays: dict | None = None) -> list:
    return encode_request(Request(op, bank, {"k": 3} if args is None else args, arrays or {}, id=77))


def hdr(**fields) -> bytes:
    base = {"v": PROTOCOL_VERSION, "id": 77, "op": "knn", "bank": "target", "args": {"k": 3},
            "arrays": [["queries", "float32", [2, 8]]]}
    base.update(fields)
    return msgpack.packb(base)


DEEP = b"\x91" * 1000 + b"\x01"  # msgpack: a list nested 1,000 deep around 1


def deep(field: str) -> bytes:
    """``hdr()`` with ``field``'s value (or, for "entry" and "shape", the array entry or its shape)
    replaced by DEEP; built as bytes, since msgpack will not pack so deep a Python value."""
    entry = {"entry": DEEP, "shape": b"\x93" + msgpack.packb("queries") + msgpack.packb("float32") + DEEP}
    fields = {"v": msgpack.packb(PROTOCOL_VERSION), "id": msgpack.packb(77), "op": msgpack.packb("knn"),
              "bank": msgpack.packb("target"), "args": msgpack.packb({"k": 3}),
              "arrays": b"\x91" + entry.get(field, msgpack.packb(["queries", "float32", [2, 8]]))}
    if field == "client":
        fields["client"] = DEEP
    elif field == "k":
        fields["args"] = b"\x81" + msgpack.packb("k") + DEEP
    elif field in fields:
        fields[field] = DEEP
    return bytes([0x80 | len(fields)]) + b"".join(msgpack.packb(k) + v for k, v in fields.items())


Q = np.ones((2, 8), np.float32)
HOSTILE = {
    "garbage msgpack": ([b"\x93\xc1\xc1 not msgpack at all"], ErrorCode.BAD_MESSAGE),
    "truncated header": ([hdr()[:-7], Q.tobytes()], ErrorCode.BAD_MESSAGE),
    "truncated array frame": ([hdr(), Q.tobytes()[:-3]], ErrorCode.BAD_SHAPE),
    "missing array frame": ([hdr()], ErrorCode.BAD_MESSAGE),
    "wrong protocol version": ([hdr(v=99), Q.tobytes()], ErrorCode.VERSION),
    "unknown op": ([hdr(op="format_disk"), Q.tobytes()], ErrorCode.UNKNOWN_OP),
    "wrong dtype": ([hdr(arrays=[["queries", "float64", [2, 4]]]), Q.tobytes()], ErrorCode.BAD_DTYPE),
    "wrong rank": ([hdr(arrays=[["queries", "float32", [16]]]), Q.tobytes()], ErrorCode.BAD_SHAPE),
    "wrong dim": (raw(arrays={"queries": np.ones((2, 5), np.float32)}), ErrorCode.BAD_SHAPE),
    "k zero": (raw(args={"k": 0}, arrays={"queries": Q}), ErrorCode.BAD_K),
    "k above rows": (raw(args={"k": 101}, arrays={"queries": Q}), ErrorCode.BAD_K),
    "NaN query": (raw(arrays={"queries": np.full((2, 8), np.nan, np.float32)}), ErrorCode.NOT_FINITE),
    "Inf update": (raw("update", args={}, arrays={"ids": np.array([1, 2]), "rows": np.full((2, 8), np.inf, np.float32)}), ErrorCode.NOT_FINITE),
    "id out of range": (raw("update", args={}, arrays={"ids": np.array([1, 100]), "rows": Q}), ErrorCode.ID_OUT_OF_RANGE),
    "negative id": (raw("knn_update", arrays={"ids": np.array([-5, 1]), "features": Q}), ErrorCode.ID_OUT_OF_RANGE),
    "duplicate ids": (raw("update", args={}, arrays={"ids": np.array([4, 4]), "rows": Q}), ErrorCode.DUPLICATE_IDS),
    "ids rows count mismatch": (raw("update", args={}, arrays={"ids": np.array([4]), "rows": Q}), ErrorCode.BAD_SHAPE),
    "unknown bank": (raw(bank="nope", arrays={"queries": Q}), ErrorCode.UNKNOWN_BANK),
    "create existing bank": (raw("create", args={"rows": 100, "dim": 8}), ErrorCode.BANK_EXISTS),
    "create with other shape": (raw("create", args={"rows": 50, "dim": 8, "exist_ok": True}), ErrorCode.BANK_MISMATCH),
    "create huge bank": (raw("create", bank="huge", args={"rows": 2**31 - 1, "dim": 65536}), ErrorCode.TOO_LARGE),
    "oversized frame": (raw(arrays={"queries": np.ones((3 * 2**14, 8), np.float32)}), ErrorCode.TOO_LARGE),
    "batch above limit": (raw(arrays={"queries": np.ones((5000, 8), np.float32)}), ErrorCode.TOO_LARGE),
    "argument of wrong type": (raw(args={"k": "three"}, arrays={"queries": Q}), ErrorCode.BAD_ARGUMENT),
    "version nested 1000 deep": ([deep("v"), Q.tobytes()], ErrorCode.VERSION),
    "id nested 1000 deep": ([deep("id"), Q.tobytes()], ErrorCode.BAD_MESSAGE),
    "client nested 1000 deep": ([deep("client"), Q.tobytes()], ErrorCode.BAD_MESSAGE),
    "op nested 1000 deep": ([deep("op"), Q.tobytes()], ErrorCode.UNKNOWN_OP),
    "bank nested 1000 deep": ([deep("bank"), Q.tobytes()], ErrorCode.BAD_ARGUMENT),
    "k nested 1000 deep": ([deep("k"), Q.tobytes()], ErrorCode.BAD_ARGUMENT),
    "array entry nested 1000 deep": ([deep("entry"), Q.tobytes()], ErrorCode.BAD_MESSAGE),
    "shape nested 1000 deep": ([deep("shape"), Q.tobytes()], ErrorCode.BAD_SHAPE),
    "bool in a shape": ([hdr(op="gather", args={}, arrays=[["ids", "int64", [True]]]), np.zeros(1, np.int64).tobytes()],
                        ErrorCode.BAD_SHAPE),
    "array named twice": ([hdr(arrays=[["queries", "float32", [2, 8]]] * 2), Q.tobytes(), Q.tobytes()],
                          ErrorCode.BAD_MESSAGE),
    "more parts than arrays allowed": ([hdr(), *[Q.tobytes()] * 20], ErrorCode.TOO_LARGE),
    "zero queries": (raw(arrays={"queries": np.ones((0, 8), np.float32)}), ErrorCode.BAD_SHAPE),
    "zero-row knn_update": (raw("knn_update", arrays={"ids": np.ones(0, np.int64), "features": np.ones((0, 8), np.float32)}),
                            ErrorCode.BAD_SHAPE),
    "negative sample seed": (raw("sample", args={"m": 3, "seed": -1}), ErrorCode.BAD_ARGUMENT),
    "create exist_ok with other momentum": (raw("create", args={"rows": 100, "dim": 8, "seed": 11, "momentum": 0.9,
                                                                "exist_ok": True}), ErrorCode.BANK_MISMATCH),
    "create exist_ok with other seed": (raw("create", args={"rows": 100, "dim": 8, "exist_ok": True}),
                                        ErrorCode.BANK_MISMATCH),
    "create exist_ok with a bad init": (raw("create", args={"rows": 100, "dim": 8, "seed": 11, "init": "zeros",
                                                            "exist_ok": True}), ErrorCode.BAD_ARGUMENT),
    "knn reply above the limit": (raw(args={"k": 100}, arrays={"queries": np.ones((4096, 8), np.float32)}),
                                  ErrorCode.TOO_LARGE),
}


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory: pytest.TempPathFactory):
    proc, address = start_server(tmp_path_factory.mktemp("limited"), "--max-frame-mib", "1", "--max-batch", "4096")
    with connect(address) as bank:
        bank.create("target", 100, 8, seed=11)
    yield address
    assert proc.poll() is None, "the server died"
    stop_server(proc)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_bad_input_gets_its_code_and_the_server_keeps_serving(limited_server: str, case: str) -> None:
    frames, code = HOSTILE[case]
    with connect(limited_server) as bank:
        before = bank.gather("target", np.arange(100)).copy()
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(limited_server)
        try:
            sock.send_multipart(frames)
            assert sock.poll(int(10_000 * TIME_FACTOR)), "no reply to a bad request"
            reply = msgpack.unpackb(sock.recv_multipart()[0])
        finally:
            sock.close()
        assert reply["ok"] is False
        assert reply["error"]["code"] == code.value, reply["error"]
        assert len(reply["error"]["message"]) > 15
        assert reply["id"] in (0, 77)
        assert bank.hello()["protocol"] == PROTOCOL_VERSION  # still serving
        assert np.array_equal(bank.gather("target", np.arange(100)), before)  # and nothing changed


def test_far_oversized_frame_is_refused_by_zeromq_and_the_server_keeps_serving(limited_server: str) -> None:
    """Above twice the frame limit ZeroMQ drops the sender's connection before buffering it."""
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(limited_server)
    try:
        sock.send_multipart(raw(arrays={"queries": np.ones((2**17, 8), np.float32)}))
        assert not sock.poll(int(1000 * TIME_FACTOR))
    finally:
        sock.close()
    with connect(limited_server) as bank:
        assert bank.info("target")["rows"] == 100


def test_client_errors_are_typed(server: str) -> None:
    with connect(server) as bank:
        with pytest.raises(BankError) as info:
            bank.knn("no-such-bank", np.ones((1, 4), np.float32), 1)
        assert info.value.code is ErrorCode.UNKNOWN_BANK
        with pytest.raises(BankError) as info:
            bank.update("x", np.array([0.5]), np.ones((1, 4)))
        assert info.value.code is ErrorCode.BAD_DTYPE


def test_unreachable_server_times_out_with_a_clear_error() -> None:
    port = unused_port()
    started = time.monotonic()
    with connect(f"tcp://127.0.0.1:{port}", timeout=0.5) as bank, pytest.raises(BankTimeout) as info:
        bank.hello()
    assert "no reply to hello" in info.value.message and f"{port}" in info.value.message
    assert time.monotonic() - started < 30 * TIME_FACTOR  # it ended; it did not hang
