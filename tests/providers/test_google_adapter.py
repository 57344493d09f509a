"""GoogleImageProvider (Imagen :predict, Gemini :generateContent) against the fake Gemini API."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx
import pytest

from server.errors import ContentPolicyError, DeadlineExceededError, InvalidRequestError, UpstreamError
from server.providers.google import GoogleImageProvider
from server.providers.http import CREDENTIALS_MESSAGE
from tests.fakes.google_fake import GoogleFake
from tests.fakes.images import describe
from tests.providers.support import FAST_RETRY, models_of

pytestmark = pytest.mark.timeout(15)

IMAGEN = ["imagen-3", "imagen-4"]


def provider_for(fake: GoogleFake, http: httpx.AsyncClient, **options: object) -> GoogleImageProvider:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("api_key", fake.api_key)
    return GoogleImageProvider(http, base_url=fake.base_url, **options)  # type: ignore[arg-type]


# -- happy paths ---------------------------------------------------------------------------------


@pytest.mark.parametrize("model", models_of("google"))
async def test_every_catalog_model_answers_decodable_images(model, google_fake, http, image_request, deadline):
    result = await provider_for(google_fake, http).generate(image_request(model), deadline=deadline(5))

    assert len(result.images) == 1
    assert describe(result.images[0].data) == ("png", 1024, 1024)
    sent = google_fake.requests[-1]
    assert sent.headers["x-goog-api-key"] == google_fake.api_key
    spec_model = {"imagen-3": "imagen-3.0-generate-002", "imagen-4": "imagen-4.0-generate-001"}.get(model, model)
    method = "predict" if model in IMAGEN else "generateContent"
    assert sent.path == f"/v1beta/models/{spec_model}:{method}"


@pytest.mark.parametrize("model", IMAGEN)
async def test_imagen_maps_n_size_and_format_exactly(model, google_fake, http, image_request, deadline):
    request = image_request(model, n=3, size="1536x1024", output_format="jpeg", output_compression=70)
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))

    assert google_fake.calls("predict")[-1].json() == {
        "instances": [{"prompt": "a red fox in snow, watercolor"}],
        "parameters": {
            "sampleCount": 3,
            "aspectRatio": "4:3",
            "includeRaiReason": True,
            "outputOptions": {"mimeType": "image/jpeg", "compressionQuality": 70},
        },
    }
    assert [describe(image.data) for image in result.images] == [("jpeg", 1280, 896)] * 3
    assert len(google_fake.requests) == 1  # one call for all n


@pytest.mark.parametrize(
    ("size", "imagen", "gemini"),
    [("1024x1024", "1:1", "1:1"), ("1536x1024", "4:3", "3:2"), ("1024x1536", "3:4", "2:3"),
     ("1792x1024", "16:9", "16:9"), ("1024x1792", "9:16", "9:16")],
)
async def test_sizes_become_the_documented_aspect_ratios(size, imagen, gemini, google_fake, http, image_request, deadline):
    provider = provider_for(google_fake, http)
    await provider.generate(image_request("imagen-4", size=size), deadline=deadline(5))
    await provider.generate(image_request("gemini-2.5-flash-image", size=size), deadline=deadline(5))
    assert google_fake.calls("predict")[-1].json()["parameters"]["aspectRatio"] == imagen
    config = google_fake.calls("generateContent")[-1].json()["generationConfig"]
    assert config == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": gemini}}


async def test_gemini_fans_out_n_calls_and_sums_usage(google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", n=3)
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))

    assert len(result.images) == 3
    assert len(google_fake.calls("generateContent")) == 3
    assert result.usage.output_image_tokens == 3 * 1290
    assert result.usage.input_text_tokens == 3 * 12


@pytest.mark.parametrize("scenario", ["with-text", "thought"])
async def test_gemini_skips_text_and_thought_parts(scenario, google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", prompt=f"banana [[fake:{scenario}]]")
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 1 and result.images[0].format == "png"


async def test_gemini_never_delivers_more_than_asked(google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", prompt="banana [[fake:two-images]]")
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 1


async def test_imagen_prompt_safety_entries_are_not_images(google_fake, http, image_request, deadline):
    request = image_request("imagen-3", n=2, prompt="fox [[fake:safety-attributes]]")
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 2


async def test_imagen_enhanced_prompt_is_the_revised_prompt(google_fake, http, image_request, deadline):
    request = image_request("imagen-4", prompt="fox [[fake:enhanced]]")
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert result.images[0].revised_prompt == "An enhanced, detailed version of: fox [[fake:enhanced]]"


async def test_formats_a_model_cannot_produce_are_refused_before_any_call(google_fake, http, image_request, deadline):
    request = image_request("imagen-3")
    provider = provider_for(google_fake, http)
    with pytest.raises(InvalidRequestError) as caught:
        await provider.generate(dataclasses.replace(request, output_format="webp"), deadline=deadline(5))
    assert caught.value.param == "output_format"
    gemini = image_request("gemini-2.5-flash-image")
    with pytest.raises(InvalidRequestError):
        await provider.generate(dataclasses.replace(gemini, output_format="jpeg"), deadline=deadline(5))
    assert google_fake.requests == []


# -- moderation -------------------------------------------------------------------------------------


async def test_imagen_partial_filtering_returns_the_survivors(google_fake, http, image_request, deadline):
    request = image_request("imagen-4", n=4, prompt="crowd [[fake:partial]]")
    result = await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert len(result.images) == 3


@pytest.mark.parametrize("scenario", ["all-filtered", "all-filtered-empty", "prompt-blocked"])
async def test_imagen_with_nothing_left_is_content_policy(scenario, google_fake, http, image_request, deadline):
    request = image_request("imagen-3", n=2, prompt=f"crowd [[fake:{scenario}]]")
    with pytest.raises(ContentPolicyError):
        await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert len(google_fake.requests) == 1


@pytest.mark.parametrize("scenario", ["blocked", "image-safety", "image-prohibited"])
async def test_gemini_block_and_image_safety_are_content_policy(scenario, google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", n=2, prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(ContentPolicyError):
        await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert len(google_fake.calls("generateContent")) == 2


async def test_gemini_fan_out_with_one_moderated_call_is_partial(google_fake, http, image_request, deadline):
    google_fake.enqueue("ok", "image-safety", "ok")
    result = await provider_for(google_fake, http).generate(image_request("gemini-2.5-flash-image", n=3), deadline=deadline(5))
    assert len(result.images) == 2
    assert result.usage.output_image_tokens == 2 * 1290


@pytest.mark.parametrize("scenario", ["no-image", "image-other", "text-only"])
async def test_gemini_answers_without_an_image_are_never_a_success(scenario, google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False


# -- quota, retries, credentials ---------------------------------------------------------------------


@pytest.mark.parametrize("model", ["imagen-4", "gemini-2.5-flash-image"])
async def test_retry_info_in_the_body_is_honoured(model, google_fake, http, image_request, deadline):
    google_fake.enqueue("429=0.2", "ok")
    started = time.monotonic()
    result = await provider_for(google_fake, http).generate(image_request(model), deadline=deadline(5))
    assert 0.2 <= time.monotonic() - started < 1.0
    assert len(result.images) == 1 and len(google_fake.requests) == 2


async def test_a_retry_delay_beyond_the_deadline_fails_fast(google_fake, http, image_request, deadline):
    google_fake.enqueue("429")  # retryDelay "26s", no Retry-After header
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(image_request("imagen-4"), deadline=deadline(2))
    assert time.monotonic() - started < 0.5
    assert (caught.value.should_retry, caught.value.retry_after) == (True, 26.0)
    assert len(google_fake.requests) == 1


async def test_a_per_day_quota_is_not_retried_and_logged(google_fake, http, image_request, deadline, caplog):
    google_fake.enqueue("429-daily=0.01")
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(image_request("imagen-4"), deadline=deadline(5))
    assert caught.value.should_retry is False
    assert len(google_fake.requests) == 1
    assert [r.levelno for r in caplog.records if r.levelno >= logging.ERROR] == [logging.ERROR]


async def test_an_invalid_key_is_a_400_api_key_invalid_mapped_to_our_credentials(google_fake, http, image_request, deadline, caplog):
    provider = provider_for(google_fake, http, api_key="AIza-wrong")
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("gemini-2.5-flash-image", n=2), deadline=deadline(5))
    assert caught.value.message == CREDENTIALS_MESSAGE and caught.value.should_retry is False
    assert "AIza-wrong" not in caught.value.message
    assert any("IMAGEGW_GOOGLE_API_KEY" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


async def test_a_disabled_api_is_our_credentials_problem(google_fake, http, image_request, deadline):
    google_fake.enqueue("permission")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(image_request("imagen-3"), deadline=deadline(5))
    assert caught.value.message == CREDENTIALS_MESSAGE


@pytest.mark.parametrize("scenario", ["500", "503", "list-error", "html-504"])
async def test_server_errors_are_retried_then_retryable(scenario, google_fake, http, image_request, deadline):
    request = image_request("imagen-4", prompt=f"fox [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is True
    assert len(google_fake.requests) == 3


async def test_a_shut_down_model_is_not_retried(google_fake, http, image_request, deadline):
    google_fake.enqueue("model-gone")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(image_request("imagen-4"), deadline=deadline(5))
    assert caught.value.should_retry is False and len(google_fake.requests) == 1


# -- malformed, deadline, cancellation ----------------------------------------------------------------


@pytest.mark.parametrize(
    "scenario", ["html-200", "invalid-json", "missing-image", "bad-base64", "truncated", "garbage-image", "fake-png"]
)
@pytest.mark.parametrize("model", ["imagen-3", "gemini-2.5-flash-image"])
async def test_malformed_answers_are_non_retryable(model, scenario, google_fake, http, image_request, deadline):
    request = image_request(model, prompt=f"fox [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(google_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False
    assert len(google_fake.requests) == 1


async def test_the_deadline_gives_deadline_exceeded(google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", n=2, prompt="fox [[fake:slow=3]]")
    with pytest.raises(DeadlineExceededError):
        await provider_for(google_fake, http).generate(request, deadline=deadline(0.3))


async def test_cancelling_a_fan_out_closes_every_upstream_request(google_fake, http, image_request, deadline):
    request = image_request("gemini-2.5-flash-image", n=2, prompt="fox [[fake:slow=5]]")
    task = asyncio.create_task(provider_for(google_fake, http).generate(request, deadline=deadline(10)))
    while len(google_fake.requests) < 2:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await google_fake.server.wait_for_disconnect(timeout=2)
    for _ in range(100):
        if len(google_fake.server.disconnects) == 2:
            break
        await asyncio.sleep(0.01)
    assert len(google_fake.server.disconnects) == 2
