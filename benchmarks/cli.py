"""``fgc-bank bench``: kNN throughput of the bank beside FAISS and the paper's search, in one run."""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path

import click

QUICK_MAX_ROWS = 65_536
QUICK_BUDGET_S = 0.6


@click.command(context_settings={"show_default": True})
@click.option("--workload", "workloads", multiple=True, type=click.Choice(["cifar", "imagenet-128", "imagenet-512"]),
              help="Workloads to run (repeat the option); default: all three.")
@click.option("--quick", is_flag=True, help=f"A run of a few minutes: banks capped at {QUICK_MAX_ROWS:,} rows, "
                                            "short measurements.")
@click.option("--max-rows", type=click.IntRange(1), default=None,
              help="Cap every bank at this many rows (scales N down for quick runs).")
@click.option("--batch", type=click.IntRange(1, 65536), default=256, help="Queries per request (B).")
@click.option("--clients", "clients", multiple=True, type=click.IntRange(1, 64),
              help="Concurrent client processes against the server (repeat); default: 1 2 4.")
@click.option("--threads", type=click.IntRange(0, 1024), default=0,
              help="Search / FAISS threads, in process and in the server (--faiss-threads); 0: every core.")
@click.option("--seconds", type=click.FloatRange(0.01), default=None,
              help="Time spent measuring each quantity (default 6, or 0.6 with --quick).")
@click.option("--reps", type=click.IntRange(1), default=5, help="Least measured repetitions of each quantity.")
@click.option("--peak-size", type=click.IntRange(256), default=None,
              help="Side of the square sgemm that measures peak GFLOP/s (default 4096, 2048 with --quick).")
@click.option("--seed", type=int, default=0, help="Seed of the bank rows and queries.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("bench-results"),
              help="Directory for bench.json, bench.png and RESULTS.md.")
@click.option("--bound-goal", type=click.FloatRange(0), default=None,
              help="Goal of the 1-client server's queries/s over the compute bound, for every workload "
                   "[default: the issue's, cifar 0.6, imagenet 0.75]. The command exits with status 1 "
                   "when any target is missed.")
@click.option("--shards", type=click.IntRange(0, 64), default=4,
              help="Also measure one bank over this many shard servers (imagenet-512's shape, capped like "
                   "the workloads): the merge's cost beyond the slowest shard and the projected queries/s "
                   "of that many machines; 0 skips it. Its target is judged on full-size runs only.")
@click.option("--progress/--no-progress", default=True, help="A progress bar on stderr.")
@click.option("--device", default="cpu", help="cpu: the CPU contenders below; cuda or cuda:N: the GPU "
              "bench (benchmarks/gpu.py: the paper's search, the torch store, GEMM bounds, momentum "
              "updates, a served bank with 1 and 8 clients), written as gpu.json.")
def bench(workloads: tuple[str, ...], quick: bool, max_rows: int | None, batch: int, clients: tuple[int, ...],
          threads: int, seconds: float | None, reps: int, peak_size: int | None, seed: int, out_dir: Path,
          bound_goal: float | None, shards: int, progress: bool, device: str) -> None:
    """Measure top-k inner-product search: queries/s, knn_update latency, update rows/s.

    Contenders, on the same rows: FAISS knn with default settings and with its BLAS path forced,
    the FGC paper's torch.mm + topk, fgc-bank's search called raw, the in-process bank, and the
    server over loopback with 1, 2 and 4 client processes. Each rate is also given as a fraction of
    the compute bound: the measured peak sgemm rate divided by the 2*N*D flops of one query.
    Exits with status 1, after writing everything, when a target is missed (one line names each).
    """
    if device != "cpu":
        from benchmarks import gpu

        _exit_on_missed(gpu.missed(gpu.run_all(device, list(workloads) or None, out_dir=out_dir)))
        return
    from tqdm import tqdm
    from tqdm.contrib.logging import logging_redirect_tqdm

    from benchmarks import report, suite
    from benchmarks.timing import measure_peak
    from benchmarks.workloads import WORKLOADS

    started = time.time()
    settings = suite.Settings(budget_s=seconds or (QUICK_BUDGET_S if quick else 6.0), min_reps=reps,
                              max_reps=max(reps, 10 if quick else 30), clients=clients or (1, 2, 4),
                              threads=threads, seed=seed)
    cap = max_rows if max_rows is not None else (QUICK_MAX_ROWS if quick else None)
    chosen = [WORKLOADS[name].resized(cap, batch) for name in (workloads or tuple(WORKLOADS))]
    goals = report.TARGET_BOUND if bound_goal is None else {name: bound_goal for name in WORKLOADS}
    out_dir.mkdir(parents=True, exist_ok=True)
    # Log records (the bank's, the server's relayed by benchmarks.remote) go through tqdm.write
    # while the bar is up, so each lands on a line of its own instead of inside the bar.
    with logging_redirect_tqdm(), tqdm(total=1 + len(chosen) * suite.steps(settings) + bool(shards), disable=not progress,
                                       file=sys.stderr, desc="fgc-bank bench", unit="step") as bar:
        def tick(what: str) -> None:
            bar.set_postfix_str(what[-40:], refresh=False)
            bar.update()

        peak = measure_peak(peak_size or (2048 if quick else 4096))
        tick(f"peak {peak.gflops:.0f} GFLOP/s")
        results = [suite.run_workload(w, peak, settings, tick) for w in chosen]
        sharded = None
        if shards:
            from benchmarks import shards as shard_bench

            sharded = shard_bench.measure(WORKLOADS["imagenet-512"].resized(cap, batch), shards,
                                          reps=max(reps, 10), threads=threads, seed=seed)
            sharded["judged"] = cap is None
            tick(f"{shards} shards")
    run = {"command": _command_line(click.get_current_context().params), "mode": {"quick": quick, "max_rows": cap},
           "machine": report.machine(), "peak": peak.__dict__, "settings": settings.__dict__,
           "elapsed_s": time.time() - started, "results": results, "bound_goals": goals, "shards": sharded,
           "checks": [c.__dict__ | {"verdict": c.verdict} for c in report.checks(results, goals)]}
    (out_dir / "bench.json").write_text(json.dumps(run, indent=2, default=list) + "\n")
    report.chart(run, out_dir / "bench.png")
    (out_dir / "RESULTS.md").write_text(report.markdown(run, "bench.png"))
    click.echo(report.text_table(results, run["peak"], goals))
    if sharded is not None:
        click.echo("\n" + shard_bench.text(sharded))
    click.echo(f"\nwrote {out_dir / 'bench.json'}, {out_dir / 'bench.png'}, {out_dir / 'RESULTS.md'}")
    _exit_on_missed(report.missed(run))


def _exit_on_missed(missed: list[str]) -> None:
    """Name each missed target on stderr and exit with status 1, so scripts and CI see the miss."""
    for line in missed:
        click.echo(f"fgc-bank bench: {line}", err=True)
    if missed:
        click.get_current_context().exit(1)


def _command_line(params: dict) -> str:
    """The command as typed (``fgc-bank bench ...``), or its parameters when called from Python."""
    if "bench" in sys.argv[1:]:
        return "fgc-bank " + shlex.join(sys.argv[1:])
    return "fgc-bank bench, called from Python with " + ", ".join(f"{k}={v!r}" for k, v in params.items())
