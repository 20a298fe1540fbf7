"""The wire's floor: ``fgc-bank serve`` beside a bare pyzmq server around the same search.

``fgc-bank bench`` compares the server with one synchronous client to the search in process. How
much of that gap is fgc-bank's and how much the transport's? This runs, in alternating blocks of
requests (this VM's speed drifts within seconds): the search in this process, ``fgc-bank serve``
with a :class:`~fgc_bank.client.BankClient`, and a bare ROUTER loop around the same search with a
bare DEALER: no validation, queues, worker threads or bookkeeping, the least a ZeroMQ server can do
per request. Each is given as time per request and as the in-process search's share of it (the
bench's "server / search-beside" ratio)::

    python -m benchmarks.floor --workload cifar
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import zmq

from benchmarks import remote
from benchmarks.workloads import WORKLOADS, Workload, make_queries
from fgc_bank.api import connect
from fgc_bank.bank import MemoryBank
from fgc_bank.protocol import Reply, Request, encode_reply, encode_request
from fgc_bank.stores.cpu.search import search_inner_product, set_threads
from fgc_bank.stores.cpu.store import CpuStore

QUERY_BATCHES = 4
STOP = b"stop"


def serve_bare(address_file: Path, workload: Workload, seed: int, threads: int) -> None:
    """The bare server: answer each knn frame set on the receiving thread until ``STOP``."""
    set_threads(threads)
    store = CpuStore(torch.from_numpy(MemoryBank(workload.bank_config(seed)).export()))
    router = zmq.Context.instance().socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    address_file.write_text(f"tcp://127.0.0.1:{port}")
    while True:
        frames = router.recv_multipart(copy=False)
        if frames[1].bytes == STOP:
            return
        queries = np.frombuffer(frames[2].buffer, dtype=np.float32).reshape(-1, workload.dim)
        scores, ids = search_inner_product(store.rows_np, queries, workload.k, store.low)
        router.send_multipart([frames[0], *encode_reply(Reply(0, arrays={"scores": scores, "ids": ids}))], copy=False)


class BareClient:
    """A DEALER that sends fgc-bank knn frames and reads the answer's buffers as they come."""

    def __init__(self, address: str, bank: str) -> None:
        self.socket = zmq.Context.instance().socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(address)
        self.bank = bank

    def knn(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        self.socket.send_multipart(encode_request(Request("knn", self.bank, {"k": k}, {"queries": queries})), copy=False)
        frames = self.socket.recv_multipart(copy=False)
        shape = (queries.shape[0], k)
        return (np.frombuffer(frames[1].buffer, np.float32).reshape(shape),
                np.frombuffer(frames[2].buffer, np.int64).reshape(shape))

    def stop(self) -> None:
        self.socket.send(STOP)
        self.socket.close()


def measure(workload: Workload, blocks: int, per_block: int, threads: int = 0, seed: int = 0) -> dict[str, Any]:
    """Seconds per request of each contender, block by block, and each block's in-process ratio.

    Raises RuntimeError if the three contenders do not return the same neighbours.
    """
    set_threads(threads)
    cfg = workload.bank_config(seed)
    store = CpuStore(torch.from_numpy(MemoryBank(cfg).export()))
    queries = make_queries(store.rows_np.__getitem__, workload.rows, workload.batch, QUERY_BATCHES, seed)
    with tempfile.TemporaryDirectory(prefix="fgc-bank-floor-") as tmp, remote.Server(threads) as server, \
            connect(server.address, **remote.CLIENT_OPTIONS) as client:
        client.create(cfg.name, cfg.rows, cfg.dim, momentum=cfg.momentum, init=cfg.init, seed=cfg.seed)
        bare_process, bare = _start_bare(Path(tmp) / "address", workload, seed, threads, cfg.name)
        try:
            calls: dict[str, Callable[[np.ndarray], Any]] = {
                "search": lambda q: search_inner_product(store.rows_np, q, workload.k, store.low),
                "server": lambda q: client.knn(cfg.name, q, workload.k),
                "bare": lambda q: bare.knn(q, workload.k),
            }
            ids = calls["search"](queries[0])[1]
            if not (np.array_equal(ids, calls["server"](queries[0]).ids)
                    and np.array_equal(ids, calls["bare"](queries[0])[1])):
                raise RuntimeError("the server, the bare server and the search disagree on the neighbours")
            seconds: dict[str, list[float]] = {name: [] for name in calls}
            for block in range(blocks):
                for name in (list(calls) if block % 2 == 0 else list(calls)[::-1]):
                    start = time.perf_counter()
                    for i in range(per_block):
                        calls[name](queries[i % QUERY_BATCHES])
                    seconds[name].append((time.perf_counter() - start) / per_block)
        finally:
            bare.stop()
            bare_process.wait(timeout=30)
    search = np.array(seconds["search"])
    return {"workload": workload.name, "rows": workload.rows, "blocks": blocks, "per_block": per_block,
            "seconds": seconds,
            "x_search": {name: float(np.median(search / np.array(s))) for name, s in seconds.items()}}


def _start_bare(address_file: Path, workload: Workload, seed: int, threads: int,
                bank: str) -> tuple[subprocess.Popen[bytes], BareClient]:
    command = [sys.executable, "-m", "benchmarks.floor", "--serve-bare", str(address_file),
               "--workload", workload.name, "--max-rows", str(workload.rows), "--seed", str(seed),
               "--threads", str(threads)]
    process = subprocess.Popen(command)
    try:
        address = remote.wait_for_address(process, address_file, command)
    except RuntimeError:
        process.kill()
        raise
    return process, BareClient(address, bank)


@click.command(context_settings={"show_default": True})
@click.option("--workload", "name", type=click.Choice(sorted(WORKLOADS)), default="cifar")
@click.option("--max-rows", type=click.IntRange(1), default=None, help="Cap the bank at this many rows.")
@click.option("--blocks", type=click.IntRange(1), default=20, help="Blocks of requests per contender, alternating.")
@click.option("--per-block", type=click.IntRange(1), default=20, help="Synchronous requests in a block.")
@click.option("--threads", type=click.IntRange(0, 1024), default=0, help="Search threads; 0: every core.")
@click.option("--seed", type=int, default=0)
@click.option("--json", "json_out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the figures here.")
@click.option("--serve-bare", "bare_address", type=click.Path(dir_okay=False, path_type=Path), default=None,
              hidden=True)
def main(name: str, max_rows: int | None, blocks: int, per_block: int, threads: int, seed: int,
         json_out: Path | None, bare_address: Path | None) -> None:
    """Time per request: in-process search, fgc-bank serve, and a bare pyzmq server, side by side."""
    workload = WORKLOADS[name].resized(max_rows)
    if bare_address is not None:  # the bare server's own process (started by measure)
        serve_bare(bare_address, workload, seed, threads)
        return
    result = measure(workload, blocks, per_block, threads, seed)
    click.echo(f"{workload.name}: N = {workload.rows:,}, D = {workload.dim}, k = {workload.k}, "
               f"B = {workload.batch}; {blocks} blocks of {per_block} requests each")
    for contender, seconds in result["seconds"].items():
        click.echo(f"  {contender:>6}: {np.median(seconds) * 1e3:7.3f} ms a request (median block), "
                   f"search / this: {result['x_search'][contender]:.3f}")
    if json_out is not None:
        json_out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
