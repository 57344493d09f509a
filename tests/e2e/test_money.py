"""Money under concurrency and faults, through the real Envoy: never lost, never invented."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.fakes.postgres import create_database
from tests.stack import ProcessStack, process_stack, status_of

pytestmark = pytest.mark.e2e

UNIT_MICROS = 1000  # local-1, medium quality
FUNDED_IMAGES = 25
CONCURRENT = 200


async def storm(stack: ProcessStack, key: str, response_format: str = "b64_json") -> Counter[int]:
    """CONCURRENT one-image requests at once; returns the count of each status."""
    limits = httpx.Limits(max_connections=CONCURRENT, max_keepalive_connections=CONCURRENT)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:

        async def one(index: int) -> int:
            response = await client.post(
                f"{stack.api_base}/images/generations",
                json={"model": "local-1", "prompt": f"tiny {index}", "size": "256x256", "response_format": response_format},
                headers={"Authorization": f"Bearer {key}"},
            )
            if response.status_code == 402:
                assert response.json()["error"]["code"] == "insufficient_balance"
            return response.status_code

        statuses = await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(CONCURRENT))), 300)
    return Counter(statuses)


async def assert_exactly_funded_images_succeed(stack: ProcessStack, response_format: str = "b64_json") -> None:
    account_id, key = await stack.admin.funded_key(f"{FUNDED_IMAGES * UNIT_MICROS / 1e6:.6f}")
    statuses = await storm(stack, key, response_format)
    assert statuses == Counter({200: FUNDED_IMAGES, 402: CONCURRENT - FUNDED_IMAGES})
    account = await stack.admin.get(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("0.000000", "0.000000", "0.025000")
    usage = await stack.admin.usage(account_id)
    assert len(usage) == FUNDED_IMAGES and {status_of(u) for u in usage} == {"succeeded"}
    report = await stack.admin.reconcile()
    assert report.ok, report.mismatches


async def test_concurrent_requests_on_sqlite_spend_the_balance_exactly(tmp_path: Path) -> None:
    async with process_stack(tmp_path / "var") as stack:
        await assert_exactly_funded_images_succeed(stack)


@pytest.mark.postgres
async def test_two_replicas_on_postgresql_spend_the_balance_exactly(tmp_path: Path, postgres_url: str) -> None:
    database = await create_database(postgres_url)
    async with process_stack(tmp_path / "var", servers=2, database_url=database) as stack:
        await assert_exactly_funded_images_succeed(stack)
        served = [stack.server_log(i).count('"method":"/imagegw.v1.ImageService/GenerateImagesHttp"') for i in range(2)]
        assert all(count > 0 for count in served), f"both replicas must have served requests: {served}"


async def test_client_disconnect_mid_generation_is_not_charged(tmp_path: Path) -> None:
    async with process_stack(tmp_path / "var", render_workers=1) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        async with httpx.AsyncClient(timeout=60) as client:
            request = asyncio.create_task(
                client.post(
                    f"{stack.api_base}/images/generations",
                    json={"model": "local-1", "prompt": "a long render", "n": 10, "size": "1792x1024"},
                    headers={"Authorization": f"Bearer {key}", "x-request-id": "disconnect-1"},
                )
            )
            for _ in range(100):
                if (await stack.admin.get(account_id)).reserved_usd != "0.000000":
                    break
                await asyncio.sleep(0.02)
            assert (await stack.admin.get(account_id)).reserved_usd == "0.010000"
            request.cancel()  # the client goes away: the connection closes mid-request
            with pytest.raises(asyncio.CancelledError):
                await request
        account = await stack.admin.settled(account_id)
        assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
        usage = await stack.admin.usage(account_id)
        assert [(u.request_id, status_of(u), u.error_code, u.cost_usd) for u in usage] == [
            ("disconnect-1", "failed", "cancelled", "0.000000")
        ]
        assert (await stack.admin.reconcile()).ok
