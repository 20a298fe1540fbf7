"""Build a :class:`~trainer.train.Trainer` from a config, checking every input first.

Order matters: dataset, checkpoint/model and banks are all checked before the first step, so a
bad directory, a checkpoint from another architecture, or an unreachable or mismatched bank stops
the run with a message, not after an epoch of compute.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from trainer.banks import FeatureBanks, GateBanks, open_bank
from trainer.checkpoint import Checkpoint
from trainer.config import TrainConfig
from trainer.data import DatasetSplits, load_dataset, make_loaders
from trainer.distributed import DistContext, barrier
from trainer.errors import TrainerError
from trainer.macs import profile_macs
from trainer.models import GatedResNet, build_model
from trainer.train import Banks, Trainer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StartFrom:
    """A checkpoint to start from: ``resume`` (everything) or weights only (``--init-from``)."""

    checkpoint: Checkpoint
    resume: bool
    path: str | None = None  # where the checkpoint was read from


def build_trainer(cfg: TrainConfig, ctx: DistContext, start: StartFrom | None = None) -> Trainer:
    """Load data, build (and restore) the model, open the banks, wrap in DDP."""
    torch.manual_seed(cfg.run.seed + ctx.rank)  # Gumbel noise differs per rank; DDP syncs weights
    splits = load_dataset(cfg.data.dataset, cfg.data.root, cfg.data.synthetic_size, cfg.run.seed,
                          cfg.data.image_size)
    cfg = fit_model_to_data(cfg, splits)
    contrast = cfg.fgc.contrast_blocks if cfg.run.phase == "fgc" else ()
    model = build_model(cfg.model.arch, cfg.model.num_classes, cfg.model.in_channels, contrast,
                        cfg.model.gate_hidden, cfg.model.gate_tau).to(ctx.device)
    if start is not None:
        load_weights(model, start.checkpoint, cfg)
    train_loader, test_loader, sampler = make_loaders(
        splits, cfg.data.batch_size, cfg.data.workers, ctx.rank, ctx.world_size, cfg.run.seed,
        pin_memory=ctx.device.type == "cuda")
    optimizer = torch.optim.SGD(model.param_groups(cfg.optim.weight_decay), lr=cfg.optim.lr,
                                momentum=cfg.optim.momentum, nesterov=cfg.optim.nesterov)
    start_epoch, fgc_start = schedule_start(cfg, start)
    if start is not None and start.resume and start.checkpoint.optimizer is not None:
        optimizer.load_state_dict(start.checkpoint.optimizer)
    banks = open_banks(cfg, ctx, model, len(splits.train), start) if fgc_start is not None else None
    macs = profile_macs(model, splits.input_shape)
    trainer = Trainer(cfg, ctx, model, wrap(model, ctx), optimizer, (train_loader, test_loader),
                      sampler, macs, banks, start_epoch, fgc_start)
    if start is not None and start.resume:
        trainer.best_top1 = start.checkpoint.best_top1
    if start is not None and not start.resume:
        trainer.init_from = start.path
    return trainer


def fit_model_to_data(cfg: TrainConfig, splits: DatasetSplits) -> TrainConfig:
    """Fill in classes and input channels from the dataset; a restored config must agree."""
    classes, channels = splits.num_classes, splits.input_shape[0]
    return cfg.replace("model", num_classes=classes, in_channels=channels)


def load_weights(model: GatedResNet, checkpoint: Checkpoint, cfg: TrainConfig) -> None:
    """Load model weights, refusing a checkpoint of another architecture or dataset shape."""
    saved = checkpoint.config.get("model", {})
    mine = {"arch": cfg.model.arch, "num_classes": cfg.model.num_classes,
            "in_channels": cfg.model.in_channels}
    for key, value in mine.items():
        if saved.get(key) != value:
            raise TrainerError(f"the checkpoint's model has {key} = {saved.get(key)!r}, this run "
                               f"needs {value!r} (arch {cfg.model.arch} on {cfg.data.dataset}); "
                               "start from a checkpoint of the same architecture and dataset")
    try:
        model.load_state_dict(checkpoint.model, strict=True)
    except RuntimeError as exc:
        raise TrainerError(f"checkpoint weights do not fit {cfg.model.arch}: "
                           f"{str(exc).splitlines()[0]}") from exc


def schedule_start(cfg: TrainConfig, start: StartFrom | None) -> tuple[int, int | None]:
    """(first epoch to run, first epoch of the FGC phase or None for BAS)."""
    if start is None:
        return 0, (0 if cfg.run.phase == "fgc" else None)
    epoch = start.checkpoint.epoch
    if start.resume:
        return epoch, start.checkpoint.fgc_start
    return epoch, (epoch if cfg.run.phase == "fgc" else None)  # --init-from: FGC starts here


def open_banks(cfg: TrainConfig, ctx: DistContext, model: GatedResNet, size: int,
               start: StartFrom | None) -> Banks:
    """Connect to the feature-bank service, create/check the banks, build the gate banks."""
    if ctx.distributed and cfg.fgc.bank.startswith("local://"):
        raise TrainerError(f"--bank local:// is private to each process, but this run has "
                           f"{ctx.world_size} ranks that must share one feature bank; start "
                           "`fgc-bank serve` and pass its tcp:// address to --bank")
    dims = {b: model.block_channels[b] for b in model.contrast_blocks}
    client = open_bank(cfg.fgc.bank, cfg.fgc.bank_timeout, cfg.fgc.curve_secret, cfg.fgc.curve_server)
    features = FeatureBanks.open(client, cfg.fgc.bank_prefix, dims, size, cfg.fgc.bank_momentum,
                                 cfg.fgc.nn_num, seed=cfg.run.seed)
    gates = GateBanks(dims, size, cfg.fgc.bank_momentum, cfg.run.seed, ctx.device)
    if start is not None and start.resume and start.checkpoint.gate_bank is not None:
        gates.load_state_dict(start.checkpoint.gate_bank)
        saved, paired = start.checkpoint.feature_banks, start.checkpoint.bank_snapshot
        if ctx.is_main and paired is not None:  # one rank restores the shared banks
            features.restore_snapshot(paired)
            logger.info("restored bank snapshot %s, taken with the checkpoint", paired)
        elif ctx.is_main and saved is not None:
            features.restore_rows({int(b): rows.numpy() for b, rows in saved.items()})
        elif saved is None:
            logger.info("the checkpoint holds no feature-bank rows: continuing with the banks "
                        "as %s holds them", cfg.fgc.bank)
        barrier(ctx)  # nobody searches a bank that is still being restored
    return Banks(features, gates)


def wrap(model: GatedResNet, ctx: DistContext) -> nn.Module:
    """DDP with several ranks (gradients averaged), the plain model otherwise."""
    if not ctx.distributed:
        return model
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)
