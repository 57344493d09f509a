"""Google's Gemini API end to end: client -> Envoy -> imagegw serve -> GoogleImageProvider -> fake Gemini API.

One process stack for the module (``IMAGEGW_GOOGLE_API_KEY``, ``IMAGEGW_GOOGLE_BASE_URL``)
against ``tests.fakes.google_fake``: Imagen models on ``:predict`` (``n`` is
``sampleCount``), Gemini image output on ``:generateContent`` (``n`` fans out). Every
error row of the adapter's table with its money outcome, to the micro-dollar.
"""

from __future__ import annotations

import re
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
    usage,
    usd,
    wait_for_disconnect,
)
from tests.fakes.google_fake import GoogleFake, start_google_fake
from tests.fakes.server import RecordedRequest
from tests.stack import ProcessStack, process_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

PRICES = {"imagen-3": 30_000, "imagen-4": 40_000, "gemini-2.5-flash-image": 39_000}
UPSTREAM = {"imagen-3": "imagen-3.0-generate-002", "imagen-4": "imagen-4.0-generate-001",
            "gemini-2.5-flash-image": "gemini-2.5-flash-image"}
IMAGEN = ("imagen-3", "imagen-4")
GEMINI = "gemini-2.5-flash-image"
MALFORMED = "The upstream provider returned a malformed answer: "
MODERATED = "The upstream provider's safety system rejected the request."


def prompt_of(request: RecordedRequest) -> str | None:
    body = request.json()
    if request.path.endswith(":predict"):
        return body["instances"][0]["prompt"]
    return body["contents"][0]["parts"][0]["text"]


@dataclass
class Env:
    stack: ProcessStack
    fake: GoogleFake

    def sent(self, prompt: str) -> list[RecordedRequest]:
        """The requests the fake received for ``prompt``, in arrival order."""
        return [r for r in self.fake.requests if prompt_of(r) == prompt]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with start_google_fake() as fake:
        var_dir = tmp_path_factory.mktemp("google-e2e") / "var"
        async with process_stack(var_dir, google_api_key=fake.api_key, google_base_url=fake.base_url) as stack:
            yield Env(stack, fake)


def imagen_body(prompt: str, n: int = 1, ratio: str = "1:1", output: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"instances": [{"prompt": prompt}], "parameters": {
        "sampleCount": n, "aspectRatio": ratio, "includeRaiReason": True, "outputOptions": output or {"mimeType": "image/png"}}}


def gemini_body(prompt: str, ratio: str = "1:1") -> dict[str, Any]:
    return {"contents": [{"role": "user", "parts": [{"text": prompt}]}],
            "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": ratio}}}


# -- catalog and happy paths --------------------------------------------------------------------


async def test_models_lists_the_google_models_and_local_1_only(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    assert await list_models(env.stack, key) == ["gemini-2.5-flash-image", "imagen-3", "imagen-4", "local-1"]
    reply = await generate(env.stack, key, {"model": "stable-image-core", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json()["error"]["code"] == "model_not_available"
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
@pytest.mark.parametrize("model", list(PRICES))
async def test_every_model_generates_at_its_catalog_price(env: Env, model: str, response_format: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a banana wearing a tuxedo, studio photo")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "response_format": response_format})

    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == model
    assert reply.headers["x-imagegw-cost-usd"] == usd(PRICES[model])
    assert await fetch_images(env.stack, reply, response_format) == [("PNG", 1024, 1024)]
    body = reply.json()
    assert set(body) == {"created", "data", "usage"}
    assert [set(item) for item in body["data"]] == [{response_format}]
    [sent] = env.sent(prompt)
    assert sent.headers["x-goog-api-key"] == env.fake.api_key and "key" not in sent.query
    if model in IMAGEN:
        assert sent.path == f"/v1beta/models/{UPSTREAM[model]}:predict"
        assert sent.json() == imagen_body(prompt)
        assert body["usage"] == ZERO_USAGE
    else:
        assert sent.path == f"/v1beta/models/{UPSTREAM[model]}:generateContent"
        assert sent.json() == gemini_body(prompt)
        assert body["usage"] == usage(input_text=12, output_image=1290)  # the fake's usageMetadata
    await expect_money(env.stack, account_id, spent=PRICES[model], usage_rows=[("succeeded", "", 1, 1, PRICES[model])])


async def test_imagen_n_is_sample_count_in_one_call(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("red skateboards on a porch")
    reply = await generate(env.stack, key, {
        "model": "imagen-4", "prompt": prompt, "n": 3, "size": "1792x1024", "output_format": "jpeg",
        "output_compression": 70, "response_format": "b64_json",
    })
    # 1792x1024 is nearest 16:9, which Imagen renders at 1408x768.
    assert await fetch_images(env.stack, reply, "b64_json") == [("JPEG", 1408, 768)] * 3
    assert [r.json() for r in env.sent(prompt)] == [
        imagen_body(prompt, n=3, ratio="16:9", output={"mimeType": "image/jpeg", "compressionQuality": 70})
    ]
    await expect_money(env.stack, account_id, spent=120_000, usage_rows=[("succeeded", "", 3, 3, 120_000)])


async def test_gemini_n_fans_out_one_call_per_image(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("three bananas")
    reply = await generate(env.stack, key, {"model": GEMINI, "prompt": prompt, "n": 3, "size": "1536x1024"})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1248, 832)] * 3
    assert [r.json() for r in env.sent(prompt)] == [gemini_body(prompt, ratio="3:2")] * 3
    assert reply.json()["usage"] == usage(input_text=3 * 12, output_image=3 * 1290)
    await expect_money(env.stack, account_id, spent=117_000, usage_rows=[("succeeded", "", 3, 3, 117_000)])


async def test_imagen_enhanced_prompt_is_passed_through_as_revised_prompt(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a skateboard [[fake:enhanced]]")
    reply = await generate(env.stack, key, {"model": "imagen-3", "prompt": prompt, "n": 2})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)] * 2
    assert [item["revised_prompt"] for item in reply.json()["data"]] == [
        f"An enhanced, detailed version of: {prompt}"] * 2
    await expect_money(env.stack, account_id, spent=60_000, usage_rows=[("succeeded", "", 2, 2, 60_000)])


@pytest.mark.parametrize(("model", "scenario"), [("imagen-3", "safety-attributes"), (GEMINI, "thought"),
                                                 (GEMINI, "with-text"), (GEMINI, "two-images")])
async def test_extra_parts_are_skipped_and_never_charged(env: Env, model: str, scenario: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    reply = await generate(env.stack, key, {"model": model, "prompt": unique(f"a cat [[fake:{scenario}]]")})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)]  # two-images: one asked, one given
    await expect_money(env.stack, account_id, spent=PRICES[model], usage_rows=[("succeeded", "", 1, 1, PRICES[model])])


# -- refused before any upstream call ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "imagen-3", "style": "vivid"}, "style", "unsupported_parameter"),
        ({"model": "imagen-4", "n": 5}, "n", "integer_above_max_value"),
        ({"model": "imagen-3", "output_format": "webp"}, "output_format", "invalid_value"),
        ({"model": "imagen-3", "quality": "hd"}, "quality", "invalid_value"),
        ({"model": "imagen-4", "background": "opaque"}, "background", "unsupported_parameter"),
        ({"model": "imagen-3", "prompt": "x" * 1901}, "prompt", "string_above_max_length"),
        ({"model": GEMINI, "output_format": "jpeg"}, "output_format", "invalid_value"),
        ({"model": GEMINI, "size": "256x256"}, "size", "invalid_size"),
        ({"model": GEMINI, "moderation": "low"}, "moderation", "unsupported_parameter"),
        ({"model": GEMINI, "output_compression": 50}, "output_compression", "unsupported_parameter"),
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


# -- moderation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "scenario", "n"),
    [
        ("imagen-3", "prompt-blocked", 1),  # 400 INVALID_ARGUMENT on :predict
        ("imagen-4", "all-filtered", 2),  # 200 with only a raiFilteredReason entry
        ("imagen-3", "all-filtered-empty", 1),  # 200 with {}
        (GEMINI, "blocked", 1),  # 200 with promptFeedback.blockReason
        (GEMINI, "image-safety", 2),  # 200, finishReason IMAGE_SAFETY, on every fanned-out call
        (GEMINI, "image-prohibited", 1),
    ],
)
async def test_moderation_is_400_content_policy_violation_and_free(env: Env, model: str, scenario: str, n: int) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"something [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "n": n})
    expect_error(reply, 400, code="content_policy_violation", should_retry=False, message=MODERATED)
    assert len(env.sent(prompt)) == (n if model == GEMINI else 1)
    await expect_refunded(env.stack, account_id, code="content_policy_violation", images=n)


# -- partial answers ------------------------------------------------------------------------------


async def test_imagen_filtered_images_are_not_returned_nor_charged(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a crowd [[fake:partial]]")
    reply = await generate(env.stack, key, {"model": "imagen-3", "prompt": prompt, "n": 3, "response_format": "b64_json"})
    assert await fetch_images(env.stack, reply, "b64_json") == [("PNG", 1024, 1024)] * 2
    assert reply.headers["x-imagegw-cost-usd"] == "0.060000"
    assert len(env.sent(prompt)) == 1
    await expect_money(env.stack, account_id, spent=60_000, usage_rows=[("succeeded", "", 3, 2, 60_000)])


async def test_gemini_moderated_calls_of_a_fan_out_are_not_charged(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a crowd [[fake:image-safetyx1]]")
    reply = await generate(env.stack, key, {"model": GEMINI, "prompt": prompt, "n": 3})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)] * 2
    assert len(env.sent(prompt)) == 3
    assert reply.json()["usage"] == usage(input_text=2 * 12, output_image=2 * 1290)
    await expect_money(env.stack, account_id, spent=78_000, usage_rows=[("succeeded", "", 3, 2, 78_000)])


# -- rate limits and transient failures ------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "scenario", "wait"),
    [("imagen-3", "429=0.6", 0.6), (GEMINI, "429=0.5", 0.5), ("imagen-4", "503", 0.0), (GEMINI, "list-error", 0.0)],
)
async def test_a_transient_failure_is_retried_then_served_and_charged_once(
    env: Env, model: str, scenario: str, wait: float
) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}x1]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)]
    assert len(env.sent(prompt)) == 2
    assert reply.seconds >= wait  # RetryInfo.retryDelay, read from the body, was honoured
    await expect_money(env.stack, account_id, spent=PRICES[model], usage_rows=[("succeeded", "", 1, 1, PRICES[model])])


async def test_a_retry_delay_past_the_deadline_is_502_retryable_at_once(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:429=26]]")
    reply = await generate(env.stack, key, {"model": "imagen-4", "prompt": prompt}, **{"grpc-timeout": "5S"})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message="The upstream provider is rate limiting the gateway (HTTP 429); retry after 26 s.")
    assert reply.headers["retry-after"] == "26"
    assert reply.seconds < 2
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


@pytest.mark.parametrize(
    ("model", "scenario", "status"),
    [("imagen-3", "500", "HTTP 500"), (GEMINI, "503", "HTTP 503"), ("imagen-4", "list-error", "HTTP 503"),
     (GEMINI, "html-502", "HTTP 502")],
)
async def test_a_persistent_5xx_is_502_retryable_and_refunded(env: Env, model: str, scenario: str, status: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message=f"The upstream provider is failing ({status}); gave up after 3 attempts.")
    assert len(env.sent(prompt)) == 3
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- our credentials and quota -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "scenario", "log_line"),
    [
        ("imagen-3", "wrong-key",
         "google rejected the gateway's credentials (HTTP 400, code API_KEY_INVALID); check IMAGEGW_GOOGLE_API_KEY"),
        (GEMINI, "wrong-key",
         "google rejected the gateway's credentials (HTTP 400, code API_KEY_INVALID); check IMAGEGW_GOOGLE_API_KEY"),
        (GEMINI, "permission",
         "google rejected the gateway's credentials (HTTP 403, code SERVICE_DISABLED); check IMAGEGW_GOOGLE_API_KEY"),
        ("imagen-4", "429-daily",
         ("google refused the gateway's account: credit or quota exhausted (HTTP 429, code QUOTA_PER_DAY); "
         "top up the account behind IMAGEGW_GOOGLE_API_KEY")),
    ],
)
async def test_our_credentials_refused_is_502_with_a_loud_log_line(
    env: Env, model: str, scenario: str, log_line: str
) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    logs = LogWatch(env.stack)
    real_key = env.fake.api_key
    if scenario == "wrong-key":
        env.fake.api_key = "AIza-revoked"
    try:
        reply = await generate(env.stack, key, {"model": model, "prompt": prompt})
    finally:
        env.fake.api_key = real_key
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=CREDENTIALS_MESSAGE)
    assert len(env.sent(prompt)) == 1
    assert logs.errors() == [log_line]
    assert real_key not in logs.text() and real_key not in reply.response.text
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_a_shut_down_model_is_502_not_retryable_and_logged(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    logs = LogWatch(env.stack)
    reply = await generate(env.stack, key, {"model": "imagen-4", "prompt": unique("a cat [[fake:model-gone]]")})
    expect_error(reply, 502, code="upstream_error", should_retry=False,
                 message="The upstream provider does not serve this model.")
    assert logs.errors() == [("google does not serve the requested model (HTTP 404): models/imagen-4.0-generate-001 "
                             "is not found for API version v1beta, or is not supported for predict.")]
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- malformed answers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "scenario", "message"),
    [
        ("imagen-3", "html-200", MALFORMED + "invalid JSON from 127.0.0.1 (HTTP 200)."),
        (GEMINI, "invalid-json", MALFORMED + "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("imagen-3", "missing-image", MALFORMED + "a prediction without bytesBase64Encoded."),
        ("imagen-4", "bad-base64", MALFORMED + "image data that is not valid base64."),
        (GEMINI, "bad-base64", MALFORMED + "image data that is not valid base64."),
        ("imagen-3", "garbage-image", MALFORMED + "bytes that are not a PNG, JPEG or WebP image."),
        (GEMINI, "fake-png", MALFORMED + "a png image that does not decode."),
        ("imagen-4", "truncated", None),
        (GEMINI, "missing-image", "The upstream model answered without an image (finishReason STOP)."),
        (GEMINI, "text-only", "The upstream model answered without an image (finishReason STOP)."),
        (GEMINI, "no-image", "The upstream model answered without an image (finishReason NO_IMAGE)."),
        (GEMINI, "image-other", "The upstream model answered without an image (finishReason IMAGE_OTHER)."),
    ],
)
async def test_a_malformed_or_imageless_answer_is_502_and_refunded(
    env: Env, model: str, scenario: str, message: str | None
) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "response_format": "b64_json"})
    if message is None:
        assert re.fullmatch(re.escape(MALFORMED) + r"a truncated answer \(RemoteProtocolError after \d+ bytes\) "
                            r"from 127\.0\.0\.1\.", reply.json()["error"]["message"])
        message = reply.json()["error"]["message"]
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=message)
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- deadlines ----------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["imagen-3", GEMINI])
async def test_a_slow_upstream_past_the_callers_deadline_is_504_refunded_and_disconnected(env: Env, model: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:slow=8]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt}, **{"grpc-timeout": "2S"})
    expect_timeout(reply, model)
    assert reply.seconds < 3
    await wait_for_disconnect(lambda: env.fake.server.disconnects, lambda r: prompt_of(r) == prompt)
    await expect_refunded(env.stack, account_id, code="timeout")
