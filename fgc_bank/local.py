"""The in-process bank: the client's interface with no server, for one-process runs and tests.

Requests still go through the protocol's encode and decode (no copies: buffers are views), so a
request the server would refuse is refused here too, with the same error.
"""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import TypeVar

from fgc_bank.api import DEFAULT_TIMEOUT_S, BankHandle
from fgc_bank.errors import BankError, BankUnavailable
from fgc_bank.protocol import Reply, Request, decode_request, encode_request
from fgc_bank.service import BankService, Limits

T = TypeVar("T")


class LocalBank(BankHandle):
    """A :class:`BankService` in this process behind the :class:`BankHandle` methods."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT_S, limits: Limits | None = None) -> None:
        self.address = "local://"
        self.timeout = timeout
        self.service: BankService | None = BankService(limits or Limits())
        self._next_id = 0

    def _submit(self, request: Request, decode: Callable[[Reply], T]) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            if self.service is None:
                raise BankUnavailable("this local bank was closed")
            self._next_id += 1
            request.id = self._next_id
            reply = self.service.handle(decode_request(encode_request(request)))
            future.set_result(decode(reply.unwrap()))
        except BankError as exc:
            future.set_exception(exc)
        return future

    def close(self) -> None:
        """Drop every bank."""
        self.service = None
