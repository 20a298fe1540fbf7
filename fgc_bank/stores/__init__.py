"""Row stores, and the one registry that picks one for an engine and a device.

Engines: ``faiss``, the CPU store (:mod:`fgc_bank.stores.cpu`: torch.mm, FAISS heaps and the
int8/bf16 prefilter; host memory only), ``torch``, the torch store
(:mod:`fgc_bank.stores.torch_store`: a tensor on any device, low-precision scoring checked by a
proven bound), and ``faiss-gpu``, the torch store searched by ``faiss.knn_gpu``
(:mod:`fgc_bank.stores.faiss_gpu`: a CUDA device and FAISS built for GPUs). ``auto`` picks the CPU
store on a CPU when FAISS is installed, else the torch store, never ``faiss-gpu`` (which is faster
is measured, not assumed: ask for it by name); the environment variable ``FGC_BANK_ENGINE``
(``faiss`` or ``torch``) changes what ``auto`` picks (the test suite runs the bank's tests once
per engine this way).
Devices: ``cpu``, ``cuda``, ``cuda:N``; ``auto`` is the first GPU torch sees, else the CPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.stores.base import RowStore

ENGINE_ENV = "FGC_BANK_ENGINE"
ENGINES = {"faiss": "fgc_bank.stores.cpu.store:CpuStore", "torch": "fgc_bank.stores.torch_store:TorchStore",
           "faiss-gpu": "fgc_bank.stores.faiss_gpu:FaissGpuStore"}
AUTO_ENGINES = ("faiss", "torch")  # what ``auto`` (and FGC_BANK_ENGINE) may pick


def resolve_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch device; ``auto``: the first GPU torch sees, else the CPU. A GPU that
    is not there is a BankError, not a CUDA traceback."""
    if str(device) == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"unknown device {device!r}: {exc}") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise BankError(ErrorCode.BAD_ARGUMENT, f"device {device!r}: this torch has no CUDA GPU "
                            f"(torch {torch.__version__}, built for CUDA {torch.version.cuda})")
        index = 0 if resolved.index is None else resolved.index
        if index >= torch.cuda.device_count():
            raise BankError(ErrorCode.BAD_ARGUMENT, f"device {device!r}: torch sees "
                            f"{torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", index)
    if resolved.type != "cpu":
        raise BankError(ErrorCode.BAD_ARGUMENT, f"device {device!r}: banks live on cpu or cuda devices")
    return resolved


def resolve_engine(engine: str, device: torch.device) -> str:
    """``engine`` for ``device``; ``auto``: the CPU store on a CPU with FAISS, else torch."""
    if engine == "auto" and os.environ.get(ENGINE_ENV) in AUTO_ENGINES:
        engine = os.environ[ENGINE_ENV]
    if engine == "auto":
        return "faiss" if device.type == "cpu" and importlib.util.find_spec("faiss") else "torch"
    if engine not in ENGINES:
        raise BankError(ErrorCode.BAD_ARGUMENT, f"unknown engine {engine!r}; engines: auto, {', '.join(ENGINES)}")
    if engine == "faiss" and device.type != "cpu":
        raise BankError(ErrorCode.BAD_ARGUMENT, "engine 'faiss' searches host memory; a bank on "
                        f"{device} is searched by engine 'torch'")
    if engine == "faiss" and not importlib.util.find_spec("faiss"):
        raise BankError(ErrorCode.BAD_ARGUMENT, "engine 'faiss' needs FAISS: pip install faiss-cpu")
    if engine == "faiss-gpu":
        from fgc_bank.stores.faiss_gpu import gpu_faiss

        gpu_faiss(device)  # a CPU device or a FAISS without GPUs: its one-line refusal
    return engine


def store_class(engine: str = "auto", device: str | torch.device = "cpu") -> type[RowStore]:
    """The store class that ``engine`` names on ``device``."""
    module, name = ENGINES[resolve_engine(engine, resolve_device(device))].split(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Placement:
    """Where a server's (or an in-process service's) banks live and what searches them, resolved
    once (``auto`` made concrete, a missing GPU refused) when it is made."""

    engine: str = "auto"
    device: str = "cpu"

    @classmethod
    def resolve(cls, engine: str = "auto", device: str | torch.device = "cpu") -> Placement:
        """A placement with ``auto`` resolved; BankError(BAD_ARGUMENT) for one that cannot be."""
        resolved = resolve_device(device)
        return cls(resolve_engine(engine, resolved), str(resolved))

    @property
    def store(self) -> type[RowStore]:
        return store_class(self.engine, self.device)

    def make(self, rows: torch.Tensor) -> RowStore:
        """A store holding ``rows`` (N, D) float32, copied or moved to the device."""
        return self.store(rows, torch.device(self.device))
