"""10,000+ malformed or random messages against a running server: every one gets a well-formed
answer, the server's memory stays bounded, and it then still answers a knn exactly like numpy."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import msgpack
import numpy as np
import zmq
from conftest import TIME_FACTOR, assert_same_knn, brute_force_knn, start_server, stop_server

from fgc_bank import connect
from fgc_bank.errors import ErrorCode
from fgc_bank.protocol import OPS, PROTOCOL_VERSION

MESSAGES = 12_000
ROWS, DIM = 500, 8
_ids = itertools.count(1)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def random_value(rnd: random.Random, depth: int = 0):
    kind = rnd.randrange(9 if depth < 3 else 6)
    return [lambda: rnd.randint(-2**63, 2**64 - 1), lambda: rnd.random() * 10**rnd.randint(-5, 40),
            lambda: "".join(rnd.choice("abk_/ \x00é") for _ in range(rnd.randrange(12))), lambda: None,
            lambda: rnd.random() < 0.5, lambda: rnd.randbytes(rnd.randrange(16)),
            lambda: [random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))],
            lambda: {str(random_value(rnd, depth + 1))[:8]: random_value(rnd, depth + 1) for _ in range(rnd.randrange(4))},
            lambda: rnd.randint(-3, 600)][kind]()


def random_array(rnd: random.Random) -> tuple[list, bytes]:
    dtype = rnd.choice(["float32", "int64", "float16", "float64", "uint8", "", 5])
    shape = [rnd.choice([0, 1, 2, 3, 8, DIM, 501, -1, 2**40]) for _ in range(rnd.randrange(4))]
    size = max(0, int(np.prod([max(s, 0) for s in shape]) if shape else 1))
    itemsize = {"float32": 4, "int64": 8, "float16": 2}.get(dtype, 4)
    nbytes = size * itemsize if size * itemsize < 4096 else rnd.randrange(64)
    if rnd.random() < 0.3:
        nbytes = max(0, nbytes + rnd.choice([-1, 1, 7]))
    if dtype == "float32" and rnd.random() < 0.5:
        payload = np.frombuffer(rnd.randbytes(nbytes - nbytes % 4), np.float32)  # NaN, Inf, huge
        return [rnd.choice(["ids", "rows", "queries", "features", "exclude"]), dtype, shape], payload.tobytes()
    if dtype == "int64" and rnd.random() < 0.5:
        payload = np.array([rnd.randint(-5, ROWS + 5) for _ in range(nbytes // 8)], np.int64).tobytes()
        return [rnd.choice(["ids", "exclude"]), dtype, shape], payload
    return [rnd.choice(["ids", "rows", "queries", "features", "exclude", "x"]), dtype, shape], rnd.randbytes(nbytes)


def plausible_request(rnd: random.Random) -> list[bytes]:
    """A well-formed request whose values are hostile: it gets past the codec to the bank's checks."""
    from fgc_bank.protocol import Request, encode_request

    op = rnd.choice(["knn", "update", "knn_update", "gather", "sample", "info", "create"])
    batch = rnd.choice([1, 4, 16])
    dim = DIM if rnd.random() < 0.8 else rnd.choice([1, DIM + 1])
    ids = np.array([rnd.randint(-2, ROWS + 2) if rnd.random() < 0.05 else rnd.randrange(ROWS) for _ in range(batch)], np.int64)
    rows = np.random.default_rng(rnd.randrange(2**32)).standard_normal((batch, dim)).astype(np.float32)
    if rnd.random() < 0.1:
        rows[rnd.randrange(batch), rnd.randrange(dim)] = rnd.choice([np.nan, np.inf, -np.inf])
    k = rnd.choice([1, 5, 0, -3, ROWS, ROWS + 1])
    bank = "fuzz" if rnd.random() < 0.9 else "missing"
    request = {
        "knn": lambda: Request("knn", bank, {"k": k}, {"queries": rows} | ({"exclude": ids} if rnd.random() < 0.5 else {})),
        "update": lambda: Request("update", bank, {"mode": rnd.choice(["momentum", "overwrite", "swap"])}, {"ids": ids, "rows": rows}),
        "knn_update": lambda: Request("knn_update", bank, {"k": k}, {"ids": ids, "features": rows}),
        "gather": lambda: Request("gather", bank, {}, {"ids": ids}),
        "sample": lambda: Request("sample", bank, {"m": rnd.choice([1, 10, 0, ROWS + 1]), "seed": rnd.randrange(9)}),
        "info": lambda: Request("info", bank),
        "create": lambda: Request("create", rnd.choice(["fuzz", "tiny"]), {"rows": rnd.choice([10, ROWS]), "dim": DIM,
                                                                            "exist_ok": rnd.random() < 0.5}),
    }[op]()
    request.id = next(_ids)
    return [bytes(f) for f in encode_request(request)]


def fuzz_message(rnd: random.Random) -> list[bytes]:
    """One message: garbage, a mutated header, or a plausible request with hostile values."""
    style = rnd.random()
    if style < 0.15:
        return [rnd.randbytes(rnd.randrange(64)) for _ in range(rnd.randrange(1, 4))]
    if style < 0.45:
        return plausible_request(rnd)
    header = {"v": PROTOCOL_VERSION if rnd.random() < 0.9 else random_value(rnd), "id": next(_ids),
              "op": rnd.choice([*OPS, "evil", ""]) if rnd.random() < 0.95 else random_value(rnd),
              "bank": rnd.choice(["fuzz", "fuzz", "other", "", "x" * 200]) if rnd.random() < 0.9 else random_value(rnd)}
    if header["op"] in ("create", "drop", "snapshot", "restore") and header["bank"] == "fuzz":
        header["bank"] = "scratch"  # keep the oracle bank; create/drop others freely
    spec = OPS.get(header["op"]) if isinstance(header["op"], str) else None
    args = {}
    for name in ([*spec.args, *spec.optional_args] if spec else []):
        if rnd.random() < 0.85:
            args[name] = rnd.choice([rnd.randint(-2, 40), rnd.randint(0, ROWS + 2), random_value(rnd)])
    if "rows" in args and header["op"] == "create":
        args["rows"] = rnd.choice([1, 10, 100, 0, -1, 2**40])
        args["dim"] = rnd.choice([1, 4, 0, 2**20])
    header["args"] = args if rnd.random() < 0.95 else random_value(rnd)
    arrays = [random_array(rnd) for _ in range(rnd.randrange(3))]
    header["arrays"] = [meta for meta, _ in arrays] if rnd.random() < 0.95 else random_value(rnd)
    for key in list(header):
        if rnd.random() < 0.03:
            del header[key]
    frames = [msgpack.packb(header, use_bin_type=True), *[data for _, data in arrays]]
    if rnd.random() < 0.05:
        frames[0] = frames[0][: rnd.randrange(len(frames[0]) + 1)]  # truncated msgpack
    if rnd.random() < 0.05:
        frames.append(rnd.randbytes(rnd.randrange(32)))  # stray frame
    return frames


def test_fuzzed_server_answers_everything_keeps_memory_bounded_and_stays_exact(tmp_path: Path) -> None:
    proc, address = start_server(tmp_path, "--max-bank-gib", "0.01")
    rnd = random.Random(20261121)
    try:
        with connect(address) as bank:
            bank.create("fuzz", ROWS, DIM, seed=4)
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(address)
        codes: dict[str, int] = {}
        rss_start = None
        answered = 0
        for batch_start in range(0, MESSAGES, 200):
            for _ in range(200):
                sock.send_multipart(fuzz_message(rnd))
            for _ in range(200):
                assert sock.poll(int(30_000 * TIME_FACTOR)), f"no answer after {answered} answers"
                header = msgpack.unpackb(sock.recv_multipart()[0])
                assert header["v"] == PROTOCOL_VERSION and isinstance(header["ok"], bool)
                if not header["ok"]:
                    ErrorCode(header["error"]["code"])  # a known, stable code
                    assert header["error"]["code"] != "internal", header["error"]
                    codes[header["error"]["code"]] = codes.get(header["error"]["code"], 0) + 1
                answered += 1
            if batch_start == 1000:
                rss_start = rss_kib(proc.pid)
        sock.close()
        assert answered == MESSAGES
        assert len(codes) >= 10, codes  # the fuzzer reached many different checks
        growth_mib = (rss_kib(proc.pid) - rss_start) / 1024
        print(f"fuzzed {answered} messages; error codes {codes}; server RSS grew {growth_mib:.1f} MiB")
        assert growth_mib < 100, f"server memory grew {growth_mib:.0f} MiB under fuzzing"
        with connect(address) as bank:
            rows = bank.gather("fuzz", np.arange(ROWS))
            assert np.isfinite(rows).all()
            queries = np.random.default_rng(1).standard_normal((64, DIM)).astype(np.float32)
            result = bank.knn("fuzz", queries, 25)
            assert_same_knn(result.scores, result.ids, *brute_force_knn(rows, queries, 25))
        assert proc.poll() is None
    finally:
        stop_server(proc)
