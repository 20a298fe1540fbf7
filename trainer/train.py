"""The training loop: BAS (batch-shaping) or FGC (gate contrastive loss with bank positives).

One :class:`Trainer` per process (torchrun rank). Each FGC step, visibly and in this order:

1. forward; as each contrasted block's features appear, its ``knn_update`` goes to the feature
   bank (after warm-up; in warm-up a plain momentum ``update``) while the forward continues;
2. losses: CE + rho(epoch) * L0 (+ batch-shaping in BAS, + kappa * gate contrastive in FGC),
   collecting each block's positives from its kNN future only now;
3. backward and optimizer step (DDP averages gradients);
4. gate-bank update, under ``no_grad``: all ranks all-gather (ids, gate logits) and apply the
   same momentum update, so the replicated gate banks stay identical.

The schedule (lr, rho, batch-shaping weight, warm-up) is decided per epoch by :func:`plan_epoch`
from absolute epoch numbers; the modules know nothing about time.
"""

from __future__ import annotations

import concurrent.futures
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler
from tqdm import tqdm

from fgc_bank.losses import (
    batch_shaping_loss,
    batch_shaping_weight,
    gate_contrastive_loss,
    l0_loss,
    l0_weight,
    sampled_gate_contrastive_loss,
)
from fgc_bank.results import KnnResult
from fgc_bank.torch import positives
from trainer.banks import FeatureBanks, GateBanks
from trainer.checkpoint import BEST_FILE, CHECKPOINT_FILE, METRICS_FILE, Checkpoint, save_checkpoint
from trainer.config import TrainConfig, lr_at
from trainer.distributed import DistContext, all_reduce_sum, barrier
from trainer.evaluate import EvalResult, evaluate
from trainer.logs import TENSORBOARD_DIR, MetricsLog, TensorBoardLog
from trainer.macs import MacProfile
from trainer.models import GatedOutput, GatedResNet

logger = logging.getLogger(__name__)

LOSS_PARTS = ("loss", "ce", "bs", "l0", "gate")


@dataclass(frozen=True)
class EpochPlan:
    """What one epoch does, decided from the absolute epoch number."""

    epoch: int
    phase: str
    lr: float
    rho: float  # L0 weight
    bs_weight: float  # batch-shaping weight (BAS only)
    kappa: float  # gate contrastive weight (FGC only)
    knn: bool  # FGC after warm-up: positives from the feature bank's kNN


def plan_epoch(cfg: TrainConfig, epoch: int, fgc_start: int | None) -> EpochPlan:
    """The schedule of FGC.md for ``epoch`` (FGC phase iff ``fgc_start`` is not None)."""
    lr = lr_at(epoch, cfg.optim.lr, cfg.optim.milestones, cfg.optim.gamma)
    rho = l0_weight(epoch, cfg.gates.rho, cfg.gates.l0_start, cfg.gates.l0_end)
    if fgc_start is None:
        zeta = batch_shaping_weight(epoch, cfg.gates.bs_weight, cfg.gates.bs_end)
        return EpochPlan(epoch, "bas", lr, rho, zeta, 0.0, False)
    knn = epoch - fgc_start >= cfg.fgc.nn_epoch
    return EpochPlan(epoch, "fgc", lr, rho, 0.0, cfg.fgc.kappa, knn)


@dataclass
class Banks:
    """The FGC phase's banks (absent in BAS)."""

    features: FeatureBanks
    gates: GateBanks


@dataclass
class Meter:
    """Sums over an epoch's steps on this rank; ``reduce`` combines ranks."""

    sums: Tensor  # LOSS_PARTS weighted by batch size, then correct, open gates, gates, examples

    @classmethod
    def zeros(cls, device: torch.device) -> Meter:
        return cls(torch.zeros(len(LOSS_PARTS) + 4, dtype=torch.float64, device=device))

    @torch.no_grad()
    def add(self, parts: dict[str, Tensor], out: GatedOutput, labels: Tensor) -> None:
        batch = len(labels)
        values = [parts[name].detach().double() * batch for name in LOSS_PARTS]
        correct = (out.logits.argmax(1) == labels).sum().double()
        open_gates = sum(g.detach().sum().double() for g in out.gates)
        gates = float(sum(g.numel() for g in out.gates))
        extra = [correct, open_gates, torch.tensor(gates, dtype=torch.float64), torch.tensor(
            float(batch), dtype=torch.float64)]
        self.sums += torch.stack(values + [e.to(self.sums.device) for e in extra])

    def reduce(self, ctx: DistContext) -> dict[str, float]:
        sums = all_reduce_sum(self.sums.clone(), ctx).tolist()
        examples = max(sums[-1], 1.0)
        out = {f"train_{name}": sums[i] / examples for i, name in enumerate(LOSS_PARTS)}
        n = len(LOSS_PARTS)
        out["train_top1"] = sums[n] / examples
        out["train_density"] = sums[n + 1] / max(sums[n + 2], 1.0)
        return out


class Trainer:
    """Runs epochs, evaluates, logs and checkpoints. Built by :func:`trainer.builder.build_trainer`."""

    def __init__(self, cfg: TrainConfig, ctx: DistContext, model: GatedResNet, net: nn.Module,
                 optimizer: torch.optim.Optimizer, loaders: tuple[DataLoader, DataLoader],
                 sampler: DistributedSampler, macs: MacProfile, banks: Banks | None,
                 start_epoch: int, fgc_start: int | None) -> None:
        self.cfg, self.ctx = cfg, ctx
        self.model = model  # the plain module: evaluation, checkpoints
        self.net = net  # what trains: DDP(model) with several ranks, else model
        self.optimizer = optimizer
        self.train_loader, self.test_loader = loaders
        self.sampler, self.macs, self.banks = sampler, macs, banks
        self.start_epoch, self.fgc_start = start_epoch, fgc_start
        self.out_dir = Path(cfg.run.out_dir)
        self.metrics = MetricsLog(self.out_dir / METRICS_FILE if ctx.is_main else None)
        self.tensorboard = (TensorBoardLog.open(self.out_dir / TENSORBOARD_DIR)
                            if ctx.is_main and cfg.run.tensorboard else None)
        self.best_top1 = 0.0
        self.global_step = start_epoch * len(self.train_loader)  # what the bank requests are tagged with
        self.bank_wait = 0.0  # seconds this rank waited for kNN answers in the current epoch
        self.init_from: str | None = None  # the checkpoint whose weights started this run (--init-from)

    def fit(self) -> EvalResult:
        """Train from ``start_epoch`` to ``epochs``, evaluating after each epoch."""
        result = None
        last = self.cfg.optim.epochs - 1
        self.metrics.write({"event": "start", "phase": self.cfg.run.phase, "start_epoch": self.start_epoch,
                            "fgc_start": self.fgc_start, "init_from": self.init_from,
                            "world_size": self.ctx.world_size}, self.global_step)
        for epoch in range(self.start_epoch, self.cfg.optim.epochs):
            plan = plan_epoch(self.cfg, epoch, self.fgc_start)
            started = time.monotonic()
            stats = self.train_epoch(plan)
            result = evaluate(self.model, self.test_loader, self.macs, self.ctx)
            self.log_epoch(plan, stats, result, time.monotonic() - started)
            self.keep_best(epoch + 1, result)
            if (epoch + 1 - self.start_epoch) % self.cfg.run.save_every == 0 or epoch == last:
                self.save(epoch + 1)
        if result is None:
            logger.warning("nothing to train: the run is at epoch %d of %d", self.start_epoch,
                           self.cfg.optim.epochs)
            result = evaluate(self.model, self.test_loader, self.macs, self.ctx)
        self.finish(result)
        return result

    def train_epoch(self, plan: EpochPlan) -> dict[str, float]:
        """One pass over this rank's shard."""
        self.net.train()
        self.sampler.set_epoch(plan.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = plan.lr
        meter = Meter.zeros(self.ctx.device)
        self.bank_wait = 0.0
        bar = tqdm(self.train_loader, desc=f"epoch {plan.epoch} {plan.phase}", leave=False,
                   disable=not (self.ctx.is_main and self.cfg.run.progress), dynamic_ncols=True)
        for step, batch in enumerate(bar):
            if 0 < self.cfg.run.max_steps <= step:
                break
            images, labels, ids = (t.to(self.ctx.device, non_blocking=True) for t in batch)
            global_step = plan.epoch * len(self.train_loader) + step  # the same on every rank
            parts, out = self.train_step(images, labels, ids, plan, host_ids=batch[2], global_step=global_step)
            self.global_step = global_step + 1
            meter.add(parts, out, labels)
            if step % 10 == 0:  # SYNC (deliberate, every 10 steps): the progress bar's loss
                bar.set_postfix(loss=f"{parts['loss'].item():.3f}")
        stats = meter.reduce(self.ctx)
        wait = all_reduce_sum(torch.tensor([self.bank_wait], dtype=torch.float64, device=self.ctx.device), self.ctx)
        stats["bank_wait_s"] = float(wait) / self.ctx.world_size  # per rank, averaged over ranks
        return stats

    def train_step(self, images: Tensor, labels: Tensor, ids: Tensor, plan: EpochPlan,
                   host_ids: Tensor | None = None, global_step: int | None = None
                   ) -> tuple[dict[str, Tensor], GatedOutput]:
        """Forward (issuing bank requests), losses, backward, step, gate-bank update. ``host_ids``:
        the batch's ids as the loader gave them, on the host (the bank requests need them there;
        copying ``ids`` back from a GPU would wait for it). ``global_step`` tags the bank requests,
        so that N ranks search and update the feature banks as one process with the global batch."""
        pending: dict[int, concurrent.futures.Future[KnnResult]] = {}
        hook = self._bank_hook(ids if host_ids is None else host_ids, plan, pending, global_step) \
            if self.banks else None
        out: GatedOutput = self.net(images, on_features=hook)
        parts = self.losses(out, labels, ids, plan, pending)
        self.optimizer.zero_grad(set_to_none=True)
        parts["loss"].backward()
        self.optimizer.step()
        if self.banks is not None:  # FGC step 4, after the loss
            logits = {b: taps.gate_logits for b, taps in out.taps.items()}
            self.banks.gates.update(ids, logits, self.ctx)
        return parts, out

    def _bank_hook(self, ids: Tensor, plan: EpochPlan, pending: dict[int, concurrent.futures.Future[KnnResult]],
                   global_step: int | None = None) -> Callable[[int, Tensor], None]:
        """The forward's ``on_features``: send each contrasted block's features right away."""
        ids_np = ids.cpu().numpy()  # the loader's host ids (fit passes them): no copy, no sync
        features_bank = self.banks.features  # type: ignore[union-attr]

        def on_features(block: int, features: Tensor) -> None:
            future = features_bank.issue(block, ids_np, features, search=plan.knn, step=global_step)
            if future is not None:
                pending[block] = future

        return on_features

    def losses(self, out: GatedOutput, labels: Tensor, ids: Tensor, plan: EpochPlan,
               pending: dict[int, concurrent.futures.Future[KnnResult]]) -> dict[str, Tensor]:
        """Every loss term, unweighted, and the weighted total under ``"loss"``."""
        ce = F.cross_entropy(out.logits, labels)
        zero = ce.new_zeros(())
        # Summed over blocks = one call on all blocks' channels side by side (sorts are per channel).
        bs = batch_shaping_loss(torch.cat(out.gate_probs, dim=1)) if plan.bs_weight else zero
        l0 = l0_loss(out.gate_probs)
        gate = self.gate_loss(out, ids, pending) if self.banks is not None else zero
        total = ce + plan.bs_weight * bs + plan.rho * l0 + plan.kappa * gate
        return {"loss": total, "ce": ce, "bs": bs, "l0": l0, "gate": gate}

    def gate_loss(self, out: GatedOutput, ids: Tensor,
                  pending: dict[int, concurrent.futures.Future[KnnResult]]) -> Tensor:
        """FGC step 3 summed over contrasted blocks; waits for each block's kNN only here."""
        total = out.logits.new_zeros(())
        for block, taps in out.taps.items():
            found = None
            if block in pending:
                waited = time.perf_counter()
                found = pending[block].result()
                self.bank_wait += time.perf_counter() - waited
            total = total + self._contrast(taps.gate_logits, block, positives(ids, found))
        return total

    def _contrast(self, gate_logits: Tensor, block: int, pos: Tensor) -> Tensor:
        bank = self.banks.gates[block]  # type: ignore[union-attr]
        fgc = self.cfg.fgc
        if fgc.negatives == 0:
            return gate_contrastive_loss(gate_logits, bank, pos, fgc.temperature)
        negatives = torch.randint(0, len(bank), (fgc.negatives,), device=bank.device)
        return sampled_gate_contrastive_loss(gate_logits, bank[pos], bank[negatives], len(bank),
                                             fgc.temperature)

    def log_epoch(self, plan: EpochPlan, stats: dict[str, float], result: EvalResult,
                  seconds: float) -> None:
        """One metrics record and one log line (rank 0)."""
        record = {"event": "epoch", **asdict(plan), **stats, "test_top1": result.top1,
                  "test_density": result.density, "macs_kept": result.macs_kept,
                  "block_density": list(result.block_density), "seconds": seconds}
        self.metrics.write(record, self.global_step)
        if self.tensorboard is not None:
            self.tensorboard.write(record, self.global_step)
        if self.ctx.is_main:
            mode = "knn" if plan.knn else ("warm-up" if plan.phase == "fgc" else "bas")
            logger.info("epoch %d (%s, lr %.3g, rho %.3g) loss %.4f train-acc %.3f | %s",
                        plan.epoch, mode, plan.lr, plan.rho, stats["train_loss"],
                        stats["train_top1"], result.summary())

    def keep_best(self, epochs_done: int, result: EvalResult) -> None:
        """Rank 0 writes ``best.pt`` beside ``checkpoint.pt`` when the test top-1 beats every
        earlier epoch of the run: the model and config only (for ``fgc-train eval`` and
        ``--init-from``), not the banks or the optimizer."""
        best = self.out_dir / BEST_FILE
        if result.top1 <= self.best_top1 and best.exists():
            return
        self.best_top1 = max(self.best_top1, result.top1)
        if self.ctx.is_main:
            save_checkpoint(best, Checkpoint(self.cfg.to_dict(), epochs_done, self.fgc_start,
                                             self.model.state_dict(), best_top1=self.best_top1))

    def save(self, epochs_done: int) -> None:
        """Rank 0 writes ``checkpoint.pt``; other ranks wait so no bank moves meanwhile."""
        if self.ctx.is_main:
            save_checkpoint(self.out_dir / CHECKPOINT_FILE, self.checkpoint(epochs_done))
        barrier(self.ctx)

    def checkpoint(self, epochs_done: int) -> Checkpoint:
        """The run's state; the feature banks as a paired server snapshot when the server keeps
        snapshots, else (with save_feature_banks) as rows copied into the checkpoint."""
        gate_bank = feature_banks = bank_snapshot = None
        if self.banks is not None:
            gate_bank = self.banks.gates.state_dict()
            bank_snapshot = self.banks.features.snapshot()
            if bank_snapshot is None and self.cfg.run.save_feature_banks:
                feature_banks = {str(b): torch.from_numpy(rows)
                                 for b, rows in self.banks.features.export_rows().items()}
        return Checkpoint(self.cfg.to_dict(), epochs_done, self.fgc_start, self.model.state_dict(),
                          self.optimizer.state_dict(), gate_bank, feature_banks, self.best_top1,
                          bank_snapshot)

    def finish(self, result: EvalResult) -> None:
        """Final record; optional per-rank gate-bank dumps (consistency checks)."""
        if self.banks is not None and self.cfg.run.dump_gate_banks:
            path = self.out_dir / f"gate_bank.rank{self.ctx.rank}.pt"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(self.banks.gates.state_dict(), path)
        bank_stats = self.banks.features.stats() if self.banks and self.ctx.is_main else None
        self.metrics.write({"event": "final", "test_top1": result.top1,
                            "test_density": result.density, "macs_kept": result.macs_kept,
                            "dense_macs": result.dense_macs, "gated_macs": result.gated_macs,
                            "best_top1": self.best_top1, "bank_stats": bank_stats}, self.global_step)
        if self.tensorboard is not None:
            self.tensorboard.close()
        barrier(self.ctx)
