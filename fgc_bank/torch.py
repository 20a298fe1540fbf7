"""Torch modules for FGC backed by a bank service: drop-ins for the FGC authors' code.

People who run the FGC authors' CIFAR-10 code (smn2010/FGC-PR) hold both banks as module buffers
and write them inside autograd. The two modules here keep those call shapes, so a model that used
them changes an import and a constructor argument, and the banks move into a bank service:

* :class:`FeatureMemoryBank` -- ``FeatureMemoryBank(inputSize, outputSize, nn_num, nn_epoch,
  momentum)``, ``bank(x, y, epoch) -> positives``: FGC steps 1 and 2 (search, then momentum
  update) in the bank at ``bank=`` (``local://``, ``tcp://host:port``, ... : whatever
  :func:`fgc_bank.connect` takes, or an open handle).
* :class:`LinearAverage` -- ``LinearAverage(inputSize, outputSize, T, momentum)``, ``bank(x, y) ->
  logits (B, N)``: the gate bank. The softmax needs every row every step, so the rows are a
  replica on the caller's device; the bank service holds the same rows (it is created there, read
  from there, and every update is sent there), so they are in its snapshots.
* :class:`KNNCriterion` and the functions of :mod:`fgc_bank.losses`: the losses.

The building blocks (:class:`FeatureBank`, :func:`positives`, :func:`gate_update`,
:func:`retry_busy`) are what ``fgc-train`` itself uses.

Differences from the authors' code, each deliberate: the own row is left out of the search
exactly (theirs scores it -2, which raw features can undercut); in warm-up the positives are
(B, 1), not (B,), so their shape never depends on the epoch's type of answer; the gate bank is
written by a named method that ``forward`` calls (in training mode, with grad enabled, which is
when their ``backward`` would have run), never from inside autograd.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from fgc_bank.api import DEFAULT_TIMEOUT_S, BankHandle, connect
from fgc_bank.bank import momentum_rows
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.losses import (
    GATE_EPS,
    GATE_TEMPERATURE,
    batch_shaping_loss,
    batch_shaping_weight,
    gate_contrastive_loss,
    l0_loss,
    l0_weight,
    positive_mass_loss,
    sampled_gate_contrastive_loss,
)
from fgc_bank.results import KnnResult

__all__ = [
    "FeatureBank", "FeatureMemoryBank", "KNNCriterion", "LinearAverage", "all_gather_rows",
    "batch_shaping_loss", "batch_shaping_weight", "first_occurrence", "gate_contrastive_loss",
    "gate_update", "l0_loss", "l0_weight", "positive_mass_loss", "positives", "retry_busy",
    "sampled_gate_contrastive_loss",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
BUSY_RETRIES = 8  # waits of 0.05, 0.1, ... 5 s: about 12 s in all before a busy bank ends the call
BUSY_FIRST_WAIT_S = 0.05
BUSY_MAX_WAIT_S = 5.0
TRANSFER_CHUNK = 8192  # rows per gather request when reading a whole bank


def retry_busy(send: Callable[[], concurrent.futures.Future[T]], retries: int = BUSY_RETRIES,
               first_wait: float = BUSY_FIRST_WAIT_S, max_wait: float = BUSY_MAX_WAIT_S
               ) -> concurrent.futures.Future[T]:
    """``send()`` again, after waits doubling from ``first_wait`` up to ``max_wait``, while it is
    answered ``busy``; any other outcome, or the last busy, resolves the returned future.

    A ``busy`` reply means the request was not applied (the server's queues, or this client's
    calls in flight, were full), so sending it again is safe; a bounded number of tries keeps a
    bank that stays overloaded from stalling a run without saying so. Resends happen on a timer
    thread, never on the client's I/O thread that completes the futures.
    """
    outer: concurrent.futures.Future[T] = concurrent.futures.Future()
    waited = [0.0]

    def attempt(tries: int) -> None:
        try:
            inner = send()
        except BankError as exc:  # refused before sending (a bad argument)
            outer.set_exception(exc)
            return
        inner.add_done_callback(lambda done: finished(done, tries))

    def finished(done: concurrent.futures.Future[T], tries: int) -> None:
        exc = done.exception()
        if exc is None:
            outer.set_result(done.result())
        elif isinstance(exc, BankError) and exc.code is ErrorCode.BUSY and tries < retries:
            wait = min(first_wait * 2**tries, max_wait)
            waited[0] += wait
            logger.debug("bank busy (%s); sending again in %.2f s", exc.message, wait)
            timer = threading.Timer(wait, attempt, (tries + 1,))
            timer.daemon = True
            timer.start()
        elif isinstance(exc, BankError) and exc.code is ErrorCode.BUSY:
            outer.set_exception(BankError(ErrorCode.BUSY, f"{exc.message} (still busy after {tries} "
                                          f"retries over {waited[0]:.1f} s)"))
        else:
            outer.set_exception(exc)

    attempt(0)
    return outer


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


@torch.no_grad()
def gate_update(rows: Tensor, ids: Tensor, values: Tensor, momentum: float,
                in_place: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """FGC step 4 on a gate bank: ``rows[id] <- normalise(m * rows[id] + (1 - m) * value)``.

    An id repeated in ``ids`` (a padded sampler gives one example to two ranks) is updated once,
    with its first value, so every replica applies the same thing.

    Parameters
    ----------
    rows : (N, C) float tensor, the gate bank.
    ids : (B,) int64 dataset indices, on ``rows``' device.
    values : (B, C) gate logits (detached here).
    in_place : False leaves ``rows`` untouched (a graph may still need them) and returns a copy.

    Returns
    -------
    rows : the updated (N, C) bank; unique : (U,) ids written; written : (U, C) their values.
    """
    unique, first = first_occurrence(ids)
    written = values.detach().to(rows.dtype)[first]
    new = momentum_rows(rows.index_select(0, unique), written, momentum)
    if in_place:
        return rows.index_copy_(0, unique, new), unique, written
    return rows.index_copy(0, unique, new), unique, written


def all_gather_rows(ids: Tensor, rows: dict[Any, Tensor]) -> tuple[Tensor, dict[Any, Tensor]]:
    """Every rank's ``ids`` and rows concatenated in rank order, the same on every rank; the
    inputs themselves without a process group (or with one rank). Batch sizes may differ.

    Parameters
    ----------
    ids : (B_r,) int64 dataset indices of this rank's batch.
    rows : per key, a (B_r, C_key) tensor.

    Returns
    -------
    ids : (sum_r B_r,) int64; rows : per key, (sum_r B_r, C_key).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, rows
    world, rank = dist.get_world_size(), dist.get_rank()
    sizes = torch.zeros(world, dtype=torch.int64, device=ids.device)
    sizes[rank] = len(ids)
    dist.all_reduce(sizes)
    longest = int(sizes.max())
    keep = torch.cat([torch.arange(int(n), device=ids.device) + r * longest
                      for r, n in enumerate(sizes.tolist())])
    gathered = {key: _gather_padded(value, longest, world)[keep] for key, value in rows.items()}
    return _gather_padded(ids, longest, world)[keep], gathered


def _gather_padded(value: Tensor, longest: int, world: int) -> Tensor:
    padded = value.new_zeros((longest, *value.shape[1:]))
    padded[: len(value)] = value
    out = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(out, padded.contiguous())
    return torch.cat(out)


def positives(ids: Tensor, found: KnnResult | None) -> Tensor:
    """FGC step 1's positive sets: each instance's own id first, then its k neighbours.

    Parameters
    ----------
    ids : (B,) int64 dataset indices, on the loss's device.
    found : the (B, k) answer of the batch's ``knn_update``, or None in warm-up.

    Returns
    -------
    (B, 1) in warm-up, else (B, 1 + k) int64, on ``ids``' device.
    """
    own = ids.reshape(-1, 1)
    if found is None:
        return own
    if isinstance(found.ids, Tensor):
        neighbours = found.ids.to(ids.device, torch.int64)
        short = bool((neighbours < 0).any())  # a sync on a GPU, only for tensor answers
    else:
        found_ids = np.asarray(found.ids, dtype=np.int64)
        short = bool((found_ids < 0).any())  # checked on the host copy: no GPU sync
        neighbours = torch.from_numpy(found_ids).to(ids.device, non_blocking=True)
    if short:
        raise BankError(ErrorCode.BAD_K, "the bank answered fewer than k neighbours (-1 ids): "
                        "k must be below the number of rows; lower nn_num")
    return torch.cat([own, neighbours], dim=1)


def _open(bank: str | BankHandle, timeout: float) -> tuple[BankHandle, bool]:
    """A handle for ``bank`` and whether this module opened it (and so closes it)."""
    if isinstance(bank, BankHandle):
        return bank, False
    return connect(bank, timeout=timeout), True


class FeatureBank:
    """One FGC feature bank F (N x C) in a bank service, torch tensors in and out.

    Created with ``exist_ok`` (so every rank may create it) with FGC's initialisation; a bank of
    that name with another shape or momentum is refused (``bank_mismatch``).

    Parameters
    ----------
    bank : an address for :func:`fgc_bank.connect`, or an open handle (shared, not closed here).
    name : the bank's name in the service.
    size, dim : N (training examples) and C (feature channels).
    k : neighbours per instance (FGC's nn_num), 0 < k < N.
    momentum : m of FGC step 2.
    seed : initialisation seed of the rows.
    """

    def __init__(self, bank: str | BankHandle, name: str, size: int, dim: int, *, k: int,
                 momentum: float = 0.5, seed: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        if not 0 < k < size:
            raise ValueError(f"k = {k} neighbours per instance needs 0 < k < N = {size} rows")
        self.client, self._owned = _open(bank, timeout)
        self.name, self.size, self.dim, self.k = name, size, dim, k
        self.info = self.client.create(name, size, dim, momentum=momentum, init="uniform", seed=seed,
                                       exist_ok=True)

    def knn_update_async(self, ids: Any, features: Tensor, step: int | None = None
                         ) -> concurrent.futures.Future[KnnResult]:
        """FGC steps 1 + 2: the top-k rows of ``features`` (own row excluded), then the momentum
        update of rows ``ids``; retried while the bank answers ``busy``.

        Parameters
        ----------
        ids : (B,) int64 dataset indices (host memory avoids a copy from the GPU).
        features : (B, C) features, any device; detached and copied to the host here.
        step : the global training step (see ``BankHandle.knn_update_async``).
        """
        # SYNC (deliberate, on a GPU): a request carries host memory, so this waits for the
        # forward up to here; the search then overlaps the rest of the forward.
        rows = features.detach().float().cpu().numpy()
        host_ids = _host_ids(ids)
        return retry_busy(lambda: self.client.knn_update_async(self.name, host_ids, rows, self.k,
                                                               step=step))

    def update(self, ids: Any, features: Tensor) -> int:
        """FGC step 2 alone (warm-up); returns the bank's version after it."""
        rows = features.detach().float().cpu().numpy()
        host_ids = _host_ids(ids)
        return retry_busy(lambda: self.client.update_async(self.name, host_ids, rows)).result()

    def rows(self) -> np.ndarray:
        """Every row, (N, C) float32, read in chunks."""
        return read_rows(self.client, self.name, self.size)

    def close(self) -> None:
        """Close the connection if this object opened it."""
        if self._owned:
            self.client.close()


def _host_ids(ids: Any) -> np.ndarray:
    array = ids.detach().cpu().numpy() if isinstance(ids, Tensor) else np.asarray(ids)
    return np.ascontiguousarray(array.reshape(-1), dtype=np.int64)


def read_rows(client: BankHandle, name: str, size: int) -> np.ndarray:
    """Rows 0..size-1 of bank ``name``, (size, D) float32, in chunks a request can carry."""
    chunks = [client.gather(name, np.arange(s, min(s + TRANSFER_CHUNK, size)))
              for s in range(0, size, TRANSFER_CHUNK)]
    return np.concatenate(chunks)


def _flat(x: Tensor) -> Tensor:
    """(B, C, 1, 1) pooled maps, as the authors' blocks pass them, to (B, C)."""
    return x.reshape(x.shape[0], -1) if x.dim() > 2 else x


class FeatureMemoryBank(nn.Module):
    """Drop-in for FGC-PR's ``FeatureMemoryBank``: ``bank(x, y, epoch) -> positives``.

    ``epoch`` counts FGC epochs from 1, as the authors' trainer passes it: up to ``nn_epoch``
    (warm-up) the positives are the own ids alone, (B, 1), and the bank is only updated; after,
    each instance's own id followed by its ``nn_num`` nearest rows, (B, 1 + nn_num), searched
    before the batch's update. Own id first, always.

    Parameters
    ----------
    inputSize : C, the feature width.
    outputSize : N, the number of training examples.
    nn_num, nn_epoch, momentum : as in the authors' code (FGC's k, warm-up epochs, m).
    bank : address or open handle of the bank service (``local://`` is in-process).
    name : the bank's name there; needed when the service is shared (two blocks, two names).
    seed : initialisation seed.
    """

    def __init__(self, inputSize: int, outputSize: int, nn_num: int = 5, nn_epoch: int = 20,
                 momentum: float = 0.5, *, bank: str | BankHandle = "local://", name: str | None = None,
                 seed: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self.nn_num, self.nn_epoch, self.momentum = nn_num, nn_epoch, momentum
        self.bank = FeatureBank(bank, _bank_name(bank, name, "feat"), outputSize, inputSize,
                                k=nn_num, momentum=momentum, seed=seed, timeout=timeout)

    def forward(self, x: Tensor, y: Tensor, epoch: int) -> Tensor:
        """Positives (B, 1) in warm-up or (B, 1 + nn_num), int64 on ``y``'s device."""
        features = _flat(x).detach()
        if epoch <= self.nn_epoch:
            self.bank.update(y, features)
            return positives(y, None)
        return positives(y, self.bank.knn_update_async(y, features).result())


def _bank_name(bank: str | BankHandle, name: str | None, kind: str) -> str:
    if name is not None:
        return name
    if isinstance(bank, str) and bank.startswith("local://"):
        return kind  # a private in-process service: nobody else names banks in it
    raise ValueError(f"give the {kind} bank a name= in the shared service at {bank}: two blocks "
                     "(or two runs) with the same name would share one bank")


class LinearAverage(nn.Module):
    """Drop-in for FGC-PR's gate bank ``LinearAverage``: ``bank(x, y) -> logits (B, N)``.

    The logits are ``x @ G.T / T`` against every row G of the gate bank as it stands, with the
    gradient flowing into ``x``. In training mode with grad enabled, ``forward`` then writes the
    batch's gate logits into the bank (:meth:`update`, FGC step 4), which the authors' code did in
    ``backward``: the loss of this step still sees the rows from before it. Under
    ``torch.no_grad`` (evaluation) nothing is written, as before.

    The rows are a replica on this module's device (``memory``, a buffer) because the softmax
    needs all of them each step; the bank service at ``bank=`` holds the same rows: they are read
    from it at construction (joining a bank that exists) and every update is sent to it. With a
    process group, the batch's (ids, logits) are all-gathered first, so every rank's replica
    applies the same update and one rank (0) sends it.

    Parameters
    ----------
    inputSize : C, gate channels. outputSize : N, training examples.
    T : softmax temperature (0.07). momentum : m of FGC step 4 (0.5).
    bank, name, seed : as for :class:`FeatureMemoryBank`.
    """

    def __init__(self, inputSize: int, outputSize: int, T: float = GATE_TEMPERATURE,
                 momentum: float = 0.5, *, bank: str | BankHandle = "local://", name: str | None = None,
                 seed: int = 0, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        super().__init__()
        self.temperature, self.momentum = T, momentum
        self.client, self._owned = _open(bank, timeout)
        self.name = _bank_name(bank, name, "gate")
        self.client.create(self.name, outputSize, inputSize, momentum=momentum, init="uniform",
                           seed=seed, exist_ok=True)
        self.register_buffer("memory", torch.from_numpy(read_rows(self.client, self.name, outputSize)))
        self._sent: concurrent.futures.Future[int] | None = None

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        """Logits (B, N) = x . G_j / T; then, when training, the bank update."""
        x = _flat(x)
        memory: Tensor = self.memory  # type: ignore[assignment]
        logits = x @ memory.t() / self.temperature  # (B, N); the bank is a constant
        if self.training and torch.is_grad_enabled():
            self.update(x, y)
        return logits

    @torch.no_grad()
    def update(self, x: Tensor, y: Tensor) -> None:
        """FGC step 4: the momentum update of rows ``y`` with gate logits ``x``, on every rank's
        replica and in the bank service. Out of place: the forward's graph keeps the old rows."""
        all_ids, gathered = all_gather_rows(y.to(torch.int64), {"x": _flat(x).detach()})
        memory, unique, written = gate_update(self.memory, all_ids, gathered["x"],  # type: ignore[arg-type]
                                              self.momentum, in_place=False)
        self.memory = memory
        if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
            return
        if self._sent is not None:
            self._sent.result()  # the previous step's write: an error surfaces here, once
        ids, values = unique.cpu().numpy(), written.float().cpu().numpy()
        self._sent = retry_busy(lambda: self.client.update_async(self.name, ids, values))

    def close(self) -> None:
        """Wait for the last write, and close the connection if this module opened it."""
        if self._sent is not None:
            self._sent.result()
            self._sent = None
        if self._owned:
            self.client.close()


class KNNCriterion(nn.Module):
    """Drop-in for FGC-PR's ``KNNCriterion``: the gate contrastive loss from logits.

    ``criterion(logits, positives, epoch)`` with ``logits`` (B, N) from :class:`LinearAverage`
    and ``positives`` (B, P) (or (B,)) from :class:`FeatureMemoryBank`:
    ``-(1/B) sum_i log(sum_{p in P_i} softmax(logits_i)_p + 1e-7)``. ``epoch`` is accepted for
    the call shape only: the positives' width already says warm-up (1) or kNN (1 + k).
    """

    def __init__(self, nn_num: int = 5, nn_epoch: int = 20, eps: float = GATE_EPS) -> None:
        super().__init__()
        self.nn_num, self.nn_epoch, self.eps = nn_num, nn_epoch, eps

    def forward(self, logits: Tensor, positive_ids: Tensor, epoch: int | None = None) -> Tensor:
        return positive_mass_loss(logits, positive_ids.reshape(len(logits), -1), self.eps)
