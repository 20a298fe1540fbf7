"""FGC's two banks as the trainer holds them.

* :class:`FeatureBanks` — one feature bank F_b per contrasted block, held by a bank service
  (``local://`` in-process, or a shared ``fgc-bank serve`` that all ranks talk to). Each step issues
  one ``knn_update`` per block as soon as the block's features exist (FGC steps 1 and 2 fused), and
  collects the positives when the loss needs them.
* :class:`GateBank` — one gate bank G_b per contrasted block, a tensor replicated on every rank.
  The exact contrastive loss needs all of it each step; ranks stay identical because every rank
  applies the same all-gathered (ids, gate logits) with ``fgc_bank.bank.momentum_update_``.

Every write to either bank is an explicit call in the training step, never a side effect of
autograd.
"""

from __future__ import annotations

import concurrent.futures
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fgc_bank import connect
from fgc_bank.api import BankHandle
from fgc_bank.bank import initial_rows, momentum_update_
from fgc_bank.errors import BankError, BankTimeout, BankUnavailable, ErrorCode
from fgc_bank.results import KnnResult
from trainer.distributed import DistContext, all_gather_rows
from trainer.errors import TrainerError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
TRANSFER_CHUNK = 8192  # rows per gather / overwrite request when saving or restoring a bank


def first_occurrence(ids: Tensor) -> tuple[Tensor, Tensor]:
    """Distinct ids and the position of each one's first occurrence in ``ids``.

    Returns
    -------
    unique : (U,) int64 sorted distinct ids; first : (U,) int64 positions into ``ids``.
    """
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(len(ids), device=ids.device)
    first = torch.full((len(unique),), len(ids), dtype=torch.int64, device=ids.device)
    return unique, first.scatter_reduce_(0, inverse, positions, reduce="amin")


class GateBank:
    """Replicated gate banks G_b (N x C_b each), identical on every rank.

    Parameters
    ----------
    dims : contrasted block index -> its gate channels C_b.
    size : N, the number of training examples.
    momentum : m of FGC step 4 (0.5).
    seed : initialisation seed, the same on every rank (block b uses ``seed + b``).
    device : where the rows live (the model's device: the loss multiplies against them).
    """

    def __init__(self, dims: dict[int, int], size: int, momentum: float, seed: int,
                 device: torch.device | str) -> None:
        self.momentum = momentum
        self.rows = {b: initial_rows(size, c, "uniform", seed + b).to(device) for b, c in dims.items()}

    def __getitem__(self, block: int) -> Tensor:
        return self.rows[block]

    @torch.no_grad()
    def update(self, ids: Tensor, gate_logits: dict[int, Tensor], ctx: DistContext) -> None:
        """FGC step 4 on every rank: all-gather the step's (ids, a_b), then the momentum update.

        Parameters
        ----------
        ids : (B,) int64 dataset indices of this rank's batch, on the rows' device.
        gate_logits : block -> (B, C_b) gate logits of this rank's batch (detached here).
        """
        values = {b: a.detach().to(self.rows[b].dtype) for b, a in gate_logits.items()}
        all_ids, all_values = all_gather_rows(ids, values, ctx)
        unique, first = first_occurrence(all_ids)  # a padded sampler may repeat an id across ranks
        for block, rows in all_values.items():
            momentum_update_(self.rows[block], unique, rows[first], self.momentum)

    def state_dict(self) -> dict[str, Tensor]:
        return {str(b): rows.cpu() for b, rows in self.rows.items()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        for block, rows in self.rows.items():
            saved = state.get(str(block))
            if saved is None or saved.shape != rows.shape:
                raise TrainerError(f"checkpoint gate bank for block {block} is "
                                   f"{None if saved is None else tuple(saved.shape)}, expected "
                                   f"{tuple(rows.shape)}; resume with the same dataset and blocks")
            rows.copy_(saved)


def open_bank(address: str, timeout: float) -> BankHandle:
    """Connect to a bank service and prove it answers, or say how to start one."""
    try:
        probe = connect(address, timeout=min(timeout, PROBE_TIMEOUT_S))
        try:
            probe.hello()
        finally:
            probe.close()
        return connect(address, timeout=timeout)
    except (BankUnavailable, BankTimeout) as exc:
        raise TrainerError(f"cannot reach the bank at {address} ({exc.message}); start one with "
                           "`fgc-bank serve --port 5555` and pass --bank tcp://127.0.0.1:5555, or "
                           "use --bank local:// for an in-process bank") from exc
    except BankError as exc:
        raise TrainerError(f"bad bank address {address!r}: {exc.message}") from exc


class FeatureBanks:
    """The contrasted blocks' feature banks in a bank service, named ``f"{prefix}/{block}"``.

    Use :meth:`open` to build one; it creates (or joins) the banks and checks their shape.
    """

    def __init__(self, client: BankHandle, names: dict[int, str], k: int, scope: str = "") -> None:
        self.client, self.names, self.k = client, names, k
        self.scope = scope  # "prefix/": this run's snapshots and restores touch only its banks
        self.paired: str = ""  # the snapshot the run's checkpoint names ("" before the first)

    @classmethod
    def open(cls, client: BankHandle, prefix: str, dims: dict[int, int], size: int,
             momentum: float, k: int, seed: int = 0) -> FeatureBanks:
        """Create the banks with ``exist_ok`` (safe from every rank) and check they fit.

        Raises
        ------
        TrainerError : a bank of that name exists with another shape or momentum, or k >= N.
        """
        if not 0 < k < size:
            raise TrainerError(f"nn_num = {k} positives per instance needs a bank of more than "
                               f"{k} rows, but the dataset has {size} examples; lower --nn-num")
        names = {b: f"{prefix}/{b}" for b in dims}
        for block, dim in dims.items():
            info = _create(client, names[block], size, dim, momentum, seed + block)
            if int(info.get("updates", 0)) > 0:
                logger.warning("bank %r at %s already holds %d updates: joining it as it is",
                               names[block], client.address, info["updates"])
        return cls(client, names, k, scope=f"{prefix}/")

    def issue(self, block: int, ids: np.ndarray, features: Tensor, search: bool, step: int | None = None
              ) -> concurrent.futures.Future[KnnResult] | None:
        """Send block ``block``'s features: kNN + update (``search``) or the update alone.

        Parameters
        ----------
        ids : (B,) int64 dataset indices.
        features : (B, C) detached features avgpool(h), any device.
        search : after warm-up: FGC steps 1+2 (returns a future); in warm-up: step 2 only.
        step : the global training step: every rank's request of the step searches the bank as
            it was before the step, and the step's updates land in a fixed order (step-consistent).
        """
        # SYNC (deliberate, on a GPU): the bank is another process and a request carries host
        # memory, so this waits for the forward up to this block; the search then overlaps the
        # rest of the forward, the loss waits for it only when it needs the positives.
        rows = features.detach().float().cpu().numpy()
        if search:
            return self.client.knn_update_async(self.names[block], ids, rows, self.k, step=step)
        self.client.update(self.names[block], ids, rows, mode="momentum")
        return None

    def snapshot(self) -> str | None:
        """Ask the bank server for a snapshot of this run's banks to pair with the checkpoint
        written next; None if it keeps none (an in-process bank, or a server without
        --snapshot-dir). It retains the snapshot the current checkpoint names, so a crash before
        the new checkpoint is written still finds that one (see bank_server.snapshot.pinned)."""
        try:
            name = str(self.client.snapshot(self.scope, retain=self.paired)["name"])
        except BankError as exc:
            if exc.code is ErrorCode.BAD_ARGUMENT:
                return None
            raise TrainerError(f"the bank server at {self.client.address} failed to snapshot: {exc}") from exc
        self.paired = name  # called only to write a checkpoint: the next call comes after it
        return name

    def restore_snapshot(self, name: str) -> None:
        """Put this run's banks back to snapshot ``name`` (the one paired with a checkpoint),
        leaving every other bank on the server as it is."""
        try:
            self.client.restore(name, prefix=self.scope)
        except BankError as exc:
            raise TrainerError(f"this checkpoint pairs with bank snapshot {name}, which the server at "
                               f"{self.client.address} cannot restore ({exc.message}); start "
                               "`fgc-bank serve` with the --snapshot-dir the run used") from exc
        self.paired = name

    def export_rows(self) -> dict[int, np.ndarray]:
        """Every bank's rows (N x C float32), gathered in chunks, for a checkpoint."""
        out = {}
        for block, name in self.names.items():
            size = int(self.client.info(name)["rows"])
            chunks = [self.client.gather(name, np.arange(s, min(s + TRANSFER_CHUNK, size)))
                      for s in range(0, size, TRANSFER_CHUNK)]
            out[block] = np.concatenate(chunks)
        return out

    def restore_rows(self, saved: dict[int, Any]) -> None:
        """Overwrite the banks with rows saved by :meth:`export_rows` (a resumed run)."""
        for block, name in self.names.items():
            rows = np.asarray(saved[block], dtype=np.float32)
            for s in range(0, len(rows), TRANSFER_CHUNK):
                ids = np.arange(s, min(s + TRANSFER_CHUNK, len(rows)))
                self.client.update(name, ids, rows[ids], mode="overwrite")

    def stats(self) -> dict[str, Any]:
        """The service's counters for this run's banks."""
        banks = self.client.stats().get("banks", {})
        return {name: banks.get(name) for name in self.names.values()}


def _create(client: BankHandle, name: str, size: int, dim: int, momentum: float,
            seed: int) -> dict[str, Any]:
    try:
        return client.create(name, size, dim, momentum=momentum, init="uniform", seed=seed,
                             exist_ok=True)
    except BankError as exc:
        if exc.code is ErrorCode.BANK_MISMATCH:
            raise TrainerError(f"bank {name!r} at {client.address} does not fit this run: "
                               f"{exc.message}; the dataset has {size} examples and the block "
                               f"has {dim} channels. Use another --bank-prefix, or restart the "
                               "bank server") from exc
        raise TrainerError(f"cannot create bank {name!r} at {client.address}: {exc}") from exc


def positives(ids: Tensor, found: KnnResult | None) -> Tensor:
    """FGC step 1's positive sets: each instance's own id, then its k neighbours.

    Parameters
    ----------
    ids : (B,) int64 dataset indices, on the loss's device.
    found : the kNN answer (B, k) of the batch's ``knn_update``, or None in warm-up.

    Returns
    -------
    (B, 1) in warm-up, else (B, 1 + k) int64, on ``ids``' device.
    """
    own = ids.reshape(-1, 1)
    if found is None:
        return own
    found_ids = np.asarray(found.ids, dtype=np.int64)
    if (found_ids < 0).any():  # checked on the host copy: no GPU sync
        raise TrainerError("the bank answered fewer than k neighbours (-1 ids); lower --nn-num")
    neighbours = torch.from_numpy(found_ids).to(ids.device, non_blocking=True)
    return torch.cat([own, neighbours], dim=1)
