"""The bank interface every caller uses, whether the bank is in-process or behind a server.

:class:`BankHandle` turns method calls into protocol :class:`Request` objects and replies into
return values; subclasses only say how a request travels (``_submit``). ``connect(address)`` picks
the subclass from the address: ``local://`` or ``tcp://host:port`` / ``ipc://path``.
"""

from __future__ import annotations

import abc
import concurrent.futures
from collections.abc import Callable
from typing import Any, Self, TypeVar

import numpy as np

from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.protocol import Reply, Request
from fgc_bank.results import KnnResult

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 30.0


def is_tensor(value: Any) -> bool:
    """Whether ``value`` is a torch tensor (told without importing torch)."""
    return hasattr(value, "detach") and hasattr(value, "device")


def _kind(dtype: Any) -> str:
    """numpy's dtype kind letter ("f", "i", "u", "b", "c", ...) of a numpy or torch dtype."""
    if isinstance(dtype, np.dtype):
        return dtype.kind
    if dtype.is_complex:
        return "c"
    if dtype.is_floating_point:
        return "f"
    return "b" if str(dtype) == "torch.bool" else "i" if dtype.is_signed else "u"


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _as_array(values: Any, kinds: str, dtype: str, refusal: str, keep_tensor: bool) -> Any:
    """``values`` (numpy, CPU or CUDA torch tensor, list) as a C-contiguous ``dtype`` numpy array,
    or, with ``keep_tensor``, a torch tensor kept as one on its own device (the in-process bank);
    BAD_DTYPE (``refusal``, then the dtype) unless its dtype kind is one of ``kinds``."""
    tensor = is_tensor(values)
    array = values.detach() if tensor and keep_tensor else np.asarray(values.detach().cpu() if tensor else values)
    if _kind(array.dtype) not in kinds:
        raise BankError(ErrorCode.BAD_DTYPE, f"{refusal}, got {_dtype_name(array.dtype)}")
    if tensor and keep_tensor:
        import torch

        return array.to(getattr(torch, dtype)).contiguous()
    return np.ascontiguousarray(array, dtype=dtype)


def as_ids(ids: Any, what: str = "ids", keep_tensor: bool = False) -> Any:
    """Any integer array-like -> (B,) int64 numpy (or a tensor, see :func:`_as_array`)."""
    return _as_array(ids, "iu", "int64", f"{what} must be integers", keep_tensor)


def as_rows(rows: Any, keep_tensor: bool = False) -> Any:
    """Any numeric array-like -> float32 numpy, a no-op for float32 numpy input (or a tensor)."""
    return _as_array(rows, "fiu", "float32", "rows must be numeric", keep_tensor)


def _update_request(name: str, ids: Any, rows: Any, mode: str, keep: bool = False) -> Request:
    return Request("update", name, {"mode": mode}, {"ids": as_ids(ids, keep_tensor=keep),
                                                     "rows": as_rows(rows, keep)})


def _knn_request(name: str, queries: Any, k: int, exclude: Any, keep: bool = False) -> Request:
    arrays = {"queries": as_rows(queries, keep)}
    if exclude is not None:
        arrays["exclude"] = as_ids(exclude, "exclude", keep)
    return Request("knn", name, {"k": int(k)}, arrays)


def _knn_update_request(name: str, ids: Any, features: Any, k: int, step: int | None = None,
                        keep: bool = False) -> Request:
    args = {"k": int(k)} if step is None else {"k": int(k), "step": int(step)}
    return Request("knn_update", name, args, {"ids": as_ids(ids, keep_tensor=keep), "features": as_rows(features, keep)})


def _version(reply: Reply) -> int:
    return int(reply.result.get("version", 0))


def _knn_result(reply: Reply) -> KnnResult:
    return KnnResult(reply.arrays["scores"], reply.arrays["ids"], _version(reply))


def _as_given(example: Any, decode: Callable[[Reply], T]) -> Callable[[Reply], T]:
    """``decode``, giving its arrays back as torch tensors on ``example``'s device when the caller
    passed a torch tensor (as ``faiss.contrib.torch_utils`` does); numpy callers never load torch.
    A tensor answer (the in-process bank's) already on that device is given back as it is."""
    if not is_tensor(example):
        return decode
    device = example.device

    def convert(array: Any) -> Any:
        if is_tensor(array):
            return array.to(device)  # a no-op on the same device; a blocking copy otherwise
        import torch

        return torch.from_numpy(array).to(device, non_blocking=True)

    def decoded(reply: Reply) -> T:
        result = decode(reply)
        if isinstance(result, KnnResult):
            return KnnResult(convert(result.scores), convert(result.ids), result.version)  # type: ignore[return-value]
        return convert(result)

    return decoded


class BankHandle(abc.ABC):
    """Methods shared by :class:`~fgc_bank.local.LocalBank` and :class:`~fgc_bank.client.BankClient`."""

    address: str
    timeout: float = DEFAULT_TIMEOUT_S
    keeps_tensors: bool = False  # requests carry torch tensors as given (in-process only), not numpy

    @abc.abstractmethod
    def _submit(self, request: Request, decode: Callable[[Reply], T]) -> concurrent.futures.Future[T]:
        """Send ``request``; the future resolves to ``decode(reply)`` or raises its BankError."""

    def _call(self, request: Request, decode: Callable[[Reply], T]) -> T:
        """A blocking call; a transport may answer it without the future (``BankClient`` does)."""
        return self._submit(request, decode).result()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Release the transport; further calls fail with BankUnavailable."""

    def hello(self) -> dict[str, Any]:
        """Protocol and package versions, and every bank's info."""
        return self._call(Request("hello"), lambda r: r.result)

    def stats(self) -> dict[str, Any]:
        """Counters of the service and of every bank."""
        return self._call(Request("stats"), lambda r: r.result)

    def create(self, name: str, rows: int, dim: int, *, momentum: float = 0.5, init: str = "uniform",
               seed: int = 0, exist_ok: bool = False) -> dict[str, Any]:
        """Create an ``rows`` x ``dim`` float32 bank (init "uniform": FGC's U[-s, s]; "unit")."""
        args = {"rows": int(rows), "dim": int(dim), "momentum": float(momentum), "init": init,
                "seed": int(seed), "exist_ok": bool(exist_ok)}
        return self._call(Request("create", name, args), lambda r: r.result)

    def drop(self, name: str) -> None:
        """Delete bank ``name`` and its rows."""
        self._call(Request("drop", name), lambda r: None)

    def info(self, name: str) -> dict[str, Any]:
        """Config and counters of bank ``name``."""
        return self._call(Request("info", name), lambda r: r.result)

    def update_async(self, name: str, ids: Any, rows: Any, *, mode: str = "momentum") -> concurrent.futures.Future[int]:
        """Write ``rows`` (B, D) into ``ids`` (B,): FGC's momentum rule, or ``mode="overwrite"``.
        Resolves to the bank's version (update count) after this update."""
        return self._submit(_update_request(name, ids, rows, mode, self.keeps_tensors), _version)

    def update(self, name: str, ids: Any, rows: Any, *, mode: str = "momentum") -> int:
        """Blocking :meth:`update_async`; returns the bank's version after the update."""
        return self._call(_update_request(name, ids, rows, mode, self.keeps_tensors), _version)

    def knn_async(self, name: str, queries: Any, k: int, *, exclude: Any = None) -> concurrent.futures.Future[KnnResult]:
        """Top-k rows by inner product for each query (B, D); ``exclude`` (B,) drops one id each.
        Scores and ids come back as the queries came: numpy, or torch on the queries' device."""
        return self._submit(_knn_request(name, queries, k, exclude, self.keeps_tensors), _as_given(queries, _knn_result))

    def knn(self, name: str, queries: Any, k: int, *, exclude: Any = None) -> KnnResult:
        """Blocking :meth:`knn_async`."""
        return self._call(_knn_request(name, queries, k, exclude, self.keeps_tensors), _as_given(queries, _knn_result))

    def knn_update_async(self, name: str, ids: Any, features: Any, k: int, *,
                         step: int | None = None) -> concurrent.futures.Future[KnnResult]:
        """FGC's step: top-k of ``features`` against the rows as they were (own id excluded), then
        the momentum update of rows ``ids``. Issue it as soon as the features exist; collect later.
        With ``step`` (the global training step), every rank's request of that step searches the
        bank as it was at the end of the previous step and the step's updates are applied in a
        fixed order when it ends: N ranks compute what one process with the global batch does."""
        request = _knn_update_request(name, ids, features, k, step, self.keeps_tensors)
        return self._submit(request, _as_given(features, _knn_result))

    def knn_update(self, name: str, ids: Any, features: Any, k: int, *, step: int | None = None) -> KnnResult:
        """Blocking :meth:`knn_update_async`."""
        request = _knn_update_request(name, ids, features, k, step, self.keeps_tensors)
        return self._call(request, _as_given(features, _knn_result))

    def gather(self, name: str, ids: Any) -> np.ndarray:
        """Rows ``ids`` (B,) -> (B, D) float32."""
        request = Request("gather", name, {}, {"ids": as_ids(ids, keep_tensor=self.keeps_tensors)})
        return self._call(request, _as_given(ids, lambda r: r.arrays["rows"]))

    def sample(self, name: str, m: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """``m`` distinct ids drawn with ``seed`` (sorted) and their rows."""
        request = Request("sample", name, {"m": int(m), "seed": int(seed)})
        return self._call(request, lambda r: (r.arrays["ids"], r.arrays["rows"]))

    def snapshot(self, prefix: str | None = None, *, retain: str | None = None) -> dict[str, Any]:
        """Ask the server to write a snapshot now; returns where and what.

        ``prefix``: only the banks whose names start with it (end it with "/": "feat/"), so the
        snapshot and its restore concern one run; None: every bank. ``retain``: makes this a
        paired snapshot (for a checkpoint about to name it) and names the snapshot the caller's
        current checkpoint names ("" if none); the server keeps both until the next paired
        snapshot of this prefix."""
        args: dict[str, Any] = {} if prefix is None else {"prefix": prefix}
        if retain is not None:
            args["retain"] = retain
        return self._call(Request("snapshot", None, args), lambda r: r.result)

    def restore(self, name: str, prefix: str | None = None) -> dict[str, Any]:
        """Put back the banks of snapshot ``name`` (as recorded in a checkpoint): those under
        ``prefix`` are replaced (default: the snapshot's own prefix, "" = every bank); every
        other bank on the server is left as it is."""
        args: dict[str, Any] = {"name": name} if prefix is None else {"name": name, "prefix": prefix}
        return self._call(Request("restore", None, args), lambda r: r.result)

    def snapshots(self) -> dict[str, Any]:
        """The server's snapshot directory and the snapshots in it (prefix, age, banks), newest first."""
        return self._call(Request("snapshots"), lambda r: r.result)


def connect(address: str, timeout: float = DEFAULT_TIMEOUT_S, **options: Any) -> BankHandle:
    """Open a bank handle: ``local://`` (in-process), ``tcp://host:port`` / ``ipc://path``, or the
    shard servers of one bank, comma-separated (``tcp://a:5555,tcp://b:5555``: one handle over
    all of them, see ``fgc_bank.sharded``) or found in a torchrun rendezvous store
    (``rdzv://host:port``, see ``fgc_bank.rendezvous``)."""
    if address.startswith("local://"):
        from fgc_bank.local import LocalBank

        return LocalBank(timeout=timeout, **options)
    if address.startswith("rdzv://"):  # shard servers launched by torchrun publish themselves there
        from fgc_bank.rendezvous import lookup

        address = ",".join(lookup(address[len("rdzv://"):], timeout))
        if "," not in address:
            return connect(address, timeout, **options)
    if "," in address:
        addresses = [a.strip() for a in address.split(",")]
        bad = [a for a in addresses if not a.startswith(("tcp://", "ipc://", "inproc://"))]
        if bad:
            raise BankError(ErrorCode.BAD_ARGUMENT, f"shard address {bad[0]!r} must start with tcp:// or ipc://")
        from fgc_bank.sharded import ShardedBank

        return ShardedBank(addresses, timeout=timeout, **options)
    if address.startswith(("tcp://", "ipc://", "inproc://")):
        from fgc_bank.client import BankClient

        return BankClient(address, timeout=timeout, **options)
    raise BankError(ErrorCode.BAD_ARGUMENT, f"bank address {address!r} must start with local://, tcp://, ipc:// or rdzv://")
