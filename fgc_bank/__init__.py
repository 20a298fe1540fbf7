"""fgc-bank: a shared kNN memory bank for Feature-Gate Coupling training.

``connect(address)`` returns a bank handle: ``local://`` for an in-process bank, ``tcp://host:port``
(or ``ipc://path``) for a server started with ``fgc-bank serve``. Both have the same methods.
"""

__version__ = "0.1.0"

from fgc_bank.api import connect

__all__ = ["__version__", "connect"]
