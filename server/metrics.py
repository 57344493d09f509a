"""Prometheus metrics, served on their own port (``IMAGEGW_METRICS_PORT``).

Each ``Metrics`` owns its registry, so tests and several servers in one process never
share counters. The README lists every metric and what it means.

With ``IMAGEGW_WORKERS=N`` the workers are one process group and one scrape target:
the supervisor (``server.workers``) sets ``PROMETHEUS_MULTIPROC_DIR`` for them, so
prometheus_client's multiprocess mode writes every worker's samples to files there, and
the supervisor alone serves ``/metrics`` (``serve_process_group``), summing them under the
same names. The mode is chosen when prometheus_client is imported, from that variable;
gauges say how workers combine (``livesum``: the sum over the living workers).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

__all__ = ["MULTIPROC_ENV", "Metrics", "mark_process_dead", "multiprocess_directory", "serve_process_group"]

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Generations take from well under a second (local-1) to minutes (GPT image models).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
# A store put/get or a wait for a database connection: milliseconds, seconds when ill.
_FAST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    """The gateway's metrics; components receive it from the composition root."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "imagegw_requests", "RPCs handled, by method, model, provider and HTTP status.",
            ["method", "model", "provider", "status"], registry=r,
        )
        self.request_seconds = Histogram(
            "imagegw_request_duration_seconds", "Whole-request latency, by method.",
            ["method"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.in_flight = Gauge(
            "imagegw_requests_in_flight", "RPCs being handled now, by method.", ["method"], registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_seconds = Histogram(
            "imagegw_upstream_duration_seconds", "Provider call latency, by provider, model and outcome.",
            ["provider", "model", "outcome"], buckets=_LATENCY_BUCKETS, registry=r,
        )
        self.images = Counter(
            "imagegw_images_generated", "Images delivered to callers, by model and provider.",
            ["model", "provider"], registry=r,
        )
        self.captured_micros = Counter(
            "imagegw_captured_microdollars", "Money captured for delivered images (micro-dollars).", ["model"], registry=r
        )
        self.released_micros = Counter(
            "imagegw_released_microdollars", "Reserved money released unspent (micro-dollars).", ["model"], registry=r
        )
        self.reservations_open = Gauge(
            "imagegw_reservations_open", "Reservations this process holds for requests in flight.", registry=r,
            multiprocess_mode="livesum",
        )
        self.upstream_retries = Counter(
            "imagegw_upstream_retries", "Upstream calls retried after a transient failure, by provider.",
            ["provider"], registry=r,
        )
        self.large_answers = Gauge(
            "imagegw_upstream_large_answers",
            "Upstream answers above 256 KiB being read, parsed and decoded (decoding), or waiting for a slot (waiting).",
            ["state"], registry=r,
        )
        self.fallbacks = Counter(
            "imagegw_fallbacks", "Requests moved to a fallback model, by model and fallback.",
            ["model", "fallback"], registry=r,
        )
        self.store_seconds = Histogram(
            "imagegw_store_duration_seconds", "Image store operations, by operation and outcome.",
            ["operation", "outcome"], buckets=_FAST_BUCKETS, registry=r,
        )
        self.store_errors = Counter(
            "imagegw_store_errors", "Image store failures, by operation and whether a retry may pass.",
            ["operation", "retryable"], registry=r,
        )
        self.images_not_stored = Counter(
            "imagegw_images_not_stored", "Images a provider delivered that could not be stored (request failed, not charged).",
            ["model"], registry=r,
        )
        self.db_pool_in_use = Gauge(
            "imagegw_db_pool_connections_in_use", "Database connections checked out of the pool now.", registry=r,
            multiprocess_mode="livesum",
        )
        self.db_pool_waits = Counter(
            "imagegw_db_pool_waits", "Transactions that found every pooled connection in use and waited.", registry=r
        )
        self.db_pool_acquire_seconds = Histogram(
            "imagegw_db_pool_acquire_seconds", "Time to get a pooled database connection (waits, connects, pings).",
            buckets=_FAST_BUCKETS, registry=r,
        )

    def serve(self, host: str, port: int) -> object:
        """Serves /metrics from a daemon thread (prometheus_client's own server), so a
        scrape never waits on the event loop; returns the server for shutdown."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def serve_process_group(host: str, port: int, directory: Path) -> object:
    """Serves the summed metrics of every process writing to ``directory`` (multiprocess
    mode); returns the server for shutdown."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server


def multiprocess_directory() -> Path | None:
    """The multiprocess directory this process writes to, when it is a worker."""
    value = os.environ.get(MULTIPROC_ENV)
    return Path(value) if value else None
