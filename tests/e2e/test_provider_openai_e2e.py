"""OpenAI's Images API end to end: client -> Envoy -> imagegw serve -> OpenAIImageProvider -> fake OpenAI.

One process stack for the module, configured exactly as an operator would
(``IMAGEGW_OPENAI_API_KEY``, ``IMAGEGW_OPENAI_BASE_URL``) against ``tests.fakes.openai_fake``.
Every catalog model answers in both response formats at its catalog price; every row of
the adapter's error table is driven through the real fake and its money outcome checked
to the micro-dollar (charged, partially charged, refunded), with the ledger reconciled.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import openai
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
from tests.fakes.openai_fake import OpenAIFake, start_openai_fake
from tests.stack import ProcessStack, metric_sample, process_stack

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]

# Catalog prices (server/catalog.toml), micro-dollars per image at the default size and quality.
PRICES = {"gpt-image-2": 42_000, "gpt-image-1.5": 34_000, "gpt-image-1": 42_000, "dall-e-3": 40_000, "dall-e-2": 20_000}
GPT_IMAGE = ("gpt-image-2", "gpt-image-1.5", "gpt-image-1")
MEDIUM_1024_TOKENS = 1056  # the fake's gpt-image-1 output tokens for medium 1024x1024 (providers.md §1.4)
MALFORMED = "The upstream provider returned a malformed answer: "


@dataclass
class Env:
    stack: ProcessStack
    fake: OpenAIFake

    def sent(self, prompt: str) -> list[dict[str, Any]]:
        """Bodies of the generation requests the fake received for ``prompt``."""
        bodies = [r.json() for r in self.fake.generation_requests]
        return [body for body in bodies if body.get("prompt") == prompt]


@pytest.fixture(scope="module")
async def env(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Env]:
    async with start_openai_fake() as fake:
        var_dir = tmp_path_factory.mktemp("openai-e2e") / "var"
        async with process_stack(var_dir, openai_api_key=fake.api_key, openai_base_url=fake.base_url) as stack:
            yield Env(stack, fake)


# -- catalog and happy paths --------------------------------------------------------------------


async def test_models_lists_the_openai_models_and_local_1_only(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    assert await list_models(env.stack, key) == [
        "dall-e-2", "dall-e-3", "gpt-4o-mini", "gpt-image-1", "gpt-image-1.5", "gpt-image-2", "local-1"
    ]
    # A model whose provider has no key is not served.
    reply = await generate(env.stack, key, {"model": "imagen-3", "prompt": "a fox"})
    assert reply.status == 400
    assert reply.json() == {"error": {
        "message": "The model 'imagen-3' is not enabled on this server (its provider 'google' is not configured).",
        "type": "invalid_request_error", "param": "model", "code": "model_not_available",
    }}
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


@pytest.mark.parametrize("response_format", ["url", "b64_json"])
@pytest.mark.parametrize("model", list(PRICES))
async def test_every_model_generates_at_its_catalog_price(env: Env, model: str, response_format: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a red fox in snow, watercolor")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "response_format": response_format})

    assert reply.status == 200, reply.response.text
    assert reply.headers["x-imagegw-model"] == model
    assert reply.headers["x-imagegw-cost-usd"] == usd(PRICES[model])
    assert await fetch_images(env.stack, reply, response_format) == [("PNG", 1024, 1024)]
    body = reply.json()
    # Exactly what went upstream: concrete size and quality, never response_format to GPT image models.
    if model in GPT_IMAGE:
        expected_sent = {"model": model, "prompt": prompt, "n": 1, "size": "1024x1024", "quality": "medium",
                         "output_format": "png"}
        assert set(body) == {"created", "data", "usage", "background", "output_format", "quality", "size"}
        assert (body["size"], body["quality"], body["output_format"], body["background"]) == (
            "1024x1024", "medium", "png", "opaque")
        # The fake counts one input token per word of the prompt.
        assert body["usage"] == usage(input_text=len(prompt.split()), output_image=MEDIUM_1024_TOKENS)
        assert [set(item) for item in body["data"]] == [{response_format}]
    else:
        expected_sent = {"model": model, "prompt": prompt, "n": 1, "size": "1024x1024", "quality": "standard",
                         "response_format": "b64_json"}
        assert set(body) == {"created", "data", "usage"}
        assert body["usage"] == ZERO_USAGE
        if model == "dall-e-3":
            assert body["data"][0]["revised_prompt"] == f"A detailed rendition of: {prompt}"
            assert [set(item) for item in body["data"]] == [{response_format, "revised_prompt"}]
        else:
            assert [set(item) for item in body["data"]] == [{response_format}]
    assert env.sent(prompt) == [expected_sent]
    request = next(r for r in env.fake.generation_requests if r.json()["prompt"] == prompt)
    assert request.headers["authorization"] == f"Bearer {env.fake.api_key}"
    await expect_money(env.stack, account_id, spent=PRICES[model], usage_rows=[("succeeded", "", 1, 1, PRICES[model])])


async def test_gpt_image_n_and_every_option_in_one_call(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("three lighthouses")
    reply = await generate(env.stack, key, {
        "model": "gpt-image-1", "prompt": prompt, "n": 3, "size": "1536x1024", "quality": "high",
        "output_format": "webp", "output_compression": 80, "background": "opaque", "moderation": "low",
        "user": "user-42", "response_format": "b64_json",
    })
    assert reply.status == 200, reply.response.text
    assert await fetch_images(env.stack, reply, "b64_json") == [("WEBP", 1536, 1024)] * 3
    assert env.sent(prompt) == [{
        "model": "gpt-image-1", "prompt": prompt, "n": 3, "size": "1536x1024", "quality": "high",
        "output_format": "webp", "output_compression": 80, "background": "opaque", "moderation": "low",
        "user": "user-42",
    }]
    body = reply.json()
    assert (body["size"], body["quality"], body["output_format"]) == ("1536x1024", "high", "webp")
    assert body["usage"] == usage(input_text=len(prompt.split()), output_image=3 * 6208)
    assert reply.headers["x-imagegw-cost-usd"] == "0.750000"
    await expect_money(env.stack, account_id, spent=750_000, usage_rows=[("succeeded", "", 3, 3, 750_000)])


async def test_dall_e_2_n_is_one_upstream_call(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("two small boats")
    reply = await generate(env.stack, key, {"model": "dall-e-2", "prompt": prompt, "n": 2, "size": "256x256"})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 256, 256)] * 2
    assert env.sent(prompt) == [{"model": "dall-e-2", "prompt": prompt, "n": 2, "size": "256x256",
                                 "quality": "standard", "response_format": "b64_json"}]
    await expect_money(env.stack, account_id, spent=32_000, usage_rows=[("succeeded", "", 2, 2, 32_000)])


async def test_dall_e_3_style_and_hd_are_forwarded_and_priced(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a wide mountain panorama")
    reply = await generate(env.stack, key, {"model": "dall-e-3", "prompt": prompt, "size": "1792x1024",
                                            "quality": "hd", "style": "natural", "response_format": "b64_json"})
    assert await fetch_images(env.stack, reply, "b64_json") == [("PNG", 1792, 1024)]
    assert reply.json()["data"][0]["revised_prompt"] == f"A detailed rendition of: {prompt}"
    assert env.sent(prompt) == [{"model": "dall-e-3", "prompt": prompt, "n": 1, "size": "1792x1024", "quality": "hd",
                                 "response_format": "b64_json", "style": "natural"}]
    await expect_money(env.stack, account_id, spent=120_000, usage_rows=[("succeeded", "", 1, 1, 120_000)])


async def test_a_provider_url_is_downloaded_at_once_and_rehosted(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    downloads = len(env.fake.blobs.downloads)
    reply = await generate(env.stack, key, {"model": "dall-e-3", "prompt": unique("a cat [[fake:url]]")})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)]
    assert len(env.fake.blobs.downloads) == downloads + 1
    assert env.fake.server.base_url not in reply.response.text  # never the provider's link
    await expect_money(env.stack, account_id, spent=40_000, usage_rows=[("succeeded", "", 1, 1, 40_000)])


async def test_a_data_url_prefixed_base64_image_is_accepted(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": unique("a cat [[fake:data-url]]"),
                                            "response_format": "b64_json"})
    assert await fetch_images(env.stack, reply, "b64_json") == [("PNG", 1024, 1024)]
    await expect_money(env.stack, account_id, spent=42_000, usage_rows=[("succeeded", "", 1, 1, 42_000)])


# -- refused before any upstream call ----------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "gpt-image-1", "style": "vivid"}, "style", "unsupported_parameter"),
        ({"model": "gpt-image-2", "background": "transparent"}, "background", "invalid_value"),
        ({"model": "gpt-image-1", "quality": "hd"}, "quality", "invalid_value"),
        ({"model": "gpt-image-1", "size": "256x256"}, "size", "invalid_size"),
        ({"model": "gpt-image-1", "n": 11}, "n", "integer_above_max_value"),
        ({"model": "gpt-image-1", "stream": True, "response_format": "url"}, "response_format", "invalid_value"),
        ({"model": "dall-e-3", "n": 2}, "n", "integer_above_max_value"),
        ({"model": "dall-e-3", "output_format": "jpeg"}, "output_format", "invalid_value"),
        ({"model": "dall-e-3", "moderation": "low"}, "moderation", "unsupported_parameter"),
        ({"model": "dall-e-2", "style": "natural"}, "style", "unsupported_parameter"),
        ({"model": "dall-e-2", "quality": "hd"}, "quality", "invalid_value"),
        ({"model": "dall-e-2", "prompt": "x" * 1001}, "prompt", "string_above_max_length"),
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
    assert reply.headers["x-should-retry"] == "false"
    assert len(env.fake.requests) == before
    await expect_money(env.stack, account_id, spent=0, usage_rows=[])


# -- moderation: 400 content_policy_violation, nothing charged, never retried ------------------------


@pytest.mark.parametrize(
    ("model", "scenario"),
    [("gpt-image-1", "moderated"), ("gpt-image-2", "moderated-output"), ("dall-e-3", "content-policy"),
     ("dall-e-2", "moderated")],
)
async def test_moderation_is_400_content_policy_violation_and_free(env: Env, model: str, scenario: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"something [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "n": 1})
    expect_error(reply, 400, code="content_policy_violation", should_retry=False,
                 message="The upstream provider's safety system rejected the request.")
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="content_policy_violation")


# -- partial answers: delivered images only are charged --------------------------------------------


@pytest.mark.parametrize(("model", "n", "unit"), [("gpt-image-1", 3, 42_000), ("dall-e-2", 4, 20_000)])
async def test_fewer_images_than_asked_are_returned_and_only_they_are_charged(
    env: Env, model: str, n: int, unit: int
) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a flock of birds [[fake:partial]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "n": n, "response_format": "b64_json"})
    assert await fetch_images(env.stack, reply, "b64_json") == [("PNG", 1024, 1024)] * (n - 1)
    assert reply.headers["x-imagegw-cost-usd"] == usd(unit * (n - 1))
    if model == "gpt-image-1":
        assert reply.json()["usage"] == usage(input_text=len(prompt.split()), output_image=MEDIUM_1024_TOKENS * (n - 1))
    await expect_money(env.stack, account_id, spent=unit * (n - 1), usage_rows=[("succeeded", "", n, n - 1, unit * (n - 1))])


# -- rate limits and transient failures ------------------------------------------------------------


async def upstream_retries(stack: ProcessStack) -> float:
    return metric_sample(await stack.metrics(), "imagegw_upstream_retries_total", provider="openai")


@pytest.mark.parametrize(("scenario", "wait"), [("429-s=0.6", 0.6), ("429-ms=400", 0.4), ("503", 0.0), ("html-502", 0.0)])
async def test_a_transient_failure_is_retried_then_served_and_charged_once(env: Env, scenario: str, wait: float) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}x1]]")
    retries_before = await upstream_retries(env.stack)
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    assert await fetch_images(env.stack, reply, "url") == [("PNG", 1024, 1024)]
    assert len(env.sent(prompt)) == 2
    assert await upstream_retries(env.stack) == retries_before + 1  # the metric counts it
    assert reply.seconds >= wait  # the Retry-After hint was honoured
    await expect_money(env.stack, account_id, spent=42_000, usage_rows=[("succeeded", "", 1, 1, 42_000)])


@pytest.mark.parametrize(
    ("scenario", "status"),
    [("500", "HTTP 500"), ("503", "HTTP 503"), ("html-502", "HTTP 502"), ("html-504", "HTTP 504"),
     ("reset", "RemoteProtocolError on images/generations")],
)
async def test_a_persistent_5xx_is_502_retryable_and_refunded(env: Env, scenario: str, status: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message=f"The upstream provider is failing ({status}); gave up after 3 attempts.")
    assert "retry-after" not in reply.headers
    assert len(env.sent(prompt)) == 3
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_a_rate_limit_longer_than_we_wait_is_502_retryable_with_retry_after(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:429-huge]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message="The upstream provider is rate limiting the gateway (HTTP 429); retry after 600 s.")
    assert reply.headers["retry-after"] == "600"
    assert reply.seconds < 5
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_a_rate_limit_without_a_hint_backs_off_then_gives_up(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:429-none]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=True,
                 message="The upstream provider is rate limiting the gateway (HTTP 429); gave up after 3 attempts.")
    assert len(env.sent(prompt)) == 3
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_a_5xx_marked_do_not_retry_is_502_not_retryable(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:500-no-retry]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=False,
                 message="The upstream provider failed (HTTP 500) and asked not to be retried.")
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- our credentials and account: 502 (never 401/402), not retryable, a loud log line ---------------


@pytest.mark.parametrize(
    ("scenario", "log_line"),
    [
        ("wrong-key", ("openai rejected the gateway's credentials (HTTP 401, code invalid_api_key); "
                      "check IMAGEGW_OPENAI_API_KEY")),
        ("region", ("openai rejected the gateway's credentials (HTTP 403, code unsupported_country_region_territory); "
                   "check IMAGEGW_OPENAI_API_KEY")),
        ("quota", ("openai refused the gateway's account: credit or quota exhausted (HTTP 429, code "
                  "insufficient_quota); top up the account behind IMAGEGW_OPENAI_API_KEY")),
        ("billing", ("openai refused the gateway's account: credit or quota exhausted (HTTP 400, code "
                    "billing_hard_limit_reached); top up the account behind IMAGEGW_OPENAI_API_KEY")),
    ],
)
async def test_our_credentials_refused_is_502_with_a_loud_log_line(env: Env, scenario: str, log_line: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    logs = LogWatch(env.stack)
    real_key = env.fake.api_key
    if scenario == "wrong-key":
        env.fake.api_key = "sk-rotated-elsewhere"  # the provider no longer accepts the configured key
    try:
        reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    finally:
        env.fake.api_key = real_key
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=CREDENTIALS_MESSAGE)
    assert len(env.sent(prompt)) == 1
    assert logs.errors() == [log_line]
    assert real_key not in logs.text() and real_key not in reply.response.text
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_a_retired_model_is_502_not_retryable_and_logged(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:model-gone]]")
    logs = LogWatch(env.stack)
    reply = await generate(env.stack, key, {"model": "dall-e-3", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=False,
                 message="The upstream provider does not serve this model.")
    assert logs.errors() == [
        "openai does not serve the requested model (HTTP 404): The model `dall-e-3` has been deprecated."
    ]
    await expect_refunded(env.stack, account_id, code="upstream_error")


async def test_an_upstream_refusal_of_parameters_is_502_not_retryable(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:invalid]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt})
    expect_error(reply, 502, code="upstream_error", should_retry=False,
                 message="The upstream provider rejected the request (HTTP 400): Invalid value for 'size'.")
    assert len(env.sent(prompt)) == 1
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- malformed answers: 502, never a 200 with empty data, refunded ----------------------------------


@pytest.mark.parametrize(
    ("model", "scenario", "detail"),
    [
        ("gpt-image-1", "html-200", "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("gpt-image-1", "invalid-json", "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("gpt-image-1", "missing-image", "a data entry without b64_json or url."),
        ("gpt-image-1", "empty-data", "an answer with no images."),
        ("gpt-image-1", "bad-base64", "image data that is not valid base64."),
        ("gpt-image-1", "garbage-image", "bytes that are not a PNG, JPEG or WebP image."),
        ("gpt-image-1", "fake-png", "a png image that does not decode."),
        ("gpt-image-1", "truncated", r"a truncated answer \(RemoteProtocolError after \d+ bytes\) from 127.0.0.1."),
        ("dall-e-3", "expired-url", "the image URL answered HTTP 403."),
    ],
)
async def test_a_malformed_answer_is_502_and_refunded(env: Env, model: str, scenario: str, detail: str) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"a harbour [[fake:{scenario}]]")
    reply = await generate(env.stack, key, {"model": model, "prompt": prompt, "response_format": "b64_json"})
    assert reply.status == 502, reply.response.text
    message = reply.json()["error"]["message"]
    assert re.fullmatch(re.escape(MALFORMED) + (detail if scenario == "truncated" else re.escape(detail)), message)
    expect_error(reply, 502, code="upstream_error", should_retry=False, message=message)
    assert len(env.sent(prompt)) == 1  # never retried: the upstream may have billed us already
    await expect_refunded(env.stack, account_id, code="upstream_error")


# -- deadlines ----------------------------------------------------------------------------------


async def test_a_slow_upstream_past_the_callers_deadline_is_504_refunded_and_disconnected(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a harbour [[fake:slow=8]]")
    reply = await generate(env.stack, key, {"model": "gpt-image-1", "prompt": prompt}, **{"grpc-timeout": "2S"})
    expect_timeout(reply, "gpt-image-1")
    assert 1.5 < reply.seconds < 3
    gone = await wait_for_disconnect(lambda: env.fake.server.disconnects, lambda r: r.json()["prompt"] == prompt)
    assert gone.path == "/v1/images/generations"
    await expect_refunded(env.stack, account_id, code="timeout")


# -- the official SDK ---------------------------------------------------------------------------


def sdk(env: Env, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=env.stack.api_base, max_retries=0, timeout=60)


async def test_sdk_generates_with_gpt_image_usage(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique("a tall portrait of a heron")
    async with sdk(env, key) as client:
        raw = await client.images.with_raw_response.generate(
            model="gpt-image-1", prompt=prompt, size="1024x1536", quality="low", response_format="b64_json"
        )
    result = raw.parse()
    assert raw.headers["x-imagegw-cost-usd"] == "0.016000"
    assert result.data is not None and len(result.data) == 1 and result.data[0].b64_json
    assert result.usage is not None
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.total_tokens) == (
        len(prompt.split()), 408, len(prompt.split()) + 408)
    assert (result.size, result.quality, result.output_format) == ("1024x1536", "low", "png")
    await expect_money(env.stack, account_id, spent=16_000, usage_rows=[("succeeded", "", 1, 1, 16_000)])


async def test_sdk_sees_moderation_as_bad_request_and_our_credentials_as_a_server_error(env: Env) -> None:
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    async with sdk(env, key) as client:
        with pytest.raises(openai.BadRequestError) as refused:
            await client.images.generate(model="gpt-image-1", prompt=unique("x [[fake:moderated]]"))
        with pytest.raises(openai.InternalServerError) as misconfigured:
            await client.images.generate(model="gpt-image-1", prompt=unique("x [[fake:quota]]"))
    assert (refused.value.status_code, refused.value.code) == (400, "content_policy_violation")
    assert (misconfigured.value.status_code, misconfigured.value.code) == (502, "upstream_error")
    assert misconfigured.value.response.headers["x-should-retry"] == "false"
    # Usage is listed newest first.
    await expect_money(env.stack, account_id, spent=0, usage_rows=[
        ("failed", "upstream_error", 1, 0, 0), ("failed", "content_policy_violation", 1, 0, 0)])
