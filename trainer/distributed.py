"""torch.distributed set-up for torchrun (gloo on CPU, nccl on GPU) and the few collectives we use.

Without torchrun's environment (``RANK``/``WORLD_SIZE`` unset) everything runs as a single process
with no process group, and the collectives below are identities.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from fgc_bank.torch import all_gather_rows as fgc_all_gather_rows
from trainer.errors import TrainerError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints, logs metrics and writes checkpoints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int, local_world: int = 1) -> torch.device:
    """``auto``: this rank's GPU when CUDA is available, else the CPU. ``cuda``: this rank's GPU
    (``LOCAL_RANK``); ``cuda:N``: GPU N + LOCAL_RANK, so that the ranks of a node take GPUs N,
    N+1, ... (N alone for a single process). TrainerError for a device that is not there."""
    if preference == "auto":
        preference = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError):
        raise TrainerError(f"--device {preference!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise TrainerError(f"--device {preference!r}: training runs on cpu or cuda devices")
    if not torch.cuda.is_available():
        raise TrainerError(f"--device {preference!r}: this torch has no CUDA GPU (torch {torch.__version__})")
    index = (device.index or 0) + local_rank
    if index >= torch.cuda.device_count():
        raise TrainerError(f"--device {preference!r}: local rank {local_rank} of {local_world} needs GPU {index}, "
                           f"and torch sees {torch.cuda.device_count()}")
    return torch.device("cuda", index)


def init_distributed(device_preference: str = "auto") -> DistContext:
    """Join torchrun's process group if launched by it; pick this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        logger.info("rank %d/%d joined the %s process group on %s", rank, world, backend, device)
    return DistContext(rank, world, local_rank, device)


def shutdown() -> None:
    """Leave the process group, if any."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_sum(tensor: Tensor, ctx: DistContext) -> Tensor:
    """Sum over ranks, in place; returns ``tensor``."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_rows(ids: Tensor, rows: dict[int, Tensor], ctx: DistContext
                    ) -> tuple[Tensor, dict[int, Tensor]]:
    """Every rank's ``ids`` and rows concatenated in rank order, identically on every rank
    (``fgc_bank.torch.all_gather_rows``); the inputs themselves in a single process."""
    if not ctx.distributed:
        return ids, rows
    return fgc_all_gather_rows(ids, rows)
