"""OpenAIImageProvider against the fake OpenAI host over real HTTP (and its xAI/Together dialects)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx
import pytest

from server.errors import ContentPolicyError, DeadlineExceededError, UpstreamError
from server.providers.http import CREDENTIALS_MESSAGE, RetryPolicy
from server.providers.openai import OpenAIImageProvider
from tests.fakes.images import describe
from tests.fakes.openai_fake import OpenAIFake, start_openai_fake
from tests.providers.support import FAST_RETRY, models_of

pytestmark = pytest.mark.timeout(15)


def provider_for(fake: OpenAIFake, http: httpx.AsyncClient, **options: object) -> OpenAIImageProvider:
    options.setdefault("retry", FAST_RETRY)
    return OpenAIImageProvider(http, api_key=fake.api_key, base_url=fake.base_url, **options)  # type: ignore[arg-type]


# -- happy paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", models_of("openai"))
async def test_every_catalog_model_answers_decodable_images(model, openai_fake, http, image_request, deadline):
    request = image_request(model)
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))

    assert len(result.images) == 1
    assert describe(result.images[0].data) == ("png", 1024, 1024)
    assert result.images[0].format == "png"
    sent = openai_fake.generation_requests[-1]
    assert sent.headers["authorization"] == f"Bearer {openai_fake.api_key}"
    body = sent.json()
    assert body["model"] == model and body["n"] == 1 and body["size"] == "1024x1024"
    if model.startswith("gpt-image"):
        assert "response_format" not in body and "style" not in body
        assert body["quality"] == "medium" and body["output_format"] == "png"
        assert result.size == "1024x1024" and result.quality == "medium"
        assert result.output_format == "png" and result.background == "opaque"
        assert result.usage.output_image_tokens == 1056 and result.usage.input_text_tokens == 6
    else:
        assert body["response_format"] == "b64_json"
        assert "output_format" not in body and "background" not in body
        assert result.size is None and result.usage.output_tokens == 0


async def test_gpt_image_n_formats_and_options_are_forwarded(openai_fake, http, image_request, deadline):
    request = image_request(
        "gpt-image-1", n=3, size="1536x1024", quality="high", output_format="webp", output_compression=80,
        background="opaque", moderation="low", user="user-42",
    )
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))

    assert [describe(image.data) for image in result.images] == [("webp", 1536, 1024)] * 3
    assert openai_fake.generation_requests[-1].json() == {
        "model": "gpt-image-1", "prompt": "a red fox in snow, watercolor", "n": 3, "size": "1536x1024",
        "quality": "high", "output_format": "webp", "output_compression": 80, "background": "opaque",
        "moderation": "low", "user": "user-42",
    }
    assert result.usage.output_image_tokens == 3 * 6208
    assert (result.size, result.quality, result.output_format) == ("1536x1024", "high", "webp")


async def test_auto_size_and_quality_are_sent_as_the_priced_concrete_values(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1.5", size="auto", quality="auto")
    await provider_for(openai_fake, http).generate(request, deadline=deadline(5))

    body = openai_fake.generation_requests[-1].json()
    assert (body["size"], body["quality"]) == ("1024x1024", "medium")


async def test_dall_e_3_sends_style_and_passes_revised_prompt(openai_fake, http, image_request, deadline):
    request = image_request("dall-e-3", size="1792x1024", quality="hd", style="natural")
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))

    body = openai_fake.generation_requests[-1].json()
    assert body == {
        "model": "dall-e-3", "prompt": "a red fox in snow, watercolor", "n": 1, "size": "1792x1024",
        "quality": "hd", "response_format": "b64_json", "style": "natural",
    }
    assert result.images[0].revised_prompt == "A detailed rendition of: a red fox in snow, watercolor"
    assert describe(result.images[0].data) == ("png", 1792, 1024)


async def test_url_answers_are_downloaded_at_once(openai_fake, http, image_request, deadline):
    request = image_request("dall-e-2", prompt="a cat [[fake:url]]", n=2, size="512x512")
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))

    assert [describe(image.data) for image in result.images] == [("png", 512, 512)] * 2
    assert len(openai_fake.blobs.downloads) == 2
    blob_requests = [r for r in openai_fake.requests if r.path.startswith("/blob/")]
    assert all("authorization" not in r.headers for r in blob_requests)  # our key never goes to the blob host


async def test_an_expired_url_is_an_upstream_error(openai_fake, http, image_request, deadline):
    request = image_request("dall-e-2", prompt="a cat [[fake:expired-url]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False
    assert "HTTP 403" in caught.value.message


async def test_a_data_url_prefix_is_accepted(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="a cat [[fake:data-url]]")
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert describe(result.images[0].data)[0] == "png"


async def test_the_format_reported_is_the_one_in_the_bytes(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="a cat [[fake:wrong-format]]")
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert result.images[0].format == "jpeg"


async def test_a_slow_drip_body_is_read_whole(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="a cat [[fake:drip=0.05]]")
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert describe(result.images[0].data) == ("png", 1024, 1024)


# -- moderation ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "scenario"),
    [("gpt-image-1", "moderated"), ("gpt-image-2", "moderated-output"), ("dall-e-3", "moderated"), ("dall-e-2", "content-policy")],
)
async def test_moderation_errors_are_content_policy(model, scenario, openai_fake, http, image_request, deadline):
    request = image_request(model, prompt=f"something [[fake:{scenario}]]")
    with pytest.raises(ContentPolicyError) as caught:
        await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.code == "content_policy_violation"
    assert len(openai_fake.generation_requests) == 1  # never retried


async def test_fewer_images_than_asked_is_a_partial_result(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="cats [[fake:partial]]", n=3)
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 2


# -- rate limits and retries ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("scenario", "at_least", "at_most"),
    [
        ("429-ms=150", 0.15, 0.9),  # retry-after-ms wins
        ("429-s=0.2", 0.2, 0.9),  # Retry-After in seconds
        ("429-date=1", 0.0, 1.6),  # Retry-After as an HTTP-date (one-second resolution)
        ("429-none", 0.0, 0.5),  # no hint: exponential backoff
    ],
)
async def test_rate_limits_wait_as_told_then_succeed(scenario, at_least, at_most, openai_fake, http, image_request, deadline):
    openai_fake.enqueue(scenario, "ok")
    started = time.monotonic()
    result = await provider_for(openai_fake, http).generate(image_request("gpt-image-1"), deadline=deadline(5))
    elapsed = time.monotonic() - started

    assert len(result.images) == 1
    assert len(openai_fake.generation_requests) == 2
    assert at_least <= elapsed <= at_most


async def test_a_retry_after_longer_than_the_deadline_fails_fast(openai_fake, http, image_request, deadline):
    openai_fake.enqueue("429")  # retry-after: 2, retry-after-ms: 2000
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(image_request("gpt-image-1"), deadline=deadline(1.0))
    assert time.monotonic() - started < 0.5
    assert caught.value.should_retry is True
    assert caught.value.retry_after == 2.0
    assert len(openai_fake.generation_requests) == 1


async def test_a_huge_retry_after_is_never_slept_even_with_time_left(openai_fake, http, image_request, deadline):
    openai_fake.enqueue("429-huge")
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(image_request("gpt-image-1"), deadline=deadline(3600))
    assert time.monotonic() - started < 0.5
    assert (caught.value.should_retry, caught.value.retry_after) == (True, 600.0)


@pytest.mark.parametrize("scenario", ["500", "503", "html-502", "reset"])
async def test_transient_failures_are_retried_then_give_up_retryable(scenario, openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt=f"fox [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is True
    assert len(openai_fake.generation_requests) == FAST_RETRY.max_attempts == 3


async def test_a_transient_failure_then_success_is_a_success(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="fox [[fake:503x2]]")
    result = await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 1
    assert len(openai_fake.generation_requests) == 3


async def test_x_should_retry_false_stops_retrying(openai_fake, http, image_request, deadline):
    openai_fake.enqueue("500-no-retry")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(image_request("gpt-image-1"), deadline=deadline(5))
    assert caught.value.should_retry is False
    assert len(openai_fake.generation_requests) == 1


# -- our own credentials and account ---------------------------------------------------------------


async def test_a_rejected_key_is_a_generic_502_and_a_loud_log(openai_fake, http, image_request, deadline, caplog):
    provider = OpenAIImageProvider(http, api_key="sk-wrong-key-123456", base_url=openai_fake.base_url, retry=FAST_RETRY)
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))

    assert caught.value.message == CREDENTIALS_MESSAGE
    assert caught.value.should_retry is False and caught.value.http_status == 502
    assert "sk-wrong" not in caught.value.message
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "IMAGEGW_OPENAI_API_KEY" in errors[0].getMessage()
    assert "sk-wrong" not in errors[0].getMessage()
    assert len(openai_fake.generation_requests) == 1


@pytest.mark.parametrize("scenario", ["quota", "billing", "region"])
async def test_account_problems_are_not_retried_and_logged(scenario, openai_fake, http, image_request, deadline, caplog):
    openai_fake.enqueue(scenario)
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(image_request("gpt-image-1"), deadline=deadline(5))
    assert (caught.value.message, caught.value.should_retry) == (CREDENTIALS_MESSAGE, False)
    assert any(r.levelno == logging.ERROR for r in caplog.records)
    assert len(openai_fake.generation_requests) == 1


async def test_a_retired_model_is_a_non_retryable_upstream_error(openai_fake, http, image_request, deadline):
    openai_fake.enqueue("model-gone")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(image_request("dall-e-3"), deadline=deadline(5))
    assert caught.value.should_retry is False


# -- malformed answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario",
    ["html-200", "invalid-json", "missing-image", "empty-data", "bad-base64", "truncated", "garbage-image", "fake-png"],
)
async def test_malformed_answers_are_non_retryable_upstream_errors(scenario, openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt=f"fox [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(openai_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False
    assert caught.value.message.startswith("The upstream provider returned a malformed answer")
    assert len(openai_fake.generation_requests) == 1


async def test_an_answer_above_the_size_bound_is_refused(openai_fake, http, image_request, deadline):
    provider = provider_for(openai_fake, http, max_response_bytes=2048)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))
    assert "2048-byte limit" in caught.value.message and caught.value.should_retry is False


# -- deadline and cancellation --------------------------------------------------------------------------


async def test_the_deadline_gives_deadline_exceeded(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="fox [[fake:slow=3]]")
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await provider_for(openai_fake, http).generate(request, deadline=deadline(0.3))
    assert time.monotonic() - started < 1.0


async def test_cancelling_the_call_closes_the_upstream_request(openai_fake, http, image_request, deadline):
    request = image_request("gpt-image-1", prompt="fox [[fake:slow=5]]")
    task = asyncio.create_task(provider_for(openai_fake, http).generate(request, deadline=deadline(10)))
    while not openai_fake.generation_requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gone = await openai_fake.server.wait_for_disconnect(timeout=2)
    assert gone.path == "/v1/images/generations"


# -- OpenAI-compatible dialects ---------------------------------------------------------------------------


async def test_xai_gets_an_aspect_ratio_and_never_a_size(http, image_request, deadline):
    async with start_openai_fake(dialect="xai") as fake:
        provider = provider_for(fake, http, dialect="xai", name="xai")
        request = image_request("gpt-image-1", n=2, size="1536x1024")
        request = dataclasses.replace(request, upstream_model="grok-2-image")
        result = await provider.generate(request, deadline=deadline(5))

        body = fake.generation_requests[-1].json()
        assert "size" not in body and "quality" not in body
        assert body["aspect_ratio"] == "3:2" and body["response_format"] == "b64_json"
        assert [image.format for image in result.images] == ["jpeg", "jpeg"]
        assert result.images[0].revised_prompt is not None


async def test_xai_moderation_forms(http, image_request, deadline):
    async with start_openai_fake(dialect="xai") as fake:
        provider = provider_for(fake, http, dialect="xai", name="xai")
        fake.enqueue("flagged", "blocked")
        request = image_request("gpt-image-1", n=2)
        partial = await provider.generate(request, deadline=deadline(5))
        assert len(partial.images) == 1
        with pytest.raises(ContentPolicyError):
            await provider.generate(request, deadline=deadline(5))


async def test_xai_error_bodies_map_by_status(http, image_request, deadline, caplog):
    async with start_openai_fake(dialect="xai") as fake:
        provider = OpenAIImageProvider(http, api_key="xai-wrong", base_url=fake.base_url, dialect="xai", name="xai",
                                       retry=FAST_RETRY, key_setting="XAI_API_KEY")
        with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
            await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))
        assert caught.value.message == CREDENTIALS_MESSAGE
        assert "XAI_API_KEY" in caplog.records[-1].getMessage()


async def test_together_gets_width_height_and_base64(http, image_request, deadline):
    async with start_openai_fake(dialect="together") as fake:
        provider = provider_for(fake, http, dialect="together", name="together")
        request = image_request("gpt-image-1", n=2, size="1024x1536")
        result = await provider.generate(request, deadline=deadline(5))

        body = fake.generation_requests[-1].json()
        assert {k: body[k] for k in ("width", "height", "response_format", "output_format")} == {
            "width": 1024, "height": 1536, "response_format": "base64", "output_format": "png",
        }
        assert "size" not in body and "quality" not in body
        assert [describe(image.data) for image in result.images] == [("png", 1024, 1536)] * 2
        fake.enqueue("spend-limit")
        with pytest.raises(UpstreamError) as caught:
            await provider.generate(request, deadline=deadline(5))
        assert caught.value.should_retry is False


async def test_a_plain_compatible_host_gets_size_and_b64(openai_fake, http, image_request, deadline):
    provider = provider_for(openai_fake, http, dialect="compatible", name="relay")
    request = image_request("dall-e-2", size="256x256")
    result = await provider.generate(request, deadline=deadline(5))
    assert openai_fake.generation_requests[-1].json()["response_format"] == "b64_json"
    assert describe(result.images[0].data) == ("png", 256, 256)


async def test_unknown_dialects_are_refused(http):
    with pytest.raises(ValueError):
        OpenAIImageProvider(http, api_key="k", dialect="azure", retry=RetryPolicy())
