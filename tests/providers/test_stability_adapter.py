"""StabilityImageProvider against the fake Stability v2beta API over real HTTP."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time

import httpx
import pytest

from server.errors import ContentPolicyError, DeadlineExceededError, InvalidRequestError, UpstreamError
from server.providers.http import CREDENTIALS_MESSAGE, RetryPolicy
from server.providers.stability import StabilityImageProvider
from tests.fakes.images import describe
from tests.fakes.stability_fake import StabilityFake
from tests.providers.support import FAST_RETRY, models_of

pytestmark = pytest.mark.timeout(15)

ENDPOINT = {"stable-image-ultra": "ultra", "stable-image-core": "core", "sd3.5-large": "sd3"}


def provider_for(fake: StabilityFake, http: httpx.AsyncClient, **options: object) -> StabilityImageProvider:
    options.setdefault("retry", FAST_RETRY)
    options.setdefault("api_key", fake.api_key)
    return StabilityImageProvider(http, base_url=fake.base_url, **options)  # type: ignore[arg-type]


@pytest.mark.parametrize("accept", ["image/*", "application/json"])
@pytest.mark.parametrize("model", models_of("stability"))
async def test_every_catalog_model_answers_in_both_negotiated_forms(model, accept, stability_fake, http, image_request, deadline):
    request = image_request(model, size="1536x1024", output_format="jpeg")
    result = await provider_for(stability_fake, http, accept=accept).generate(request, deadline=deadline(5))

    assert [describe(image.data) for image in result.images] == [("jpeg", 76, 52)]
    sent = stability_fake.generation_requests[-1]
    assert sent.path == f"/v2beta/stable-image/generate/{ENDPOINT[model]}"
    assert sent.content_type == "multipart/form-data"
    assert (sent.headers["authorization"], sent.headers["accept"]) == (f"Bearer {stability_fake.api_key}", accept)
    parts = sent.multipart()
    assert parts is not None and all(part.filename is None for part in parts)
    expected = {"prompt": "a red fox in snow, watercolor", "aspect_ratio": "3:2", "output_format": "jpeg"}
    if model == "sd3.5-large":
        expected["model"] = "sd3.5-large"
    assert {part.name: part.data.decode() for part in parts} == expected


async def test_n_fans_out_one_call_per_image(stability_fake, http, image_request, deadline):
    request = image_request("stable-image-core", n=4, output_format="webp")
    result = await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert [image.format for image in result.images] == ["webp"] * 4
    assert len(stability_fake.generation_requests) == 4


async def test_a_format_the_model_cannot_make_is_refused_before_any_call(stability_fake, http, image_request, deadline):
    request = dataclasses.replace(image_request("sd3.5-large"), output_format="webp")
    with pytest.raises(InvalidRequestError) as caught:
        await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.param == "output_format"
    assert stability_fake.requests == []


@pytest.mark.parametrize("accept", ["image/*", "application/json"])
@pytest.mark.parametrize("scenario", ["moderated", "filtered"])
async def test_moderation_in_both_forms_is_content_policy(scenario, accept, stability_fake, http, image_request, deadline):
    request = image_request("stable-image-ultra", n=2, prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(ContentPolicyError):
        await provider_for(stability_fake, http, accept=accept).generate(request, deadline=deadline(5))
    assert len(stability_fake.generation_requests) == 2


async def test_some_moderated_calls_leave_a_partial_result(stability_fake, http, image_request, deadline):
    stability_fake.enqueue("ok", "moderated", "filtered")
    result = await provider_for(stability_fake, http).generate(image_request("stable-image-core", n=3), deadline=deadline(5))
    assert len(result.images) == 1


async def test_out_of_credits_is_not_retried_and_logged(stability_fake, http, image_request, deadline, caplog):
    stability_fake.enqueue("payment")
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider_for(stability_fake, http).generate(image_request("stable-image-core"), deadline=deadline(5))
    assert caught.value.should_retry is False
    assert any("IMAGEGW_STABILITY_API_KEY" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)
    assert len(stability_fake.generation_requests) == 1


async def test_a_wrong_key_is_our_credentials(stability_fake, http, image_request, deadline, caplog):
    provider = provider_for(stability_fake, http, api_key="sk-wrong")
    with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("stable-image-core"), deadline=deadline(5))
    assert caught.value.message == CREDENTIALS_MESSAGE
    assert any(r.levelno == logging.ERROR for r in caplog.records)


async def test_a_429_without_hint_backs_off_60_s_so_a_short_deadline_fails_fast(stability_fake, http, image_request, deadline):
    stability_fake.enqueue("429")
    provider = provider_for(stability_fake, http, retry=RetryPolicy(rate_limit_delay=60.0))
    started = time.monotonic()
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("stable-image-core"), deadline=deadline(5))
    assert time.monotonic() - started < 0.5
    assert (caught.value.should_retry, caught.value.retry_after) == (True, 60.0)


async def test_the_production_default_waits_60_s_after_a_429(stability_fake, http, image_request, deadline):
    stability_fake.enqueue("429")
    provider = StabilityImageProvider(http, api_key=stability_fake.api_key, base_url=stability_fake.base_url)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("stable-image-core"), deadline=deadline(30))
    assert caught.value.retry_after == 60.0


async def test_a_429_with_time_left_is_retried(stability_fake, http, image_request, deadline):
    stability_fake.enqueue("429", "ok")
    provider = provider_for(stability_fake, http, retry=RetryPolicy(rate_limit_delay=0.05))
    result = await provider.generate(image_request("stable-image-core"), deadline=deadline(5))
    assert len(result.images) == 1 and len(stability_fake.generation_requests) == 2


async def test_server_errors_are_retried_with_the_exact_attempt_count(stability_fake, http, image_request, deadline):
    request = image_request("stable-image-core", prompt="x [[fake:500]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is True
    assert len(stability_fake.generation_requests) == 3


async def test_unprocessable_is_rejected_without_retry(stability_fake, http, image_request, deadline):
    stability_fake.enqueue("unprocessable")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(stability_fake, http).generate(image_request("stable-image-core"), deadline=deadline(5))
    assert caught.value.should_retry is False
    assert "English is the only supported language" in caught.value.message


async def test_the_format_reported_is_the_one_in_the_bytes(stability_fake, http, image_request, deadline):
    request = image_request("stable-image-core", prompt="x [[fake:wrong-content-type]]")
    result = await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert result.images[0].format == "jpeg"


@pytest.mark.parametrize(
    ("accept", "scenario"),
    [
        ("image/*", "garbage-image"), ("image/*", "fake-png"), ("image/*", "truncated"), ("image/*", "html-200"),
        ("application/json", "missing-image"), ("application/json", "bad-base64"), ("application/json", "invalid-json"),
        ("application/json", "garbage-image"),
    ],
)
async def test_malformed_answers_are_non_retryable(accept, scenario, stability_fake, http, image_request, deadline):
    request = image_request("stable-image-ultra", prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(stability_fake, http, accept=accept).generate(request, deadline=deadline(5))
    assert caught.value.should_retry is False
    assert len(stability_fake.generation_requests) == 1


async def test_the_deadline_gives_deadline_exceeded(stability_fake, http, image_request, deadline):
    request = image_request("stable-image-core", prompt="x [[fake:slow=3]]")
    with pytest.raises(DeadlineExceededError):
        await provider_for(stability_fake, http).generate(request, deadline=deadline(0.3))


async def test_cancelling_closes_the_upstream_request(stability_fake, http, image_request, deadline):
    request = image_request("stable-image-core", prompt="x [[fake:slow=5]]")
    task = asyncio.create_task(provider_for(stability_fake, http).generate(request, deadline=deadline(10)))
    while not stability_fake.generation_requests:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    gone = await stability_fake.server.wait_for_disconnect(timeout=2)
    assert gone.path == "/v2beta/stable-image/generate/core"
