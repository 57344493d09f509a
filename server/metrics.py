"""Prometheus metrics, served on their own port (``IMAGEGW_METRICS_PORT``).

Each ``Metrics`` owns its registry, so tests and several servers in one process never
share counters. The README lists every metric and what it means.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

__all__ = ["Metrics"]

# Generations take from well under a second (local-1) to minutes (GPT image models).
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)


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
        self.in_flight = Gauge("imagegw_requests_in_flight", "RPCs being handled now, by method.", ["method"], registry=r)
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
            "imagegw_reservations_open", "Reservations this process holds for requests in flight.", registry=r
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

    def serve(self, host: str, port: int) -> object:
        """Serves /metrics from a daemon thread (prometheus_client's own server), so a
        scrape never waits on the event loop; returns the server for shutdown."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server
