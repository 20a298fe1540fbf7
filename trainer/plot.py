"""A run's history as one PNG: test top-1 and MACs kept per epoch, BAS then FGC.

An FGC run started with ``--init-from`` records where its weights came from (a ``start`` record
in ``metrics.jsonl``), so its plot begins with the BAS run's epochs before its own. matplotlib is
optional (``pip install 'fgc-bank[plot]'``): without it the run ends as usual and says, in one
line, that no plot was drawn.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from trainer.checkpoint import METRICS_FILE

logger = logging.getLogger(__name__)

PLOT_FILE = "run.png"
PHASE_COLOURS = {"bas": "tab:blue", "fgc": "tab:orange"}


def _records(out_dir: Path) -> list[dict[str, Any]]:
    path = out_dir / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_history(out_dir: str | Path, _seen: frozenset[Path] = frozenset()) -> list[dict[str, Any]]:
    """The epoch records of the run in ``out_dir``, preceded by those of the runs it was started
    from (``--init-from``), one per epoch, in epoch order (a resumed epoch: its last record)."""
    out_dir = Path(out_dir).resolve()
    records = _records(out_dir)
    by_epoch: dict[int, dict[str, Any]] = {}
    for record in records:
        origin = record.get("init_from")
        if record.get("event") == "start" and origin and Path(origin).parent.resolve() not in _seen | {out_dir}:
            for earlier in run_history(Path(origin).parent, _seen | {out_dir}):
                if earlier["epoch"] < record["start_epoch"]:
                    by_epoch.setdefault(earlier["epoch"], earlier)
    for record in records:
        if record.get("event") == "epoch":
            by_epoch[record["epoch"]] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def plot_run(out_dir: str | Path, path: str | Path | None = None) -> Path | None:
    """Draw ``run.png`` (or ``path``) from :func:`run_history`; None when there is nothing to
    draw or matplotlib is missing (said in one warning)."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        logger.warning("no run plot: matplotlib is not installed (pip install 'fgc-bank[plot]')")
        return None
    history = run_history(out_dir)
    if not history:
        return None
    figure = Figure(figsize=(7, 5.5), layout="constrained")  # no pyplot: no global state
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, sharex=True)
    for axes, key, label in ((top, "test_top1", "test top-1 (%)"), (bottom, "macs_kept", "MACs kept (%)")):
        for phase, colour in PHASE_COLOURS.items():
            points = [(r["epoch"], 100 * r[key]) for r in history if r.get("phase") == phase]
            if points:
                axes.plot(*zip(*points, strict=True), marker=".", color=colour, label=phase.upper())
        axes.set_ylabel(label)
        axes.grid(alpha=0.3)
    fgc = [r["epoch"] for r in history if r.get("phase") == "fgc"]
    if fgc:
        for axes in (top, bottom):
            axes.axvline(min(fgc) - 0.5, color="grey", linestyle=":", linewidth=1)
    top.legend(loc="lower right")
    top.set_title(f"{Path(out_dir).name}: {history[-1].get('phase', '').upper()} run, "
                  f"{len(history)} epochs")
    bottom.set_xlabel("epoch")
    target = Path(path) if path is not None else Path(out_dir) / PLOT_FILE
    figure.savefig(target, dpi=100)
    return target
