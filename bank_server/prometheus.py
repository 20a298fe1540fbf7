"""A Prometheus endpoint (prometheus-client) that reads the server's stats at scrape time.

Names follow Prometheus's conventions: base units (``_seconds``, ``_bytes``), ``_total`` on
counters (the client library appends it), ``_info`` on constant 1-valued metrics that carry
labels, and no repeated words. The metrics, with the ``stats`` fields they come from:

- ``fgc_bank_build_info{version,device,engine}``: 1, for joins and dashboards;
- ``fgc_bank_requests_total{op}``, ``fgc_bank_errors_total{code}``: requests answered, error replies;
- ``fgc_bank_request_duration_seconds{op}``: histogram of successful requests' time from
  arrival to reply (``latency_histogram``);
- per bank (label ``bank``): ``fgc_bank_rows``, ``fgc_bank_updates_total`` (update requests
  applied), ``fgc_bank_rows_updated_total``, ``fgc_bank_searches_total`` (search requests),
  ``fgc_bank_queries_total`` (query vectors), ``fgc_bank_search_calls_total`` (store calls: one
  answers several coalesced searches), ``fgc_bank_placement_info{bank,device,engine}``;
- ``fgc_bank_queue_depth``, ``fgc_bank_held_bytes{what}``, ``fgc_bank_dropped_replies_total``,
  ``fgc_bank_dropped_requests_total``, ``fgc_bank_coalesce_wait_seconds_total``;
- with ``--snapshot-dir``: ``fgc_bank_snapshot_age_seconds``, ``fgc_bank_snapshots_written_total``,
  ``fgc_bank_snapshot_failures_total``, ``fgc_bank_snapshot_last_failure_timestamp_seconds``;
- ``fgc_bank_stats_errors_total``: scrapes whose stats could not be read (logged; the scrape
  still answers, with the process and Python metrics);
- prometheus-client's own ``process_*`` (CPU, memory, open files) and ``python_*`` (version, gc).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    start_http_server,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

if TYPE_CHECKING:
    from fgc_bank.stores import Placement

logger = logging.getLogger(__name__)

# stats key of a bank's counter -> (metric name without _total, help)
BANK_COUNTERS = {
    "updates": ("fgc_bank_updates", "Update requests applied to the bank (its version)"),
    "rows_updated": ("fgc_bank_rows_updated", "Rows written by the bank's updates"),
    "searches": ("fgc_bank_searches", "kNN search requests answered from the bank"),
    "queries": ("fgc_bank_queries", "kNN query vectors searched in the bank"),
    "coalesced_calls": ("fgc_bank_search_calls",
                        "Search calls into the bank's store; one answers every search request coalesced into it"),
}


class StatsCollector:
    """Turns one ``stats()`` dict into metric families on every scrape: nothing to keep in sync.

    A ``stats()`` that raises, or a reply it cannot read, is logged and counted in
    ``fgc_bank_stats_errors_total``; the scrape still succeeds, so a bug here never turns into a
    stream of HTTP 500s or an exception in the HTTP thread.
    """

    def __init__(self, stats: Callable[[], dict[str, Any]], build: dict[str, str] | None = None) -> None:
        self._stats = stats
        self._build = build
        self._errors = 0
        self._lock = threading.Lock()  # scrapes run in parallel HTTP threads

    def collect(self) -> Iterator[Metric]:
        if self._build is not None:
            yield InfoMetricFamily("fgc_bank_build", "fgc-bank version, and where its banks live and what "
                                   "searches them", value=self._build)
        try:
            families = _families(self._stats())
        except Exception:  # a scrape must never fail because of one bad field
            with self._lock:
                self._errors += 1
                count = self._errors
            # The first failure with its traceback, later ones in one line: scrapes repeat every few seconds.
            logger.error("cannot read the server's stats for /metrics (failure %d)", count, exc_info=count == 1)
            families = []
        yield from families
        yield CounterMetricFamily("fgc_bank_stats_errors", "Scrapes whose server stats could not be read "
                                  "(logged)", value=self._errors)


def _families(stats: dict[str, Any]) -> list[Metric]:
    """Every metric family of one ``stats()`` reply, built in full before any is yielded, so a
    scrape has all of them or none."""
    out: list[Metric] = []
    requests = CounterMetricFamily("fgc_bank_requests", "Requests answered, by op", labels=["op"])
    for op, n in stats.get("requests", {}).items():
        requests.add_metric([op], n)
    errors = CounterMetricFamily("fgc_bank_errors", "Error replies, by code", labels=["code"])
    for code, n in stats.get("errors", {}).items():
        errors.add_metric([code], n)
    out += [requests, errors, _latency(stats)]
    out += _banks(stats.get("banks", {}))
    out.append(GaugeMetricFamily("fgc_bank_queue_depth", "Requests waiting for a worker",
                                 value=stats.get("queue_depth", 0)))
    out.append(CounterMetricFamily("fgc_bank_dropped_replies", "Replies to clients that were gone or were "
                                   "not reading theirs", value=stats.get("dropped_replies", 0)))
    out.append(CounterMetricFamily("fgc_bank_dropped_requests", "Requests from clients holding their budget "
                                   "of unread replies", value=stats.get("dropped_requests", 0)))
    out.append(CounterMetricFamily("fgc_bank_coalesce_wait_seconds", "Time workers waited for the clients "
                                   "they had just answered, to search their requests together",
                                   value=stats.get("coalesce_wait_s", 0.0)))
    held = GaugeMetricFamily("fgc_bank_held_bytes", "Memory the server holds, by what holds it", labels=["what"])
    for what, n in stats.get("held_bytes", {}).items():
        held.add_metric([what], n)
    out.append(held)
    return out + _snapshots(stats)


def _latency(stats: dict[str, Any]) -> HistogramMetricFamily:
    """The per-op histogram of successful requests' latency, from the cumulative bucket counts."""
    family = HistogramMetricFamily("fgc_bank_request_duration_seconds", "Time from a request's arrival to "
                                   "its reply, successful requests, by op", labels=["op"])
    bounds = [*(f"{b:g}" for b in stats.get("latency_buckets_s", [])), "+Inf"]
    for op, h in stats.get("latency_histogram", {}).items():
        if len(h["counts"]) != len(bounds):
            raise ValueError(f"latency histogram of {op!r}: {len(h['counts'])} buckets for {len(bounds)} bounds")
        family.add_metric([op], list(zip(bounds, h["counts"])), h["sum_s"])
    return family


def _banks(banks: dict[str, dict[str, Any]]) -> list[Metric]:
    """Rows, counters and placement of every bank, labelled ``bank``."""
    rows = GaugeMetricFamily("fgc_bank_rows", "Rows of the bank", labels=["bank"])
    placed = GaugeMetricFamily("fgc_bank_placement_info", "Where each bank's rows live and what searches "
                               "them (always 1)", labels=["bank", "device", "engine"])
    counters = {key: CounterMetricFamily(name, text, labels=["bank"]) for key, (name, text) in BANK_COUNTERS.items()}
    for name, b in banks.items():
        rows.add_metric([name], b["rows"])
        placed.add_metric([name, b.get("device", "cpu"), b.get("engine", "faiss")], 1)
        for key, family in counters.items():
            family.add_metric([name], b.get(key, 0))
    return [rows, placed, *counters.values()]


def _snapshots(stats: dict[str, Any]) -> list[Metric]:
    """The snapshot metrics of a server with --snapshot-dir (none without one)."""
    out: list[Metric] = []
    snap = stats.get("snapshot")
    if snap is not None:
        out.append(GaugeMetricFamily("fgc_bank_snapshot_age_seconds", "Age of the last snapshot this server "
                                     "wrote", value=snap["age_s"]))
    if "snapshot_failures" in stats:
        out.append(CounterMetricFamily("fgc_bank_snapshots_written", "Snapshots written",
                                       value=stats.get("snapshots_written", 0)))
        out.append(CounterMetricFamily("fgc_bank_snapshot_failures", "Snapshots that could not be written "
                                       "(disk full, directory not writable)", value=stats["snapshot_failures"]))
    failure = stats.get("snapshot_last_failure")
    if failure is not None:
        out.append(GaugeMetricFamily("fgc_bank_snapshot_last_failure_timestamp_seconds",
                                     "When the last snapshot failed (Unix time)", value=failure["time"]))
    return out


def build_info(placement: Placement) -> dict[str, str]:
    """The labels of ``fgc_bank_build_info``: this package's version and the server's placement."""
    from fgc_bank import __version__

    return {"version": __version__, "device": str(placement.device), "engine": placement.engine}


def serve_metrics(stats: Callable[[], dict[str, Any]], port: int, host: str = "127.0.0.1",
                  placement: Placement | None = None) -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port.

    Besides the server's own metrics it serves prometheus-client's process and Python collectors
    (the server's CPU, memory, file descriptors, gc), which dashboards expect of every target.
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats, None if placement is None else build_info(placement)))
    for default in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(default)
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]
