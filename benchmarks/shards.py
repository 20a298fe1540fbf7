"""What sharding costs: the time a knn request across S shard servers takes beyond its slowest
shard's own round trip (the fan-out of S requests, the wait for the last reply, the exact merge),
as a share of the request, and the throughput S shards on S machines would give.

Every shard runs here on the same cores, so a shard's round trip within a sharded request is
slowed by the others; the overhead is measured from the client's side (request time minus the
slowest shard's round trip in the same request), which that contention does not enter. The
projection uses each shard's time measured alone (one request at a time, one shard at a time):
on S machines each shard has its cores to itself.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import numpy as np

from benchmarks.remote import CLIENT_OPTIONS, Server
from benchmarks.timing import Stats
from benchmarks.workloads import Workload, make_queries
from fgc_bank import connect
from fgc_bank.shards import merge_topk

TARGET_OVERHEAD = 0.05  # the merge's share of a request at S = 4, B = 256, k = 200


def measure(workload: Workload, shards: int = 4, reps: int = 20, threads: int = 0, seed: int = 0) -> dict[str, Any]:
    """Overhead of one logical bank over ``shards`` servers against its slowest shard, with the
    projection; one plain server of the whole bank is measured beside it."""
    config = workload.bank_config(seed)
    with contextlib.ExitStack() as stack:
        servers = [stack.enter_context(Server(threads, extra=("--shard", f"{i}/{shards}"))) for i in range(shards)]
        plain = stack.enter_context(Server(threads))
        sharded = stack.enter_context(connect(",".join(s.address for s in servers), **CLIENT_OPTIONS))
        whole = stack.enter_context(connect(plain.address, **CLIENT_OPTIONS))
        for bank in (sharded, whole):
            bank.create(config.name, config.rows, config.dim, init=config.init, seed=config.seed)
        queries = make_queries(lambda ids: sharded.gather(config.name, ids), config.rows, workload.batch, 4, seed)
        k = workload.k
        for q in queries:  # warm-up, and the answers must agree (equal scores may come in any order)
            a, b = sharded.knn(config.name, q, k), whole.knn(config.name, q, k)
            if not (np.allclose(a.scores, b.scores, rtol=1e-6, atol=0) and
                    (np.sort(a.ids, axis=1) == np.sort(b.ids, axis=1)).mean() > 0.999):
                raise AssertionError("the sharded bank's answer differs from one server's")
        totals, slowest = [], []
        for i in range(reps):
            sharded.knn(config.name, queries[i % len(queries)], k)
            totals.append(sharded.last_call["total_s"])
            slowest.append(sharded.last_call["slowest_shard_s"])
        alone = []
        for server in servers:
            with connect(server.address, **CLIENT_OPTIONS) as one:
                alone.append(_median_time(lambda q=queries[0], one=one: one.knn(config.name, q, k), reps))
        plain_s = _median_time(lambda: whole.knn(config.name, queries[0], k), reps)
    answers = [(np.sort(np.random.default_rng(i).standard_normal((workload.batch, k)).astype(np.float32))[:, ::-1],
                np.arange(k, dtype=np.int64)[None].repeat(workload.batch, 0) + i * k) for i in range(shards)]
    merge_s = _median_time(lambda: merge_topk([a for a, _ in answers], [b for _, b in answers], k), reps)
    totals_a, slowest_a = np.array(totals), np.array(slowest)
    overhead = Stats.of((totals_a - slowest_a) / totals_a)
    overhead_s = float(np.median(totals_a - slowest_a))
    return {"workload": workload.name, "rows": workload.rows, "dim": workload.dim, "k": k, "batch": workload.batch,
            "shards": shards, "overhead_fraction": overhead.to_json(), "overhead_ms": overhead_s * 1e3,
            "merge_ms": merge_s * 1e3, "request_ms": float(np.median(totals_a)) * 1e3,
            "slowest_shard_alone_ms": max(alone) * 1e3, "one_server_ms": plain_s * 1e3,
            "one_server_qps": workload.batch / plain_s,
            "projected_qps": workload.batch / (max(alone) + overhead_s),
            "target_overhead": TARGET_OVERHEAD}


def _median_time(call: Any, reps: int) -> float:
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def text(result: dict[str, Any]) -> str:
    """The measurement as a few lines for the terminal and RESULTS.md."""
    o = result["overhead_fraction"]
    return (f"shards: {result['workload']} (N {result['rows']:,}, D {result['dim']}, k {result['k']}, "
            f"B {result['batch']}) over S = {result['shards']} shard servers\n"
            f"  request {result['request_ms']:.1f} ms; beyond its slowest shard {result['overhead_ms']:.2f} ms = "
            f"{100 * o['median']:.1f}% (range {100 * o['low']:.1f}-{100 * o['high']:.1f}%; target <= "
            f"{100 * result['target_overhead']:.0f}%), of which the merge {result['merge_ms']:.2f} ms\n"
            f"  one server: {result['one_server_ms']:.1f} ms = {result['one_server_qps']:,.0f} queries/s; "
            f"slowest shard alone {result['slowest_shard_alone_ms']:.1f} ms -> S machines: "
            f"{result['projected_qps']:,.0f} queries/s (projected, {result['projected_qps'] / result['one_server_qps']:.1f}x)")


def missed(result: dict[str, Any] | None) -> list[str]:
    """A line for a missed overhead target (judged at S >= 4 only, where the target is set)."""
    if (result is None or not result.get("judged", True) or result["shards"] < 4
            or result["overhead_fraction"]["median"] <= result["target_overhead"]):
        return []
    return [(f"missed target: shard merge overhead {100 * result['overhead_fraction']['median']:.1f}% of a request "
             f"at S = {result['shards']}, goal <= {100 * result['target_overhead']:.0f}%")]


if __name__ == "__main__":
    import argparse

    from benchmarks.workloads import WORKLOADS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="cifar", choices=sorted(WORKLOADS))
    parser.add_argument("--max-rows", type=int, default=None)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    print(text(measure(WORKLOADS[args.workload].resized(args.max_rows), args.shards, args.reps)))
