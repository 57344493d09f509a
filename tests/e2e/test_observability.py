"""Metrics, server log lines and Envoy's access log tell the same story of a request; every
money event's log line names its account, amount and request id, and no key."""

from __future__ import annotations

import asyncio
import json
import secrets

import httpx
import pytest

from tests.stack import ProcessStack, cli, metric_sample

pytestmark = pytest.mark.e2e


async def test_a_request_shows_in_metrics_and_both_logs(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    before = await gateway.metrics()
    async with httpx.AsyncClient(timeout=60) as client:
        ok = await client.post(
            f"{gateway.api_base}/images/generations",
            json={"model": "local-1", "prompt": "a metric", "n": 3, "size": "256x256", "quality": "high"},
            headers={"Authorization": f"Bearer {key}", "x-request-id": "obs-ok-1"},
        )
        short = await client.post(
            f"{gateway.api_base}/images/generations",
            json={"model": "local-1", "prompt": "a metric", "n": 1, "size": "7x7"},
            headers={"Authorization": f"Bearer {key}", "x-request-id": "obs-bad-1"},
        )
    assert (ok.status_code, short.status_code) == (200, 400)
    after = await gateway.metrics()

    def delta(name: str, **labels: str) -> float:
        return metric_sample(after, name, **labels) - metric_sample(before, name, **labels)

    assert delta("imagegw_requests_total", method="GenerateImagesHttp", model="local-1", provider="local", status="200") == 1
    assert delta("imagegw_requests_total", method="GenerateImagesHttp", model="local-1", provider="", status="400") == 1
    assert delta("imagegw_images_generated_total", model="local-1", provider="local") == 3
    assert delta("imagegw_captured_microdollars_total", model="local-1") == 6000
    assert delta("imagegw_upstream_duration_seconds_count", provider="local", model="local-1", outcome="ok") == 1
    assert metric_sample(after, "imagegw_reservations_open") == 0
    assert metric_sample(after, "imagegw_requests_in_flight", method="GenerateImagesHttp") == 0
    assert "authorization" not in after.lower() and key not in after

    await asyncio.sleep(1.5)  # Envoy flushes its access log every second
    server_lines = [json.loads(line) for line in gateway.server_log().splitlines() if line.startswith("{")]
    access = [line for line in server_lines if line.get("request_id") == "obs-ok-1" and line.get("logger") == "imagegw.access"]
    assert len(access) == 1
    assert {k: access[0][k] for k in ("method", "outcome", "status", "model", "images", "cost_micros", "account_id")} == {
        "method": "/imagegw.v1.ImageService/GenerateImagesHttp", "outcome": "ok", "status": 200, "model": "local-1",
        "images": 3, "cost_micros": 6000, "account_id": account_id,
    }
    assert key not in gateway.server_log()
    envoy_lines = [json.loads(line) for line in gateway.envoy_log().splitlines() if line.startswith("{")]
    by_id = {line["request_id"]: line for line in envoy_lines}
    assert (by_id["obs-ok-1"]["status"], by_id["obs-ok-1"]["path"]) == (200, "/v1/images/generations")
    assert by_id["obs-ok-1"]["grpc_path"] == "/imagegw.v1.ImageService/GenerateImagesHttp"
    assert (by_id["obs-ok-1"]["grpc_status"], by_id["obs-ok-1"]["cause"]) == (0, None)
    assert (by_id["obs-bad-1"]["status"], by_id["obs-bad-1"]["grpc_status"]) == (400, 3)


def server_lines(stack: ProcessStack) -> list[dict[str, object]]:
    return [json.loads(line) for line in stack.server_log().splitlines() if line.startswith("{")]


def money_lines(stack: ProcessStack, request_id: str) -> list[tuple[object, ...]]:
    """(message, account, amount) of the money events logged for one request id, in order."""
    return [
        (line["message"], line["account_id"], line["amount_micros"])
        for line in server_lines(stack)
        if line.get("request_id") == request_id and "amount_micros" in line
    ]


async def test_money_events_log_account_amount_and_request_id_and_never_a_key(gateway: ProcessStack) -> None:
    # Through the CLI (its printed request id is the call's x-request-id) and Envoy, as in use.
    code, created = await cli(gateway, "accounts", "create", "--name", f"logs-{secrets.token_hex(4)}", "--balance", "1")
    account_id = created["account"]["account_id"]
    code, credited = await cli(gateway, "accounts", "credit", "--account", account_id, "--amount", "0.5")
    code, key = await cli(gateway, "keys", "create", "--account", account_id)
    api_key = key["key_string"]
    heavy = {"model": "local-1", "prompt": "a storm", "n": 10, "size": "1792x1024", "quality": "high"}
    async with httpx.AsyncClient(timeout=60) as client:
        ok = await client.post(
            f"{gateway.api_base}/images/generations",
            json={"model": "local-1", "prompt": "a ledger", "n": 2, "size": "256x256"},
            headers={"Authorization": f"Bearer {api_key}", "x-request-id": f"money-ok-{account_id}"},
        )
        late = await client.post(
            f"{gateway.api_base}/images/generations",
            json=heavy,  # ten large images cannot be ready in 0.3 s: 504, everything released
            headers={"Authorization": f"Bearer {api_key}", "x-request-id": f"money-late-{account_id}",
                     "grpc-timeout": "300m"},
        )
    assert (ok.status_code, late.status_code) == (200, 504)
    await gateway.admin.settled(account_id)
    assert money_lines(gateway, created["request_id"]) == [("account created", account_id, 1_000_000)]
    assert money_lines(gateway, credited["request_id"]) == [("account credited", account_id, 500_000)]
    assert money_lines(gateway, f"money-ok-{account_id}") == [
        ("reserved", account_id, 2_000), ("captured", account_id, 2_000)
    ]
    assert money_lines(gateway, f"money-late-{account_id}") == [
        ("reserved", account_id, 20_000), ("released", account_id, 20_000)
    ]
    [released] = [
        line for line in server_lines(gateway)
        if line["message"] == "released" and line.get("request_id") == f"money-late-{account_id}"
    ]
    assert (released["error_code"], released["logger"], str(released["reservation_id"])[:4]) == (
        "timeout", "server.ledger.store", "rsv_"
    )
    log = gateway.server_log()
    assert api_key not in log and api_key[len("sk-igw-"):] not in log
    assert gateway.env["IMAGEGW_ADMIN_TOKEN"] not in log


async def test_the_access_log_has_the_status_the_client_got_and_the_server_s_grpc_code(gateway: ProcessStack) -> None:
    """Lua hides gRPC from clients; the access log keeps the server's own code (not Envoy's
    guess from the HTTP status: 13 for a 400, 2 for a 402, 12 for a 404)."""
    _, key = await gateway.admin.funded_key("0.001")
    auth = {"Authorization": f"Bearer {key}"}
    generate = f"{gateway.api_base}/images/generations"
    async with httpx.AsyncClient(timeout=60) as client:
        answers = {
            "truth-400": await client.post(generate, json={"prompt": "p", "size": "7x7"}, headers={**auth, "x-request-id": "truth-400"}),
            "truth-401": await client.post(generate, json={"prompt": "p"}, headers={"x-request-id": "truth-401"}),
            "truth-402": await client.post(generate, json={"prompt": "p", "n": 2}, headers={**auth, "x-request-id": "truth-402"}),
            "truth-403": await client.get(
                f"{gateway.api_base}/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png?expires=4102444800&signature=forged",
                headers={"x-request-id": "truth-403"},
            ),
            "truth-404": await client.get(f"{gateway.api_base}/models/nope", headers={**auth, "x-request-id": "truth-404"}),
            "truth-405": await client.delete(generate, headers={"x-request-id": "truth-405"}),
        }
    lines = await gateway.envoy_access_log(answers)
    expected = {
        "truth-400": (400, 3), "truth-401": (401, 16), "truth-402": (402, 9), "truth-403": (403, 7),
        "truth-404": (404, 5), "truth-405": (405, None),
    }
    assert {rid: (answers[rid].status_code, lines[rid]["grpc_status"]) for rid in answers} == expected
    assert {rid: lines[rid]["status"] for rid in answers} == {rid: status for rid, (status, _) in expected.items()}


async def test_health_checks_are_counted_not_logged(gateway: ProcessStack) -> None:
    before = metric_sample(await gateway.metrics(), "imagegw_requests_total", method="Check", status="200")
    await asyncio.sleep(2.5)  # Envoy checks every second
    after = metric_sample(await gateway.metrics(), "imagegw_requests_total", method="Check", status="200")
    assert after >= before + 2
    logged = [line for line in gateway.server_log().splitlines() if "grpc.health" in line]
    assert logged == []
