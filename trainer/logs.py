"""Where a run's numbers go (rank 0 only): ``metrics.jsonl`` always, TensorBoard when asked.

Every JSONL record carries the wall-clock time (``time``, UTC, ISO 8601) and the global training
step it was written at (``global_step``: optimizer steps taken since epoch 0), so records from a
resumed run line up with the first part. TensorBoard (``torch.utils.tensorboard``) is optional:
without the ``tensorboard`` package a run asked to use it says so once and keeps the JSONL.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

TENSORBOARD_DIR = "tensorboard"
# JSONL key -> TensorBoard tag: what an epoch record shows as curves.
SCALARS = {
    "train_loss": "train/loss", "train_ce": "train/ce", "train_bs": "train/batch_shaping",
    "train_l0": "train/l0", "train_gate": "train/gate_contrastive", "train_top1": "train/top1",
    "train_density": "train/gate_density", "test_top1": "test/top1",
    "test_density": "test/gate_density", "macs_kept": "test/macs_kept", "lr": "schedule/lr",
    "rho": "schedule/rho", "kappa": "schedule/kappa", "bs_weight": "schedule/bs_weight",
    "bank_wait_s": "bank/wait_s", "seconds": "time/epoch_s",
}


class MetricsLog:
    """Append-only JSONL metrics, one JSON object a line, stamped with time and global step."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict[str, Any], global_step: int) -> None:
        if self.path is None:
            return
        stamped = {"time": datetime.now(UTC).isoformat(timespec="milliseconds"),
                   "global_step": global_step, **record}
        with self.path.open("a") as f:
            f.write(json.dumps(stamped, sort_keys=True) + "\n")


class TensorBoardLog:
    """The epoch records' scalars as TensorBoard curves against the global step.

    Use :meth:`open`: it returns None (after one warning) when ``tensorboard`` is missing.
    """

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    @classmethod
    def open(cls, log_dir: Path) -> TensorBoardLog | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            logger.warning("--tensorboard: the tensorboard package is not installed (pip install "
                           "tensorboard); this run logs to metrics.jsonl only")
            return None
        return cls(SummaryWriter(str(log_dir)))

    def write(self, record: dict[str, Any], global_step: int) -> None:
        for key, value in epoch_scalars(record).items():
            self.writer.add_scalar(SCALARS[key], value, global_step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The numbers of an epoch record that TensorBoard shows (keys of :data:`SCALARS`)."""
    return {key: float(record[key]) for key in SCALARS if isinstance(record.get(key), (int, float))}
