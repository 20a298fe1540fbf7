"""FGC's training losses: batch-shaping, L0 (with its ramp) and the gate contrastive loss.

Everything here is a pure function of tensors, usable by any trainer: no module state, no bank
writes. The gate contrastive loss reads a gate bank as a constant; updating that bank is the
caller's job, in its own visible ``no_grad`` step (``fgc_bank.bank.momentum_update_``).

The exact definitions are in ``FGC.md`` (shared with this repository); the comments below name the
step they implement.

Limits
------
* The Beta CDF is computed here, on the tensor's device, by a continued fraction in float64 (torch
  has no ``betainc``). ``batch_shaping_loss`` therefore needs a device with float64 support.
* ``gate_contrastive_loss`` materialises a (B, N) logit matrix: the exact loss is meant for a gate
  bank that fits beside the model. ``sampled_gate_contrastive_loss`` is the approximation for banks
  that do not.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

BETA_A = 0.6  # batch-shaping prior Beta(0.6, 0.4): most gates near 0 or 1, 60% open on average
BETA_B = 0.4
GATE_EPS = 1e-7  # FGC.md step 3: inside the log, damps instances whose positives carry ~no mass
GATE_TEMPERATURE = 0.07
_TINY = 1e-300


def _nonzero(t: Tensor) -> Tensor:
    """Lentz's guard: replace values too close to zero by a tiny number."""
    return torch.where(t.abs() < _TINY, _TINY, t)


def _cf_iterations(a: float, b: float) -> int:
    """Continued-fraction terms for float64 accuracy: about sqrt(max(a, b)) (Numerical Recipes).

    Measured against scipy: Beta(0.6, 0.4) needs 9 terms, Beta(5, 0.5) 15.
    """
    return 10 + math.ceil(3.0 * math.sqrt(max(a, b, 1.0)))


def _beta_continued_fraction(x: Tensor, swap: Tensor, a: float, b: float) -> Tensor:
    """The continued fraction of I_x(a, b) (modified Lentz), elementwise.

    Where ``swap`` is set, the fraction of I_x(b, a) is evaluated instead. The coefficients of
    term m are x times a scalar that depends only on (a, b, m), so each term costs a handful of
    vectorised operations whatever the tensor's size.
    """

    def coef(value: float, swapped: float) -> Tensor:
        return torch.where(swap, x * swapped, x * value)  # stays float64

    c = torch.ones_like(x)
    d = _nonzero(1.0 - coef((a + b) / (a + 1.0), (a + b) / (b + 1.0))).reciprocal()
    h = d
    for m in range(1, _cf_iterations(a, b) + 1):
        even = coef(m * (b - m) / ((a - 1 + 2 * m) * (a + 2 * m)),
                    m * (a - m) / ((b - 1 + 2 * m) * (b + 2 * m)))
        odd = coef(-(a + m) * (a + b + m) / ((a + 2 * m) * (a + 1 + 2 * m)),
                   -(b + m) * (a + b + m) / ((b + 2 * m) * (b + 1 + 2 * m)))
        for aa in (even, odd):
            d = _nonzero(torch.addcmul(torch.ones_like(d), aa, d)).reciprocal()
            c = _nonzero(1.0 + aa / c)
            h = h * d * c
    return h


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def beta_cdf(x: Tensor, a: float = BETA_A, b: float = BETA_B) -> Tensor:
    """The regularized incomplete beta function I_x(a, b), the CDF of Beta(a, b).

    Computed in float64 on ``x``'s device, all elements at once (no per-element Python loop, a
    fixed number of vectorised continued-fraction terms). The fraction converges fast for
    x < (a+1)/(a+b+2); elements above that use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).

    Parameters
    ----------
    x : float tensor of any shape, values in [0, 1] (clamped).
    a, b : positive shape parameters.

    Returns
    -------
    float64 tensor shaped like ``x``.
    """
    x = x.to(torch.float64).clamp(0.0, 1.0)
    swap = x >= (a + 1.0) / (a + b + 2.0)
    xs = torch.where(swap, 1.0 - x, x)
    pa = torch.where(swap, torch.full_like(x, b), torch.full_like(x, a))
    pb = torch.where(swap, torch.full_like(x, a), torch.full_like(x, b))
    front = torch.exp(pa * torch.log(xs) + pb * torch.log1p(-xs) - _log_beta(a, b))  # 0 at xs = 0
    part = front * _beta_continued_fraction(xs, swap, a, b) / pa
    return torch.where(swap, 1.0 - part, part)


def beta_pdf(x: Tensor, a: float = BETA_A, b: float = BETA_B) -> Tensor:
    """The Beta(a, b) density in float64, with 0 wherever it is infinite (FGC.md, batch-shaping).

    For a, b < 1 the density is infinite at x = 0 and x = 1; FGC's code sets it to 0 there, which
    turns off the gradient of gates that are saturated exactly.
    """
    x = x.to(torch.float64)
    pdf = torch.exp((a - 1.0) * torch.log(x) + (b - 1.0) * torch.log1p(-x) - _log_beta(a, b))
    return torch.where(torch.isfinite(pdf), pdf, torch.zeros_like(pdf))


class _BatchShaping(torch.autograd.Function):
    """Batch-shaping loss with FGC's gradient through the Beta pdf.

    The loss depends on the batch's values only through their per-channel order statistics,
    so its gradient w.r.t. a value is the gradient at its sorted position, scattered back.
    """

    @staticmethod
    def forward(ctx, probs: Tensor, a: float, b: float) -> Tensor:  # type: ignore[override]
        batch = probs.shape[0]
        x_sorted, order = probs.detach().to(torch.float64).sort(dim=0)  # (B, C) each
        e_cdf = torch.arange(1, batch + 1, dtype=torch.float64, device=probs.device) / (batch + 1)
        diff = e_cdf[:, None] - beta_cdf(x_sorted, a, b)  # (B, C)
        grad_sorted = -2.0 * beta_pdf(x_sorted, a, b) * diff / batch  # (B, C)
        grad = torch.empty_like(grad_sorted).scatter_(0, order, grad_sorted)
        ctx.save_for_backward(grad)
        return (diff.square().sum() / batch).to(probs.dtype)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).to(grad_output.dtype), None, None


def batch_shaping_loss(probs: Tensor, a: float = BETA_A, b: float = BETA_B) -> Tensor:
    """Batch-shaping loss of one gated block: per-channel CDF distance to Beta(a, b).

    Per channel, the batch's gate probabilities are sorted and the empirical CDF i/(B+1),
    i = 1..B, is compared with the Beta CDF at the sorted values; the loss is the sum of squared
    differences over batch and channels, divided by B. Sum it over blocks for the network's loss.

    Parameters
    ----------
    probs : (B, C) float tensor, gate probabilities sigmoid(a) in [0, 1].
    a, b : the Beta prior's shape parameters (FGC: 0.6, 0.4).

    Returns
    -------
    scalar tensor of ``probs``' dtype; its gradient uses the Beta pdf (0 where infinite).
    """
    if probs.dim() != 2 or probs.shape[0] < 1:
        raise ValueError(f"batch_shaping_loss expects gate probabilities of shape (B, C) with "
                         f"B >= 1, got {tuple(probs.shape)}; flatten (B, C, 1, 1) gates first")
    return _BatchShaping.apply(probs, a, b)


def l0_loss(gate_probs: Sequence[Tensor]) -> Tensor:
    """L0 surrogate: the mean gate probability over every gate of every block.

    Parameters
    ----------
    gate_probs : one (B, C_b) tensor of sigmoid(a) per gated block.

    Returns
    -------
    scalar tensor: sum of all probabilities / number of gates.
    """
    if not gate_probs:
        raise ValueError("l0_loss needs the gate probabilities of at least one block")
    total = sum(p.sum() for p in gate_probs)
    count = sum(p.numel() for p in gate_probs)
    return total / count


def l0_weight(epoch: int, rho: float, start: int, end: int) -> float:
    """rho(epoch): 0 up to epoch ``start``, linear to ``rho`` at epoch ``end``, then ``rho``."""
    if epoch >= end:
        return rho
    if epoch <= start:
        return 0.0
    return rho * (epoch - start) / (end - start)


def batch_shaping_weight(epoch: int, weight: float, end: int) -> float:
    """The batch-shaping weight of FGC's BAS code: ``weight`` at epoch 0, linear to 0 at ``end``."""
    if epoch >= end:
        return 0.0
    return weight * (end - epoch) / end


def _check_logits(gate_logits: Tensor, dim: int, what: str) -> None:
    if gate_logits.dim() != 2 or gate_logits.shape[1] != dim:
        raise ValueError(f"{what}: gate logits must be (B, {dim}) to match the bank rows, "
                         f"got {tuple(gate_logits.shape)}")


def gate_contrastive_loss(gate_logits: Tensor, gate_bank: Tensor, positives: Tensor,
                          temperature: float = GATE_TEMPERATURE, eps: float = GATE_EPS) -> Tensor:
    """FGC's gate contrastive loss (step 3), exact: a softmax over the whole gate bank.

    z_ij = a_i . G[j] / T for every bank row j; q_i = softmax_j(z_i);
    L = -(1/B) sum_i log(sum_{p in P_i} q_ip + eps). The bank is a constant (detached): the
    gradient flows into ``gate_logits`` only. ``eps`` stays inside the log on purpose (FGC.md).

    Parameters
    ----------
    gate_logits : (B, C) float tensor, the block's gate logits a (not normalised).
    gate_bank : (N, C) float tensor, the block's gate bank G (rows L2-normalised).
    positives : (B, P) int64 tensor of bank row ids, P_i; column 0 is usually i's own id.
    temperature : T (FGC: 0.07).
    eps : the 1e-7 inside the log.

    Returns
    -------
    scalar tensor.
    """
    _check_logits(gate_logits, gate_bank.shape[1], "gate_contrastive_loss")
    if positives.dim() != 2 or positives.shape[0] != gate_logits.shape[0]:
        raise ValueError(f"gate_contrastive_loss: positives must be (B, P) with B = "
                         f"{gate_logits.shape[0]}, got {tuple(positives.shape)}")
    logits = gate_logits @ gate_bank.detach().t() / temperature  # (B, N)
    return positive_mass_loss(logits, positives, eps)


def positive_mass_loss(logits: Tensor, positives: Tensor, eps: float = GATE_EPS) -> Tensor:
    """The last part of FGC step 3, from logits already divided by T:
    ``-(1/B) sum_i log(sum_{p in P_i} softmax(logits_i)_p + eps)``, in that order (FGC.md).

    Parameters
    ----------
    logits : (B, N) float tensor, z_ij = a_i . G[j] / T.
    positives : (B, P) int64 tensor of row ids, P_i.

    Returns
    -------
    scalar tensor.
    """
    if logits.dim() != 2 or positives.dim() != 2 or positives.shape[0] != logits.shape[0]:
        raise ValueError(f"positive_mass_loss: logits must be (B, N) and positives (B, P), got "
                         f"{tuple(logits.shape)} and {tuple(positives.shape)}")
    probs = torch.softmax(logits, dim=1)  # (B, N)
    mass = probs.gather(1, positives.to(torch.int64)).sum(dim=1)  # (B,)
    return -torch.log(mass + eps).mean()


def sampled_gate_contrastive_loss(gate_logits: Tensor, positive_rows: Tensor,
                                  negative_rows: Tensor, bank_size: int,
                                  temperature: float = GATE_TEMPERATURE,
                                  eps: float = GATE_EPS) -> Tensor:
    """APPROXIMATION of :func:`gate_contrastive_loss` from sampled negatives (FGC.md, "At scale").

    The softmax denominator over all N bank rows is estimated from the positives' exact mass plus
    M negatives drawn uniformly from the bank, whose mass is scaled by N / M:
    Z_i ~= sum_{p in P_i} exp(z_ip) + (N / M) sum_m exp(z_im). The estimate is noisy and slightly
    biased (a sampled row may also be a positive); use it only where the gate bank cannot be
    replicated beside the model. Computed with log-sum-exp, so large logits do not overflow.

    Parameters
    ----------
    gate_logits : (B, C) float tensor, the gate logits a.
    positive_rows : (B, P, C) float tensor, the gate-bank rows G[p] of each instance's positives.
    negative_rows : (M, C) float tensor, gate-bank rows drawn uniformly, shared by the batch.
    bank_size : N, the number of rows in the gate bank.
    temperature, eps : as in :func:`gate_contrastive_loss`.

    Returns
    -------
    scalar tensor.
    """
    _check_logits(gate_logits, negative_rows.shape[-1], "sampled_gate_contrastive_loss")
    if positive_rows.dim() != 3 or positive_rows.shape[0] != gate_logits.shape[0]:
        raise ValueError(f"sampled_gate_contrastive_loss: positive_rows must be (B, P, C), got "
                         f"{tuple(positive_rows.shape)}")
    if negative_rows.dim() != 2 or negative_rows.shape[0] < 1:
        raise ValueError(f"sampled_gate_contrastive_loss: negative_rows must be (M, C) with "
                         f"M >= 1, got {tuple(negative_rows.shape)}")
    num_neg = negative_rows.shape[0]
    pos_logits = torch.einsum("bc,bpc->bp", gate_logits, positive_rows.detach()) / temperature
    neg_logits = gate_logits @ negative_rows.detach().t() / temperature  # (B, M)
    log_pos = torch.logsumexp(pos_logits, dim=1)  # (B,)
    log_neg = torch.logsumexp(neg_logits, dim=1) + math.log(bank_size / num_neg)  # (B,)
    mass = torch.exp(log_pos - torch.logaddexp(log_pos, log_neg))  # (B,)
    return -torch.log(mass + eps).mean()
