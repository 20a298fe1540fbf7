"""The trainer's one error type: a setup or input problem, said so a person can fix it.

Raised before any training time is spent (bad dataset directory, unreachable or mismatched bank,
checkpoint from another architecture, ...). The CLI prints the message and exits with status 2.
"""

from __future__ import annotations


class TrainerError(Exception):
    """What is wrong and what to do about it, in one message."""
