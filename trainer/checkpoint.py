"""Checkpoints: the run's config, where it stopped, model and optimizer state, and both banks.

Files are written atomically (temporary file, then rename), so a crash mid-save leaves the previous
checkpoint intact, and read with ``torch.load(weights_only=True)``: tensors and plain data only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from trainer.errors import TrainerError

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
CHECKPOINT_FILE = "checkpoint.pt"  # the latest state: what --resume continues
BEST_FILE = "best.pt"  # the weights of the epoch with the best test top-1 so far
METRICS_FILE = "metrics.jsonl"
RUN_FILES = (CHECKPOINT_FILE, BEST_FILE, METRICS_FILE)  # what marks a directory as holding a run


@dataclass(frozen=True)
class Checkpoint:
    """Everything needed to continue a run."""

    config: dict[str, Any]  # TrainConfig.to_dict()
    epoch: int  # epochs completed: a resumed run starts at this epoch
    fgc_start: int | None  # first epoch of the FGC phase (None: BAS)
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None = None
    gate_bank: dict[str, torch.Tensor] | None = None  # block -> (N, C) rows
    feature_banks: dict[str, torch.Tensor] | None = None  # block -> (N, C) rows, if saved
    best_top1: float = 0.0
    bank_snapshot: str | None = None  # the bank server's snapshot taken with this checkpoint


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> None:
    """Write ``checkpoint`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save({"format": CHECKPOINT_FORMAT, **asdict(checkpoint)}, tmp)
    os.replace(tmp, path)
    logger.info("saved checkpoint %s (epoch %d)", path, checkpoint.epoch)


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, or say why it cannot be used."""
    path = Path(path)
    if not path.is_file():
        raise TrainerError(f"checkpoint {path} does not exist; pass the checkpoint.pt that a "
                           "previous fgc-train run wrote into its --out-dir")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a corrupt or foreign file
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        raise TrainerError(f"cannot read checkpoint {path} ({exc.__class__.__name__}: {first}); "
                           "is it a checkpoint.pt written by fgc-train?") from exc
    if not isinstance(raw, dict) or raw.get("format") != CHECKPOINT_FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise TrainerError(f"{path} is not an fgc-train checkpoint of format {CHECKPOINT_FORMAT} "
                           f"(found {found!r}); use a checkpoint written by this version")
    raw.pop("format")
    try:
        return Checkpoint(**raw)
    except TypeError as exc:
        raise TrainerError(f"checkpoint {path} has unexpected contents: {exc}") from exc


def check_run_dir(out_dir: str | Path) -> None:
    """Refuse to start a new run in a directory that holds one: it would be overwritten or its
    metrics appended to. ``--resume`` continues a run and skips this check."""
    found = [name for name in RUN_FILES if (Path(out_dir) / name).exists()]
    if found:
        raise TrainerError(f"--out-dir {out_dir} already holds a run ({', '.join(found)}); "
                           f"continue it with --resume {Path(out_dir) / CHECKPOINT_FILE}, or "
                           "give another --out-dir")
