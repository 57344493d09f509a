"""Rate limits per API key through the real Envoy: the x-ratelimit-* headers on 200 and 429,
Retry-After, OpenAI's body, the openai SDK's RateLimitError, the operator CLI, and an
exact limit across two replicas sharing PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import time

import grpc
import httpx
import openai
import pytest
from imagegw.v1 import images_pb2, images_pb2_grpc

from tests.e2e.matrix import png
from tests.stack import ProcessStack, cli

pytestmark = pytest.mark.e2e

SMALL: dict[str, object] = {"model": "local-1", "prompt": "a tin robot", "size": "256x256", "response_format": "b64_json"}
RATE_HEADERS = (
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-images",
    "x-ratelimit-remaining-images",
    "x-ratelimit-reset-images",
)


async def post(stack: ProcessStack, key: str, body: dict[str, object], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(
            f"{stack.api_base}/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}", **headers},
        )


def reset_seconds(text: str) -> int:
    """Parses OpenAI's reset duration (``12s``, ``1m0s``) into seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(\d+)s", text)
    assert match is not None, text
    return int(match.group(1) or 0) * 60 + int(match.group(2))


async def fresh_window(min_left: float = 15) -> None:
    """Windows are whole unix minutes: start well inside one (waits less than min_left s)."""
    left = 60 - time.time() % 60
    if left < min_left:
        await asyncio.sleep(left + 0.05)


def rate_headers(response: httpx.Response) -> dict[str, str]:
    return {name: response.headers[name] for name in RATE_HEADERS if name in response.headers}


async def money(stack: ProcessStack, account_id: str) -> tuple[str, str, str]:
    account = await stack.admin.get(account_id)
    return account.balance_usd, account.reserved_usd, account.spent_usd


async def test_200s_carry_the_limits_and_the_request_over_gets_429_with_retry_after(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    await gateway.admin.set_limits(account_id, requests_per_minute=3, images_per_minute=100)
    await fresh_window()
    ok = [await post(gateway, key, {**SMALL, "n": 2}) for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    reset = ok[-1].headers["x-ratelimit-reset-requests"]
    assert 1 <= reset_seconds(reset) <= 60
    assert [rate_headers(r) | {"x-ratelimit-reset-requests": "", "x-ratelimit-reset-images": ""} for r in ok] == [
        {
            "x-ratelimit-limit-requests": "3",
            "x-ratelimit-remaining-requests": str(2 - i),
            "x-ratelimit-reset-requests": "",
            "x-ratelimit-limit-images": "100",
            "x-ratelimit-remaining-images": str(98 - 2 * i),
            "x-ratelimit-reset-images": "",
        }
        for i in range(3)
    ]
    limited = await post(gateway, key, {**SMALL, "n": 2})
    assert limited.status_code == 429
    assert limited.json() == {
        "error": {
            "message": limited.json()["error"]["message"],
            "type": "requests",
            "param": None,
            "code": "rate_limit_exceeded",
        }
    }
    assert limited.json()["error"]["message"].startswith(
        "Rate limit reached for requests per minute (RPM) on API key key_"
    )
    assert "Limit 3, Used 3, Requested 1." in limited.json()["error"]["message"]
    assert limited.headers["x-should-retry"] == "true"
    assert limited.headers["x-request-id"]
    headers = rate_headers(limited)
    assert (headers["x-ratelimit-limit-requests"], headers["x-ratelimit-remaining-requests"]) == ("3", "0")
    assert (headers["x-ratelimit-limit-images"], headers["x-ratelimit-remaining-images"]) == ("100", "94")
    assert int(limited.headers["retry-after"]) == reset_seconds(headers["x-ratelimit-reset-requests"])
    assert 1 <= int(limited.headers["retry-after"]) <= 60
    assert not any(name.startswith("grpc-") or name.startswith("x-http-") for name in limited.headers)
    # Nothing reserved or charged for the limited request: three requests of two images.
    assert await money(gateway, account_id) == ("0.994000", "0.000000", "0.006000")
    assert len(await gateway.admin.usage(account_id)) == 3


async def test_the_images_limit_counts_n(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    await gateway.admin.set_limits(account_id, requests_per_minute=0, images_per_minute=5)
    await fresh_window()
    first = await post(gateway, key, {**SMALL, "n": 4})
    assert first.status_code == 200
    assert rate_headers(first) == {
        "x-ratelimit-limit-images": "5",
        "x-ratelimit-remaining-images": "1",
        "x-ratelimit-reset-images": first.headers["x-ratelimit-reset-images"],
    }
    limited = await post(gateway, key, {**SMALL, "n": 2})
    assert limited.status_code == 429
    assert "images per minute (IPM)" in limited.json()["error"]["message"]
    assert limited.headers["x-ratelimit-remaining-images"] == "1"
    assert (await post(gateway, key, {**SMALL, "n": 1})).status_code == 200
    # Asking for more images than the limit allows at all: a 429 not worth retrying.
    too_big = await post(gateway, key, {**SMALL, "n": 6})
    assert (too_big.status_code, too_big.headers["x-should-retry"], "retry-after" in too_big.headers) == (
        429, "false", False
    )
    assert await money(gateway, account_id) == ("0.995000", "0.000000", "0.005000")


async def test_edits_and_variations_count_against_the_same_limits(gateway: ProcessStack) -> None:
    """One key's requests and images per minute cover generations, edits and variations together."""
    account_id, key = await gateway.admin.funded_key("1.00")
    await gateway.admin.set_limits(account_id, requests_per_minute=2, images_per_minute=10)
    await fresh_window()
    image = {"image": ("logo.png", png(64, 64), "image/png")}
    async with httpx.AsyncClient(timeout=120, headers={"Authorization": f"Bearer {key}"}) as client:
        variation = await client.post(
            f"{gateway.api_base}/images/variations", data={"model": "local-1", "n": "2", "size": "256x256"}, files=image
        )
        edit = await client.post(
            f"{gateway.api_base}/images/edits", data={"model": "local-1", "prompt": "a lamp", "size": "256x256"}, files=image
        )
    assert (variation.status_code, edit.status_code) == (200, 200), (variation.text, edit.text)
    assert [(r.headers["x-ratelimit-remaining-requests"], r.headers["x-ratelimit-remaining-images"]) for r in (variation, edit)] == [
        ("1", "8"), ("0", "7")
    ]
    spent = await money(gateway, account_id)
    limited = await post(gateway, key, SMALL)
    assert limited.status_code == 429
    assert "requests per minute (RPM)" in limited.json()["error"]["message"]
    assert await money(gateway, account_id) == spent  # nothing reserved for the refused request


async def test_the_openai_sdk_raises_rate_limit_error_with_the_headers(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    await gateway.admin.set_limits(account_id, requests_per_minute=1)
    await fresh_window()
    async with openai.AsyncOpenAI(api_key=key, base_url=gateway.api_base, max_retries=0, timeout=60) as sdk:
        raw = await sdk.images.with_raw_response.generate(model="local-1", prompt="p", size="256x256")
        assert raw.headers["x-ratelimit-remaining-requests"] == "0"
        with pytest.raises(openai.RateLimitError) as caught:
            await sdk.images.generate(model="local-1", prompt="p", size="256x256")
    error = caught.value
    assert (error.status_code, error.type, error.code, error.param) == (429, "requests", "rate_limit_exceeded", None)
    assert int(error.response.headers["retry-after"]) >= 1
    assert error.response.headers["x-ratelimit-limit-requests"] == "1"
    assert error.response.headers["x-ratelimit-remaining-requests"] == "0"
    assert error.request_id == error.response.headers["x-request-id"]
    assert await money(gateway, account_id) == ("0.999000", "0.000000", "0.001000")


async def test_operators_set_limits_with_the_cli(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    code, shown = await cli(gateway, "accounts", "limits", "--account", account_id)
    assert (code, shown) == (  # a read (GetRateLimits): no request id
        0,
        {
            "rate_limits": {
                "account_id": account_id,
                "requests_per_minute": 600,
                "images_per_minute": 3000,
                "requests_per_minute_is_default": True,
                "images_per_minute_is_default": True,
            }
        },
    )
    code, changed = await cli(gateway, "accounts", "limits", "--account", account_id, "--rpm", "1", "--ipm", "7")
    limits = changed["rate_limits"]
    assert (code, limits["requests_per_minute"], limits["images_per_minute"]) == (0, 1, 7)
    assert (limits["requests_per_minute_is_default"], limits["images_per_minute_is_default"]) == (False, False)
    assert re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", changed["request_id"])
    await fresh_window()
    first = await post(gateway, key, SMALL)
    assert (first.status_code, first.headers["x-ratelimit-limit-images"]) == (200, "7")
    assert (await post(gateway, key, SMALL)).status_code == 429
    code, error = await cli(gateway, "accounts", "limits", "--account", account_id, "--rpm", "-1")
    assert (code, error["error"]["param"]) == (1, "requests_per_minute")
    code, error = await cli(gateway, "accounts", "limits", "--account", "acct_nope", "--rpm", "5")
    assert (code, error["error"]["code"]) == (1, "not_found")
    code, back = await cli(gateway, "accounts", "limits", "--account", account_id, "--defaults")
    assert (code, back["rate_limits"]["requests_per_minute"], back["rate_limits"]["requests_per_minute_is_default"]) == (
        0, 600, True
    )
    assert (await post(gateway, key, SMALL)).status_code == 200  # applies to the very next request


async def grpc_generate(target: str, key: str) -> grpc.StatusCode:
    """One small request straight to one replica's gRPC port; returns its status code."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
            images_pb2.GenerateImagesRequest(prompt="a tin robot", size="256x256", response_format="b64_json"),
            metadata=(("authorization", f"Bearer {key}"),),
            timeout=120,
        )
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            return exc.code()
        return await call.code()


async def test_the_limit_is_exact_across_two_replicas_sharing_postgresql(replicas: ProcessStack) -> None:
    account_id, key = await replicas.admin.funded_key("1.00")
    await replicas.admin.set_limits(account_id, requests_per_minute=5)
    await fresh_window()
    # Twelve through Envoy (which spreads them over the replicas) and, so that both replicas
    # surely take part, three straight to each replica's gRPC port: eighteen at once.
    http = [post(replicas, key, SMALL) for _ in range(12)]
    direct = [grpc_generate(target, key) for target in replicas.grpc_targets * 3]
    results = await asyncio.wait_for(asyncio.gather(*http, *direct), 120)
    responses: list[httpx.Response] = list(results[:12])  # type: ignore[arg-type]
    codes: list[grpc.StatusCode] = list(results[12:])  # type: ignore[arg-type]
    admitted = [r for r in responses if r.status_code == 200] + [c for c in codes if c == grpc.StatusCode.OK]
    assert len(admitted) == 5
    assert all(r.status_code in (200, 429) for r in responses)
    assert all(c in (grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED) for c in codes)
    remaining = sorted(r.headers["x-ratelimit-remaining-requests"] for r in responses if r.status_code == 200)
    assert set(remaining) <= {"0", "1", "2", "3", "4"} and len(set(remaining)) == len(remaining)
    for limited in (r for r in responses if r.status_code == 429):
        assert limited.json()["error"]["code"] == "rate_limit_exceeded"
        assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert await money(replicas, account_id) == ("0.995000", "0.000000", "0.005000")
    assert len(await replicas.admin.usage(account_id)) == 5
    assert (await replicas.admin.reconcile()).ok
