"""Multiply-accumulate counts of a gated ResNet, dense and as kept by its gates.

A gate switches off channels of h = relu(bn1(conv1(x))): a closed channel is neither computed by
conv1 nor read by conv2, so both convs of a block scale by the block's fraction of open gates
(FGC's evaluation does the same). The stem, projection shortcuts and classifier always run; the
gate MLPs are extra work that the dense network does not have, and are counted in the kept MACs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from trainer.models import GatedResNet

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class MacProfile:
    """MACs of one image through the network, split by how gating affects them."""

    fixed: int  # stem, projection shortcuts, classifier: always computed
    blocks: tuple[int, ...]  # per block: conv1 + conv2, scaled by that block's gate density
    gate: int  # all gate MLPs (1x1 convs on pooled inputs)

    @property
    def dense(self) -> int:
        """MACs of the same network without gates."""
        return self.fixed + sum(self.blocks)

    def gated(self, densities: Sequence[float]) -> float:
        """Expected MACs per image given each block's fraction of open gates."""
        if len(densities) != len(self.blocks):
            raise ValueError(f"need one density per block ({len(self.blocks)}), "
                             f"got {len(densities)}")
        return self.fixed + sum(d * m for d, m in zip(densities, self.blocks)) + self.gate

    def kept(self, densities: Sequence[float]) -> float:
        """Gated MACs (gate MLPs included) as a fraction of the dense network's."""
        return self.gated(densities) / self.dense


def _layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        per_output = module.in_channels // module.groups * kh * kw
        return per_output * module.out_channels * output.shape[2] * output.shape[3]
    return module.in_features * module.out_features  # nn.Linear


@torch.no_grad()
def profile_macs(model: GatedResNet, input_shape: tuple[int, int, int]) -> MacProfile:
    """Count MACs with one forward of a zero image (eval mode, BN statistics untouched).

    Parameters
    ----------
    model : the gated network (not wrapped in DDP).
    input_shape : (C, H, W) of one image.
    """
    role: dict[int, str] = {}
    for index, block in enumerate(model.blocks):
        role[id(block.conv1)] = role[id(block.conv2)] = f"block{index}"
        role.update({id(m): "gate" for m in block.gate.modules()})
    counts: dict[str, int] = {}

    def hook(module: nn.Module, _inputs: object, output: torch.Tensor) -> None:
        key = role.get(id(module), "fixed")
        counts[key] = counts.get(key, 0) + _layer_macs(module, output)

    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    handles = [m.register_forward_hook(hook) for m in layers]
    was_training = model.training
    try:
        model.eval()
        device = next(model.parameters()).device
        model(torch.zeros((1, *input_shape), device=device))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    blocks = tuple(counts.get(f"block{i}", 0) for i in range(len(model.blocks)))
    return MacProfile(counts.get("fixed", 0), blocks, counts.get("gate", 0))
