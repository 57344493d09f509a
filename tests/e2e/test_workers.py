"""``imagegw serve`` with IMAGEGW_WORKERS=2: two processes behind one Envoy, one database.

Envoy's config comes from the settings alone (every worker's port), the load reaches
both workers, money stays exact across the two processes on SQLite, one scrape of the
supervisor's metrics port shows the whole group, and the supervisor stops every worker
on SIGTERM, or all of them when one dies.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.test_lifecycle import reconcile_offline
from tests.e2e.test_money import assert_exactly_funded_images_succeed
from tests.stack import metric_sample, process_stack

pytestmark = pytest.mark.e2e


def children(pid: int) -> list[int]:
    return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_exit(pids: list[int], seconds: float) -> None:
    # Not our children (the supervisor's): poll instead of wait().
    deadline = time.monotonic() + seconds
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)


async def test_two_workers_share_the_load_and_spend_the_balance_exactly(tmp_path: Path) -> None:
    async with process_stack(tmp_path / "var", workers=2) as stack:
        supervisor = stack.servers[0]
        workers = children(supervisor.pid)
        assert len(workers) == 2
        assert len(stack.grpc_targets) == 2
        await assert_exactly_funded_images_succeed(stack)
        # One scrape, the group's sums under the single-server names.
        page = await stack.metrics()
        assert metric_sample(page, "imagegw_requests_total", method="GenerateImagesHttp", status="200") == 25
        assert metric_sample(page, "imagegw_requests_total", method="GenerateImagesHttp", status="402") == 175
        assert metric_sample(page, "imagegw_images_generated_total", model="local-1", provider="local") == 25
        assert metric_sample(page, "imagegw_request_duration_seconds_count", method="GenerateImagesHttp") == 200
        assert metric_sample(page, "imagegw_requests_in_flight", method="GenerateImagesHttp") == 0
        assert "imagegw_db_pool_connections_in_use" in page
        # 200 requests, least-request balancing: both workers took a real share.
        hosts = await stack.envoy_host_stats()
        served = [int(hosts[target]["rq_total"]) for target in stack.grpc_targets]
        assert sum(served) >= 200 and min(served) >= 20, served

        supervisor.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(supervisor.wait, 60) == 0
        await asyncio.to_thread(wait_exit, workers, 10)
        assert not any(alive(pid) for pid in workers)


async def test_when_a_worker_dies_the_supervisor_stops_the_rest_and_fails(tmp_path: Path) -> None:
    async with process_stack(tmp_path / "var", workers=2) as stack:
        account_id, _ = await stack.admin.funded_key("1.00")
        supervisor = stack.servers[0]
        first, second = children(supervisor.pid)
        os.kill(first, signal.SIGKILL)
        assert await asyncio.to_thread(supervisor.wait, 60) != 0
        await asyncio.to_thread(wait_exit, [second], 10)
        assert not alive(second)
        ok, balance, reserved, spent = await reconcile_offline(stack, account_id)
        assert (ok, balance, reserved, spent) == (True, 1_000_000, 0, 0)
