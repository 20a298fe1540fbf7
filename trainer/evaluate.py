"""Evaluation: top-1 accuracy, gate density and MACs kept, summed over every rank's shard."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader

from trainer.distributed import DistContext, all_reduce_sum
from trainer.macs import MacProfile
from trainer.models import GatedResNet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalResult:
    """Test-set results; gates are thresholded (evaluation mode)."""

    top1: float  # fraction of correct predictions
    density: float  # fraction of open gates over every gate of every block
    block_density: tuple[float, ...]  # per block
    macs_kept: float  # gated MACs (gate MLPs included) / dense MACs
    gated_macs: float  # expected MACs per image
    dense_macs: int  # MACs per image of the network without gates
    examples: int

    def summary(self) -> str:
        return (f"top-1 {100 * self.top1:.2f}% | gate density {100 * self.density:.1f}% | "
                f"MACs kept {100 * self.macs_kept:.1f}% ({self.gated_macs / 1e6:.2f}M of "
                f"{self.dense_macs / 1e6:.2f}M dense, gate MLPs included) | {self.examples} images")


@torch.no_grad()
def evaluate(model: GatedResNet, loader: DataLoader, macs: MacProfile,
             ctx: DistContext) -> EvalResult:
    """Evaluate the (unwrapped) model on this rank's shard and combine all ranks.

    Call it on every rank with the plain module, not the DDP wrapper: shards may differ in
    length, and DDP's forward would wait on collectives the shorter shard never joins.
    """
    was_training = model.training
    model.eval()
    channels = torch.tensor(model.block_channels, dtype=torch.float64, device=ctx.device)
    totals = torch.zeros(2 + len(channels), dtype=torch.float64, device=ctx.device)
    for images, labels, _ in loader:
        images, labels = images.to(ctx.device), labels.to(ctx.device)
        out = model(images)
        totals[0] += (out.logits.argmax(1) == labels).sum()
        totals[1] += len(labels)
        totals[2:] += torch.stack([g.sum(dtype=torch.float64) for g in out.gates])
    model.train(was_training)
    all_reduce_sum(totals, ctx)
    examples = max(int(totals[1]), 1)
    block_density = (totals[2:] / (examples * channels)).tolist()
    density = float(totals[2:].sum() / (examples * channels.sum()))
    return EvalResult(float(totals[0]) / examples, density, tuple(block_density),
                      macs.kept(block_density), macs.gated(block_density), macs.dense,
                      int(totals[1]))
