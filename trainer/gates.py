"""FGC's channel gate: a small MLP on the block input, Gumbel-sigmoid straight-through in training.

The gate returns its logits and its binary gates; it keeps nothing on ``self`` between calls.
Its temperature is a buffer (so it moves with the module and is checkpointed).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

GATE_HIDDEN = 16
GATE_TAU = 2.0 / 3.0


def logistic_noise(like: Tensor) -> Tensor:
    """l = log u - log(1 - u), u ~ U(0, 1), shaped like ``like`` (u kept off 0 and 1)."""
    tiny = torch.finfo(like.dtype).tiny
    u = torch.rand_like(like).clamp_(tiny, 1.0 - torch.finfo(like.dtype).eps)
    return torch.log(u) - torch.log1p(-u)


def gumbel_sigmoid_st(logits: Tensor, tau: Tensor | float, noise: Tensor) -> Tensor:
    """Straight-through Gumbel-sigmoid gates.

    y = (a + l) / tau. The forward value is exactly 1[y > 0]; the backward pass uses the gradient
    of sigmoid(y), i.e. sigmoid(y) (1 - sigmoid(y)) / tau w.r.t. a.

    Parameters
    ----------
    logits : (B, C) gate logits a.
    tau : temperature (FGC: 2/3), a scalar or a 0-d tensor.
    noise : (B, C) logistic noise l (see :func:`logistic_noise`).

    Returns
    -------
    (B, C) tensor of 0.0 / 1.0 values, differentiable w.r.t. ``logits``.
    """
    y = (logits + noise) / tau
    soft = torch.sigmoid(y)
    hard = (y > 0).to(logits.dtype)
    return hard + (soft - soft.detach())  # value: hard exactly; gradient: that of soft


class Gate(nn.Module):
    """Gate MLP: global average pool -> 1x1 conv (in -> 16, no bias) -> BN -> ReLU -> 1x1 conv.

    Parameters
    ----------
    in_channels : channels of the block input x.
    channels : number of gates (the block's ``planes``).
    hidden : width of the hidden layer (FGC: 16).
    tau : Gumbel-sigmoid temperature (FGC: 2/3), stored as a buffer.
    """

    def __init__(self, in_channels: int, channels: int, hidden: int = GATE_HIDDEN,
                 tau: float = GATE_TAU) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(in_channels, hidden, kernel_size=1, bias=False)
        self.bn = nn.BatchNorm2d(hidden)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, bias=True)
        self.register_buffer("tau", torch.tensor(float(tau)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Gate logits and gates for block input ``x``.

        Parameters
        ----------
        x : (B, C_in, H, W) block input.

        Returns
        -------
        logits : (B, C) gate logits a.
        gates : (B, C) binary gates: straight-through Gumbel-sigmoid in training,
            1[sigmoid(a) > 0.5] in evaluation.
        """
        hidden = torch.relu(self.bn(self.fc1(self.pool(x))))  # (B, hidden, 1, 1)
        logits = self.fc2(hidden).flatten(1)  # (B, C)
        if self.training:
            return logits, gumbel_sigmoid_st(logits, self.tau, logistic_noise(logits))
        return logits, (torch.sigmoid(logits) > 0.5).to(logits.dtype)
