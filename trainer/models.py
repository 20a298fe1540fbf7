"""Gated ResNets for FGC: CIFAR ResNet-20/32/56 (option-A shortcuts) and ImageNet ResNet-18/34.

Every BasicBlock carries a :class:`~trainer.gates.Gate` that switches off channels of its first
conv. ``forward`` returns everything the losses need (:class:`GatedOutput`): the logits, every
block's gate probabilities and binary gates, and, for each contrasted block, its pooled features
and gate logits. Nothing is stored on the modules during ``forward``.

A contrasted block's features exist before the rest of the network has run; ``forward`` accepts an
``on_features(block_index, features)`` callback, called right then, so a trainer can send the kNN
request to the bank and let the rest of the forward overlap it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.errors import TrainerError
from trainer.gates import GATE_HIDDEN, GATE_TAU, Gate

logger = logging.getLogger(__name__)

FeatureHook = Callable[[int, Tensor], None]
"""``on_features(block_index, features)``: features is (B, C), detached."""

CIFAR_DEPTHS = {"resnet20": 3, "resnet32": 5, "resnet56": 9}  # blocks per stage
IMAGENET_LAYERS = {"resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
ARCHS = tuple(CIFAR_DEPTHS) + tuple(IMAGENET_LAYERS)


def default_contrast_blocks(arch: str) -> tuple[int, ...]:
    """FGC contrasts the deepest gated blocks: the architecture's last two (ResNet-20: 7 and 8, as
    published; ResNet-18: 6 and 7; ResNet-34: 14 and 15)."""
    blocks = 3 * CIFAR_DEPTHS[arch] if arch in CIFAR_DEPTHS else sum(IMAGENET_LAYERS[arch])
    return (blocks - 2, blocks - 1)


@dataclass(frozen=True)
class BlockTaps:
    """What FGC reads from one contrasted block."""

    features: Tensor  # (B, C) avgpool(h), detached: goes to the feature bank
    gate_logits: Tensor  # (B, C) a: goes into the gate contrastive loss and the gate bank


@dataclass(frozen=True)
class GatedOutput:
    """The network's forward result."""

    logits: Tensor  # (B, num_classes)
    gate_probs: list[Tensor]  # per block, (B, C_b) sigmoid(a): L0 and batch-shaping losses
    gates: list[Tensor]  # per block, (B, C_b) binary gates actually applied: density, MACs
    taps: dict[int, BlockTaps]  # per contrasted block index


@dataclass(frozen=True)
class BlockOutput:
    out: Tensor  # (B, planes, H', W')
    features: Tensor  # (B, planes), detached
    gate_logits: Tensor  # (B, planes)
    gates: Tensor  # (B, planes)


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by ``stride`` and zero-pad the new channels (no parameters)."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.pad = (planes - in_planes) // 2

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, self.pad, self.pad))


def _shortcut(in_planes: int, planes: int, stride: int, option: str) -> nn.Module:
    if stride == 1 and in_planes == planes:
        return nn.Identity()
    if option == "A":
        return PadShortcut(in_planes, planes, stride)
    return nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                         nn.BatchNorm2d(planes))


class GatedBasicBlock(nn.Module):
    """h = relu(bn1(conv1(x))); out = relu(bn2(conv2(h * g)) + shortcut(x)), g = gate(x).

    Parameters
    ----------
    in_planes, planes : input and output channels; the gate has ``planes`` channels.
    stride : stride of conv1 (and of the shortcut).
    shortcut : "A" (pad, CIFAR) or "B" (1x1 conv + BN, ImageNet).
    gate_hidden, gate_tau : the gate MLP's hidden width and Gumbel temperature.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, shortcut: str,
                 gate_hidden: int = GATE_HIDDEN, gate_tau: float = GATE_TAU) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _shortcut(in_planes, planes, stride, shortcut)
        self.gate = Gate(in_planes, planes, gate_hidden, gate_tau)
        self.planes = planes

    def forward(self, x: Tensor, on_features: Callable[[Tensor], None] | None = None) -> BlockOutput:
        h = F.relu(self.bn1(self.conv1(x)))  # (B, planes, H', W')
        features = h.detach().mean(dim=(2, 3))  # (B, planes): FGC's feature, before gating
        if on_features is not None:
            on_features(features)
        gate_logits, gates = self.gate(x)  # (B, planes) each
        out = self.bn2(self.conv2(h * gates[:, :, None, None]))
        return BlockOutput(F.relu(out + self.shortcut(x)), features, gate_logits, gates)


class GatedResNet(nn.Module):
    """A stem, a flat list of gated blocks, global average pooling and a linear classifier.

    Parameters
    ----------
    stem : module from the image to the first block's input.
    blocks : the gated blocks, in order; block indices (for ``contrast_blocks``) count from 0.
    width : channels of the last block.
    num_classes : classifier outputs.
    contrast_blocks : indices of the blocks whose features and gate logits FGC contrasts.
    """

    def __init__(self, stem: nn.Module, blocks: Sequence[GatedBasicBlock], width: int,
                 num_classes: int, contrast_blocks: Sequence[int] = ()) -> None:
        super().__init__()
        bad = [b for b in contrast_blocks if not 0 <= b < len(blocks)]
        if bad:
            raise TrainerError(f"contrasted block(s) {bad} do not exist: this network has "
                               f"{len(blocks)} gated blocks, numbered 0..{len(blocks) - 1}")
        self.stem = stem
        self.blocks = nn.ModuleList(blocks)
        self.fc = nn.Linear(width, num_classes)
        self.contrast_blocks = tuple(sorted(set(contrast_blocks)))

    @property
    def block_channels(self) -> list[int]:
        """Gate channels of each block, in order."""
        return [block.planes for block in self.blocks]

    def forward(self, x: Tensor, on_features: FeatureHook | None = None) -> GatedOutput:
        """Run the network.

        Parameters
        ----------
        x : (B, C_in, H, W) images.
        on_features : called as ``on_features(block_index, features)`` for each contrasted
            block, as soon as that block's (B, C) detached features exist.
        """
        out = self.stem(x)
        gate_probs, gates, taps = [], [], {}
        for index, block in enumerate(self.blocks):
            contrasted = index in self.contrast_blocks
            hook = partial(on_features, index) if contrasted and on_features else None
            result = block(out, hook)
            out = result.out
            gate_probs.append(torch.sigmoid(result.gate_logits))
            gates.append(result.gates)
            if contrasted:
                taps[index] = BlockTaps(result.features, result.gate_logits)
        logits = self.fc(out.mean(dim=(2, 3)))
        return GatedOutput(logits, gate_probs, gates, taps)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """SGD parameter groups: gate parameters get no weight decay (FGC), the rest do."""
        gate_ids = {id(p) for m in self.modules() if isinstance(m, Gate) for p in m.parameters()}
        gate = [p for p in self.parameters() if id(p) in gate_ids]
        rest = [p for p in self.parameters() if id(p) not in gate_ids]
        return [{"params": rest, "weight_decay": weight_decay},
                {"params": gate, "weight_decay": 0.0}]


def _init_weights(model: nn.Module, mode: str) -> None:
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode=mode, nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _cifar_resnet(per_stage: int, num_classes: int, in_channels: int, contrast: Sequence[int],
                  gate_hidden: int, gate_tau: float) -> GatedResNet:
    stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1, bias=False),
                         nn.BatchNorm2d(16), nn.ReLU(inplace=True))
    blocks, in_planes = [], 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        for i in range(per_stage):
            blocks.append(GatedBasicBlock(in_planes, planes, stride if i == 0 else 1, "A",
                                          gate_hidden, gate_tau))
            in_planes = planes
    model = GatedResNet(stem, blocks, 64, num_classes, contrast)
    _init_weights(model, "fan_in")  # as FGC's CIFAR code (kaiming_normal_ defaults)
    return model


def _imagenet_resnet(layers: Sequence[int], num_classes: int, in_channels: int,
                     contrast: Sequence[int], gate_hidden: int, gate_tau: float) -> GatedResNet:
    stem = nn.Sequential(nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False),
                         nn.BatchNorm2d(64), nn.ReLU(inplace=True),
                         nn.MaxPool2d(3, stride=2, padding=1))
    blocks, in_planes = [], 64
    for stage, count in enumerate(layers):
        planes = 64 * 2**stage
        for i in range(count):
            stride = 2 if stage > 0 and i == 0 else 1
            blocks.append(GatedBasicBlock(in_planes, planes, stride, "B", gate_hidden, gate_tau))
            in_planes = planes
    model = GatedResNet(stem, blocks, in_planes, num_classes, contrast)
    _init_weights(model, "fan_out")  # as torchvision's ResNet
    return model


def build_model(arch: str, num_classes: int, in_channels: int = 3,
                contrast_blocks: Sequence[int] = (), gate_hidden: int = GATE_HIDDEN,
                gate_tau: float = GATE_TAU) -> GatedResNet:
    """Build a gated ResNet by name: resnet20/32/56 (CIFAR) or resnet18/34 (ImageNet)."""
    if arch in CIFAR_DEPTHS:
        return _cifar_resnet(CIFAR_DEPTHS[arch], num_classes, in_channels, contrast_blocks,
                             gate_hidden, gate_tau)
    if arch in IMAGENET_LAYERS:
        return _imagenet_resnet(IMAGENET_LAYERS[arch], num_classes, in_channels, contrast_blocks,
                                gate_hidden, gate_tau)
    raise TrainerError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
