"""Turn a benchmark run into a table, target checks, a chart and a markdown page.

``python -m benchmarks.report RUN_JSON`` draws a recorded run's chart again (see :func:`redraw`).
"""

from __future__ import annotations

import json
import platform
import subprocess
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import click

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


def checks(results: list[dict[str, Any]], bound_goals: dict[str, float] | None = None) -> list[Check]:
    """Every target of the issue, with the measured ratio. ``bound_goals`` replaces the 1-client
    server's goals over the compute bound (``TARGET_BOUND``), by workload."""
    bound_goals = TARGET_BOUND if bound_goals is None else bound_goals
    out = []
    for r in results:
        name, bound = r["workload"]["name"], r["bound_qps"]
        have = set(contenders(r))
        # The server against the search measured beside it (same minutes, same machine state)
        # where the run has it; the in-process table's search otherwise.
        search = qps_of(r, BESIDE if BESIDE in have else "search")
        if "server-1" in have:
            out.append(Check(name, "server, 1 client / compute bound", qps_of(r, "server-1") / bound,
                             bound_goals.get(name)))
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


def text_table(results: list[dict[str, Any]], peak: dict[str, Any], bound_goals: dict[str, float] | None = None) -> str:
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
    for c in checks(results, bound_goals):
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


# Every series' colour and marker, distinct over all twelve; the baselines come first in a group
# and are drawn hatched with dashed edges, fgc-bank's own solid.
BASELINES = ["faiss-default", "faiss-blas", "torch-topk"]
STYLE = {"faiss-default": ("#7f7f7f", "v"), "faiss-blas": ("#8c564b", "^"), "torch-topk": ("#bcbd22", "D"),
         "search-fp32": ("#17becf", "o"), "search-bf16": ("#9467bd", "s"), "search": ("#1f77b4", "P"),
         "bank": ("#2ca02c", "X"), BESIDE: ("#aec7e8", "h"), "server-1": ("#ff7f0e", "*"),
         "server-2": ("#d62728", "p"), "server-4": ("#e377c2", "d"), PIPELINED: ("#393b79", "<")}
SPARE_STYLES = [("#ff9896", ">"), ("#98df8a", "8"), ("#c5b0d5", "H"), ("#c49c94", "1"), ("#f7b6d2", "2")]


def chart(run: dict[str, Any], path: Path) -> None:
    """Each contender's median queries/s per workload (log axis) with min-max whiskers, beside the
    workload's compute bound and the 1-client server's goal; fgc-bank's entries solid, the
    baselines hatched. The title says how the run was made (mode, N, k, B, CPU)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.legend_handler import HandlerTuple
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    results = run["results"]
    keys = series(results)
    styles = series_styles(keys)
    slots = _slots(keys)
    width = 0.84 / (slots[keys[-1]] + 1)
    fig, ax = plt.subplots(figsize=(max(9.0, 3.0 + 0.3 * len(keys) * len(results)), 5.5))
    for key in keys:
        colour, marker = styles[key]
        baseline = key in BASELINES
        xs, ys, lo, hi = [], [], [], []
        for j, r in enumerate(results):
            if key in contenders(r):
                stats = qps_stats(r, key)
                xs.append(j - 0.42 + (slots[key] + 0.5) * width)
                ys.append(stats["median"])
                lo.append(stats["median"] - stats["low"])
                hi.append(stats["high"] - stats["median"])
        ax.bar(xs, ys, width * 0.9, color="white" if baseline else colour, edgecolor=colour,
               hatch="///" if baseline else None, linestyle="--" if baseline else "-", linewidth=1.2)
        # On a solid bar a marker of the bar's colour would vanish: white, outlined, shows its shape.
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt=marker, color=colour if baseline else "white", markeredgecolor="black",
                    markeredgewidth=0.5, markersize=7, ecolor="black", elinewidth=0.9, capsize=2)
    for j, r in enumerate(results):
        ax.hlines(r["bound_qps"], j - 0.45, j + 0.45, colors="dimgrey", linewidth=1.2)
        goal = run.get("bound_goals", TARGET_BOUND).get(r["workload"]["name"])
        if goal:
            ax.hlines(goal * r["bound_qps"], j - 0.45, j + 0.45, colors="black", linestyles="dotted", linewidth=1.4)
    ax.set_yscale("log")
    ax.set_ylabel("queries/s (log scale)")
    ax.set_xticks(range(len(results)), [f"{r['workload']['name']}\nN={r['workload']['rows']:,} D={r['workload']['dim']} "
                                        f"k={r['workload']['k']}" for r in results])
    ax.set_xlim(-0.5, len(results) - 0.5)
    ax.grid(axis="y", which="major", alpha=0.3)
    ax.set_title(chart_title(run), fontsize=9)

    def handle(key: str) -> tuple[Patch, Line2D]:
        colour, marker = styles[key]
        baseline = key in BASELINES
        return (Patch(facecolor="white" if baseline else colour, edgecolor=colour, hatch="///" if baseline else None,
                      linestyle="--" if baseline else "-"),
                Line2D([], [], color=colour if baseline else "white", marker=marker, markeredgecolor="black",
                       markeredgewidth=0.5, linestyle=""))

    blank = Patch(visible=False)  # a legend row that is only a heading
    baselines = [k for k in keys if k in BASELINES]
    handles = [blank, *(handle(k) for k in baselines), blank, *(handle(k) for k in keys if k not in BASELINES), blank,
               Line2D([], [], color="black", marker="|", markersize=10, linestyle="-", linewidth=0.9),
               Line2D([], [], color="dimgrey", linewidth=1.2),
               Line2D([], [], color="black", linestyle="dotted", linewidth=1.4)]
    labels = ["baselines (hatched, dashed)", *baselines, "fgc-bank (solid)", *(k for k in keys if k not in BASELINES),
              "lines", "min-max of the repetitions", "compute bound: peak sgemm / (2 N D)",
              "goal: 1-client server, x bound"]
    legend = ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
                       handler_map={tuple: HandlerTuple(ndivide=1)})
    for text, h in zip(legend.get_texts(), handles):
        if h is blank:
            text.set_fontweight("bold")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def series(results: list[dict[str, Any]]) -> list[str]:
    """The chart's series: every contender of any workload, the baselines first."""
    keys: list[str] = []
    for r in results:
        keys += [k for k in contenders(r) if k not in keys]
    return [k for k in keys if k in BASELINES] + [k for k in keys if k not in BASELINES]


def series_styles(keys: list[str]) -> dict[str, tuple[str, str]]:
    """(colour, marker) of each series: its own from STYLE, else a spare one not used by another."""
    styles = {k: STYLE[k] for k in keys if k in STYLE}
    spare = (style for style in SPARE_STYLES if style not in styles.values())
    for key in keys:
        if key not in styles:
            styles[key] = next(spare, ("black", "."))
    return styles


def _slots(keys: list[str]) -> dict[str, int]:
    """Each series' position in a workload's group: baselines, an empty slot, then fgc-bank's."""
    slots, at = {}, 0
    for i, key in enumerate(keys):
        if i and key not in BASELINES and keys[i - 1] in BASELINES:
            at += 1
        slots[key] = at
        at += 1
    return slots


def run_mode(run: dict[str, Any]) -> str:
    """"--quick" or "full run", and the row cap: from the run's record, or its command line for
    runs recorded before the mode was."""
    mode = run.get("mode")
    if mode is None:
        command = run.get("command", "")
        mode = {"quick": "--quick" in command or "quick=True" in command, "max_rows": None}
    text = "--quick" if mode["quick"] else "full run"
    return text + (f", banks capped at {mode['max_rows']:,} rows" if mode.get("max_rows") else "")


def chart_title(run: dict[str, Any]) -> str:
    """Two lines: what the chart shows and the run's mode; the workloads' shapes and the machine."""
    m, results = run["machine"], run["results"]
    shapes = "; ".join(f"{r['workload']['name']} N={r['workload']['rows']:,} k={r['workload']['k']}" for r in results)
    batches = sorted({r["workload"]["batch"] for r in results})
    return (f"fgc-bank bench ({run_mode(run)}): kNN queries/s, median of repetitions\n"
            f"{shapes}; B={', '.join(map(str, batches))}; {m['cpu']}, {m['cores']} cores, "
            f"peak sgemm {run['peak']['gflops']:.0f} GFLOP/s")


def missed(run: dict[str, Any]) -> list[str]:
    """One line per target the run missed, naming it, its value and its goal (empty: all met)."""
    from benchmarks.shards import missed as shards_missed

    return [f"missed target: {c['workload']}: {c['what']} = {c['value']:.3f}, goal >= {c['goal']:g}"
            for c in run["checks"] if c["verdict"] == "MISSED"] + shards_missed(run.get("shards"))


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
    for c in checks(results, run.get("bound_goals")):
        out.append(f"| {c.workload} | {c.what} | {c.value:.3f} | {'' if c.goal is None else f'>= {c.goal:g}'} | {c.verdict} |")
    if run.get("shards"):
        from benchmarks.shards import text as shards_text

        out += ["", "## One bank over shard servers", "", "    " + shards_text(run["shards"]).replace("\n", "\n    ")]
    out += ["", f"![queries/s of each contender beside the compute bound]({chart_name})", ""]
    return "\n".join(out)


@click.command(context_settings={"show_default": True})
@click.argument("run_json", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--chart", "chart_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Where to draw the chart  [default: bench.png beside RUN_JSON]")
@click.option("--page", "page_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write the markdown page here (its chart link is the chart's name).")
def redraw(run_json: Path, chart_path: Path | None, page_path: Path | None) -> None:
    """Draw the chart (and the page) of a recorded run again from its bench.json, without
    measuring anything: for a change to the chart, or to draw a run made elsewhere."""
    run = json.loads(run_json.read_text())
    chart_path = chart_path or run_json.with_name("bench.png")
    chart(run, chart_path)
    written = [chart_path]
    if page_path is not None:
        page_path.write_text(markdown(run, chart_path.name))
        written.append(page_path)
    click.echo("wrote " + ", ".join(map(str, written)))


if __name__ == "__main__":
    redraw()
