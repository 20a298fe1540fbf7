"""Paired A/B of the CPU search, the in-process bank or the served bank: this tree's against
another checkout's, in alternating blocks.

Run-to-run drift on a shared VM moves whole bench runs by 10-15%; two processes that build the
same rows and queries and take turns (A B, B A, ...) see the same seconds of the machine, so the
ratio of each pair says what changed in the code. Each process imports ``fgc_bank`` from its own
tree (the search module's path before and after the row-store redesign both work)::

    git worktree add /tmp/old 6e5376d
    python -m benchmarks.ab_search --old-tree /tmp/old --rows 50000 --dim 64 --k 200

prints both medians and the new-over-old speed ratio of the pairs (median and range).
``--what bank`` times the in-process bank's ``knn_update`` (validation and execution),
``--what server`` a ``knn`` through a `fgc-bank serve` of each tree, with that tree's client.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

WORKER = """
import sys, time, numpy as np, torch
sys.path.insert(0, {tree!r})
try:
    from fgc_bank.stores.cpu import prefilter
    from fgc_bank.stores.cpu.search import search_inner_product
except ImportError:  # a tree from before the row stores
    from fgc_bank import prefilter
    from fgc_bank.search import search_inner_product
n, d, k, b = {rows}, {dim}, {k}, 256
g = torch.Generator().manual_seed(0)
rows = torch.randn(n, d, generator=g)
rows = (rows / rows.norm(dim=1, keepdim=True)).numpy()
low = prefilter.make(rows, prefilter.best_kind())
rng = np.random.default_rng(1)
queries = [(rows[rng.choice(n, b)] + 0.1 * rng.standard_normal((b, d))).astype(np.float32) for _ in range(4)]
search_inner_product(rows, queries[0], k, low)
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    for i in range(int(line)):
        search_inner_product(rows, queries[i % 4], k, low)
    print((time.perf_counter() - start) / int(line), flush=True)
"""

BANK_WORKER = """
import sys, time, numpy as np
sys.path.insert(0, {tree!r})
from fgc_bank.bank import BankConfig, MemoryBank, SearchUpdate
n, d, k, b = {rows}, {dim}, {k}, {batch}
bank = MemoryBank(BankConfig("ab", n, d, 0.5, "uniform", 0))
rng = np.random.default_rng(1)
ops = [SearchUpdate(rng.choice(n, b, replace=False).astype(np.int64),
                    rng.standard_normal((b, d)).astype(np.float32), k) for _ in range(8)]
for op in ops[:2]:
    bank.validate(op); bank.execute([op])
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    for i in range(int(line)):
        bank.validate(ops[i % 8]); bank.execute([ops[i % 8]])
    print((time.perf_counter() - start) / int(line), flush=True)
"""

SERVER_WORKER = """
import os, subprocess, sys, tempfile, time, numpy as np
sys.path.insert(0, {tree!r})
from fgc_bank import connect
address_file = os.path.join(tempfile.mkdtemp(), "address")
server = subprocess.Popen([sys.executable, "-m", "fgc_bank.cli", "--log-level", "warning", "serve", "--port", "0",
                           "--address-file", address_file], env=dict(os.environ, PYTHONPATH={tree!r}),
                          cwd={tree!r}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
while not (os.path.exists(address_file) and open(address_file).read().strip()):
    time.sleep(0.05)
client = connect(open(address_file).read().strip())
n, d, k, b = {rows}, {dim}, {k}, {batch}
client.create("ab", n, d, init="unit", seed=0)
rng = np.random.default_rng(1)
queries = [rng.standard_normal((b, d)).astype(np.float32) for _ in range(4)]
for q in queries:
    client.knn("ab", q, k)
print("ready", flush=True)
for line in sys.stdin:
    start = time.perf_counter()
    for i in range(int(line)):
        client.knn("ab", queries[i % 4], k)
    print((time.perf_counter() - start) / int(line), flush=True)
client.close()
server.terminate()
server.wait()
"""
WORKERS = {"search": WORKER, "bank": BANK_WORKER, "server": SERVER_WORKER}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old-tree", type=Path, required=True, help="a checkout of the revision to compare with")
    parser.add_argument("--rows", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--k", type=int, default=200)
    parser.add_argument("--batch", type=int, default=256, help="queries per request (bank, server)")
    parser.add_argument("--what", choices=sorted(WORKERS), default="search",
                        help="the raw search, the in-process bank's knn_update, or a served knn")
    parser.add_argument("--requests", type=int, default=20, help="searches per block")
    parser.add_argument("--pairs", type=int, default=16)
    args = parser.parse_args()
    trees = {"old": args.old_tree.resolve(), "new": Path(__file__).resolve().parent.parent}
    workers = {name: subprocess.Popen([sys.executable, "-c", WORKERS[args.what].format(
                                          tree=str(tree), rows=args.rows, dim=args.dim, k=args.k, batch=args.batch)],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
               for name, tree in trees.items()}
    for worker in workers.values():
        assert worker.stdout.readline().strip() == "ready"
    seconds: dict[str, list[float]] = {"old": [], "new": []}
    for pair in range(args.pairs):
        for name in ("old", "new") if pair % 2 == 0 else ("new", "old"):
            workers[name].stdin.write(f"{args.requests}\n")
            workers[name].stdin.flush()
            seconds[name].append(float(workers[name].stdout.readline()))
    for worker in workers.values():
        worker.stdin.close()
        worker.wait()
    ratios = [old / new for old, new in zip(seconds["old"], seconds["new"])]
    print(f"{args.what}, N {args.rows:,} D {args.dim} k {args.k}: old {statistics.median(seconds['old']) * 1e3:.2f} ms, "
          f"new {statistics.median(seconds['new']) * 1e3:.2f} ms a request; new speed / old: median "
          f"{statistics.median(ratios):.3f}, pairs {min(ratios):.3f}-{max(ratios):.3f} ({args.pairs} pairs)")


if __name__ == "__main__":
    main()
