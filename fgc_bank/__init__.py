"""fgc-bank: a shared kNN memory bank for Feature-Gate Coupling training.

``connect(address)`` returns a bank handle: ``local://`` for an in-process bank, ``tcp://host:port``
(or ``ipc://path``) for a server started with ``fgc-bank serve``. Both have the same methods.
"""

from importlib.metadata import PackageNotFoundError, version

try:  # the one version string: pyproject.toml's, as installed
    __version__ = version("fgc-bank")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from fgc_bank.api import connect

__all__ = ["__version__", "connect"]
