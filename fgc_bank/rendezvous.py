"""Shard servers launched by torchrun find their shard and publish their addresses in the
launch's rendezvous store; clients find them there (``connect("rdzv://host:port")``).

``torchrun --nnodes S --nproc_per_node 1 --rdzv-backend c10d --rdzv-endpoint HOST:PORT -m bank_server
--shard auto --rendezvous HOST:PORT`` starts S servers: each takes shard RANK of WORLD_SIZE from
torchrun's environment and writes its address into the c10d rendezvous store at HOST:PORT (a
``torch.distributed.TCPStore`` that torchrun's agent hosts for as long as the job runs). A trainer
given ``--bank rdzv://HOST:PORT`` reads the set from the same store. torch is imported only here,
only when a rendezvous is used: a plain client stays light.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.shards import Shard

COUNT_KEY = "fgc-bank/shards"
ADDRESS_KEY = "fgc-bank/shard/{}"


def shard_from_env() -> Shard:
    """Shard RANK of WORLD_SIZE, as torchrun (or SLURM through it) sets them."""
    rank, world = os.environ.get("RANK"), os.environ.get("WORLD_SIZE")
    if rank is None or world is None:
        raise BankError(ErrorCode.BAD_ARGUMENT, "--shard auto takes the shard from torchrun's RANK and WORLD_SIZE, "
                        "which are not set: launch with torchrun, or give --shard I/S")
    return Shard(int(rank), int(world))


def _store(endpoint: str, timeout_s: float) -> Any:
    from torch.distributed import TCPStore

    host, _, port = endpoint.rpartition(":")
    if not host or not port.isdigit():
        raise BankError(ErrorCode.BAD_ARGUMENT, f"rendezvous endpoint {endpoint!r} must be HOST:PORT")
    try:
        return TCPStore(host.strip("[]"), int(port), is_master=False, wait_for_workers=False,
                        timeout=datetime.timedelta(seconds=timeout_s))
    except (RuntimeError, OSError) as exc:
        raise BankError(ErrorCode.UNAVAILABLE, f"cannot reach the rendezvous store at {endpoint}: {exc}; is the "
                        "torchrun job of the shard servers running with --rdzv-endpoint there?") from None


def reachable(address: str) -> str:
    """``address`` as other machines can connect to it: a wildcard bind names this host."""
    for wildcard in ("tcp://0.0.0.0:", "tcp://[::]:", "tcp://*:"):
        if address.startswith(wildcard):
            return f"tcp://{socket.getfqdn()}:{address[len(wildcard):]}"
    return address


def publish(endpoint: str, shard: Shard, address: str, timeout_s: float = 60.0) -> None:
    """Write shard ``shard``'s address (and the shard count) into the rendezvous store."""
    store = _store(endpoint, timeout_s)
    store.set(ADDRESS_KEY.format(shard.index), reachable(address))
    store.set(COUNT_KEY, str(shard.count))


def lookup(endpoint: str, timeout_s: float = 60.0) -> list[str]:
    """The shard servers' addresses, in shard order, waiting up to ``timeout_s`` for all of them."""
    store = _store(endpoint, timeout_s)
    try:
        store.wait([COUNT_KEY])
        count = int(store.get(COUNT_KEY))
        keys = [ADDRESS_KEY.format(i) for i in range(count)]
        store.wait(keys)
        return [store.get(key).decode() for key in keys]
    except RuntimeError as exc:  # the store's timeout
        raise BankError(ErrorCode.TIMEOUT, f"the shard servers did not all publish their addresses at {endpoint} "
                        f"within {timeout_s:g} s ({exc})") from None
