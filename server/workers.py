"""``imagegw serve`` with ``IMAGEGW_WORKERS=N``: one server process per core, behind Envoy.

One Python process runs its event loop, its protobuf and JSON work and its share of the
database calls under one GIL: on the benchmark it saturates about one core (see
``bench/README.md``). Several processes use several cores. Worker ``i`` is an ordinary
``imagegw serve`` on gRPC port ``IMAGEGW_GRPC_PORT + i``; Envoy lists every worker as an endpoint of the ``imagegw``
cluster (``server.envoy``), balances by least requests and health-checks each one, so
a draining or dead worker gets no new requests. Each port is bound by exactly one
process (no ``SO_REUSEPORT``): the kernel would spread Envoy's few long-lived HTTP/2
connections unevenly, Envoy spreads requests evenly.

The workers share everything that matters through the database (money, rate limits,
idempotency keys, exact across processes as across replicas) and the image folder.
Every worker migrates at start (safe concurrently) and sweeps (race-safe).

Metrics are one view of the group: the workers write theirs to a fresh directory in
prometheus_client's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) and serve none
themselves; this supervisor serves the sum on ``IMAGEGW_METRICS_PORT``, under the same
names a single server uses, so one scrape target is one host however many workers it runs.

This supervisor forwards SIGTERM/SIGINT to every worker and waits for them: each drains
as a lone server would. If a worker exits on its own, the others are stopped too and the
supervisor exits with that status, so the process manager restarts the whole set.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from server.config import Settings
from server.metrics import MULTIPROC_ENV, serve_process_group
from server.signals import StopSignals

__all__ = ["run_workers", "worker_env"]

log = logging.getLogger(__name__)


def worker_env(settings: Settings, index: int, metrics_dir: Path) -> dict[str, str]:
    """The settings that differ for worker ``index`` (0-based)."""
    return {
        "IMAGEGW_WORKERS": "1",
        "IMAGEGW_GRPC_PORT": str(settings.grpc_port + index),
        # The supervisor serves the group's metrics; workers only write theirs.
        "IMAGEGW_METRICS_PORT": "0",
        MULTIPROC_ENV: str(metrics_dir),
    }


def run_workers(settings: Settings, env: Mapping[str, str] | None = None) -> int:
    """Runs ``settings.workers`` servers until SIGTERM/SIGINT; returns the exit status."""
    # Generated secrets are shared by every worker: create them before any worker starts.
    for name in ("key_hash_secret", "url_signing_secret", "admin_token"):
        settings.secret(name)
    stop = StopSignals()
    base = {**os.environ, **(env or {})}
    # Fresh every start: files left by an earlier group would be summed into this one's.
    metrics_dir = Path(tempfile.mkdtemp(prefix="imagegw-metrics-"))
    metrics_server = serve_process_group(settings.metrics_host, settings.metrics_port, metrics_dir) if settings.metrics_port else None
    workers = [
        subprocess.Popen([sys.executable, "-m", "server.cli", "serve"], env={**base, **worker_env(settings, i, metrics_dir)})
        for i in range(settings.workers)
    ]
    log.info("started %d workers on gRPC ports %s", len(workers), ", ".join(t.split(":")[-1] for t in settings.grpc_targets))
    status = 0
    try:
        while not stop.requested:
            exited = [worker for worker in workers if worker.poll() is not None]
            if exited:
                status = exited[0].returncode or 1
                log.error("worker %d exited with status %s; stopping the others", exited[0].pid, exited[0].returncode)
                break
            time.sleep(0.2)
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.send_signal(signal.SIGTERM)
        for worker in workers:
            # Each drains for at most its drain delay plus grace period.
            try:
                worker.wait(timeout=settings.shutdown_drain_seconds + settings.shutdown_grace_seconds + 20)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if metrics_server is not None:
            metrics_server.shutdown()  # type: ignore[attr-defined]
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status
