"""Stability's v2beta Stable Image API end to end: client -> Envoy -> imagegw serve ->
StabilityImageProvider -> fake Stability.

One process stack for the module (``IMAGEGW_STABILITY_API_KEY``, ``IMAGEGW_STABILITY_BASE_URL``)
against ``tests.fakes.stability_fake``: multipart bodies, ``accept: image/*`` answers with a
``finish-reason`` header, one image per call (``n`` fans out). The fake renders each
aspect ratio at 1/16 of Stability's pixel size (1:1 -> 64x64), so images decode fast.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from tests.e2e.provider_support import (
    CREDENTIALS_MESSAGE,
    FUNDED,
    ZERO_USAGE,
    LogWatch,
    expect_error,
    expect_money,
    expect_refunded,
    expect_timeout,
    fetch_images,
    generate,
    list_models,
    unique,
    usd,
    wait_for_disconnect,
)
from tests.fakes.server import RecordedRequest
from tests.fakes.stability_fake import StabilityFake, start_stability_fake
from tests.stack import ProcessStack, process_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PRICES = {"stable-image-ultra": 80_000, "stable-image-core": 30_000, "sd3.5-large": 65_000}
ENDPOINTS = {"stable-image-ultra": "ultra", "stable-image-core": "core", "sd3.5-large": "sd3"}
MALFORMED = "The upstream provider returned a malformed answer: "
MODERATED = "The upstream provider's safety system rejected the request."


def fields_of(request: RecordedRequest) -> dict[str, str]:
    parts = request.multipart()
    assert parts is not None, "not multipart/form-data"
    assert [p.filename for p in parts] == [None] * len(parts)  # fields only, no dummy file
    return {part.name: part.data.decode() for part in parts}


@dataclass
class Env:
    stack: ProcessStack
    fake: StabilityFake

    def sent(self, prompt: str) -> list[RecordedRequest]:
        return [r for r in self.fake.generation_requests if fields_of(r).get("prompt") == prompt]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with start_stability_fake() as fake:
        var_dir = tmp_path_factory.mktemp("stability-e2e") / "var"
        async with process_stack(var_dir, stability_api_key=fake.api_key, stability_base_url=fake.base_url) as stack:
            yield Env(stack, fake)


# -- catalog and happy paths --------------------------------------------------------------------


async def test_models_lists_the_stability_models_and_local_1_only(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    assert await list_models(env.stack, key) == ["local-1", "sd3.5-large", "stable-image-core", "stable-image-ultra"]
    reply = await generate(env.stack, key, {"model": "flux-pro-1.1", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "model_not_available"
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
@pytest.mark.parametrize("model", list(PRICES))
async def test_every_model_generates_at_its_catalog_price(env: Env, model: str, response_format: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a lighthouse on a cliff, oil painting")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "response_format": response_format})

    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == model
    assert reply.headers["x-imagegw-cost-usd"] == usd(PRICES[model])
    assert await fetch_images(env.stack, reply, response_format) == [("PNG", 64, 64)]
    body = reply.json()
    assert set(body) == {"created", "data", "usage"} and body["usage"] == ZERO_USAGE
    assert [set(item) for item in body["data"]] == [{response_format}]
    [sent] = env.sent(prompt)
    assert sent.path == f"/v2beta/stable-image/generate/{ENDPOINTS[model]}"
    assert sent.content_type == "multipart/form-data"
    assert sent.headers["authorization"] == f"Bearer {env.fake.api_key}"
    assert sent.headers["accept"] == "image/*"
    expected = {"prompt": prompt, "aspect_ratio": "1:1", "output_format": "png"}
    if model == "sd3.5-large":
        expected["model"] = "sd3.5-large"
    assert fields_of(sent) == expected
    await expect_money(env.stack, account_id, spent=PRICES[model], usage_rows=[("succeeded", "", 1, 1, PRICES[model])])


async def test_n_fans_out_one_call_per_image(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("three harbours")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt, "n": 3, "size": "1792x1024",
                                            "output_format": "webp", "response_format": "b64_json"})
    # 1792x1024 -> 16:9, which the fake renders at 1344x768 / 16.
    assert await fetch_images(env.stack, reply, "b64_json") == [("WEBP", 84, 48)] * 3
    assert [fields_of(r) for r in env.sent(prompt)] == [
        {"prompt": prompt, "aspect_ratio": "16:9", "output_format": "webp"}] * 3
    await expect_money(env.stack, account_id, spent=90_000, usage_rows=[("succeeded", "", 3, 3, 90_000)])


async def test_the_delivered_format_is_the_one_in_the_bytes(env: Env) -> None:
    # The fake labels JPEG bytes image/png: the gateway stores and serves what the bytes are.
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    reply = await generate(env.stack, key, {"model": "stable-image-ultra", "prompt": unique("x [[fake:wrong-content-type]]")})
    assert await fetch_images(env.stack, reply, "url") == [("JPEG", 8, 8)]
    await expect_money(env.stack, account_id, spent=80_000, usage_rows=[("succeeded", "", 1, 1, 80_000)])


# -- refused before any upstream call ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "sd3.5-large", "output_format": "webp"}, "output_format", "invalid_value"),
        ({"model": "stable-image-ultra", "n": 5}, "n", "integer_above_max_value"),
        ({"model": "stable-image-core", "style": "vivid"}, "style", "unsupported_parameter"),
        ({"model": "stable-image-core", "quality": "hd"}, "quality", "invalid_value"),
        ({"model": "stable-image-core", "background": "opaque"}, "background", "unsupported_parameter"),
        ({"model": "stable-image-ultra", "size": "512x512"}, "size", "invalid_size"),
        ({"model": "stable-image-ultra", "output_format": "jpeg", "output_compression": 50}, "output_compression",
         "unsupported_parameter"),
        ({"model": "sd3.5-large", "prompt": "x" * 10001}, "prompt", "string_above_max_length"),
    ],
)
async def test_parameters_a_model_cannot_take_are_400_before_any_upstream_call(
    env: Env, body: dict[str, Any], param: str, code: str
) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    before = len(env.fake.requests)
    reply = await generate(env.stack, key, {"prompt": "a cat", **body})
    assert reply.status == 400, reply.response.text
    error = reply.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert len(env.fake.requests) == before
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


# -- moderation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "n"), [("moderated", 1), ("filtered", 1), ("moderated", 2), ("filtered", 2)])
async def test_moderation_is_400_content_policy_violation_and_free(env: Env, scenario: str, n: int) -> None:
    # moderated: 403 content_moderation; filtered: 200 with finish-reason CONTENT_FILTERED (a blurred image).
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"something [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt, "n": n})
    expect_error(reply, 400, code="content_policy_violation", should_retry=False, message=MODERATED)
    assert len(env.sent(prompt)) == n
    await expect_refunded(env.stack, account_id, code="content_policy_violation", images=n)


@pytest.mark.parametrize("scenario", ["filtered", "moderated"])
async def test_moderated_calls_of_a_fan_out_are_not_returned_nor_charged(env: Env, scenario: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a crowd [[fake:{scenario}x1]]")
    reply = await generate(env.stack, key, {"model": "sd3.5-large", "prompt": prompt, "n": 3})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 64, 64)] * 2
    assert reply.headers["x-imagegw-cost-usd"] == "0.130000"
    assert len(env.sent(prompt)) == 3
    await expect_money(env.stack, account_id, spent=130_000, usage_rows=[("succeeded", "", 3, 2, 130_000)])


# -- rate limits and transient failures ------------------------------------------------------------


@pytest.mark.parametrize("scenario", ["500", "html-502", "reset"])
async def test_a_transient_failure_is_retried_then_served_and_charged_once(env: Env, scenario: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}x1]]")
    reply = await generate(env.stack, key, {"model": "stable-image-ultra", "prompt": prompt})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 64, 64)]
    assert len(env.sent(prompt)) == 2
    await expect_money(env.stack, account_id, spent=80_000, usage_rows=[("succeeded", "", 1, 1, 80_000)])


async def test_a_rate_limit_is_502_retryable_at_once_when_the_60_s_timeout_does_not_fit(env: Env) -> None:
    # Stability sends no Retry-After; it times a key out for 60 s, longer than this caller waits.
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:429]]")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt}, **{"grpc-timeout": "10S"})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message="The upstream provider is rate limiting the gateway (HTTP 429); retry after 60 s.")
    assert reply.headers["retry-after"] == "60"
    assert reply.seconds < 2
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


@pytest.mark.parametrize(("scenario", "status"), [("500", "HTTP 500"), ("html-504", "HTTP 504")])
async def test_a_persistent_5xx_is_502_retryable_and_refunded(env: Env, scenario: str, status: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt, "n": 2})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message=f"The upstream provider is failing ({status}); gave up after 3 attempts.")
    assert len(env.sent(prompt)) == 2 * 3  # each fanned-out call tried three times
    await expect_refunded(env.stack, account_id, code="upstream_error", images=2)


# -- our credentials and credit ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "log_line"),
    [
        ("wrong-key", ("stability rejected the gateway's credentials (HTTP 401, code unauthorized); "
                      "check IMAGEGW_STABILITY_API_KEY")),
        ("payment", ("stability refused the gateway's account: credit or quota exhausted (HTTP 402, code "
                    "payment_required); top up the account behind IMAGEGW_STABILITY_API_KEY")),
    ],
)
async def test_our_credentials_refused_is_502_with_a_loud_log_line(env: Env, scenario: str, log_line: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    logs = LogWatch(env.stack)
    real_key = env.fake.api_key
    if scenario == "wrong-key":
        env.fake.api_key = "sk-revoked"
    try:
        reply = await generate(env.stack, key, {"model": "stable-image-ultra", "prompt": prompt})
    finally:
        env.fake.api_key = real_key
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=CREDENTIALS_MESSAGE)
    assert len(env.sent(prompt)) == 1
    assert logs.errors() == [log_line]
    assert real_key not in logs.text() and real_key not in reply.response.text
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_an_upstream_refusal_of_the_request_is_502_not_retryable(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("ein Hafen [[fake:unprocessable]]")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=(
        "The upstream provider rejected the request (HTTP 422): English is the only supported language for this service."))
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- malformed answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "detail"),
    [
        ("garbage-image", "bytes that are not a PNG, JPEG or WebP image."),
        ("fake-png", "a png image that does not decode."),
        ("html-200", "an answer of content type text/html."),
        ("invalid-json", "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("truncated", None),
    ],
)
async def test_a_malformed_answer_is_502_and_refunded(env: Env, scenario: str, detail: str | None) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt, "response_format": "b64_json"})
    assert reply.status == 502, reply.response.text
    message = reply.json()["error"]["message"]
    if detail is None:
        assert message.startswith(MALFORMED + "a truncated answer (RemoteProtocolError after ")
    else:
        assert message == MALFORMED + detail
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=message)
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- deadlines ----------------------------------------------------------------------------------


async def test_a_slow_upstream_past_the_callers_deadline_is_504_refunded_and_disconnected(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:slow=8]]")
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": prompt, "n": 2},
                           **{"grpc-timeout": "2S"})
    expect_timeout(reply, "stable-image-core")
    assert reply.seconds < 3
    for _ in range(2):  # both fanned-out calls are closed
        gone = await wait_for_disconnect(lambda: env.fake.server.disconnects, lambda r: fields_of(r)["prompt"] == prompt)
        env.fake.server.disconnects.remove(gone)
    await expect_refunded(env.stack, account_id, code="timeout", images=2)
