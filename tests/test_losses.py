"""FGC's losses against direct formulas (numpy/scipy in float64) and torch.autograd.gradcheck."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest
import torch
from scipy import special, stats

from fgc_bank.losses import (
    batch_shaping_loss,
    batch_shaping_weight,
    beta_cdf,
    beta_pdf,
    gate_contrastive_loss,
    l0_loss,
    l0_weight,
    sampled_gate_contrastive_loss,
)


def _bs_reference(p: np.ndarray, a: float = 0.6, b: float = 0.4) -> tuple[float, np.ndarray]:
    """Batch-shaping loss and its FGC gradient, written out directly per channel."""
    batch, channels = p.shape
    loss, grad = 0.0, np.zeros_like(p)
    for c in range(channels):
        order = np.argsort(p[:, c], kind="stable")
        for rank, i in enumerate(order, start=1):
            e = rank / (batch + 1)
            cdf = special.betainc(a, b, p[i, c])
            pdf = stats.beta.pdf(p[i, c], a, b)
            pdf = 0.0 if not np.isfinite(pdf) else pdf
            loss += (e - cdf) ** 2 / batch
            grad[i, c] = -2.0 * pdf * (e - cdf) / batch
    return loss, grad


@pytest.mark.parametrize("a,b", [(0.6, 0.4), (0.4, 0.6), (2.0, 3.0), (0.5, 0.5), (30.0, 50.0)])
def test_beta_cdf_matches_scipy_betainc(a: float, b: float) -> None:
    x = np.linspace(0.0, 1.0, 2001)
    ours = beta_cdf(torch.from_numpy(x), a, b).numpy()
    np.testing.assert_allclose(ours, special.betainc(a, b, x), rtol=0, atol=1e-12)


@pytest.mark.parametrize("x", [1e-12, 1 - 1e-12, 0.5333333, 0.999])
def test_beta_cdf_matches_arbitrary_precision_at_the_edges(x: float) -> None:
    mpmath.mp.dps = 40
    expected = float(mpmath.betainc(0.5, 0.5, 0, mpmath.mpf(x), regularized=True))
    ours = beta_cdf(torch.tensor([x], dtype=torch.float64), 0.5, 0.5).item()
    assert ours == pytest.approx(expected, rel=0, abs=1e-14)


def test_beta_pdf_matches_scipy_and_is_zero_where_infinite() -> None:
    x = np.linspace(0.0, 1.0, 501)
    expected = stats.beta.pdf(x, 0.6, 0.4)
    expected[~np.isfinite(expected)] = 0.0
    ours = beta_pdf(torch.from_numpy(x)).numpy()
    assert ours[0] == 0.0 and ours[-1] == 0.0
    np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_batch_shaping_loss_and_gradient_match_direct_formula() -> None:
    rng = np.random.default_rng(0)
    p = rng.uniform(0.0, 1.0, size=(13, 5))
    p[0, 0], p[1, 1] = 0.0, 1.0  # saturated gates: pdf infinite there, gradient must be 0
    x = torch.tensor(p, requires_grad=True)
    loss = batch_shaping_loss(x)
    loss.backward()
    ref_loss, ref_grad = _bs_reference(p)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-12)
    np.testing.assert_allclose(x.grad.numpy(), ref_grad, rtol=1e-10, atol=1e-14)
    assert x.grad[0, 0] == 0.0 and x.grad[1, 1] == 0.0


def test_batch_shaping_loss_float32_gives_float32_and_same_value() -> None:
    p = torch.rand(32, 16, generator=torch.Generator().manual_seed(1))
    loss32 = batch_shaping_loss(p.clone().requires_grad_())
    ref_loss, _ = _bs_reference(p.double().numpy())
    assert loss32.dtype == torch.float32
    assert loss32.item() == pytest.approx(ref_loss, rel=1e-5)


def test_batch_shaping_gradcheck_float64() -> None:
    gen = torch.Generator().manual_seed(2)
    x = (torch.rand(9, 4, generator=gen, dtype=torch.float64) * 0.9 + 0.05).requires_grad_()
    assert torch.autograd.gradcheck(batch_shaping_loss, (x,), eps=1e-7, atol=1e-8)


def test_batch_shaping_over_concatenated_blocks_is_the_sum_over_blocks() -> None:
    blocks = [torch.rand(10, c, dtype=torch.float64) for c in (3, 5, 8)]
    joined = batch_shaping_loss(torch.cat(blocks, dim=1))
    assert joined.item() == pytest.approx(sum(batch_shaping_loss(b).item() for b in blocks))


def test_batch_shaping_rejects_wrong_shape() -> None:
    with pytest.raises(ValueError, match=r"\(B, C\)"):
        batch_shaping_loss(torch.rand(4, 3, 1, 1))


def test_l0_loss_is_mean_over_every_gate_of_every_block() -> None:
    probs = [torch.rand(6, 16), torch.rand(6, 32), torch.rand(6, 64)]
    flat = np.concatenate([p.numpy().ravel() for p in probs])
    assert l0_loss(probs).item() == pytest.approx(flat.mean(), rel=1e-6)


def test_l0_loss_gradient_is_one_over_gate_count() -> None:
    probs = [torch.rand(2, 3, requires_grad=True), torch.rand(2, 5, requires_grad=True)]
    l0_loss(probs).backward()
    for p in probs:
        assert torch.allclose(p.grad, torch.full_like(p, 1.0 / 16))


@pytest.mark.parametrize("epoch,expected", [(0, 0.0), (100, 0.0), (150, 0.1), (200, 0.2),
                                            (300, 0.4), (450, 0.4)])
def test_l0_weight_ramps_linearly_from_start_to_end(epoch: int, expected: float) -> None:
    assert l0_weight(epoch, rho=0.4, start=100, end=300) == pytest.approx(expected)


def test_l0_weight_without_ramp_is_a_step() -> None:
    assert l0_weight(4, 0.4, 5, 5) == 0.0 and l0_weight(5, 0.4, 5, 5) == 0.4


def test_batch_shaping_weight_decays_to_zero_at_end() -> None:
    assert batch_shaping_weight(0, 0.75, 100) == 0.75
    assert batch_shaping_weight(50, 0.75, 100) == pytest.approx(0.375)
    assert batch_shaping_weight(100, 0.75, 100) == 0.0


def _contrastive_reference(a: np.ndarray, bank: np.ndarray, pos: np.ndarray, t: float,
                           eps: float) -> tuple[float, np.ndarray]:
    """FGC.md step 3 and its stated gradient dL/dz_ij = (q_ij S_i - q_ij [j in P_i]) / (S_i + eps)."""
    z = a @ bank.T / t
    q = np.exp(z - z.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    in_pos = np.zeros_like(q)
    np.put_along_axis(in_pos, pos, 1.0, axis=1)
    s = (q * in_pos).sum(1)
    loss = -np.log(s + eps).mean()
    dz = (q * s[:, None] - q * in_pos) / (s[:, None] + eps) / len(a)
    return loss, dz @ bank / t


def _unit_rows(n: int, c: int, seed: int) -> torch.Tensor:
    rows = torch.randn(n, c, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return rows / rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("temperature,scale", [(0.07, 0.3), (0.07, 8.0), (1.0, 1.0)])
def test_gate_contrastive_loss_matches_formula_and_stated_gradient(temperature: float,
                                                                   scale: float) -> None:
    gen = torch.Generator().manual_seed(3)
    bank = _unit_rows(50, 8, seed=4).requires_grad_()
    a = (torch.randn(6, 8, generator=gen, dtype=torch.float64) * scale).requires_grad_()
    pos = torch.cat([torch.arange(6)[:, None], torch.randint(6, 50, (6, 3), generator=gen)], 1)
    loss = gate_contrastive_loss(a, bank, pos, temperature=temperature)
    loss.backward()
    ref_loss, ref_grad = _contrastive_reference(a.detach().numpy(), bank.detach().numpy(),
                                                pos.numpy(), temperature, 1e-7)
    assert loss.item() == pytest.approx(ref_loss, rel=1e-10)
    np.testing.assert_allclose(a.grad.numpy(), ref_grad, rtol=1e-7, atol=1e-12)
    assert bank.grad is None  # the bank is a constant


def test_gate_contrastive_epsilon_damps_instances_with_no_positive_mass() -> None:
    bank = _unit_rows(20, 4, seed=5)
    a = (bank[1] * 30.0).reshape(1, 4).clone().requires_grad_()  # all mass on row 1
    pos = torch.tensor([[0]])  # a positive that gets ~no mass
    loss = gate_contrastive_loss(a, bank, pos, temperature=0.07)
    loss.backward()
    assert loss.item() == pytest.approx(-math.log(1e-7), rel=1e-3)
    # Without eps the gradient would be O(1/T); with it, it collapses with the positive's mass.
    assert a.grad.abs().max().item() < 1e-3


def test_gate_contrastive_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="match the bank rows"):
        gate_contrastive_loss(torch.randn(4, 8), torch.randn(10, 16), torch.zeros(4, 1).long())
    with pytest.raises(ValueError, match="positives must be"):
        gate_contrastive_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(3, 1).long())


def test_sampled_gate_contrastive_loss_matches_its_formula() -> None:
    gen = torch.Generator().manual_seed(6)
    bank = _unit_rows(40, 8, seed=7)
    a = torch.randn(5, 8, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 40, (5, 3), generator=gen)
    neg_ids = torch.randint(0, 40, (11,), generator=gen)
    loss = sampled_gate_contrastive_loss(a, bank[pos], bank[neg_ids], bank_size=40, temperature=0.5)
    an, bn = a.numpy(), bank.numpy()
    pos_mass = np.exp(np.einsum("bc,bpc->bp", an, bn[pos.numpy()]) / 0.5).sum(1)
    neg_mass = np.exp(an @ bn[neg_ids.numpy()].T / 0.5).sum(1) * 40 / 11
    expected = -np.log(pos_mass / (pos_mass + neg_mass) + 1e-7).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_sampled_gate_contrastive_loss_approximates_the_exact_loss() -> None:
    gen = torch.Generator().manual_seed(8)
    bank = _unit_rows(4000, 8, seed=9)
    a = torch.randn(16, 8, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 4000, (16, 4), generator=gen)
    neg_ids = torch.randint(0, 4000, (2000,), generator=gen)
    exact = gate_contrastive_loss(a, bank, pos, temperature=1.0).item()
    approx = sampled_gate_contrastive_loss(a, bank[pos], bank[neg_ids], 4000, temperature=1.0)
    assert approx.item() == pytest.approx(exact, abs=0.05)
