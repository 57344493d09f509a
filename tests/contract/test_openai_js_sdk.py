"""The official openai JavaScript SDK (npm `openai`, pinned in tests/js) against the gateway
through the real Envoy: generations (url and b64_json), the models endpoints, and the
error class and fields the SDK gives each refusal, checked exactly."""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx
import pytest
from imagegw.v1 import admin_pb2
from PIL import Image

from tests.js_harness import run_js
from tests.stack import ProcessStack

pytestmark = pytest.mark.contract

LOCAL_1 = {"id": "local-1", "object": "model", "created": 1767225600, "owned_by": "imagegw"}


def image_size(data: bytes) -> tuple[str | None, tuple[int, int]]:
    image = Image.open(io.BytesIO(data))
    return image.format, image.size


async def test_generate_url(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(
        gateway, key, "scenarios/generate.mjs",
        input={"model": "local-1", "prompt": "A watercolor painting of a mountain lake", "n": 1, "size": "1024x1024"},
    )
    assert outcome["ok"], outcome
    result, headers = outcome["result"]["result"], outcome["result"]["headers"]
    assert set(result) == {"created", "data", "usage"}
    assert isinstance(result["created"], int)
    (image,) = result["data"]
    assert set(image) == {"url", "revised_prompt"}
    assert outcome["result"]["requestID"] == headers["x-request-id"]
    assert (headers["x-imagegw-cost-usd"], headers["x-imagegw-model"]) == ("0.001000", "local-1")
    async with httpx.AsyncClient() as client:
        fetched = await client.get(image["url"])
    assert image_size(fetched.content) == ("PNG", (1024, 1024))


async def test_generate_b64_json(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(
        gateway, key, "scenarios/generate.mjs",
        input={"model": "local-1", "prompt": "a lighthouse at dusk", "n": 2, "size": "512x512", "response_format": "b64_json"},
    )
    assert outcome["ok"], outcome
    images = outcome["result"]["result"]["data"]
    assert [set(image) for image in images] == [{"b64_json", "revised_prompt"}] * 2
    for image in images:
        assert image_size(base64.b64decode(image["b64_json"], validate=True)) == ("PNG", (512, 512))
    assert outcome["result"]["headers"]["x-imagegw-cost-usd"] == "0.002000"


async def test_models_list_and_retrieve(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(gateway, key, "scenarios/models.mjs", input={"id": "local-1", "missing": "gpt-image-1"})
    assert outcome["ok"], outcome
    assert outcome["result"]["listed"] == [LOCAL_1]
    assert outcome["result"]["retrieved"] == LOCAL_1
    missing = outcome["result"]["missing"]
    assert missing["ok"] is False
    error = missing["error"]
    assert error["classes"] == ["NotFoundError", "APIError", "OpenAIError", "Error"]
    assert (error["status"], error["type"], error["code"], error["param"]) == (
        404, "invalid_request_error", "model_not_available", "model",
    )


def assert_error(
    outcome: dict[str, Any], classes: list[str], status: int, error: dict[str, Any], should_retry: str = "false"
) -> None:
    assert outcome["ok"] is True and outcome["result"]["ok"] is False, outcome
    described = outcome["result"]["error"]
    assert described["classes"] == classes
    assert described["status"] == status
    assert described["error"] == error
    assert (described["type"], described["code"], described["param"]) == (error["type"], error["code"], error["param"])
    assert described["message"] == f"{status} {error['message']}"
    assert described["requestID"] == described["headers"]["x-request-id"]
    assert described["headers"]["content-type"] == "application/json"
    assert described["headers"]["x-should-retry"] == should_retry


async def test_401_is_authentication_error(gateway: ProcessStack) -> None:
    outcome = await run_js(gateway, "sk-igw-not-a-real-key", "scenarios/generate_attempt.mjs", input={"model": "local-1", "prompt": "p"})
    assert_error(outcome, ["AuthenticationError", "APIError", "OpenAIError", "Error"], 401, {
        "message": "Incorrect or revoked API key. Send a valid imagegw key as 'Authorization: Bearer sk-igw-...'.",
        "type": "invalid_request_error", "param": None, "code": "invalid_api_key",
    })


async def test_400_is_bad_request_error_with_param(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    server = await run_js(gateway, key, "scenarios/generate_attempt.mjs", input={"model": "local-1", "prompt": "p", "size": "300x300"})
    edge = await run_js(gateway, key, "scenarios/generate_attempt.mjs", input={"model": "local-1", "prompt": "p", "n": "2"})
    bad_request = ["BadRequestError", "APIError", "OpenAIError", "Error"]
    described = server["result"]["error"]
    assert_error(server, bad_request, 400, {
        "message": described["error"]["message"], "type": "invalid_request_error", "param": "size", "code": "invalid_size",
    })
    assert "300x300" in described["error"]["message"]
    assert_error(edge, bad_request, 400, {
        "message": "Invalid type for 'n': expected an integer, but got a string instead.",
        "type": "invalid_request_error", "param": "n", "code": "invalid_type",
    })
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.spent_usd) == ("1.000000", "0.000000")


async def test_402_is_the_base_api_error(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("0.001500")
    outcome = await run_js(gateway, key, "scenarios/generate_attempt.mjs", input={"model": "local-1", "prompt": "p", "n": 2})
    described = outcome["result"]["error"]
    assert_error(outcome, ["APIError", "OpenAIError", "Error"], 402, {
        "message": described["error"]["message"], "type": "insufficient_quota", "param": None, "code": "insufficient_balance",
    })
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.spent_usd, account.reserved_usd) == ("0.001500", "0.000000", "0.000000")


async def test_429_is_rate_limit_error(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    await gateway.admin.stub.SetRateLimits(
        admin_pb2.SetRateLimitsRequest(account_id=account_id, images_per_minute=1), metadata=gateway.admin.auth
    )
    # More images in one request than the key may have per minute: refused whatever the window.
    outcome = await run_js(gateway, key, "scenarios/generate_attempt.mjs", input={"model": "local-1", "prompt": "p", "n": 2})
    described = outcome["result"]["error"]
    assert_error(outcome, ["RateLimitError", "APIError", "OpenAIError", "Error"], 429, {
        "message": described["error"]["message"], "type": "requests", "param": None, "code": "rate_limit_exceeded",
    })
    assert described["error"]["message"].startswith("Request too large for images per minute (IPM) on API key key_")
    assert described["headers"]["x-ratelimit-limit-images"] == "1"


async def test_an_inline_scenario_gets_the_sdk_in_its_context(gateway: ProcessStack) -> None:
    """The harness runs scenarios given as source too (no file, no imports)."""
    _, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(
        gateway, key,
        source="export default async ({ client, input, OpenAI }) => ({ version: OpenAI.VERSION ?? null, "
        "ids: (await client().models.list()).data.map((m) => m.id), input })",
        input={"echo": [1, "two"]},
    )
    assert outcome == {"ok": True, "result": {"version": outcome["result"]["version"], "ids": ["local-1"], "input": {"echo": [1, "two"]}}}
