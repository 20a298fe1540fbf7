"""The trainer's one error type: a setup or input problem, said so a person can fix it.

Raised before any training time is spent (bad dataset directory, unreachable or mismatched bank,
checkpoint from another architecture, ...). The CLI prints the message and exits with status 2.
Under torchrun, only rank 0 prints it; every rank hands it to torchrun's failure summary.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


class TrainerError(Exception):
    """What is wrong and what to do about it, in one message."""


def rank() -> int:
    """This process's torchrun rank (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def record_for_torchrun(message: str) -> None:
    """Put ``message`` where torchrun's failure summary reads it (the error file torchelastic
    names in ``TORCHELASTIC_ERROR_FILE``), as a plain message with no traceback. The summary then
    names the cause even when the rank that failed first is not rank 0, which prints it."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # torchelastic's own layout; the summary prints "py_callstack", here the message alone
        info = {"py_callstack": message, "timestamp": str(int(time.time()))}
        Path(path).write_text(json.dumps({"message": {"message": message, "extraInfo": info}}))
    except OSError:
        pass  # the summary then says less; the message itself was still reported by rank 0
