"""The trainer's banks: positives from the feature bank (in-process and over a real server, against
a numpy oracle), the replicated gate bank's update, and bank set-up errors."""

from __future__ import annotations

import socket

import numpy as np
import pytest
import torch

from fgc_bank import connect
from fgc_bank.torch import first_occurrence, positives
from trainer.banks import FeatureBanks, GateBanks, open_bank
from trainer.data import synthetic
from trainer.distributed import DistContext
from trainer.errors import TrainerError
from trainer.models import build_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")


SIZE, BATCH, K, STEPS = 96, 16, 5, 6
SINGLE = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))


def _momentum(rows: np.ndarray, ids: np.ndarray, values: np.ndarray, m: float) -> None:
    mixed = m * rows[ids] + (1 - m) * values
    rows[ids] = mixed / np.linalg.norm(mixed, axis=1, keepdims=True)


def _train_like_steps(address: str, prefix: str) -> tuple[list, list, dict]:
    """Drive FeatureBanks the way a training step does: issue mid-forward, collect after."""
    torch.manual_seed(0)
    model = build_model("resnet20", 10, 3, contrast_blocks=(7, 8)).eval()
    data = synthetic(SIZE, seed=5).train
    order = torch.randperm(SIZE, generator=torch.Generator().manual_seed(1))
    client = connect(address, timeout=30.0)
    banks = FeatureBanks.open(client, prefix, {7: 64, 8: 64}, SIZE, momentum=0.5, k=K, seed=3)
    initial = {b: client.gather(name, np.arange(SIZE)) for b, name in banks.names.items()}
    found, features = [], []
    for step in range(STEPS):
        ids = order[(step * BATCH) % SIZE:][:BATCH]
        pending = {}

        def hook(block: int, feats: torch.Tensor, ids=ids, pending=pending) -> None:
            pending[block] = banks.issue(block, ids.numpy(), feats, search=True)

        with torch.no_grad():
            out = model(data.images[ids], on_features=hook)
        found.append({b: positives(ids, pending[b].result()) for b in (7, 8)})
        features.append({b: out.taps[b].features.double().numpy() for b in (7, 8)})
    client.close()
    return found, features, initial


def test_positives_are_identical_in_process_and_over_a_real_server(server: str) -> None:
    local, local_features, local_init = _train_like_steps("local://", "pos")
    remote, remote_features, remote_init = _train_like_steps(server, "pos-identical")
    for b in (7, 8):
        np.testing.assert_array_equal(local_init[b], remote_init[b])
    for step in range(STEPS):
        for b in (7, 8):
            assert torch.equal(local[step][b], remote[step][b]), (step, b)
            np.testing.assert_array_equal(local_features[step][b], remote_features[step][b])


def test_positives_match_a_numpy_oracle_of_fgc_steps_1_and_2() -> None:
    found, features, initial = _train_like_steps("local://", "oracle")
    order = torch.randperm(SIZE, generator=torch.Generator().manual_seed(1))
    rows = {b: initial[b].astype(np.float64) for b in (7, 8)}
    for step in range(STEPS):
        ids = order[(step * BATCH) % SIZE:][:BATCH].numpy()
        for b in (7, 8):
            scores = features[step][b] @ rows[b].T  # raw f against the rows as they were
            scores[np.arange(BATCH), ids] = -np.inf  # own row excluded
            expected = np.argsort(-scores, axis=1, kind="stable")[:, :K]
            pos = found[step][b].numpy()
            assert pos.shape == (BATCH, 1 + K)
            np.testing.assert_array_equal(pos[:, 0], ids)  # own id first
            assert [set(r) for r in pos[:, 1:]] == [set(r) for r in expected]
            _momentum(rows[b], ids, features[step][b], 0.5)  # then the update


def test_warm_up_updates_the_feature_bank_without_searching() -> None:
    client = connect("local://")
    banks = FeatureBanks.open(client, "warm", {7: 4}, 10, momentum=0.5, k=3)
    before = client.gather("warm/7", np.arange(10)).astype(np.float64)
    ids = np.array([2, 5, 7])
    feats = torch.randn(3, 4)
    assert banks.issue(7, ids, feats, search=False) is None
    _momentum(before, ids, feats.double().numpy(), 0.5)
    np.testing.assert_allclose(client.gather("warm/7", np.arange(10)), before, rtol=1e-6)
    assert client.info("warm/7")["searches"] == 0
    assert torch.equal(positives(torch.tensor(ids), None), torch.tensor([[2], [5], [7]]))


def test_feature_bank_rows_survive_export_and_restore() -> None:
    source, target = connect("local://"), connect("local://")
    a = FeatureBanks.open(source, "f", {7: 8}, 50, 0.5, k=4, seed=1)
    a.issue(7, np.arange(10), torch.randn(10, 8), search=True).result()
    b = FeatureBanks.open(target, "f", {7: 8}, 50, 0.5, k=4, seed=2)
    b.restore_rows(a.export_rows())
    np.testing.assert_array_equal(target.gather("f/7", np.arange(50)),
                                  source.gather("f/7", np.arange(50)))


def test_gate_bank_initialisation_and_update_follow_fgc() -> None:
    bank = GateBanks({7: 16, 8: 32}, size=40, momentum=0.5, seed=0, device="cpu")
    assert bank[8].abs().max() <= 1 / np.sqrt(32 / 3) and bank[8].shape == (40, 32)
    again = GateBanks({7: 16, 8: 32}, size=40, momentum=0.5, seed=0, device="cpu")
    assert torch.equal(bank[7], again[7])
    expected = {b: bank[b].double().numpy().copy() for b in (7, 8)}
    ids = torch.tensor([3, 9, 3, 1])  # id 3 twice (a padded sampler): the first one counts
    logits = {7: torch.randn(4, 16), 8: torch.randn(4, 32)}
    bank.update(ids, logits, SINGLE)
    for b in (7, 8):
        _momentum(expected[b], np.array([1, 3, 9]), logits[b].double().numpy()[[3, 0, 1]], 0.5)
        np.testing.assert_allclose(bank[b].numpy(), expected[b], rtol=1e-5, atol=1e-6)


def test_first_occurrence_keeps_the_earliest_position() -> None:
    unique, first = first_occurrence(torch.tensor([5, 2, 5, 7, 2]))
    assert unique.tolist() == [2, 5, 7] and first.tolist() == [1, 0, 3]


def test_gate_bank_refuses_a_checkpoint_of_another_shape() -> None:
    bank = GateBanks({7: 16}, size=40, momentum=0.5, seed=0, device="cpu")
    with pytest.raises(TrainerError, match="same dataset"):
        bank.load_state_dict({"7": torch.zeros(30, 16)})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_bank_says_how_to_start_one() -> None:
    with pytest.raises(TrainerError, match="cannot reach the bank.*fgc-bank serve"):
        open_bank(f"tcp://127.0.0.1:{_free_port()}", timeout=1.0)


def test_bad_bank_address_is_refused() -> None:
    with pytest.raises(TrainerError, match="bad bank address"):
        open_bank("http://example", timeout=1.0)


def test_bank_of_another_size_or_momentum_is_refused(server: str) -> None:
    client = connect(server, timeout=30.0)
    client.create("mismatch/7", 50, 64, momentum=0.5)
    with pytest.raises(TrainerError, match="does not fit this run.*60 examples"):
        FeatureBanks.open(client, "mismatch", {7: 64}, 60, momentum=0.5, k=5)
    with pytest.raises(TrainerError, match=r"does not fit this run.*momentum 0.5 \(asked 0.9\)"):
        FeatureBanks.open(client, "mismatch", {7: 64}, 50, momentum=0.9, k=5)
    with pytest.raises(TrainerError, match="lower --nn-num"):
        FeatureBanks.open(client, "other", {7: 64}, 50, momentum=0.5, k=50)
    client.close()
