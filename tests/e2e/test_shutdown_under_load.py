"""SIGTERM with 100 generations in flight: drain, finish or fail retryably, lose no money."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from pathlib import Path

import httpx
import pytest
import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.e2e.test_lifecycle import reconcile_offline
from tests.fakes.openai_fake import DEFAULT_KEY, start_openai_fake
from tests.stack import ProcessStack, process_stack

pytestmark = pytest.mark.e2e

IN_FLIGHT = 100
UNIT_MICROS = 11000  # gpt-image-1, low quality, 1024x1024 (server/catalog.toml)


async def launch(stack: ProcessStack, key: str, upstream_seconds: float) -> list[asyncio.Task[httpx.Response]]:
    client = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=IN_FLIGHT + 10))
    body = {"model": "gpt-image-1", "prompt": f"[[fake:slow={upstream_seconds}]] a queue of boats",
            "quality": "low", "size": "1024x1024"}

    async def one() -> httpx.Response:
        return await client.post(
            f"{stack.api_base}/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
        )

    tasks = [asyncio.create_task(one()) for _ in range(IN_FLIGHT)]
    asyncio.get_running_loop().call_later(200, lambda: asyncio.ensure_future(client.aclose()))
    return tasks


async def wait_until_reserved(stack: ProcessStack, account_id: str, amount: str) -> None:
    for _ in range(200):
        if (await stack.admin.get(account_id)).reserved_usd == amount:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the {IN_FLIGHT} requests never got in flight")


async def wait_until_envoy_sees_unhealthy(stack: ProcessStack) -> None:
    """Envoy's active health check (1 s interval) marks the draining server unhealthy."""
    async with httpx.AsyncClient(timeout=5) as client:
        for _ in range(60):
            clusters = (await client.get(f"http://127.0.0.1:{stack.settings.envoy_admin_port}/clusters")).text
            if "health_flags::/failed_active_hc" in clusters:
                return
            await asyncio.sleep(0.1)
    raise AssertionError("Envoy never saw the server's NOT_SERVING")


async def test_in_flight_requests_finish_within_the_grace_period(tmp_path: Path) -> None:
    async with start_openai_fake() as fake, process_stack(
        tmp_path / "var", openai_api_key=DEFAULT_KEY, openai_base_url=fake.base_url,
        shutdown_drain_seconds=1.5, shutdown_grace_seconds=30,
    ) as stack:
        account_id, key = await stack.admin.funded_key("5.00")
        tasks = await launch(stack, key, upstream_seconds=4)
        await wait_until_reserved(stack, account_id, f"{IN_FLIGHT * UNIT_MICROS / 1e6:.6f}")
        stack.servers[0].send_signal(signal.SIGTERM)
        async with grpc.aio.insecure_channel(stack.grpc_targets[0]) as channel:
            reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        await wait_until_envoy_sees_unhealthy(stack)
        async with httpx.AsyncClient(timeout=10) as client:
            refused = await client.post(
                f"{stack.api_base}/images/generations", json={"prompt": "late"}, headers={"Authorization": f"Bearer {key}"}
            )
        assert refused.status_code == 503  # Envoy routes nothing to a draining server
        responses = await asyncio.gather(*tasks)
        assert Counter(r.status_code for r in responses) == Counter({200: IN_FLIGHT})
        assert await asyncio.to_thread(stack.servers[0].wait, 60) == 0
        ok, balance, reserved, spent = await reconcile_offline(stack, account_id)
        assert (ok, reserved, spent, balance) == (True, 0, IN_FLIGHT * UNIT_MICROS, 5_000_000 - IN_FLIGHT * UNIT_MICROS)


async def test_requests_past_the_grace_period_fail_retryably_and_are_released(tmp_path: Path) -> None:
    async with start_openai_fake() as fake, process_stack(
        tmp_path / "var", openai_api_key=DEFAULT_KEY, openai_base_url=fake.base_url,
        shutdown_drain_seconds=0.5, shutdown_grace_seconds=1,
    ) as stack:
        account_id, key = await stack.admin.funded_key("5.00")
        tasks = await launch(stack, key, upstream_seconds=30)
        await wait_until_reserved(stack, account_id, f"{IN_FLIGHT * UNIT_MICROS / 1e6:.6f}")
        stack.servers[0].send_signal(signal.SIGTERM)
        responses = await asyncio.gather(*tasks)
        statuses = Counter(r.status_code for r in responses)
        assert statuses == Counter({503: IN_FLIGHT}), statuses
        for response in responses:
            error = response.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "shutting_down")
            assert response.headers["x-should-retry"] == "true"  # the SDK retries it, elsewhere
        assert await asyncio.to_thread(stack.servers[0].wait, 60) == 0
        ok, balance, reserved, spent = await reconcile_offline(stack, account_id)
        assert (ok, balance, reserved, spent) == (True, 5_000_000, 0, 0)
