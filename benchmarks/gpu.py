"""The bank on one GPU, side by side with the FGC authors' search on the same GPU.

One run measures, at each workload's shape (B = 256): the GPU's float32 and bfloat16 GEMM rates
(turned into compute bounds, 2 N D flops a query), the paper's float32 ``torch.mm`` + ``topk``,
the torch store in process, ``faiss.knn_gpu`` on the same rows where FAISS built for GPUs is
importable (the ``faiss-gpu`` engine's search; "not installed" otherwise), momentum-update rows
per second, and ``fgc-bank serve --device cuda``
over loopback with 1 and 8 client processes. It prints one table and writes ``gpu.json``.
``make gpu-check`` runs it after the GPU tests::

    python -m benchmarks.gpu --out DIR [--workload imagenet-512 ...] [--requests 40]

Targets (one H100, imagenet-512): server with 8 clients >= 50,000 queries/s; torch store >= 5x
the paper's search and >= 30% of the bfloat16 bound; momentum update >= 10 M rows/s.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks import remote
from benchmarks.torch_store import benchmark as search_benchmark
from benchmarks.workloads import WORKLOADS, Workload
from fgc_bank.bank import momentum_update_


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


TARGETS = {"server_8_clients_qps": 50_000, "store_vs_paper": 5.0, "store_vs_bf16_bound": 0.30,
           "update_rows_per_s": 10e6}


def gemm_tflops(dtype: torch.dtype, device: torch.device, size: int = 8192, repeats: int = 10) -> float:
    """Measured dense GEMM rate (TF32 off for float32)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        torch.mm(a, b)
        _sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            torch.mm(a, b)
        _sync(device)
        return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e12
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def update_rows_per_s(workload: Workload, device: torch.device, repeats: int = 50) -> float:
    """FGC's momentum update of B rows at a time into the workload's bank, on the GPU."""
    rows = torch.nn.functional.normalize(torch.randn(workload.rows, workload.dim, device=device), dim=1)
    values = torch.randn(workload.batch, workload.dim, device=device)
    ids = [torch.randperm(workload.rows, device=device)[:workload.batch] for _ in range(8)]
    momentum_update_(rows, ids[0], values, 0.5)
    _sync(device)
    start = time.perf_counter()
    for i in range(repeats):
        momentum_update_(rows, ids[i % 8], values, 0.5)
    _sync(device)
    return repeats * workload.batch / (time.perf_counter() - start)


def server_qps(workload: Workload, device: str, clients: int, requests: int) -> float:
    """Aggregate queries/s of ``clients`` processes sending knn requests to a GPU server."""
    cfg = workload.bank_config(0)
    with remote.Server(threads=1, device=device) as server:
        from fgc_bank import connect

        with connect(server.address, **remote.CLIENT_OPTIONS) as client:
            client.create(cfg.name, cfg.rows, cfg.dim, momentum=cfg.momentum, init=cfg.init, seed=cfg.seed)
        with remote.Fleet(server.address, workload, cfg.name, clients, seed=1) as fleet:
            return remote.aggregate_qps(fleet.run("knn", requests, clients), workload.batch)


def run(workload: Workload, device: torch.device, requests: int, peaks: dict[str, float]) -> dict[str, Any]:
    search = search_benchmark(device, workload.rows, workload.dim, workload.batch, workload.k, repeats=10)
    result: dict[str, Any] = {"workload": workload.name, **search}
    flops = workload.flops_per_query
    result["fp32_bound_qps"] = peaks["fp32_tflops"] * 1e12 / flops
    result["bf16_bound_qps"] = peaks["bf16_tflops"] * 1e12 / flops
    result["store_vs_paper"] = search["torch_store_qps"] / search["float32_mm_topk_qps"]
    result["store_vs_bf16_bound"] = search["torch_store_qps"] / result["bf16_bound_qps"]
    result["update_rows_per_s"] = update_rows_per_s(workload, device)
    for clients in (1, 8):
        result[f"server_{clients}_clients_qps"] = server_qps(workload, str(device), clients, requests)
    return result


def run_all(device: str, workloads: list[str] | None = None, requests: int = 40, out_dir: Path = Path("."),
            gemm_size: int = 8192) -> list[dict[str, Any]]:
    """Every measurement on every workload; prints the table and the targets, writes gpu.json."""
    where = torch.device(device)
    peaks = {"fp32_tflops": gemm_tflops(torch.float32, where, gemm_size),
             "bf16_tflops": gemm_tflops(torch.bfloat16, where, gemm_size)}
    name = torch.cuda.get_device_name(where) if where.type == "cuda" else "cpu"
    print(f"{name}: GEMM float32 {peaks['fp32_tflops']:.1f} TFLOP/s, bfloat16 {peaks['bf16_tflops']:.1f} TFLOP/s")
    results = [run(WORKLOADS[w], where, requests, peaks) for w in workloads or ["cifar", "imagenet-128", "imagenet-512"]]
    keys = ["float32_mm_topk_qps", "torch_store_qps", "faiss_knn_gpu_qps", "store_vs_paper", "store_vs_bf16_bound",
            "server_1_clients_qps", "server_8_clients_qps", "update_rows_per_s", "fallbacks"]
    print("workload".ljust(14) + "".join(k.ljust(22) for k in keys))
    for r in results:
        print(r["workload"].ljust(14) + "".join(_cell(r.get(k)) for k in keys))
    for r in results:
        if "faiss_knn_gpu_qps" in r:
            print(f"{r['workload']}: torch store / faiss.knn_gpu = {r['store_vs_faiss_knn_gpu']:.3g} (same rows, same GPU)")
        else:
            print(f"{r['workload']}: faiss.knn_gpu {r['faiss_knn_gpu']}")
    for r in results:
        if r["workload"] == "imagenet-512":
            for key, goal in TARGETS.items():
                print(f"target {key}: {r[key]:.4g} (goal {goal:g}) {'met' if r[key] >= goal else 'MISSED'}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "gpu.json").write_text(json.dumps({"device": name, "peaks": peaks, "results": results}, indent=2))
    chart(results, name, out_dir / "gpu.png")
    return results


def _cell(value: float | None) -> str:
    """A table cell: the number, or "not installed" for a contender that did not run."""
    return ("not installed" if value is None else f"{value:.4g}").ljust(22)


def missed(results: list[dict[str, Any]]) -> list[str]:
    """One line per target (imagenet-512 only) the run missed; empty when all were met."""
    return [f"missed target: imagenet-512: {key} = {r[key]:.4g}, goal >= {goal:g}"
            for r in results if r["workload"] == "imagenet-512"
            for key, goal in TARGETS.items() if r[key] < goal]


SERIES = (("float32_mm_topk_qps", "paper: float32 torch.mm + topk", "#999999", "//"),
          ("torch_store_qps", "fgc-bank torch store, in process", "#1f77b4", ""),
          ("faiss_knn_gpu_qps", "faiss.knn_gpu (engine faiss-gpu), in process", "#2ca02c", "\\\\"),
          ("server_1_clients_qps", "fgc-bank server, 1 client", "#ff7f0e", ""),
          ("server_8_clients_qps", "fgc-bank server, 8 clients", "#d62728", ""))


def chart(results: list[dict[str, Any]], device: str, path: Path) -> None:
    """Queries/s of each contender per workload (log axis), the bfloat16 and float32 GEMM bounds
    as markers, the served target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    series = [s for s in SERIES if any(s[0] in r for r in results)]  # faiss.knn_gpu where installed
    width = 0.8 / len(series)
    for i, (key, label, colour, hatch) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(results))]
        ax.bar(xs, [r.get(key, 0) for r in results], width, label=label, color=colour, hatch=hatch, edgecolor="black")
    for j, r in enumerate(results):
        ax.plot([j - 0.4, j + 0.4], [r["bf16_bound_qps"]] * 2, color="black", linestyle="--",
                label="bfloat16 GEMM bound" if j == 0 else None)
        ax.plot([j - 0.4, j + 0.4], [r["fp32_bound_qps"]] * 2, color="black", linestyle=":",
                label="float32 GEMM bound" if j == 0 else None)
    ax.axhline(TARGETS["server_8_clients_qps"], color="#d62728", linewidth=0.8, label="target: 50,000 queries/s (imagenet-512, 8 clients)")
    ax.set_yscale("log")
    ax.set_ylabel("queries/s (B = 256)")
    ax.set_xticks(range(len(results)), [f"{r['workload']}\nN={r['n']:,} D={r['d']} k={r['k']}" for r in results])
    ax.set_title(f"fgc-bank on {device}: kNN throughput against the FGC paper's search", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--workload", action="append", choices=sorted(WORKLOADS))
    parser.add_argument("--requests", type=int, default=40, help="knn requests per client process")
    parser.add_argument("--gemm-size", type=int, default=8192, help="side of the square GEMMs that measure the peaks")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    run_all(args.device, args.workload, args.requests, args.out, args.gemm_size)


if __name__ == "__main__":
    main()
