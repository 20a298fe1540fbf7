"""Typed, frozen run configuration, built once in the CLI layer and stored in every checkpoint.

Defaults are FGC's published CIFAR-10 / ResNet-20 settings (FGC.md); small-data recipes (the
digits demo) override them on the command line. Library functions never see this whole object:
each takes the few values it uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from trainer.errors import TrainerError
from trainer.gates import GATE_HIDDEN, GATE_TAU
from trainer.models import ARCHS, default_contrast_blocks

PHASES = ("bas", "fgc")
DATASETS = ("cifar10", "digits", "imagefolder", "synthetic")


@dataclass(frozen=True)
class ModelConfig:
    """Shape-defining: restored from a checkpoint on resume, never overridden."""

    arch: str = "resnet20"
    num_classes: int = 10
    in_channels: int = 3
    gate_hidden: int = GATE_HIDDEN
    gate_tau: float = GATE_TAU


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "cifar10"
    root: str | None = None  # directory for cifar10 / imagefolder
    batch_size: int = 256  # global: split evenly over the ranks
    workers: int = 0  # DataLoader worker processes per rank
    synthetic_size: int = 512  # examples in the synthetic training set
    image_size: int = 224  # imagefolder: side of the square crops the model sees


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 500  # total, counted from epoch 0 of BAS
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # not applied to gate parameters
    milestones: tuple[int, ...] = (300, 375, 450)  # lr x gamma at each of these epochs
    gamma: float = 0.1


@dataclass(frozen=True)
class GateLossConfig:
    rho: float = 0.4  # L0 weight, ramped from 0 at l0_start to rho at l0_end
    l0_start: int = 100
    l0_end: int = 300
    bs_weight: float = 0.75  # batch-shaping weight in the BAS phase (FGC's BAS code: zeta)
    bs_end: int = 100  # batch-shaping weight decays linearly to 0 at this epoch


@dataclass(frozen=True)
class FGCConfig:
    kappa: float = 0.003  # weight of the gate contrastive loss
    nn_num: int = 200  # k: kNN positives per instance after warm-up
    nn_epoch: int = 20  # warm-up epochs (self-only positives) at the start of the FGC phase
    contrast_blocks: tuple[int, ...] = ()  # (): the architecture's last two gated blocks
    temperature: float = 0.07
    bank_momentum: float = 0.5
    negatives: int = 0  # 0: exact loss; M > 0: sampled-negatives APPROXIMATION with M rows
    bank: str = "local://"  # feature-bank address: local:// or tcp://host:port
    bank_prefix: str = "feat"  # bank names are f"{bank_prefix}/{block}"
    bank_timeout: float = 30.0  # seconds per bank call
    curve_secret: str | None = None  # CURVE: this client's secret key file (fgc-bank keys)
    curve_server: str | None = None  # CURVE: the server's public key file


@dataclass(frozen=True)
class RunConfig:
    phase: str = "bas"
    out_dir: str = "runs/fgc"
    seed: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    save_every: int = 1  # epochs between checkpoints (the last epoch is always saved)
    max_steps: int = 0  # > 0: cap training steps per epoch (smoke tests)
    progress: bool = True  # tqdm bars on rank 0
    save_feature_banks: bool = True  # gather feature-bank rows into checkpoints
    dump_gate_banks: bool = False  # each rank writes its gate bank at the end (consistency check)
    tensorboard: bool = False  # also log the epoch records to OUT_DIR/tensorboard (optional package)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    gates: GateLossConfig = field(default_factory=GateLossConfig)
    fgc: FGCConfig = field(default_factory=FGCConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        if not self.fgc.contrast_blocks and self.model.arch in ARCHS:  # the architecture's own default
            blocks = default_contrast_blocks(self.model.arch)
            object.__setattr__(self, "fgc", dataclasses.replace(self.fgc, contrast_blocks=blocks))
        validate(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (tuples become lists) for checkpoints and logs."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> TrainConfig:
        """Rebuild from :meth:`to_dict` output; unknown sections or keys are an error."""
        parts = {}
        for f in fields(cls):
            section_type = f.default_factory  # type: ignore[misc]
            values = dict(raw.get(f.name, {}))
            known = {g.name for g in fields(section_type)}
            unknown = set(values) - known
            if unknown:
                raise TrainerError(f"config section {f.name!r} has unknown keys "
                                   f"{sorted(unknown)}; was it written by another version?")
            for g in fields(section_type):
                if g.name in values and isinstance(values[g.name], list):
                    values[g.name] = tuple(values[g.name])
            parts[f.name] = section_type(**values)
        return cls(**parts)

    def replace(self, section: str, **changes: Any) -> TrainConfig:
        """A copy with some fields of one section changed (validated again)."""
        return dataclasses.replace(
            self, **{section: dataclasses.replace(getattr(self, section), **changes)})


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise TrainerError(message)


def validate(cfg: TrainConfig) -> None:
    """Reject settings that cannot work, with the reason and the fix."""
    _check(cfg.model.arch in ARCHS, f"unknown arch {cfg.model.arch!r}; one of {ARCHS}")
    _check(cfg.run.phase in PHASES, f"unknown phase {cfg.run.phase!r}; one of {PHASES}")
    _check(cfg.data.dataset in DATASETS, f"unknown dataset {cfg.data.dataset!r}; one of {DATASETS}")
    _check(cfg.data.batch_size > 1, f"batch size must be > 1, got {cfg.data.batch_size}")
    _check(cfg.optim.epochs > 0, f"epochs must be > 0, got {cfg.optim.epochs}")
    _check(list(cfg.optim.milestones) == sorted(cfg.optim.milestones),
           f"lr milestones must be increasing, got {cfg.optim.milestones}")
    _check(cfg.gates.l0_end >= cfg.gates.l0_start,
           f"l0_end ({cfg.gates.l0_end}) must be >= l0_start ({cfg.gates.l0_start})")
    _check(cfg.fgc.nn_num > 0, f"nn_num must be > 0, got {cfg.fgc.nn_num}")
    _check(cfg.fgc.nn_epoch >= 0, f"nn_epoch must be >= 0, got {cfg.fgc.nn_epoch}")
    _check(cfg.fgc.temperature > 0, f"temperature must be > 0, got {cfg.fgc.temperature}")
    _check(0.0 <= cfg.fgc.bank_momentum < 1.0,
           f"bank momentum must be in [0, 1), got {cfg.fgc.bank_momentum}")
    _check(cfg.fgc.negatives >= 0, f"negatives must be >= 0, got {cfg.fgc.negatives}")


def lr_at(epoch: int, base_lr: float, milestones: tuple[int, ...], gamma: float) -> float:
    """Step schedule: ``base_lr * gamma ** (number of milestones <= epoch)``."""
    return base_lr * gamma ** sum(1 for m in milestones if epoch >= m)
