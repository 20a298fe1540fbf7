"""One error hierarchy for fgc-bank, with stable codes that cross the wire.

A server answers every bad request with ``{code, message}``; the client turns that back into the
same exception class, so a caller handles a remote error exactly like a local one.
"""

from __future__ import annotations

import reprlib
from enum import Enum


class ErrorCode(str, Enum):
    """Stable error codes. Their string values are part of the wire protocol: never rename one."""

    BAD_MESSAGE = "bad_message"  # garbage or truncated msgpack, wrong frame count, bad header
    VERSION = "version"  # protocol version the server does not speak
    UNKNOWN_OP = "unknown_op"
    BAD_ARGUMENT = "bad_argument"  # a scalar argument missing, of the wrong type or out of range
    BAD_DTYPE = "bad_dtype"
    BAD_SHAPE = "bad_shape"
    TOO_LARGE = "too_large"  # a frame, batch or bank above the server's limits
    UNKNOWN_BANK = "unknown_bank"
    BANK_EXISTS = "bank_exists"
    BANK_MISMATCH = "bank_mismatch"  # exist_ok create with another shape
    ID_OUT_OF_RANGE = "id_out_of_range"
    DUPLICATE_IDS = "duplicate_ids"
    NOT_FINITE = "not_finite"  # NaN or Inf in rows or queries
    BAD_K = "bad_k"
    BUSY = "busy"  # server queues full: back off and retry
    STALE_REQUEST = "stale_request"  # resent after the server's exactly-once window: not applied
    ID_REUSED = "id_reused"  # a (client, request id) sent again with other content
    STEP_CLOSED = "step_closed"  # a step-tagged knn_update for a training step the bank has closed
    SNAPSHOT_FAILED = "snapshot_failed"  # a snapshot could not be written (disk full, directory not writable)
    TIMEOUT = "timeout"  # client side: no reply in time
    UNAVAILABLE = "unavailable"  # client side: server unreachable or closed
    INTERNAL = "internal"  # a server bug; the server logged the traceback and kept serving


_QUOTE = reprlib.Repr()
_QUOTE.maxlevel, _QUOTE.maxstring, _QUOTE.maxother, _QUOTE.maxlong = 2, 60, 60, 40
_QUOTE.maxlist = _QUOTE.maxtuple = _QUOTE.maxdict = _QUOTE.maxset = 6


def quote(value: object) -> str:
    """A repr of a value from the wire for an error message, bounded in length and depth.

    Error messages quote what a client sent; ``repr`` of a list nested a thousand deep raises
    RecursionError and one of a megabyte string is a megabyte, so nothing else quotes it.
    """
    try:
        return _QUOTE.repr(value)
    except Exception:  # noqa: BLE001 - a value whose repr fails is still an error to report
        return f"<{type(value).__name__}>"


class BankError(Exception):
    """An error with a stable :class:`ErrorCode` and a message a person can act on."""

    def __init__(self, code: ErrorCode | str, message: str) -> None:
        self.code = ErrorCode(code)
        self.message = message
        super().__init__(f"[{self.code.value}] {message}")

    def to_wire(self) -> dict[str, str]:
        """The error as it travels in a reply header."""
        return {"code": self.code.value, "message": self.message}

    @classmethod
    def from_wire(cls, error: object) -> BankError:
        """Rebuild an error from a reply header; unknown codes become INTERNAL rather than crash."""
        if not isinstance(error, dict):
            return cls(ErrorCode.BAD_MESSAGE, f"server sent a malformed error: {quote(error)}")
        code, message = error.get("code"), error.get("message", "")
        message = message[:4096] if isinstance(message, str) else quote(message)
        try:
            code = ErrorCode(code)
        except ValueError:
            return cls(ErrorCode.INTERNAL, f"unknown error code {quote(code)}: {message}")
        if code is ErrorCode.TIMEOUT:
            return BankTimeout(message)
        if code is ErrorCode.UNAVAILABLE:
            return BankUnavailable(message)
        return cls(code, message)


class BankTimeout(BankError):
    """No reply within the call's timeout."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.TIMEOUT, message)


class BankUnavailable(BankError):
    """The server cannot be reached, or the client was closed."""

    def __init__(self, message: str) -> None:
        super().__init__(ErrorCode.UNAVAILABLE, message)
