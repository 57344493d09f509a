"""StabilityImageProvider where the matrix (tests/e2e/test_provider_matrix.py) cannot look:
answers negotiated as ``application/json`` (the server always asks for ``image/*``), the
60 s wait after a 429 when the deadline leaves room for it, and the inpainting mask's
conversion for pixels the matrix's masks do not have (half transparent)."""

from __future__ import annotations

import dataclasses
import io

import pytest
from PIL import Image

from server.errors import ContentPolicyError, InvalidRequestError, UpstreamError
from server.providers import PROVIDERS
from server.providers.http import RetryPolicy
from server.providers.stability import StabilityImageProvider, strength_mask
from server.uploads import in_memory, inspect_image
from tests.fakes.images import describe
from tests.providers.support import SleepRecorder, models_of, upstream

pytestmark = pytest.mark.timeout(15)


def provider_for(fake, http, **options) -> StabilityImageProvider:
    accept = options.pop("accept", "application/json")
    return StabilityImageProvider(
        upstream(http, "stability", **options), api_key=fake.api_key, base_url=fake.base_url, accept=accept
    )


@pytest.mark.parametrize("model", models_of("stability"))
async def test_every_catalog_model_answers_as_json(model, stability_fake, http, image_request, deadline):
    request = image_request(model, size="1536x1024", output_format="jpeg")
    result = await provider_for(stability_fake, http).generate(request, deadline=deadline(5))

    assert [describe(image.data) for image in result.images] == [("jpeg", 76, 52)]
    sent = stability_fake.generation_requests[-1]
    assert sent.headers["accept"] == "application/json"
    assert stability_fake.payload(sent) == {
        "prompt": "a red fox in snow, watercolor", "aspect_ratio": "3:2", "output_format": "jpeg",
        **({"model": "sd3.5-large"} if model == "sd3.5-large" else {}),
    }


@pytest.mark.parametrize("scenario", ["moderated", "filtered"])
async def test_moderation_in_json_is_content_policy(scenario, stability_fake, http, image_request, deadline):
    request = image_request("stable-image-ultra", n=2, prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(ContentPolicyError):
        await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert len(stability_fake.generation_requests) == 2


async def test_both_kinds_of_moderation_in_one_fan_out_leave_the_rest(stability_fake, http, image_request, deadline):
    stability_fake.enqueue("ok", "moderated", "filtered")
    provider = provider_for(stability_fake, http, accept="image/*")
    result = await provider.generate(image_request("stable-image-core", n=3), deadline=deadline(5))
    assert len(result.images) == 1 and len(stability_fake.generation_requests) == 3


async def test_a_format_the_model_cannot_make_is_refused_before_any_call(stability_fake, http, image_request, deadline):
    # The catalog refuses it first end to end; the adapter does not rely on that.
    request = dataclasses.replace(image_request("sd3.5-large"), output_format="webp")
    with pytest.raises(InvalidRequestError) as caught:
        await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.param == "output_format"
    assert stability_fake.requests == []


@pytest.mark.parametrize(
    ("scenario", "detail"),
    [
        ("missing-image", "an answer without an image field."),
        ("bad-base64", "image data that is not valid base64."),
        ("invalid-json", "invalid JSON from 127.0.0.1 (HTTP 200)."),
        ("garbage-image", "bytes that are not a PNG, JPEG or WebP image."),
    ],
)
async def test_malformed_json_answers_are_never_retried(scenario, detail, stability_fake, http, image_request, deadline):
    request = image_request("stable-image-ultra", prompt=f"x [[fake:{scenario}]]")
    with pytest.raises(UpstreamError) as caught:
        await provider_for(stability_fake, http).generate(request, deadline=deadline(5))
    assert caught.value.message == f"The upstream provider returned a malformed answer: {detail}"
    assert caught.value.should_retry is False
    assert len(stability_fake.generation_requests) == 1


async def test_a_429_with_time_left_waits_the_60_s_then_retries(stability_fake, http, image_request, deadline):
    sleeps = SleepRecorder()
    stability_fake.enqueue("429", "ok")
    # The production policy, as the registry builds it.
    retry = RetryPolicy(rate_limit_delay=PROVIDERS["stability"].rate_limit_delay)
    provider = provider_for(stability_fake, http, retry=retry, sleep=sleeps, accept="image/*")
    result = await provider.generate(image_request("stable-image-core"), deadline=deadline(120))
    assert len(result.images) == 1 and len(stability_fake.generation_requests) == 2
    assert sleeps.waits == [60.0]


async def test_only_fully_transparent_mask_pixels_are_repainted():
    # OpenAI edits where alpha is zero; a half-transparent pixel is kept (black for Stability).
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, 32, 64))
    mask.paste((255, 255, 255, 128), (32, 0, 48, 64))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    data = out.getvalue()
    converted = Image.open(io.BytesIO(await strength_mask(await inspect_image(in_memory(data), size=len(data), param="mask", max_pixels=50_000_000))))
    assert (converted.mode, converted.size) == ("L", (64, 64))
    assert converted.crop((0, 0, 32, 64)).getextrema() == (255, 255)
    assert converted.crop((32, 0, 64, 64)).getextrema() == (0, 0)
