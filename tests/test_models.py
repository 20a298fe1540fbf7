"""Gated ResNets: structure, FGC's gate and block equations, returned taps, MAC counts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.errors import TrainerError
from trainer.gates import Gate, gumbel_sigmoid_st, logistic_noise
from trainer.macs import profile_macs
from trainer.models import GatedResNet, PadShortcut, build_model


@pytest.mark.parametrize("arch,blocks,widths,shape", [
    ("resnet20", 9, (16, 32, 64), (1, 8, 8)),
    ("resnet32", 15, (16, 32, 64), (3, 8, 8)),
    ("resnet56", 27, (16, 32, 64), (3, 8, 8)),
    ("resnet18", 8, (64, 128, 256, 512), (3, 32, 32)),
    ("resnet34", 16, (64, 128, 256, 512), (3, 32, 32)),
])
def test_forward_returns_logits_and_every_blocks_gates(arch: str, blocks: int,
                                                       widths: tuple[int, ...],
                                                       shape: tuple[int, int, int]) -> None:
    model = build_model(arch, num_classes=7, in_channels=shape[0],
                        contrast_blocks=(blocks - 2, blocks - 1))
    out = model(torch.randn(3, *shape))
    assert out.logits.shape == (3, 7)
    assert len(out.gate_probs) == len(out.gates) == blocks
    assert sorted({p.shape[1] for p in out.gate_probs}) == list(widths)
    assert set(out.taps) == {blocks - 2, blocks - 1}
    for taps in out.taps.values():
        assert taps.features.shape == taps.gate_logits.shape == (3, widths[-1])
        assert not taps.features.requires_grad and taps.gate_logits.requires_grad
    for gates in out.gates:
        assert set(gates.unique().tolist()) <= {0.0, 1.0}


def test_block_follows_fgc_equations_in_evaluation() -> None:
    model = build_model("resnet20", 10, 3, contrast_blocks=(3,)).eval()
    x = torch.randn(4, 16, 8, 8)
    block = model.blocks[3]  # first block of stage 2: stride 2, option-A shortcut
    with torch.no_grad():
        result = block(x)
        h = F.relu(block.bn1(block.conv1(x)))
        pooled = x.mean(dim=(2, 3), keepdim=True)
        a = block.gate.fc2(F.relu(block.gate.bn(block.gate.fc1(pooled)))).flatten(1)
        g = (torch.sigmoid(a) > 0.5).float()
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 8, 8))
        expected = F.relu(block.bn2(block.conv2(h * g[:, :, None, None])) + shortcut)
    torch.testing.assert_close(result.features, h.mean(dim=(2, 3)))
    torch.testing.assert_close(result.gate_logits, a)
    torch.testing.assert_close(result.gates, g)
    torch.testing.assert_close(result.out, expected)


def test_option_a_shortcut_subsamples_and_zero_pads_channels() -> None:
    x = torch.randn(2, 16, 8, 8)
    out = PadShortcut(16, 32, 2)(x)
    assert out.shape == (2, 32, 4, 4)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().sum() == 0 and out[:, 24:].abs().sum() == 0


def test_gumbel_sigmoid_st_is_binary_forward_and_sigmoid_gradient() -> None:
    logits = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    noise = logistic_noise(logits.detach())
    tau = 2.0 / 3.0
    gates = gumbel_sigmoid_st(logits, tau, noise)
    y = (logits.detach() + noise) / tau
    assert torch.equal(gates.detach(), (y > 0).double())
    gates.sum().backward()
    s = torch.sigmoid(y)
    torch.testing.assert_close(logits.grad, s * (1 - s) / tau)


def test_logistic_noise_has_the_logistic_distribution() -> None:
    torch.manual_seed(0)
    noise = logistic_noise(torch.empty(200_000, dtype=torch.float64))
    assert torch.isfinite(noise).all()
    # Logistic(0, 1): mean 0, variance pi^2 / 3, CDF sigmoid.
    assert abs(noise.mean().item()) < 0.02
    assert noise.var().item() == pytest.approx(torch.pi**2 / 3, rel=0.02)
    assert (noise < 1.0).double().mean().item() == pytest.approx(torch.sigmoid(
        torch.tensor(1.0)).item(), abs=0.005)


def test_gate_temperature_is_a_buffer_and_training_uses_noise() -> None:
    gate = Gate(8, 4)
    assert "tau" in dict(gate.named_buffers()) and "tau" not in dict(gate.named_parameters())
    assert gate.state_dict()["tau"].item() == pytest.approx(2.0 / 3.0)
    x = torch.randn(2000, 8, 1, 1)
    logits, eval_gates = gate.eval()(x)
    assert torch.equal(eval_gates, (torch.sigmoid(logits) > 0.5).float())
    train_logits, train_gates = gate.train()(x)
    # In training a gate opens with probability sigmoid(a), not by thresholding.
    assert not torch.equal(train_gates, (train_logits > 0).float())
    assert train_gates.mean().item() == pytest.approx(
        torch.sigmoid(train_logits).mean().item(), abs=0.02)


def test_gate_parameters_get_no_weight_decay() -> None:
    model = build_model("resnet20", 10, 3)
    groups = model.param_groups(weight_decay=5e-4)
    gate_params = {id(p) for block in model.blocks for p in block.gate.parameters()}
    by_decay = {g["weight_decay"]: {id(p) for p in g["params"]} for g in groups}
    assert by_decay[0.0] == gate_params
    assert by_decay[5e-4].isdisjoint(gate_params)
    assert by_decay[0.0] | by_decay[5e-4] == {id(p) for p in model.parameters()}


def test_on_features_is_called_as_soon_as_each_contrasted_block_has_features() -> None:
    model = build_model("resnet20", 10, 1, contrast_blocks=(7, 8)).eval()
    events: list[tuple[str, int]] = []
    seen: dict[int, torch.Tensor] = {}
    for index, block in enumerate(model.blocks):
        block.conv2.register_forward_hook(lambda *_, i=index: events.append(("conv2", i)))

    def on_features(block: int, features: torch.Tensor) -> None:
        events.append(("features", block))
        seen[block] = features

    out = model(torch.randn(2, 1, 8, 8), on_features=on_features)
    assert events.index(("features", 7)) < events.index(("conv2", 7))
    assert events.index(("features", 8)) < events.index(("conv2", 8))
    assert [e for e in events if e[0] == "features"] == [("features", 7), ("features", 8)]
    for block in (7, 8):
        assert torch.equal(seen[block], out.taps[block].features)


def _cifar_dense_macs(per_stage: int, size: int, classes: int) -> int:
    """ResNet-20/32/56 MACs written out: stem, 2 convs per block, classifier."""
    macs = 3 * 16 * 9 * size * size
    in_planes = 16
    for planes, stride in ((16, 1), (32, 2), (64, 2)):
        size //= stride
        macs += in_planes * planes * 9 * size * size + planes * planes * 9 * size * size
        macs += (per_stage - 1) * 2 * planes * planes * 9 * size * size
        in_planes = planes
    return macs + 64 * classes


@pytest.mark.parametrize("arch,per_stage", [("resnet20", 3), ("resnet56", 9)])
def test_mac_profile_matches_hand_count(arch: str, per_stage: int) -> None:
    model = build_model(arch, 10, 3)
    profile = profile_macs(model, (3, 32, 32))
    assert profile.dense == _cifar_dense_macs(per_stage, 32, 10)
    gate_macs = sum(b.gate.fc1.in_channels * 16 + 16 * b.planes for b in model.blocks)
    assert profile.gate == gate_macs
    assert profile.gated([1.0] * len(model.blocks)) == profile.dense + gate_macs
    half = profile.kept([0.5] * len(model.blocks))
    assert half == pytest.approx((profile.fixed + sum(profile.blocks) / 2 + gate_macs)
                                 / profile.dense)


def test_resnet20_and_resnet18_macs_match_published_counts() -> None:
    assert profile_macs(build_model("resnet20", 10, 3), (3, 32, 32)).dense == 40_551_040
    resnet18 = profile_macs(build_model("resnet18", 1000, 3), (3, 224, 224))
    assert resnet18.dense == 1_814_073_344  # the usual "1.8 GMACs" of ResNet-18


def test_profile_macs_leaves_model_mode_and_statistics_alone() -> None:
    model = build_model("resnet20", 10, 3).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    profile_macs(model, (3, 32, 32))
    assert model.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_bad_architecture_and_blocks_are_refused_with_the_choices() -> None:
    with pytest.raises(TrainerError, match="resnet20"):
        build_model("resnet21", 10)
    with pytest.raises(TrainerError, match=r"numbered 0\.\.8"):
        build_model("resnet20", 10, contrast_blocks=(9,))
    assert isinstance(build_model("resnet32", 10), GatedResNet)


@pytest.mark.parametrize("arch, blocks", [("resnet20", (7, 8)), ("resnet32", (13, 14)), ("resnet18", (6, 7)),
                                          ("resnet34", (14, 15))])
def test_fgc_contrasts_each_architectures_last_two_blocks_by_default(arch: str, blocks: tuple[int, int]) -> None:
    from trainer.config import TrainConfig

    cfg = TrainConfig.from_dict({"model": {"arch": arch}, "run": {"phase": "fgc"}})
    assert cfg.fgc.contrast_blocks == blocks
    model = build_model(arch, 10, 3, cfg.fgc.contrast_blocks)
    assert model.contrast_blocks == blocks and max(blocks) == len(model.blocks) - 1
