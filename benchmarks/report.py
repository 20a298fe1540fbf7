"""Turn a benchmark run into a table, target checks, a chart and a markdown page."""

from __future__ import annotations

import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

# Ratios the issue asks for, per workload: (what, numerator, denominator, goal).
TARGET_BOUND = {"cifar": 0.6, "imagenet-128": 0.75, "imagenet-512": 0.75}
ORDER = ["faiss-default", "faiss-blas", "torch-topk", "search-fp32", "search-bf16", "search", "bank"]  # in-process contenders
PIPELINED = "server-1-pipelined"  # one client, two requests in flight
BESIDE = "search-beside"  # the raw search again, in blocks interleaved with the server's runs
LIBRARIES = ["torch", "faiss-cpu", "numpy", "pyzmq", "msgpack", "click", "matplotlib"]


@dataclass(frozen=True)
class Check:
    """One target: ``value`` against ``goal`` (a ratio; higher is better)."""

    workload: str
    what: str
    value: float
    goal: float | None

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return "reported"
        return "met" if self.value >= self.goal else "MISSED"


def qps_stats(result: dict[str, Any], key: str) -> dict[str, float]:
    """Queries/s (median, low, high, n) of an in-process method (``search``), a server run with
    N clients (``server-4``) or one client with requests in flight (``server-1-pipelined``)."""
    if key == PIPELINED:
        return result["server"]["pipelined"]["qps"]
    if key == BESIDE:
        return result["server"]["search_beside"]["qps"]
    if key.startswith("server-"):
        return result["server"]["clients"][key.split("-", 1)[1]]["qps"]
    return result["methods"][key]["qps"]


def qps_of(result: dict[str, Any], key: str) -> float:
    return qps_stats(result, key)["median"]


def contenders(result: dict[str, Any]) -> list[str]:
    keys = [k for k in ORDER if k in result["methods"]] + ([BESIDE] if "search_beside" in result["server"] else [])
    keys += [f"server-{c}" for c in result["server"]["clients"]]
    return keys + ([PIPELINED] if "pipelined" in result["server"] else [])


def checks(results: list[dict[str, Any]]) -> list[Check]:
    """Every target of the issue, with the measured ratio."""
    out = []
    for r in results:
        name, bound = r["workload"]["name"], r["bound_qps"]
        have = set(contenders(r))
        # The server against the search measured beside it (same minutes, same machine state)
        # where the run has it; the in-process table's search otherwise.
        search = qps_of(r, BESIDE if BESIDE in have else "search")
        if "server-1" in have:
            out.append(Check(name, "server, 1 client / compute bound", qps_of(r, "server-1") / bound,
                             TARGET_BOUND.get(name)))
            out.append(Check(name, "server, 1 client / search in process", _x_search(r, "1", search), 0.9))
            one = r["server"]["clients"]["1"]
            if "wire_p50_ms" in one:  # the same goal, per request: the wire's share under 10%
                out.append(Check(name, "server, 1 client: server p50 / client p50",
                                 one["server_knn_p50_ms"] / one["knn_ms"]["p50_ms"], 0.9))
        if PIPELINED in have:
            out.append(Check(name, "server, 1 client, 2 in flight / compute bound", qps_of(r, PIPELINED) / bound, None))
            out.append(Check(name, "server, 1 client, 2 in flight / search in process",
                             qps_of(r, PIPELINED) / search, None))
        if "server-4" in have:
            out.append(Check(name, "server, 4 clients (aggregate) / search in process",
                             _x_search(r, "4", search), 1.0))
        out.append(Check(name, "in-process bank / search in process", qps_of(r, "bank") / qps_of(r, "search"), 0.95))
        for other in ("torch-topk", "faiss-default", "faiss-blas", "search-fp32", "search-bf16"):
            if other in have:
                out.append(Check(name, f"search / {other}", qps_of(r, "search") / qps_of(r, other), None))
    return out


def _x_search(result: dict[str, Any], clients: str, search: float) -> float:
    """The server with ``clients`` clients over the in-process search: the median of its blocks'
    own ratios to the search block timed beside each (``x_beside``), where the run has them.

    A pair's two blocks share the machine's state of those seconds, and that state drifts by
    several percent within a run: the pairs' ratios cancel the drift, which the ratio of the two
    sets' medians only averages out. Without pairs: over ``search``, minutes earlier.
    """
    entry = result["server"]["clients"][clients]
    if "x_beside" in entry:
        return entry["x_beside"]["median"]
    return entry["qps"]["median"] / search


def text_table(results: list[dict[str, Any]], peak: dict[str, Any]) -> str:
    """The stdout table: one block per workload, one line per contender."""
    lines = [f"peak sgemm: {peak['gflops']:.1f} GFLOP/s ({peak['library']}, {peak['threads']} threads, n={peak['size']})"]
    for r in results:
        w = r["workload"]
        lines.append("")
        lines.append(f"{w['name']}: N={w['rows']:,} D={w['dim']} k={w['k']} B={w['batch']}  "
                     f"compute bound {r['bound_qps']:,.0f} q/s")
        lines.append(f"  {'contender':<18} {'queries/s':>11} {'spread':>7} {'x bound':>8} {'x search':>9} {'x faiss':>8}")
        for key, q, spread, x_bound, x_search, x_faiss in contender_rows(r):
            lines.append(f"  {key:<18} {q:>11,.0f} {spread:>7} {x_bound:>8.3f} {x_search:>9.3f} {x_faiss:>8.2f}")
        b, s = r["bank"], r["server"]
        if "knn_update_step_ms" in b:
            lines.append(f"  knn_update with step tags p50/p99 ms: in-process {b['knn_update_step_ms']['p50_ms']:.1f}/"
                         f"{b['knn_update_step_ms']['p99_ms']:.1f}")
        lines.append(f"  knn_update p50/p99 ms: in-process {b['knn_update_ms']['p50_ms']:.1f}/{b['knn_update_ms']['p99_ms']:.1f}"
                     f", server {s['knn_update_ms']['p50_ms']:.1f}/{s['knn_update_ms']['p99_ms']:.1f}")
        lines.append(f"  update rows/s: in-process {b['update_rows_per_s']['median']:,.0f}, "
                     f"server {s['update_rows_per_s']['median']:,.0f}")
        one = s["clients"].get("1", {})
        if "wire_p50_ms" in one:
            lines.append(f"  wire (client p50 - server p50, 1 client): {one['wire_p50_ms']:.2f} ms of {one['knn_ms']['p50_ms']:.1f} ms")
        if paired := _paired(s):
            lines.append(f"  server / search-beside, paired blocks: {paired}")
    lines.append("")
    lines.append("targets:")
    for c in checks(results):
        goal = "" if c.goal is None else f" (goal >= {c.goal:g})"
        lines.append(f"  {c.workload:<13} {c.what:<52} {c.value:7.3f}{goal:<16} {c.verdict}")
    return "\n".join(lines)


def _paired(server: dict[str, Any]) -> str:
    """"1 client(s) 0.915 (0.870-0.950, 16 pairs), ...": each server block over the search block
    paired with it; the checks use the median, the range shows how far one block strays."""
    return ", ".join(f"{c} client(s) {x['median']:.3f} ({x['low']:.3f}-{x['high']:.3f}, {x['n']} pairs)"
                     for c, e in server["clients"].items() if (x := e.get("x_beside")))


def contender_rows(result: dict[str, Any]) -> list[tuple[str, float, str, float, float, float]]:
    """One row per contender, for both tables: name, queries/s, spread, and its ratios to the
    compute bound, to fgc-bank's raw search and to FAISS's defaults."""
    rows = []
    for key in contenders(result):
        stats = qps_stats(result, key)
        q = stats["median"]
        rows.append((key, q, _spread(stats), q / result["bound_qps"], q / qps_of(result, "search"),
                     q / qps_of(result, "faiss-default")))
    return rows


def _spread(stats: dict[str, float]) -> str:
    return f"{(stats['high'] - stats['low']) / stats['median']:.0%}" if stats["median"] else "-"


def chart(results: list[dict[str, Any]], path: Path) -> None:
    """Bars: each contender's median queries/s as a fraction of the compute bound, min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = []
    for r in results:
        keys += [k for k in contenders(r) if k not in keys]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 + 0.45 * len(keys) * len(results)), 4.5))
    width = 0.8 / len(keys)
    for i, key in enumerate(keys):
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(results):
            if key not in contenders(r):
                continue
            stats = qps_stats(r, key)
            xs.append(j + (i - (len(keys) - 1) / 2) * width)
            ys.append(stats["median"] / r["bound_qps"])
            lo.append((stats["median"] - stats["low"]) / r["bound_qps"])
            hi.append((stats["high"] - stats["median"]) / r["bound_qps"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=key)
    for j, r in enumerate(results):
        goal = TARGET_BOUND.get(r["workload"]["name"])
        if goal:
            ax.hlines(goal, j - 0.45, j + 0.45, colors="black", linestyles="dotted")
    ax.axhline(1.0, color="grey", linewidth=0.8)
    ax.set_xticks(range(len(results)), [f"{r['workload']['name']}\nN={r['workload']['rows']:,} D={r['workload']['dim']} k={r['workload']['k']}"
                                        for r in results])
    ax.set_ylabel("queries/s as a fraction of the sgemm bound")
    ax.set_title("kNN throughput / compute bound (dotted: 1-client server target)", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def machine() -> dict[str, Any]:
    """CPU model, cores, memory, OS and library versions."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem_gib = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, IndexError, ValueError):
        mem_gib = 0.0
    import os

    versions = {"python": platform.python_version()}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = "not installed"
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem_gib, 1),
            "os": platform.platform(), "versions": versions, "git": _git_commit()}


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def markdown(run: dict[str, Any], chart_name: str) -> str:
    """The results page: how it was made, on what, the numbers, the targets, the chart."""
    m, peak, results = run["machine"], run["peak"], run["results"]
    out = ["# fgc-bank kNN benchmark results", "",
           "Produced by the command below; `benchmarks/README.md` explains the contenders and how",
           "to read the figures, `docs/perf-notes.md` what the profiling found. Each figure is the median of repeated measurements after warm-up;",
           "`spread` is (max - min) / median.", "",
           f"    {run['command']}", "",
           f"- machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {m['os']}",
           "- libraries: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
           f"- git commit: {m['git']}; wall time of the run: {run['elapsed_s'] / 60:.1f} min",
           (f"- measured peak sgemm: **{peak['gflops']:.1f} GFLOP/s** ({peak['library']}, {peak['size']}^3, "
            f"{peak['threads']} threads); a workload's compute bound is peak / (2 N D) queries/s"), ""]
    for r in results:
        w = r["workload"]
        out += [f"## {w['name']}: N = {w['rows']:,}, D = {w['dim']}, k = {w['k']}, B = {w['batch']}", "",
                f"Compute bound: {r['bound_qps']:,.0f} queries/s.", "",
                "| contender | queries/s | spread | x bound | x search | x FAISS default |",
                "| --- | ---: | ---: | ---: | ---: | ---: |"]
        for key, q, spread, x_bound, x_search, x_faiss in contender_rows(r):
            out.append(f"| {key} | {q:,.0f} | {spread} | {x_bound:.3f} | {x_search:.3f} | {x_faiss:.2f} |")
        b, s = r["bank"], r["server"]
        one = s["clients"].get("1", {})
        out += ["", "| per request | in-process bank | server, 1 client |", "| --- | ---: | ---: |",
                (f"| knn_update p50 / p99 (ms) | {b['knn_update_ms']['p50_ms']:.1f} / {b['knn_update_ms']['p99_ms']:.1f} "
                 f"| {s['knn_update_ms']['p50_ms']:.1f} / {s['knn_update_ms']['p99_ms']:.1f} |"),
                f"| update (rows/s) | {b['update_rows_per_s']['median']:,.0f} | {s['update_rows_per_s']['median']:,.0f} |"]
        if "wire_p50_ms" in one:
            out.append(f"| knn: client p50 - server p50 (ms) | | {one['wire_p50_ms']:.2f} of {one['knn_ms']['p50_ms']:.1f} |")
        coalesced = ", ".join(f"{c} client(s): {e['requests_per_search']:.2f}" for c, e in s["clients"].items())
        out += ["", f"Requests answered per search call on the server (coalescing): {coalesced}.", ""]
        if paired := _paired(s):
            out += [f"Server / search-beside, block by block (median, min-max of the pairs): {paired}.", ""]
    out += ["## Targets", "", "| workload | ratio | measured | goal | verdict |", "| --- | --- | ---: | ---: | --- |"]
    for c in checks(results):
        out.append(f"| {c.workload} | {c.what} | {c.value:.3f} | {'' if c.goal is None else f'>= {c.goal:g}'} | {c.verdict} |")
    out += ["", f"![queries/s as a fraction of the compute bound]({chart_name})", ""]
    return "\n".join(out)
