"""Idempotent retries and rate limits through the real gRPC server (in-process).

gRPC callers send the same metadata Envoy forwards: ``idempotency-key``; they read the
response headers from the initial metadata and the error headers from the trailers.
The only stand-in is a scripted provider behind ``local-1`` (a real ImageProvider), so a
test can hold a generation open, fail it, and tell a regeneration from a replay: every
image it makes is fresh random bytes.
"""

from __future__ import annotations

import asyncio
import re
import json
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status
from imagegw.v1 import admin_pb2, images_pb2

from server.errors import UpstreamError
from server.providers.base import GeneratedImage, ImageRequest, Progress, ProviderResult
from tests.stack import InProcessStack, in_process_stack, status_of

UNIT = 1000  # local-1's price per image (micro-dollars), server/catalog.toml


class ScriptedProvider:
    """Fresh random "images"; can be held on a gate, or fail its first calls."""

    name = "scripted"

    def __init__(self, *, failures: int = 0, gated: bool = False) -> None:
        self.calls = 0
        self.failures = failures
        self.started = asyncio.Event()
        self.gate = asyncio.Event()
        if not gated:
            self.gate.set()

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        self.calls += 1
        self.started.set()
        await self.gate.wait()
        if self.calls <= self.failures:
            raise UpstreamError("The upstream failed.", retryable=False)
        images = [
            GeneratedImage(data=b"\x89PNG\r\n\x1a\n" + secrets.token_bytes(64), format="png", revised_prompt="p")
            for _ in range(request.n)
        ]
        return ProviderResult(images=images)

    async def aclose(self) -> None:
        return None


@pytest.fixture
def provider() -> ScriptedProvider:
    return ScriptedProvider()


@pytest.fixture
async def stack(tmp_path: Path, provider: ScriptedProvider) -> AsyncIterator[InProcessStack]:
    async with in_process_stack(tmp_path / "var", providers={"local-1": provider}) as running:
        yield running


def meta(key: str, idempotency_key: str | None = None) -> tuple[tuple[str, str], ...]:
    result: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {key}"),)
    if idempotency_key is not None:
        result += (("idempotency-key", idempotency_key),)
    return result


async def generate(
    stack: InProcessStack, key: str, request: images_pb2.GenerateImagesRequest, idempotency_key: str | None = None,
    **kwargs: float,
) -> tuple[images_pb2.GenerateImagesResponse, dict[str, str]]:
    call = stack.images.GenerateImages(request, metadata=meta(key, idempotency_key), **kwargs)
    reply = await call
    return reply, dict(await call.initial_metadata())


async def failure(
    stack: InProcessStack, key: str, request: images_pb2.GenerateImagesRequest, idempotency_key: str | None = None,
    **kwargs: float,
) -> tuple[grpc.StatusCode, error_details_pb2.ErrorInfo, dict[str, str]]:
    call = stack.images.GenerateImages(request, metadata=meta(key, idempotency_key), **kwargs)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    trailers = {k: v for k, v in caught.value.trailing_metadata() if isinstance(v, str)}
    return caught.value.code(), info, trailers


async def money(stack: InProcessStack, account_id: str) -> tuple[str, str, str]:
    account = await stack.admin.get(account_id)
    return account.balance_usd, account.reserved_usd, account.spent_usd


def reset_seconds(text: str) -> int:
    """Parses OpenAI's reset duration (``12s``, ``1m0s``) into seconds."""
    match = re.fullmatch(r"(?:(\d+)m)?(\d+)s", text)
    assert match is not None, text
    return int(match.group(1) or 0) * 60 + int(match.group(2))


async def fresh_window(min_left: float = 10) -> None:
    """Rate-limit windows are whole unix minutes: start a test well inside one (waits < min_left s)."""
    left = 60 - time.time() % 60
    if left < min_left:
        await asyncio.sleep(left + 0.05)


B64 = images_pb2.GenerateImagesRequest(prompt="a red kite", n=2, size="256x256", response_format="b64_json")
URL = images_pb2.GenerateImagesRequest(prompt="a red kite", n=2, size="256x256")


# -- idempotency ----------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [B64, URL], ids=["b64_json", "url"])
async def test_a_replay_returns_the_same_bytes_and_charges_once(
    stack: InProcessStack, provider: ScriptedProvider, request_: images_pb2.GenerateImagesRequest
) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    first, first_headers = await generate(stack, key, request_, "retry-1")
    second, second_headers = await generate(stack, key, request_, "retry-1")
    assert provider.calls == 1
    # The same answer; a url answer's links are signed again at the replay (same image ids).
    for image in [*first.data, *second.data]:
        if image.HasField("url"):
            image.url = image.url.partition("?")[0]
    assert second.SerializeToString() == first.SerializeToString()
    assert len(first.data) == 2
    assert "x-imagegw-idempotent-replay" not in first_headers
    assert second_headers["x-imagegw-idempotent-replay"] == "true"
    assert first_headers["x-imagegw-cost-usd"] == second_headers["x-imagegw-cost-usd"] == "0.002000"
    assert first_headers["x-imagegw-model"] == second_headers["x-imagegw-model"] == "local-1"
    assert first_headers["x-request-id"] != second_headers["x-request-id"]
    assert await money(stack, account_id) == ("0.998000", "0.000000", "0.002000")
    assert len(await stack.admin.usage(account_id)) == 1


async def test_without_a_key_every_request_generates_and_pays(
    stack: InProcessStack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    first, _ = await generate(stack, key, B64)
    second, headers = await generate(stack, key, B64)
    assert provider.calls == 2 and first.data[0].b64_json != second.data[0].b64_json
    assert "x-imagegw-idempotent-replay" not in headers
    assert await money(stack, account_id) == ("0.996000", "0.000000", "0.004000")


async def test_the_same_key_with_another_body_is_400_and_charges_nothing_more(stack: InProcessStack) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    await generate(stack, key, B64, "reused")
    other = images_pb2.GenerateImagesRequest(prompt="a red kite", n=3, size="256x256", response_format="b64_json")
    code, info, trailers = await failure(stack, key, other, "reused")
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    assert (info.reason, dict(info.metadata)) == (
        "IDEMPOTENCY_KEY_REUSED",
        {"type": "invalid_request_error", "param": "Idempotency-Key", "code": "idempotency_key_reused"},
    )
    assert (trailers["x-http-status"], trailers["x-should-retry"]) == ("400", "false")
    assert await money(stack, account_id) == ("0.998000", "0.000000", "0.002000")


async def test_keys_are_scoped_to_the_account(stack: InProcessStack, provider: ScriptedProvider) -> None:
    _, key_a = await stack.admin.funded_key("1.00")
    _, key_b = await stack.admin.funded_key("1.00")
    first, _ = await generate(stack, key_a, B64, "shared-name")
    second, headers = await generate(stack, key_b, B64, "shared-name")
    assert provider.calls == 2 and first.data[0].b64_json != second.data[0].b64_json
    assert "x-imagegw-idempotent-replay" not in headers


@pytest.mark.parametrize("value", ["", "x" * 256], ids=["empty", "too-long"])
async def test_a_malformed_key_is_400_on_the_header(stack: InProcessStack, value: str) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    code, info, trailers = await failure(stack, key, B64, value)
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert dict(info.metadata) == {"type": "invalid_request_error", "param": "Idempotency-Key", "code": "invalid_value"}
    assert trailers["x-http-status"] == "400"
    assert await money(stack, account_id) == ("1.000000", "0.000000", "0.000000")


async def test_concurrent_retries_wait_for_the_first_and_share_its_answer(
    tmp_path: Path,
) -> None:
    provider = ScriptedProvider(gated=True)
    async with in_process_stack(tmp_path / "var", providers={"local-1": provider}) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        first = asyncio.create_task(generate(stack, key, B64, "together"))
        await asyncio.wait_for(provider.started.wait(), 10)
        retries = [asyncio.create_task(generate(stack, key, B64, "together")) for _ in range(3)]
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in retries)
        provider.gate.set()
        answers = await asyncio.wait_for(asyncio.gather(first, *retries), 30)
        assert provider.calls == 1
        assert len({reply.SerializeToString() for reply, _ in answers}) == 1
        assert [headers.get("x-imagegw-idempotent-replay") for _, headers in answers] == [None, "true", "true", "true"]
        assert await money(stack, account_id) == ("0.998000", "0.000000", "0.002000")


async def test_a_retry_still_waiting_at_its_deadline_gets_409_then_the_answer(tmp_path: Path) -> None:
    provider = ScriptedProvider(gated=True)
    async with in_process_stack(tmp_path / "var", providers={"local-1": provider}) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        first = asyncio.create_task(generate(stack, key, B64, "slow"))
        await asyncio.wait_for(provider.started.wait(), 10)
        code, info, trailers = await failure(stack, key, B64, "slow", timeout=1.0)
        assert code == grpc.StatusCode.ABORTED
        assert dict(info.metadata) == {
            "type": "invalid_request_error", "param": "", "code": "idempotency_key_in_use"
        }
        assert (trailers["x-http-status"], trailers["x-should-retry"], trailers["retry-after"]) == ("409", "true", "1")
        provider.gate.set()
        original, _ = await first
        replay, headers = await generate(stack, key, B64, "slow")
        assert replay == original and headers["x-imagegw-idempotent-replay"] == "true"
        assert provider.calls == 1
        assert await money(stack, account_id) == ("0.998000", "0.000000", "0.002000")


async def test_a_failed_first_attempt_is_refunded_and_the_retry_runs(tmp_path: Path) -> None:
    provider = ScriptedProvider(failures=1)
    async with in_process_stack(tmp_path / "var", providers={"local-1": provider}) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        code, info, trailers = await failure(stack, key, B64, "flaky")
        assert (code, trailers["x-http-status"], info.reason) == (grpc.StatusCode.UNAVAILABLE, "502", "UPSTREAM_ERROR")
        assert await money(stack, account_id) == ("1.000000", "0.000000", "0.000000")
        reply, headers = await generate(stack, key, B64, "flaky")
        assert len(reply.data) == 2 and "x-imagegw-idempotent-replay" not in headers
        again, headers = await generate(stack, key, B64, "flaky")
        assert again == reply and headers["x-imagegw-idempotent-replay"] == "true"
        assert provider.calls == 2
        assert await money(stack, account_id) == ("0.998000", "0.000000", "0.002000")
        usage = await stack.admin.usage(account_id)
        assert [(status_of(u), u.error_code, u.cost_usd) for u in usage] == [
            ("succeeded", "", "0.002000"),
            ("failed", "upstream_error", "0.000000"),
        ]
        assert (await stack.admin.reconcile()).ok


# -- rate limits ------------------------------------------------------------------------------


async def test_successes_carry_the_limits_and_the_first_request_over_is_429(service: InProcessStack) -> None:
    account_id, key = await service.admin.funded_key("1.00")
    limits = await service.admin.set_limits(account_id, requests_per_minute=2, images_per_minute=10)
    assert (limits.requests_per_minute, limits.images_per_minute) == (2, 10)
    await fresh_window()
    request = images_pb2.GenerateImagesRequest(prompt="p", n=3, size="256x256", response_format="b64_json")
    seen = []
    for _ in range(2):
        _, headers = await generate(service, key, request)
        seen.append({k: v for k, v in headers.items() if k.startswith("x-ratelimit-")})
    reset = seen[1]["x-ratelimit-reset-requests"]
    assert 1 <= reset_seconds(reset) <= 60
    assert seen[1] == {
        "x-ratelimit-limit-requests": "2",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-limit-images": "10",
        "x-ratelimit-remaining-images": "4",
        "x-ratelimit-reset-images": reset,
    }
    assert (seen[0]["x-ratelimit-remaining-requests"], seen[0]["x-ratelimit-remaining-images"]) == ("1", "7")
    code, info, trailers = await failure(service, key, request)
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert (info.reason, dict(info.metadata)) == (
        "RATE_LIMIT_EXCEEDED", {"type": "requests", "param": "", "code": "rate_limit_exceeded"}
    )
    assert (trailers["x-http-status"], trailers["x-should-retry"]) == ("429", "true")
    assert trailers["x-ratelimit-remaining-requests"] == "0"
    assert trailers["x-ratelimit-remaining-images"] == "4"
    assert int(trailers["retry-after"]) == reset_seconds(trailers["x-ratelimit-reset-requests"])
    body = json.loads(trailers["x-openai-error"])["error"]
    assert (body["type"], body["code"], body["param"]) == ("requests", "rate_limit_exceeded", None)
    # Nothing was reserved or charged for the limited request.
    assert await money(service, account_id) == ("0.994000", "0.000000", "0.006000")
    assert len(await service.admin.usage(account_id)) == 2


async def test_the_images_limit_counts_n(service: InProcessStack) -> None:
    account_id, key = await service.admin.funded_key("1.00")
    await service.admin.set_limits(account_id, requests_per_minute=0, images_per_minute=5)
    await fresh_window()
    three = images_pb2.GenerateImagesRequest(prompt="p", n=3, size="256x256")
    _, headers = await generate(service, key, three)
    assert "x-ratelimit-limit-requests" not in headers  # unlimited: not reported
    assert headers["x-ratelimit-remaining-images"] == "2"
    code, info, trailers = await failure(service, key, three)
    assert (code, trailers["x-ratelimit-remaining-images"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "2")
    two = images_pb2.GenerateImagesRequest(prompt="p", n=2, size="256x256")
    _, headers = await generate(service, key, two)
    assert headers["x-ratelimit-remaining-images"] == "0"
    # More images than the limit can never pass: 429 that says so, not worth retrying.
    code, info, trailers = await failure(service, key, images_pb2.GenerateImagesRequest(prompt="p", n=6))
    assert (code, trailers["x-should-retry"], "retry-after" in trailers) == (
        grpc.StatusCode.RESOURCE_EXHAUSTED, "false", False
    )
    assert await money(service, account_id) == ("0.995000", "0.000000", "0.005000")


async def test_replays_count_as_requests(stack: InProcessStack, provider: ScriptedProvider) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    await stack.admin.set_limits(account_id, requests_per_minute=2)
    await fresh_window()
    await generate(stack, key, B64, "counted")
    _, headers = await generate(stack, key, B64, "counted")
    assert (headers["x-imagegw-idempotent-replay"], headers["x-ratelimit-remaining-requests"]) == ("true", "0")
    code, _, _ = await failure(stack, key, B64, "counted")
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert provider.calls == 1


async def test_defaults_come_from_settings(tmp_path: Path) -> None:
    async with in_process_stack(tmp_path / "var", rate_limit_rpm=1, rate_limit_ipm=0) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        limits = await stack.admin.limits(account_id)
        assert (limits.requests_per_minute, limits.images_per_minute) == (1, 0)
        assert limits.requests_per_minute_is_default and limits.images_per_minute_is_default
        await fresh_window()
        _, headers = await generate(stack, key, images_pb2.GenerateImagesRequest(prompt="p", size="256x256"))
        assert sorted(k for k in headers if k.startswith("x-ratelimit-")) == [
            "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests"
        ]
        code, _, _ = await failure(stack, key, images_pb2.GenerateImagesRequest(prompt="p", size="256x256"))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        # An override lifts it at once.
        await stack.admin.set_limits(account_id, requests_per_minute=0)
        _, headers = await generate(stack, key, images_pb2.GenerateImagesRequest(prompt="p", size="256x256"))
        assert not any(k.startswith("x-ratelimit-") for k in headers)


@pytest.mark.parametrize(
    ("limits", "code", "param"),
    [
        ({"requests_per_minute": -1}, grpc.StatusCode.INVALID_ARGUMENT, "requests_per_minute"),
        ({"images_per_minute": 1_000_001}, grpc.StatusCode.INVALID_ARGUMENT, "images_per_minute"),
    ],
)
async def test_bad_limits_are_refused(
    service: InProcessStack, limits: dict[str, int], code: grpc.StatusCode, param: str
) -> None:
    account_id, _ = await service.admin.funded_key("1.00")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.admin.set_limits(account_id, **limits)
    assert caught.value.code() == code
    assert json.loads(dict(caught.value.trailing_metadata())["x-openai-error"])["error"]["param"] == param
    unchanged = await service.admin.limits(account_id)
    assert unchanged.requests_per_minute_is_default and unchanged.images_per_minute_is_default


async def test_set_rate_limits_needs_the_admin_token_and_a_real_account(service: InProcessStack) -> None:
    _, key = await service.admin.funded_key("1.00")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.admin.stub.SetRateLimits(
            admin_pb2.SetRateLimitsRequest(account_id="acct_x", requests_per_minute=1), metadata=meta(key)
        )
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.admin.set_limits("acct_unknown", requests_per_minute=1)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# -- admission: the key, the rate limit, the claim and the reservation in one transaction ----


async def test_a_request_short_of_money_is_counted_and_leaves_its_key_free(
    stack: InProcessStack, provider: ScriptedProvider
) -> None:
    account_id, key = await stack.admin.funded_key("0.001")  # B64 asks for two images at 0.001 each
    await stack.admin.set_limits(account_id, requests_per_minute=3)
    await fresh_window()
    code, info, trailers = await failure(stack, key, B64, "short")
    assert (code, trailers["x-http-status"], info.reason) == (
        grpc.StatusCode.FAILED_PRECONDITION, "402", "INSUFFICIENT_BALANCE"
    )
    assert provider.calls == 0
    assert await money(stack, account_id) == ("0.001000", "0.000000", "0.000000")
    await stack.admin.stub.CreditAccount(
        admin_pb2.CreditAccountRequest(account_id=account_id, amount_usd="0.001"), metadata=stack.admin.auth
    )
    # The same key generates now (the refused request held no claim), as the second request counted.
    reply, headers = await generate(stack, key, B64, "short")
    assert len(reply.data) == 2 and "x-imagegw-idempotent-replay" not in headers
    assert headers["x-ratelimit-remaining-requests"] == "1"
    assert provider.calls == 1
    assert await money(stack, account_id) == ("0.000000", "0.000000", "0.002000")


async def test_a_bad_request_is_counted_and_reserves_nothing(stack: InProcessStack) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    await stack.admin.set_limits(account_id, requests_per_minute=2)
    await fresh_window()
    code, _, trailers = await failure(stack, key, images_pb2.GenerateImagesRequest(prompt="p", size="7x7"))
    assert (code, trailers["x-http-status"]) == (grpc.StatusCode.INVALID_ARGUMENT, "400")
    _, headers = await generate(stack, key, B64)
    assert headers["x-ratelimit-remaining-requests"] == "0"
    # Over the limit, the 429 comes first, as for any request.
    code, _, trailers = await failure(stack, key, images_pb2.GenerateImagesRequest(prompt="p", size="7x7"))
    assert (code, trailers["x-http-status"]) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "429")
    assert await money(stack, account_id) == ("0.998000", "0.000000", "0.002000")
