"""The epoch plan follows FGC.md's published CIFAR-10 schedule (the config defaults)."""

from __future__ import annotations

import pytest

from trainer.config import TrainConfig, lr_at
from trainer.errors import TrainerError
from trainer.train import plan_epoch

CIFAR = TrainConfig()  # defaults = FGC.md's published settings


@pytest.mark.parametrize("epoch,lr", [(0, 0.1), (299, 0.1), (300, 0.01), (374, 0.01),
                                      (375, 0.001), (450, 0.0001), (499, 0.0001)])
def test_lr_drops_tenfold_at_300_375_450(epoch: int, lr: float) -> None:
    assert lr_at(epoch, 0.1, (300, 375, 450), 0.1) == pytest.approx(lr)
    assert plan_epoch(CIFAR, epoch, 100 if epoch >= 100 else None).lr == pytest.approx(lr)


def test_bas_phase_uses_batch_shaping_and_no_contrast() -> None:
    first, last = plan_epoch(CIFAR, 0, None), plan_epoch(CIFAR, 99, None)
    assert (first.phase, first.bs_weight, first.kappa, first.knn) == ("bas", 0.75, 0.0, False)
    assert last.bs_weight == pytest.approx(0.0075) and last.rho == 0.0


@pytest.mark.parametrize("epoch,knn,rho", [(100, False, 0.0), (119, False, 0.038),
                                           (120, True, 0.04), (200, True, 0.2),
                                           (300, True, 0.4), (499, True, 0.4)])
def test_fgc_phase_warms_up_for_nn_epoch_epochs_and_ramps_rho(epoch: int, knn: bool,
                                                              rho: float) -> None:
    plan = plan_epoch(CIFAR, epoch, fgc_start=100)
    assert (plan.phase, plan.kappa, plan.bs_weight, plan.knn) == ("fgc", 0.003, 0.0, knn)
    assert plan.rho == pytest.approx(rho)


def test_config_round_trips_and_rejects_what_cannot_work() -> None:
    assert TrainConfig.from_dict(CIFAR.to_dict()) == CIFAR
    with pytest.raises(TrainerError, match="l0_end"):
        CIFAR.replace("gates", l0_end=50)
    with pytest.raises(TrainerError, match="unknown keys"):
        TrainConfig.from_dict({"fgc": {"kapa": 1.0}})
    # no blocks named: the architecture's last two (ResNet-20's 7 and 8, as published)
    assert CIFAR.replace("run", phase="fgc").replace("fgc", contrast_blocks=()).fgc.contrast_blocks == (7, 8)
