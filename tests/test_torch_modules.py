"""fgc_bank.torch, the drop-ins for FGC-PR's banks, against FGC's semantics written out in numpy:
positives own id first, warm-up up to nn_epoch, the momentum rule, the gate logits and loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import brute_force_knn, momentum_oracle

from fgc_bank import connect
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.torch import (
    FeatureBank,
    FeatureMemoryBank,
    KNNCriterion,
    LinearAverage,
    gate_contrastive_loss,
    retry_busy,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N, C, B, K = 60, 8, 10, 5


def _batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(step)
    ids = torch.randperm(N, generator=gen)[:B]
    return torch.randn(B, C, 1, 1, generator=gen), ids  # pooled maps, as the authors' blocks pass them


def test_feature_bank_warms_up_then_answers_own_id_and_exact_neighbours() -> None:
    client = connect("local://")
    bank = FeatureMemoryBank(C, N, nn_num=K, nn_epoch=2, momentum=0.5, bank=client, name="f")
    rows = client.gather("f", np.arange(N)).astype(np.float64)
    for epoch in (1, 2, 3, 4):  # FGC-PR counts FGC epochs from 1; warm-up is epoch <= nn_epoch
        x, ids = _batch(epoch)
        feats = x.flatten(1).double().numpy()
        pos = bank(x, ids, epoch)
        assert pos.dtype == torch.int64 and torch.equal(pos[:, 0], ids)  # own id first, always
        if epoch <= 2:
            assert pos.shape == (B, 1)
        else:
            assert pos.shape == (B, 1 + K)
            _, expected = brute_force_knn(rows, feats, K, exclude=ids.numpy())  # rows before the update
            assert [set(r) for r in pos[:, 1:].tolist()] == [set(r) for r in expected.tolist()]
        rows = momentum_oracle(rows, ids.numpy(), feats, 0.5)  # then the update, warm-up too
        np.testing.assert_allclose(client.gather("f", np.arange(N)), rows, rtol=1e-5, atol=1e-6)
    assert client.info("f")["searches"] == 2  # no search in the two warm-up epochs


def test_feature_bank_over_a_real_server_answers_like_the_in_process_one(server: str) -> None:
    remote = FeatureMemoryBank(C, N, nn_num=K, nn_epoch=0, bank=server, name="dropin/feat", seed=4)
    local = FeatureMemoryBank(C, N, nn_num=K, nn_epoch=0, seed=4)
    for step in range(3):
        x, ids = _batch(10 + step)
        assert torch.equal(remote(x, ids, 1), local(x, ids, 1))
    remote.bank.close()
    with pytest.raises(ValueError, match="name="):
        FeatureMemoryBank(C, N, bank=server)  # a shared service needs the bank's name


def test_gate_bank_logits_gradient_and_update_follow_the_authors_linear_average() -> None:
    client = connect("local://")
    gates = LinearAverage(C, N, T=0.07, momentum=0.5, bank=client, name="g", seed=2)
    rows = client.gather("g", np.arange(N)).astype(np.float64)
    np.testing.assert_array_equal(gates.memory.numpy(), rows)  # the replica is the service's rows
    for step in range(3):
        x, ids = _batch(20 + step)
        x = x.flatten(1).requires_grad_()
        logits = gates(x, ids)
        np.testing.assert_allclose(logits.detach().double().numpy(), x.detach().double().numpy() @ rows.T / 0.07,
                                   rtol=1e-4, atol=1e-4)  # against the rows before this step's update
        logits.sum().backward()  # gradient of x @ G.T / T: the column sums of G / T
        np.testing.assert_allclose(x.grad.numpy(), np.tile(rows.sum(0) / 0.07, (B, 1)), rtol=1e-4, atol=1e-4)
        rows = momentum_oracle(rows, ids.numpy(), x.detach().double().numpy(), 0.5)
        np.testing.assert_allclose(gates.memory.numpy(), rows, rtol=1e-5, atol=1e-6)
    gates.close()
    np.testing.assert_array_equal(client.gather("g", np.arange(N)), gates.memory.numpy())  # service == replica


def test_gate_bank_writes_nothing_in_evaluation() -> None:
    gates = LinearAverage(C, N)
    before = gates.memory.clone()
    x, ids = _batch(30)
    with torch.no_grad():
        gates(x, ids)
    gates.eval()
    gates(x, ids)
    assert torch.equal(gates.memory, before)


def test_criterion_equals_the_loss_written_out_and_the_exact_gate_loss() -> None:
    gen = torch.Generator().manual_seed(5)
    bank = torch.nn.functional.normalize(torch.randn(N, C, generator=gen), dim=1)
    a = torch.randn(B, C, generator=gen) * 3
    pos = torch.randint(0, N, (B, 1 + K), generator=gen)
    logits = a @ bank.t() / 0.07
    got = KNNCriterion(K, 2)(logits, pos, 3)
    q = torch.softmax(logits.double(), 1).numpy()
    expected = -np.mean(np.log(np.take_along_axis(q, pos.numpy(), 1).sum(1) + 1e-7))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(gate_contrastive_loss(a, bank, pos, 0.07).item(), rel=1e-6)
    own = KNNCriterion(K, 2)(logits, pos[:, 0], 1)  # warm-up positives may come flat, (B,)
    assert own.item() == pytest.approx(gate_contrastive_loss(a, bank, pos[:, :1], 0.07).item(), rel=1e-6)


def test_busy_answers_are_sent_again_until_they_pass(server: str) -> None:
    from fgc_bank.client import BankClient

    with BankClient(server, max_in_flight=1) as client:
        bank = FeatureBank(client, "dropin/busy", 50_000, 64, k=10, seed=1)
        queries = torch.randn(256, 64)
        raw = [client.knn_async("dropin/busy", queries, 10) for _ in range(3)]
        assert any(isinstance(f.exception(), BankError) and f.exception().code is ErrorCode.BUSY
                   for f in raw)  # one call in flight: the others are answered busy at once
        futures = [bank.knn_update_async(np.arange(i * 256, (i + 1) * 256), queries) for i in range(3)]
        assert all(f.result().ids.shape == (256, 10) for f in futures)  # every one went through
        assert client.info("dropin/busy")["updates"] == 3
        blocker = client.knn_async("dropin/busy", queries, 10)
        gave_up = retry_busy(lambda: client.knn_async("dropin/busy", queries, 10), retries=0)
        assert gave_up.exception().code is ErrorCode.BUSY  # bounded: the last busy ends the call
        assert "still busy after 0 retries" in gave_up.exception().message
        blocker.result()


def test_import_of_fgc_bank_torch_leaves_torch_itself_alone() -> None:
    import fgc_bank.torch as module

    assert module.torch is torch and torch.__name__ == "torch"  # no shadowing inside the package
