"""FGC's two banks as the trainer holds them.

* :class:`FeatureBanks` — one feature bank F_b per contrasted block, held by a bank service
  (``local://`` in-process, or a shared ``fgc-bank serve`` that all ranks talk to). Each step issues
  one ``knn_update`` per block as soon as the block's features exist (FGC steps 1 and 2 fused), and
  collects the positives when the loss needs them.
* :class:`GateBanks` — one gate bank G_b per contrasted block, a tensor replicated on every rank.
  The exact contrastive loss needs all of it each step; ranks stay identical because every rank
  applies the same all-gathered (ids, gate logits) with ``fgc_bank.torch.gate_update``.

The per-bank pieces (:class:`~fgc_bank.torch.FeatureBank`, :func:`~fgc_bank.torch.positives`,
:func:`~fgc_bank.torch.gate_update`) are the public layer that FGC's drop-in modules use too;
this module adds what a run needs: several blocks, all-gathers, snapshots and checkpoints.

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
from fgc_bank.bank import initial_rows
from fgc_bank.errors import BankError, BankTimeout, BankUnavailable, ErrorCode
from fgc_bank.results import KnnResult
from fgc_bank.torch import FeatureBank, gate_update
from trainer.distributed import DistContext, all_gather_rows
from trainer.errors import TrainerError

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 5.0
TRANSFER_CHUNK = 8192  # rows per overwrite request when restoring a bank


class GateBanks:
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
        """FGC step 4 on every rank: all-gather the step's (ids, a_b), then the momentum update
        (``fgc_bank.torch.gate_update``: an id repeated across ranks counts once).

        Parameters
        ----------
        ids : (B,) int64 dataset indices of this rank's batch, on the rows' device.
        gate_logits : block -> (B, C_b) gate logits of this rank's batch (detached here).
        """
        values = {b: a.detach().to(self.rows[b].dtype) for b, a in gate_logits.items()}
        all_ids, all_values = all_gather_rows(ids, values, ctx)
        for block, rows in all_values.items():
            gate_update(self.rows[block], all_ids, rows, self.momentum)

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


def open_bank(address: str, timeout: float, curve_secret: str | None = None,
              curve_server: str | None = None) -> BankHandle:
    """Connect to a bank service and prove it answers, or say how to start one.

    ``curve_secret`` / ``curve_server``: this client's secret key file and the server's public
    key file, for a server started with ``--curve-secret`` (see ``fgc-bank keys``).
    """
    curve = {k: v for k, v in (("curve_secret", curve_secret), ("curve_server", curve_server)) if v}
    if curve and address.startswith("local://"):
        raise TrainerError("--curve-secret/--curve-server authenticate to a bank server; an "
                           "in-process bank (--bank local://) takes no keys")
    if len(curve) == 1:
        raise TrainerError("CURVE needs both --curve-secret (this client's secret key file) and "
                           "--curve-server (the server's public key file)")
    try:
        probe = connect(address, timeout=min(timeout, PROBE_TIMEOUT_S), **curve)
        try:
            probe.hello()
        finally:
            probe.close()
        return connect(address, timeout=timeout, **curve)
    except (BankUnavailable, BankTimeout) as exc:
        if exc.message.startswith("authentication refused") or ": authentication refused" in exc.message:
            raise TrainerError(f"the bank at {address} refused this trainer's CURVE key ({exc.message})") from exc
        keys = (" (with CURVE: are the key files the server's pair and one it allows?)"
                if curve else "")
        raise TrainerError(f"cannot reach the bank at {address} ({exc.message}){keys}; "
                           f"{serve_hint(address)}, or use --bank local:// for an in-process "
                           "bank") from exc
    except BankError as exc:
        raise TrainerError(f"bad bank address {address!r}: {exc.message}") from exc


def serve_hint(address: str) -> str:
    """How to start a server at ``address``: its own port (or endpoint), never a default one."""
    if "," in address or address.startswith("rdzv://"):
        return "start every shard server with `fgc-bank serve --shard I/S` (README: several servers)"
    if address.startswith("tcp://") and ":" in address[6:]:
        host, _, port = address[6:].rpartition(":")
        where = "" if host in ("127.0.0.1", "localhost", "[::1]") else f" on {host}, with --host 0.0.0.0,"
        return f"start one{where} with `fgc-bank serve --port {port}`"
    return f"start one with `fgc-bank serve --endpoint {address}`"


class FeatureBanks:
    """The contrasted blocks' feature banks in a bank service, named ``f"{prefix}/{block}"``.

    Use :meth:`open` to build one; it creates (or joins) the banks and checks their shape.
    """

    def __init__(self, client: BankHandle, banks: dict[int, FeatureBank], scope: str = "") -> None:
        self.client, self.banks = client, banks
        self.names = {b: bank.name for b, bank in banks.items()}
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
        banks = {b: _create(client, f"{prefix}/{b}", size, dim, momentum, k, seed + b)
                 for b, dim in dims.items()}
        for bank in banks.values():
            if int(bank.info.get("updates", 0)) > 0:
                logger.warning("bank %r at %s already holds %d updates: joining it as it is",
                               bank.name, client.address, bank.info["updates"])
        return cls(client, banks, scope=f"{prefix}/")

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
        if search:
            return self.banks[block].knn_update_async(ids, features, step=step)
        self.banks[block].update(ids, features)
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
        return {block: bank.rows() for block, bank in self.banks.items()}

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


def _create(client: BankHandle, name: str, size: int, dim: int, momentum: float, k: int,
            seed: int) -> FeatureBank:
    try:
        return FeatureBank(client, name, size, dim, k=k, momentum=momentum, seed=seed)
    except BankError as exc:
        if exc.code is ErrorCode.BANK_MISMATCH:
            raise TrainerError(f"bank {name!r} at {client.address} does not fit this run: "
                               f"{exc.message}; the dataset has {size} examples and the block "
                               f"has {dim} channels. Use another --bank-prefix, or restart the "
                               "bank server") from exc
        raise TrainerError(f"cannot create bank {name!r} at {client.address}: {exc}") from exc
