"""The in-process bank: the client's interface with no server, for one-process runs and tests.

Numpy requests still go through the protocol's encode and decode (no copies: buffers are views),
so a request the server would refuse is refused here too, with the same error. Torch tensors are
not turned into numpy: the request carries them as they are (made contiguous float32 or int64 on
their own device), gets the same checks (:func:`fgc_bank.protocol.check_request`, then the
bank's), and the bank answers with tensors on its device, so ``local://`` with a bank on a GPU
and CUDA tensors never copies through the host (the checks read a few scalars back).
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from fgc_bank.api import DEFAULT_TIMEOUT_S, BankHandle, is_tensor
from fgc_bank.errors import BankError, BankUnavailable
from fgc_bank.layout import Layout
from fgc_bank.protocol import Reply, Request, check_request, decode_request, encode_request
from fgc_bank.service import BankService, Limits

T = TypeVar("T")


class LocalBank(BankHandle):
    """A :class:`BankService` in this process behind the :class:`BankHandle` methods.

    ``device`` and ``engine`` place its banks as ``fgc-bank serve``'s options do (``cpu``,
    ``cuda``, ``cuda:N``, ``auto``; ``auto``, ``faiss``, ``torch``, ``faiss-gpu``); a device
    that is not there is a BankError(BAD_ARGUMENT) here, at once."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, limits: Limits | None = None, *,
                 device: str = "cpu", engine: str = "auto") -> None:
        self.address = "local://"
        self.timeout = timeout
        layout = Layout.resolve(engine, device)
        self.service: BankService | None = BankService(limits or Limits(), layout)
        self.keeps_tensors = len(layout.placements) == 1  # a bank split over devices merges in numpy
        self._next_id = 0

    def _submit(self, request: Request, decode: Callable[[Reply], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            if self.service is None:
                raise BankUnavailable("this local bank was closed")
            self._next_id += 1
            request.id = self._next_id
            if any(is_tensor(array) for array in request.arrays.values()):
                request = check_request(request)
            else:
                request = decode_request(encode_request(request))
            reply = self.service.handle(request)
            future.set_result(decode(reply.unwrap()))
        except BankError as exc:
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Drop every bank."""
        self.service = None
