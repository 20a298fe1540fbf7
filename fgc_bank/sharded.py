"""One bank handle over several shard servers (``fgc-bank serve --shard I/S``).

``connect("tcp://a:5555,tcp://b:5555")`` returns a :class:`ShardedBank`: the methods of every bank
handle, with the answers one server holding every row would give. At connect it asks each server
which shard it is and refuses a set that does not cover every shard exactly once, or whose banks
differ. Then, per op:

* ``create``, ``drop``, ``info``: every shard (``info`` merges the shards' counters).
* ``update``: every shard gets the rows it owns (the others an empty update, so that every shard's
  version counts the same updates as one server's); ``gather``: each id from its owner.
* ``knn``: every shard searches all queries; :func:`fgc_bank.shards.merge_topk` keeps the exact
  top-k. ``knn_update``: every shard searches all queries against its rows as they were, excludes
  each query's own id where it holds it, and updates only the ids it owns: one server's semantics.
* ``sample``: the ids one server would draw, gathered from their owners.
* ``snapshot``: every shard at once, tagged with one group name, which is what ``restore`` takes:
  all shards are restored or, if any lacks its member of the group, none.

All shards are driven by one :class:`~fgc_bank.client.BankClient` (one I/O thread, one socket per
shard), with its retries and exactly-once resends per shard. A call that fails on one shard fails
with that shard's error, its address in the message.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from fgc_bank.api import DEFAULT_TIMEOUT_S, BankHandle
from fgc_bank.client import BankClient
from fgc_bank.errors import BankError, ErrorCode
from fgc_bank.protocol import Reply, Request
from fgc_bank.shards import by_owner, merge_topk, merged_info, owners, sample_ids, split

T = TypeVar("T")
CONFIG_FIELDS = ("rows", "dim", "momentum", "init", "seed", "dtype")
Combine = Callable[[list[Reply]], Reply]
Call = tuple[int, Request]


def _same(reply: Reply) -> Reply:
    return reply


class ShardedBank(BankHandle):
    """The bank handle over shard servers; ``addresses`` in any order."""

    def __init__(self, addresses: list[str], timeout: float = DEFAULT_TIMEOUT_S, **options: Any) -> None:
        if len(set(addresses)) != len(addresses):
            raise BankError(ErrorCode.BAD_ARGUMENT, f"a shard address is given twice in {','.join(addresses)}")
        self.timeout = timeout
        self.client = BankClient(",".join(addresses), timeout=timeout, **options)
        try:
            hellos = self.client.call_all([(i, Request("hello"), _same) for i in range(len(addresses))])
            self._conn = _shard_order(addresses, [h.result for h in hellos])
            for index, conn in enumerate(self._conn):
                self.client.label(conn, f"shard {index}/{len(addresses)} ({addresses[conn]})")
            self._rows = _check_banks([hellos[c].result for c in self._conn], [addresses[c] for c in self._conn])
        except BaseException:
            self.client.close()
            raise
        self.count = len(addresses)
        self.address = ",".join(addresses[c] for c in self._conn)  # in shard order
        self._rows_lock = threading.Lock()
        # the last blocking call's time, and its slowest shard's round trip (send to reply): the
        # difference is what sharding adds (fan-out, merge), which `fgc-bank bench` measures
        self.last_call: dict[str, float] = {}

    def close(self) -> None:
        """Close every shard's connection."""
        self.client.close()

    # -- transport: a request becomes calls to shards and one combined reply --------------------

    def _submit(self, request: Request, decode: Callable[[Reply], T]) -> concurrent.futures.Future[T]:
        out: concurrent.futures.Future[T] = concurrent.futures.Future()
        try:
            calls, combine = self._plan(request)
        except BankError as exc:
            out.set_exception(exc)
            return out
        futures = [self.client.submit_to(self._conn[shard], sub, _same) for shard, sub in calls]
        left = [len(futures)]
        lock = threading.Lock()

        def landed(_: concurrent.futures.Future) -> None:
            with lock:
                left[0] -= 1
                if left[0]:
                    return
            try:
                out.set_result(decode(combine([f.result() for f in futures])))
            except BankError as exc:
                out.set_exception(exc)
            except Exception as exc:  # noqa: BLE001 - a reply that lacks what its op promises
                out.set_exception(BankError(ErrorCode.BAD_MESSAGE, f"malformed {request.op} reply: {exc!r}"))

        for future in futures:
            future.add_done_callback(landed)
        return out

    def _call(self, request: Request, decode: Callable[[Reply], T]) -> T:
        started = time.perf_counter()
        calls, combine = self._plan(request)
        replies = self.client.call_all([(self._conn[shard], sub, _same) for shard, sub in calls])
        result = decode(combine(replies))
        self.last_call = {"total_s": time.perf_counter() - started,
                          "slowest_shard_s": max(self.client.round_trips, default=0.0)}
        return result

    def _every(self, request: Request) -> list[Call]:
        return [(i, Request(request.op, request.bank, dict(request.args), request.arrays)) for i in range(self.count)]

    def _plan(self, request: Request) -> tuple[list[Call], Combine]:
        """The calls that answer ``request`` and how their replies make its reply."""
        op = request.op
        if op in ("knn", "knn_update"):
            return self._every(request), lambda rs: _merged_knn(rs, request.args["k"])
        if op == "update":
            return self._update(request), lambda rs: Reply(0, result={
                "rows_updated": sum(r.result["rows_updated"] for r in rs), "version": rs[0].result["version"]})
        if op == "gather":
            return self._gather(request)
        if op == "sample":
            return self._sample(request)
        if op in ("create", "info"):
            return self._every(request), lambda rs: Reply(0, result=self._learn(_merged_info([r.result for r in rs])))
        if op == "drop":
            return self._every(request), lambda rs: Reply(0, result={"dropped": request.bank})
        if op == "hello":
            return self._every(request), lambda rs: Reply(0, result={
                **rs[0].result, "shard": [0, 1], "shards": self.count, "addresses": self.address.split(","),
                "banks": _merged_banks([r.result["banks"] for r in rs])})
        if op == "stats":
            return self._every(request), lambda rs: Reply(0, result={
                "shards": [r.result for r in rs], "banks": _merged_banks([r.result["banks"] for r in rs])})
        if op == "snapshots":
            return self._every(request), lambda rs: Reply(0, result=_grouped_listing([r.result for r in rs]))
        if op == "snapshot":
            return self._snapshot(request)
        if op == "restore":
            return self._restore(request)
        raise BankError(ErrorCode.UNKNOWN_OP, f"op {op!r} is not served by a sharded bank")

    # -- routing --------------------------------------------------------------------------------

    def _bank_rows(self, name: str | None) -> int:
        """The rows of bank ``name`` (as known at connect or since; asked of shard 0 otherwise)."""
        rows = self._rows.get(name or "")
        if rows is None:
            info = self.client.call_all([(self._conn[0], Request("info", name), _same)])[0].result
            rows = self._learn(_merged_info([info]))["rows"]
        return rows

    def _learn(self, info: dict[str, Any]) -> dict[str, Any]:
        with self._rows_lock:
            self._rows[info["name"]] = int(info["rows"])
        return info

    def _owned(self, request: Request, ids: np.ndarray) -> np.ndarray:
        rows = self._bank_rows(request.bank)
        if ids.ndim != 1 or (ids.size and (ids.min() < 0 or ids.max() >= rows)):
            bad = "must be 1-D" if ids.ndim != 1 else f"contains id {int(ids.min() if ids.min() < 0 else ids.max())}"
            raise BankError(ErrorCode.ID_OUT_OF_RANGE if ids.ndim == 1 else ErrorCode.BAD_SHAPE,
                            f"ids {bad}; bank {request.bank!r} has rows 0..{rows - 1}")
        return owners(ids, rows, self.count)

    def _update(self, request: Request) -> list[Call]:
        ids, values = request.arrays["ids"], request.arrays["rows"]
        owner = self._owned(request, ids)
        if values.ndim != 2 or values.shape[0] != ids.shape[0]:
            raise BankError(ErrorCode.BAD_SHAPE, f"rows has shape {list(values.shape)} for {ids.shape[0]} ids")
        return [(i, Request("update", request.bank, dict(request.args),
                            {"ids": ids[owner == i], "rows": values[owner == i]})) for i in range(self.count)]

    def _gather(self, request: Request) -> tuple[list[Call], Combine]:
        ids = request.arrays["ids"]
        owner = self._owned(request, ids)
        shards = [i for i in range(self.count) if (owner == i).any()] or [0]
        calls = [(i, Request("gather", request.bank, {}, {"ids": ids[owner == i]})) for i in shards]

        return calls, lambda rs: Reply(0, arrays={"rows": by_owner(owner, {i: r.arrays["rows"] for i, r in zip(shards, rs)})})

    def _sample(self, request: Request) -> tuple[list[Call], Combine]:
        rows = self._bank_rows(request.bank)
        ids = sample_ids(rows, request.args["m"], request.args.get("seed", 0))
        calls, combine = self._gather(Request("gather", request.bank, {}, {"ids": ids}))
        return calls, lambda rs: Reply(0, arrays={"ids": ids, "rows": combine(rs).arrays["rows"]})

    # -- snapshots of every shard ---------------------------------------------------------------

    def _members(self, group: str) -> list[str]:
        """Each shard's snapshot of ``group``, in shard order; BAD_ARGUMENT if one has none."""
        listings = self.client.call_all([(self._conn[i], Request("snapshots"), _same) for i in range(self.count)])
        names = []
        for i, listing in enumerate(listings):
            found = [s["name"] for s in listing.result.get("snapshots", [])
                     if s.get("group") == group and s.get("shard") == [i, self.count]]
            if not found:
                raise BankError(ErrorCode.BAD_ARGUMENT, f"snapshot group {group!r} is not complete: shard "
                                f"{i}/{self.count} ({self.address.split(',')[i]}) has no snapshot of it; "
                                "nothing was restored")
            names.append(found[0])
        return names

    def _snapshot(self, request: Request) -> tuple[list[Call], Combine]:
        group = f"shards{self.count}-{uuid.uuid4().hex[:16]}"
        retain = request.args.get("retain")
        kept = [retain] * self.count if retain in (None, "") else self._members(retain)
        calls = []
        for i in range(self.count):
            args = {**request.args, "group": group}
            if retain is not None:
                args["retain"] = kept[i]
            calls.append((i, Request("snapshot", None, args)))
        return calls, lambda rs: Reply(0, result={
            "name": group, "prefix": rs[0].result.get("prefix", ""), "banks": rs[0].result.get("banks", {}),
            "path": ", ".join(str(r.result.get("path")) for r in rs),
            "seconds": max(r.result.get("seconds", 0.0) for r in rs), "shards": [r.result for r in rs]})

    def _restore(self, request: Request) -> tuple[list[Call], Combine]:
        group = request.args["name"]
        members = self._members(group)
        calls = [(i, Request("restore", None, {**request.args, "name": members[i]})) for i in range(self.count)]
        return calls, lambda rs: Reply(0, result={"name": group, "prefix": rs[0].result.get("prefix", ""),
                                                  "shards": [r.result for r in rs],
                                                  "banks": _merged_banks([r.result.get("banks", {}) for r in rs])})


# -- checks at connect -------------------------------------------------------------------------


def _shard_order(addresses: list[str], hellos: list[dict[str, Any]]) -> list[int]:
    """Connection index of each shard, in shard order; BAD_ARGUMENT unless the servers are shards
    0..S-1 of S = len(addresses), each once."""
    count = len(addresses)
    said = [tuple(h.get("shard", [0, 1])) for h in hellos]
    where = ", ".join(f"{a} is shard {i}/{s}" for a, (i, s) in zip(addresses, said))
    if any(s != count for _, s in said):
        raise BankError(ErrorCode.BAD_ARGUMENT, f"{count} addresses were given but {where}: start each with "
                        f"--shard I/{count}, and give every shard once")
    seen = sorted(i for i, _ in said)
    if seen != list(range(count)):
        twice = sorted({i for i in seen if seen.count(i) > 1})
        missing = sorted(set(range(count)) - set(seen))
        raise BankError(ErrorCode.BAD_ARGUMENT, f"the shards overlap or leave ids uncovered ({where}): shard(s) "
                        f"{twice} given twice, {missing} missing")
    return [said.index((i, count)) for i in range(count)]


def _check_banks(hellos: list[dict[str, Any]], addresses: list[str]) -> dict[str, int]:
    """A bank found on several shards has the same configuration on each, and each shard holds
    its share of the ids; the banks' rows by name. A bank on some shards only is left to the
    calls (another client may be creating it right now; a call on it then names the shard that
    lacks it)."""
    count = len(hellos)
    names = sorted({name for h in hellos for name in h.get("banks", {})})
    rows = {}
    for name in names:
        infos = [h.get("banks", {}).get(name) for h in hellos]
        configs = {tuple(info.get(f) for f in CONFIG_FIELDS) for info in infos if info is not None}
        if len(configs) > 1:
            raise BankError(ErrorCode.BANK_MISMATCH, f"bank {name!r} has different configurations on the shards "
                            f"({', '.join(map(str, sorted(configs, key=str)))}); drop it and create it again")
        infos = [info for info in infos if info is not None]
        expected = split(int(infos[0]["rows"]), count)
        for i, info in enumerate(h.get("banks", {}).get(name) for h in hellos):
            if info is not None and "ids" in info and tuple(info["ids"]) != expected[i]:
                raise BankError(ErrorCode.BANK_MISMATCH, f"bank {name!r} on {addresses[i]} holds ids {info['ids']}, "
                                f"not shard {i}/{count}'s {list(expected[i])}")
        rows[name] = int(infos[0]["rows"])
    return rows


# -- combining replies ---------------------------------------------------------------------------


def _merged_knn(replies: list[Reply], k: int) -> Reply:
    scores, ids = merge_topk([r.arrays["scores"] for r in replies], [r.arrays["ids"] for r in replies], k)
    return Reply(0, result={"version": replies[0].result.get("version", 0)}, arrays={"scores": scores, "ids": ids})


def _merged_info(infos: list[dict[str, Any]]) -> dict[str, Any]:
    """One bank's info from its shards' (see :func:`fgc_bank.shards.merged_info`)."""
    return {**merged_info(infos, (0, int(infos[0]["rows"]))), "shards": len(infos)}


def _merged_banks(per_shard: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    names = [name for name in per_shard[0] if all(name in banks for banks in per_shard)]
    return {name: _merged_info([banks[name] for banks in per_shard]) for name in names}


def _grouped_listing(listings: list[dict[str, Any]]) -> dict[str, Any]:
    """The shards' snapshot listings, and their groups (snapshots of every shard at once) as one
    listing of the sharded bank, newest first: a group is named, aged, pinned and verified as its
    members are, and says which shard lacks its part."""
    groups: dict[str, list[Any]] = {}
    for i, listing in enumerate(listings):
        for snap in listing.get("snapshots", []):
            if snap.get("group"):
                groups.setdefault(snap["group"], [None] * len(listings))[i] = snap
    entries = []
    for group, members in groups.items():
        present = [m for m in members if m is not None]
        missing = [i for i, m in enumerate(members) if m is None]
        entry = {"name": group, "complete": not missing, "members": [None if m is None else m["name"] for m in members],
                 "prefix": present[0].get("prefix", ""), "age_s": max(m.get("age_s", 0.0) for m in present),
                 "banks": present[0].get("banks", {}), "pinned": all(m.get("pinned", False) for m in present),
                 "verified": all(m.get("verified", False) for m in present)}
        if missing:
            entry["error"] = f"incomplete: shard(s) {missing} have no part of it"
        entries.append(entry)
    directories = [listing.get("directory") for listing in listings]
    return {"directory": None if all(d is None for d in directories) else ", ".join(map(str, directories)),
            "shards": listings, "snapshots": sorted(entries, key=lambda e: e["age_s"])}
