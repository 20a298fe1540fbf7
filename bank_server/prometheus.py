"""A Prometheus endpoint (prometheus-client) that reads the server's stats at scrape time."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class StatsCollector:
    """Turns one ``stats()`` dict into metric families on every scrape: nothing to keep in sync."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        requests = CounterMetricFamily("fgc_bank_requests", "Requests answered, by op", labels=["op"])
        for op, n in stats.get("requests", {}).items():
            requests.add_metric([op], n)
        errors = CounterMetricFamily("fgc_bank_errors", "Error replies, by code", labels=["code"])
        for code, n in stats.get("errors", {}).items():
            errors.add_metric([code], n)
        latency = GaugeMetricFamily("fgc_bank_latency_seconds", "Recent request latency", labels=["op", "quantile"])
        for op, q in stats.get("latency", {}).items():
            latency.add_metric([op, "0.5"], q["p50_ms"] / 1e3)
            latency.add_metric([op, "0.99"], q["p99_ms"] / 1e3)
        rows = GaugeMetricFamily("fgc_bank_bank_rows", "Rows per bank", labels=["bank"])
        updates = CounterMetricFamily("fgc_bank_bank_rows_updated", "Rows updated per bank", labels=["bank"])
        queries = CounterMetricFamily("fgc_bank_bank_queries", "kNN queries per bank", labels=["bank"])
        placed = GaugeMetricFamily("fgc_bank_bank_placement", "Where each bank's rows live and what "
                                   "searches them (always 1)", labels=["bank", "device", "engine"])
        for name, b in stats.get("banks", {}).items():
            placed.add_metric([name, b.get("device", "cpu"), b.get("engine", "faiss")], 1)
            rows.add_metric([name], b["rows"])
            updates.add_metric([name], b["rows_updated"])
            queries.add_metric([name], b["queries"])
        yield from (requests, errors, latency, rows, updates, queries, placed)
        yield GaugeMetricFamily("fgc_bank_queue_depth", "Requests waiting for a worker", value=stats.get("queue_depth", 0))
        yield CounterMetricFamily("fgc_bank_dropped_replies", "Replies to clients that were gone or "
                                  "were not reading theirs", value=stats.get("dropped_replies", 0))
        yield CounterMetricFamily("fgc_bank_dropped_requests", "Requests from clients holding their "
                                  "budget of unread replies", value=stats.get("dropped_requests", 0))
        yield CounterMetricFamily("fgc_bank_coalesce_wait_seconds", "Time workers waited for the clients "
                                  "they had just answered, to search their requests together",
                                  value=stats.get("coalesce_wait_s", 0.0))
        held = GaugeMetricFamily("fgc_bank_held_bytes", "Memory the server holds, by what holds it",
                                 labels=["what"])
        for what, n in stats.get("held_bytes", {}).items():
            held.add_metric([what], n)
        yield held
        snap = stats.get("snapshot")
        if snap is not None:
            yield GaugeMetricFamily("fgc_bank_snapshot_age_seconds", "Age of the last snapshot", value=snap["age_s"])
        if "snapshot_failures" in stats:  # a server with --snapshot-dir
            yield CounterMetricFamily("fgc_bank_snapshots_written", "Snapshots written",
                                      value=stats.get("snapshots_written", 0))
            yield CounterMetricFamily("fgc_bank_snapshot_failures", "Snapshots that could not be written "
                                      "(disk full, directory not writable)", value=stats["snapshot_failures"])
        failure = stats.get("snapshot_last_failure")
        if failure is not None:
            yield GaugeMetricFamily("fgc_bank_snapshot_last_failure_timestamp_seconds",
                                    "When the last snapshot failed (Unix time)", value=failure["time"])


def serve_metrics(stats: Callable[[], dict[str, Any]], port: int, host: str = "127.0.0.1") -> int:
    """Start the /metrics HTTP endpoint in a daemon thread; returns the bound port."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(stats))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_address[1]
