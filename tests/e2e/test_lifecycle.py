"""Process life cycle through Envoy: graceful shutdown, deadlines, a dead upstream."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.ledger import Database, Ledger
from tests.stack import ProcessStack, process_stack, status_of

pytestmark = pytest.mark.e2e

# Slow enough on two cores to still be running when the test acts (about 2 s of rendering).
HEAVY = {"model": "local-1", "prompt": "a storm over the sea", "n": 4, "size": "1792x1024",
         "response_format": "b64_json", "quality": "high"}


async def generate(stack: ProcessStack, key: str, body: dict[str, object], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=60) as client:
        return await client.post(
            f"{stack.api_base}/images/generations", json=body, headers={"Authorization": f"Bearer {key}", **headers}
        )


async def reconcile_offline(stack: ProcessStack, account_id: str) -> tuple[bool, int, int, int]:
    """Reconciles the stopped stack's database directly: (ok, balance, reserved, spent)."""
    db = Database(stack.settings.resolved_database_url)
    try:
        ledger = Ledger(db, key_hash_secret=b"unused", reservation_ttl_seconds=60)
        report = await ledger.reconcile()
        account = await ledger.get_account(account_id)
        return report.ok, account.balance_micros, account.reserved_micros, account.spent_micros
    finally:
        await db.close()


async def test_sigterm_drains_in_flight_requests_then_envoy_answers_503(tmp_path: Path) -> None:
    async with process_stack(tmp_path / "var", shutdown_drain_seconds=1.5, shutdown_grace_seconds=30) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        in_flight = [asyncio.create_task(generate(stack, key, HEAVY)) for _ in range(4)]
        await asyncio.sleep(0.5)
        stack.servers[0].send_signal(signal.SIGTERM)
        async with grpc.aio.insecure_channel(stack.grpc_targets[0]) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            reply = await health.Check(health_pb2.HealthCheckRequest(service="imagegw.v1.ImageService"), timeout=2)
        assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING
        responses = await asyncio.gather(*in_flight)
        assert [r.status_code for r in responses] == [200] * 4
        assert all(len(r.json()["data"]) == 4 for r in responses)
        exit_code = await asyncio.to_thread(stack.servers[0].wait, 40)
        assert exit_code == 0
        after = await generate(stack, key, HEAVY)
        assert after.status_code == 503
        assert after.json()["error"]["type"] == "server_error"
        assert set(after.json()["error"]) == {"message", "type", "param", "code"}
        ok, balance, reserved, spent = await reconcile_offline(stack, account_id)
        assert (ok, balance, reserved, spent) == (True, 1_000_000 - 16 * 2000, 0, 16 * 2000)


async def test_deadline_shorter_than_the_generation_is_504_and_releases(tmp_path: Path) -> None:
    # One render worker: ten large images take well over a second, the deadline is 0.3 s
    # (a client grpc-timeout, which Envoy forwards and caps at the route timeout).
    async with process_stack(tmp_path / "var", render_workers=1) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        heavy = {**HEAVY, "n": 10}
        response = await generate(stack, key, heavy, **{"grpc-timeout": "300m"})
        assert response.status_code == 504, response.text
        error = response.json()["error"]
        assert (error["type"], error["code"]) == ("server_error", "timeout")
        account = await stack.admin.settled(account_id)
        assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
        usage = await stack.admin.usage(account_id)
        assert [(status_of(u), u.error_code, u.images_delivered) for u in usage] == [("failed", "timeout", 0)]
        assert (await stack.admin.reconcile()).ok


async def test_sigkill_mid_request_leaves_a_reservation_the_next_start_releases(tmp_path: Path) -> None:
    from server.dev import start_server, stop_process, wait_for_grpc

    async with process_stack(
        tmp_path / "var", reservation_grace_seconds=1, sweep_interval_seconds=0.5, render_workers=1
    ) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        async with httpx.AsyncClient(timeout=30) as client:
            pending = asyncio.create_task(
                client.post(
                    f"{stack.api_base}/images/generations",
                    json={**HEAVY, "n": 10},
                    headers={"Authorization": f"Bearer {key}", "grpc-timeout": "3S", "x-request-id": "crashed-1"},
                )
            )
            for _ in range(100):
                if (await stack.admin.get(account_id)).reserved_usd != "0.000000":
                    break
                await asyncio.sleep(0.05)
            assert (await stack.admin.get(account_id)).reserved_usd == "0.020000"
            stack.servers[0].kill()
            await asyncio.to_thread(stack.servers[0].wait, 10)
            crashed = await pending
        assert crashed.status_code == 503
        ok, balance, reserved, spent = await reconcile_offline(stack, account_id)
        assert (ok, balance, reserved, spent) == (True, 980_000, 20_000, 0)
        restarted = start_server(stack.env, log_path=stack.logs / "server-restarted.log")
        stack.servers[0] = restarted
        await asyncio.to_thread(wait_for_grpc, stack.grpc_targets[0], restarted)
        account = await stack.admin.settled(account_id)
        assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
        usage = await stack.admin.usage(account_id)
        assert [(status_of(u), u.error_code, u.cost_usd) for u in usage] == [("failed", "reservation_expired", "0.000000")]
        assert (await stack.admin.reconcile()).ok
        stop_process(restarted)
        # The sweep's money event names the account, the amount and the crashed request's id.
        swept = [
            json.loads(line) for line in (stack.logs / "server-restarted.log").read_text().splitlines()
            if '"expired reservation released"' in line
        ]
        assert [(line["account_id"], line["amount_micros"], line["request_id"]) for line in swept] == [
            (account_id, 20_000, usage[0].request_id)
        ]
        assert usage[0].request_id == "crashed-1"
