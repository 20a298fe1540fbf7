"""One benchmark run: every contender on each workload, in process and over loopback."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from benchmarks import inprocess, remote
from benchmarks.timing import Latency, Peak, Stats, reps_for
from benchmarks.workloads import Workload, make_queries, make_update_ids
from fgc_bank.api import connect
from fgc_bank.local import LocalBank
from fgc_bank.stores.cpu import prefilter
from fgc_bank.stores.cpu.search import search_inner_product, set_threads
from fgc_bank.stores.cpu.store import CpuStore

QUERY_BATCHES = 4
SERVER_REPS = 3  # repetitions of each aggregate server measurement
WIRE_MIN_REQUESTS = 100  # one client's requests needed to report the wire's share of a request
PAIR_BLOCK_S = 0.1  # a server block's aim: short, so that the search block beside it shares its seconds
MIN_PAIRS, MAX_PAIRS = 16, 64  # server blocks per client count, each paired with a block of the raw search


@dataclass(frozen=True)
class Settings:
    """How long and how wide to measure."""

    budget_s: float = 6.0  # time to spend on each measured quantity
    min_reps: int = 3
    max_reps: int = 30
    clients: tuple[int, ...] = (1, 2, 4)
    threads: int = 0  # search / FAISS threads in this process and the server; 0: every core
    seed: int = 0


def steps(settings: Settings) -> int:
    """Progress-bar steps per workload (see :func:`run_workload`)."""
    return 1 + 2 * inprocess.count(prefilter.best_kind()) + 3 + len(settings.clients) + 3


def run_workload(workload: Workload, peak: Peak, settings: Settings, tick: Callable[[str], None]) -> dict[str, Any]:
    """Measure every contender on ``workload``; a JSON-ready dict."""
    set_threads(settings.threads)
    cfg = workload.bank_config(settings.seed)
    local = LocalBank()
    local.create(cfg.name, cfg.rows, cfg.dim, momentum=cfg.momentum, init=cfg.init, seed=cfg.seed)
    name = cfg.name
    # A CPU store holding a copy of the bank's rows: the in-process contenders search its rows
    # (and its low-precision copy), the in-process bank its own.
    store = CpuStore(torch.from_numpy(local.service.bank(name).export()))
    rows = store.rows_np
    queries = make_queries(rows.__getitem__, workload.rows, workload.batch, QUERY_BATCHES, settings.seed)
    ids = make_update_ids(workload.rows, workload.batch, QUERY_BATCHES, settings.seed + 1)
    tick(f"{workload.name}: bank built")
    contenders = inprocess.methods(rows, workload.k, local, name, store.low)
    seconds = inprocess.measure(contenders, queries, settings.budget_s, settings.min_reps, settings.max_reps, tick)
    result: dict[str, Any] = {
        "workload": asdict(workload),
        "bound_qps": peak.bound_qps(workload.flops_per_query),
        "methods": {m.key: {"label": m.label, "qps": Stats.of(workload.batch / np.array(seconds[m.key])).to_json()}
                    for m in contenders},
    }
    step_s = float(np.median(seconds["bank"]))
    reps = reps_for(step_s, settings.budget_s, max(settings.min_reps, 5), 4 * settings.max_reps)
    result["bank"] = {
        "knn_update_ms": asdict(Latency.of(inprocess.bank_step_latency(local, name, queries, ids, workload.k, reps))),
        "knn_update_step_ms": asdict(Latency.of(inprocess.bank_step_latency(local, name, queries, ids, workload.k, reps,
                                                                            step_consistent=True))),
        "update_rows_per_s": Stats.of(workload.batch / np.array(
            inprocess.bank_update_seconds(local, name, queries, ids, 4 * reps))).to_json(),
    }
    tick(f"{workload.name}: in-process bank steps")
    del contenders  # the bf16 copy; the bank stays for the search measured beside the server
    low = store.low

    def beside(count: int) -> float:
        """Queries/s of ``count`` raw searches in this process, after an untimed one."""
        search_inner_product(rows, queries[-1], workload.k, low)
        start = time.perf_counter()
        for i in range(count):
            search_inner_product(rows, queries[i % len(queries)], workload.k, low)
        return count * workload.batch / (time.perf_counter() - start)

    result["server"] = run_server(workload, settings, step_s, tick, beside)
    local.close()
    return result


def pairing(step_s: float, budget_s: float) -> tuple[int, int]:
    """(requests per block, pairs of blocks) for one client count's server measurement.

    Blocks of about ``PAIR_BLOCK_S`` and as many pairs as ``budget_s`` holds (at least
    ``MIN_PAIRS``). This VM's speed drifts within seconds, so a pair's ratio is closer to the truth
    the closer in time its two blocks are, and the median of more pairs scatters less: four runs
    of each, cifar, one client, in one process, gave medians 0.889-0.918 with 16 pairs of 37
    requests and 0.897-0.904 with 60 pairs of 10, the same centre (0.901 and 0.900).
    """
    block = reps_for(step_s, PAIR_BLOCK_S, 2, 1000)
    pairs = int(np.clip(budget_s / (block * step_s), MIN_PAIRS, MAX_PAIRS))
    return block, pairs


def run_server(workload: Workload, settings: Settings, step_s: float, tick: Callable[[str], None],
               beside: Callable[[int], float]) -> dict[str, Any]:
    """The same bank behind ``fgc-bank serve``, loaded by 1, 2, 4... client processes.

    Each measured server block is paired with a block of as many raw searches in this process
    (``beside``; sizes from :func:`pairing`), taken before it in even pairs and after it in odd
    ones, so that neither side always runs first (on a warm machine, or right after the other's
    work). Each pair's own ratio is kept (``x_beside``), and the targets take its median for each
    client count: not the in-process figures of minutes earlier, nor other client counts' blocks,
    nor the ratio of the two sets' medians, since this VM's speed drifts by several percent within
    a run and a pair's two blocks share the state of the same seconds.
    """
    out: dict[str, Any] = {"clients": {}}
    reference: list[float] = []
    with remote.Server(settings.threads) as server, connect(server.address, **remote.CLIENT_OPTIONS) as admin:
        cfg = workload.bank_config(settings.seed)
        admin.create(cfg.name, cfg.rows, cfg.dim, momentum=cfg.momentum, init=cfg.init, seed=cfg.seed)
        tick(f"{workload.name}: server up")
        with remote.Fleet(server.address, workload, cfg.name, max(settings.clients), settings.seed) as fleet:
            tick(f"{workload.name}: clients up")
            count = reps_for(step_s, settings.budget_s / SERVER_REPS, 2, 4 * settings.max_reps)
            block, pairs = pairing(step_s, settings.budget_s)
            for clients in settings.clients:
                runs, searches, ratios = [], [], []
                before = remote.server_counters(admin.stats())
                for pair in range(pairs):
                    if pair % 2 == 0:
                        searches.append(beside(block))
                    runs.append(fleet.run("knn", block, clients))
                    if pair % 2 == 1:
                        searches.append(beside(block))
                    ratios.append(remote.aggregate_qps(runs[-1], workload.batch) / searches[-1])
                after = remote.server_counters(admin.stats())
                calls, requests = after[0] - before[0], after[1] - before[1]
                reference += searches
                entry = {"qps": Stats.of([remote.aggregate_qps(r, workload.batch) for r in runs]).to_json(),
                         "beside_qps": Stats.of(searches).to_json(),
                         "x_beside": Stats.of(ratios).to_json(),
                         "knn_ms": asdict(Latency.of(remote.pooled(runs))),
                         "requests_per_search": requests / calls if calls else 0.0,
                         "pairs": pairs, "block_requests": block}
                if clients == 1:
                    server_ms = admin.stats().get("latency", {}).get("knn", {}).get("p50_ms")
                    # A difference of two medians, one of them over the untimed requests too: with a few
                    # long requests (imagenet) it is noise, and can come out negative.
                    if server_ms is not None:
                        entry["server_knn_p50_ms"] = server_ms
                        if entry["knn_ms"]["n"] >= WIRE_MIN_REQUESTS:
                            entry["wire_p50_ms"] = entry["knn_ms"]["p50_ms"] - server_ms
                out["clients"][str(clients)] = entry
                tick(f"{workload.name}: {clients} client(s)")
            out["search_beside"] = {"qps": Stats.of(reference).to_json()}
            fleet.run("knn_window", 2, 1)
            runs = [fleet.run("knn_window", 2 * count, 1) for _ in range(SERVER_REPS)]
            out["pipelined"] = {"qps": Stats.of([remote.aggregate_qps(r, workload.batch) for r in runs]).to_json(),
                                "window": remote.WINDOW}
            tick(f"{workload.name}: 1 client, {remote.WINDOW} in flight")
            out["knn_update_ms"] = asdict(Latency.of(remote.pooled(
                [fleet.run("knn_update", count, 1) for _ in range(SERVER_REPS)])))
            tick(f"{workload.name}: server knn_update")
            updates = [fleet.run("update", 4 * count, 1) for _ in range(SERVER_REPS)]
            out["update_rows_per_s"] = Stats.of(workload.batch / remote.pooled(updates)).to_json()
            tick(f"{workload.name}: server update")
    time.sleep(0.2)
    return out

