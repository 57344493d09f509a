"""GoogleImageProvider where the matrix (tests/e2e/test_provider_matrix.py) cannot look: the
request bodies for every size, the adapter's own output-format guard (the catalog refuses
first, end to end), the exact wait a RetryInfo asks for, and token counts by modality."""

from __future__ import annotations

import dataclasses

import pytest

from server.errors import InvalidRequestError
from server.providers.google import GeminiAnswer, GoogleImageProvider
from server.providers.http import RetryPolicy
from tests.providers.support import SleepRecorder, upstream

pytestmark = pytest.mark.timeout(15)


def provider_for(fake, http, **options) -> GoogleImageProvider:
    return GoogleImageProvider(upstream(http, "google", **options), api_key=fake.api_key, base_url=fake.base_url)


@pytest.mark.parametrize(
    ("size", "imagen", "gemini"),
    [("1024x1024", "1:1", "1:1"), ("1536x1024", "4:3", "3:2"), ("1024x1536", "3:4", "2:3"),
     ("1792x1024", "16:9", "16:9"), ("1024x1792", "9:16", "9:16")],
)
async def test_sizes_become_the_documented_aspect_ratios(size, imagen, gemini, http, image_request):
    provider = GoogleImageProvider(upstream(http, "google"), api_key="k", base_url="https://example.test")
    assert provider.imagen_body(image_request("imagen-4", size=size))["parameters"]["aspectRatio"] == imagen
    config = (await provider.gemini_body(image_request("gemini-2.5-flash-image", size=size)))["generationConfig"]
    assert config == {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": gemini}}


async def test_formats_a_model_cannot_produce_are_refused_before_any_call(google_fake, http, image_request, deadline):
    provider = provider_for(google_fake, http)
    with pytest.raises(InvalidRequestError) as caught:
        await provider.generate(dataclasses.replace(image_request("imagen-3"), output_format="webp"), deadline=deadline(5))
    assert caught.value.param == "output_format"
    gemini = image_request("gemini-2.5-flash-image")
    with pytest.raises(InvalidRequestError):
        await provider.generate(dataclasses.replace(gemini, output_format="jpeg"), deadline=deadline(5))
    assert google_fake.requests == []


@pytest.mark.parametrize("model", ["imagen-4", "gemini-2.5-flash-image"])
async def test_the_retry_delay_in_the_body_is_the_wait(model, google_fake, http, image_request, deadline):
    sleeps = SleepRecorder()
    google_fake.enqueue("429=12.5", "ok")
    result = await provider_for(google_fake, http, retry=RetryPolicy(), sleep=sleeps).generate(
        image_request(model), deadline=deadline(60)
    )
    assert len(result.images) == 1 and len(google_fake.requests) == 2
    assert sleeps.waits == [12.5]


def test_usage_is_counted_by_modality_or_from_the_totals():
    by_modality = GeminiAnswer.model_validate_json(
        b'{"usageMetadata": {"promptTokenCount": 20, "candidatesTokenCount": 1300,'
        b' "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}, {"modality": "IMAGE", "tokenCount": 8}],'
        b' "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290}, {"modality": "TEXT", "tokenCount": 10},'
        b' {"modality": 3}, "junk"]}}'
    )
    assert by_modality.usage_metadata is not None
    tokens = by_modality.usage_metadata.tokens()
    assert (tokens.input_text_tokens, tokens.input_image_tokens, tokens.output_image_tokens, tokens.output_text_tokens) == (
        12, 8, 1290, 10)
    totals = GeminiAnswer.model_validate_json(b'{"usageMetadata": {"promptTokenCount": 7, "candidatesTokenCount": 1290}}')
    assert totals.usage_metadata is not None
    tokens = totals.usage_metadata.tokens()
    assert (tokens.input_text_tokens, tokens.output_image_tokens) == (7, 1290)
