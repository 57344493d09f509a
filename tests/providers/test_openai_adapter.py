"""OpenAIImageProvider where the matrix (tests/e2e/test_provider_matrix.py) cannot look: the
exact wait before each retry, the response size bound, the typed answer's tolerance, and
the edit form for hosts the fakes do not play (a compatible host's own model names).

Every scenario a caller can see (each model, dialect, error and its money) is a matrix row.
"""

from __future__ import annotations

import io
import re

import httpx
import pytest
from PIL import Image

from server.errors import ModelNotSupportedError, UpstreamError
from server.providers.base import ImageRequest, InputImage
from server.providers.http import RetryPolicy, UpstreamResponse
from server.providers.openai import ImagesAnswer, OpenAIImageProvider
from server.uploads import in_memory, inspect_image
from tests.providers.support import SleepRecorder, upstream

pytestmark = pytest.mark.timeout(15)


def provider_for(fake, http, **options) -> OpenAIImageProvider:
    return OpenAIImageProvider(upstream(http, "openai", **options), api_key=fake.api_key, base_url=fake.base_url)


@pytest.mark.parametrize(
    ("scenario", "low", "high"),
    [
        ("429-ms=150", 0.15, 0.15),  # retry-after-ms wins
        ("429-s=0.2", 0.2, 0.2),  # Retry-After in seconds
        ("429-date=30", 28.0, 30.0),  # Retry-After as an HTTP-date (one-second resolution)
        ("429-none", 0.375, 0.5),  # no hint: the first backoff, 0.5 s less up to 25 % jitter
    ],
)
async def test_a_rate_limit_waits_exactly_the_hint_then_succeeds(scenario, low, high, openai_fake, http, image_request, deadline):
    sleeps = SleepRecorder()
    openai_fake.enqueue(scenario, "ok")
    provider = provider_for(openai_fake, http, retry=RetryPolicy(), sleep=sleeps)
    result = await provider.generate(image_request("gpt-image-1"), deadline=deadline(60))

    assert len(result.images) == 1
    assert len(openai_fake.generation_requests) == 2
    [wait] = sleeps.waits
    assert low <= wait <= high


async def test_the_backoff_doubles_between_attempts(openai_fake, http, image_request, deadline):
    sleeps = SleepRecorder()
    openai_fake.enqueue("503", "503", "ok")
    provider = provider_for(openai_fake, http, retry=RetryPolicy(base_delay=0.5, jitter=0.0), sleep=sleeps)
    await provider.generate(image_request("gpt-image-1"), deadline=deadline(60))
    assert sleeps.waits == [0.5, 1.0]


async def test_an_answer_above_the_size_bound_is_refused(openai_fake, http, image_request, deadline):
    provider = provider_for(openai_fake, http, max_response_bytes=2048)
    with pytest.raises(UpstreamError) as caught:
        await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))
    assert re.fullmatch(
        r"The upstream provider returned a malformed answer: an answer of \d+ bytes, above the 2048-byte limit "
        r"from 127\.0\.0\.1\.",
        caught.value.message,
    ), caught.value.message
    assert caught.value.should_retry is False


async def test_unknown_dialects_are_refused(http):
    with pytest.raises(ValueError, match="unknown OpenAI dialect 'azure'"):
        OpenAIImageProvider(upstream(http, "openai"), api_key="k", base_url="https://example.test/v1", dialect="azure")


# -- the typed answer ---------------------------------------------------------------------------------


def test_cosmetic_fields_of_the_wrong_type_read_as_absent():
    answer = ImagesAnswer.model_validate_json(
        b'{"data": [{"b64_json": "AAAA", "revised_prompt": 7, "respect_moderation": "no"}], "size": 1024,'
        b' "usage": {"input_tokens": -3, "output_tokens": true, "output_tokens_details": "many"}, "extra": {}}'
    )
    [item] = answer.data
    assert (item.b64_json, item.revised_prompt, item.respect_moderation, answer.size) == ("AAAA", None, None, None)
    assert answer.usage is not None and answer.usage.tokens().output_tokens == 0
    assert answer.usage.tokens().input_tokens == 0


@pytest.mark.parametrize(
    ("body", "detail"),
    [
        (b'{"data": "nothing"}', "an answer of unexpected shape (data: Input should be a valid array)."),
        (b'{"created": 1}', "an answer of unexpected shape (data: Field required)."),
        (b'{"data": [7]}', "an answer of unexpected shape (data.0: Input should be an object)."),
        (b'{"data": [{"b64_json": 7}]}', "an answer of unexpected shape (data.0.b64_json: Input should be a valid string)."),
        (b'[{"data": []}]', "an answer of unexpected shape (the top level: Input should be an object)."),
        (b'{"data": [', "invalid JSON from api.openai.com (HTTP 200)."),
    ],
)
async def test_an_answer_without_what_we_need_is_malformed(body, detail):
    response = UpstreamResponse(status=200, headers=httpx.Headers(), body=body, url="https://api.openai.com/v1/images")
    with pytest.raises(UpstreamError) as caught:
        await response.parse(ImagesAnswer)
    assert caught.value.message == f"The upstream provider returned a malformed answer: {detail}"
    assert caught.value.should_retry is False


async def _inputs(*shapes: tuple[int, int]) -> tuple[InputImage, ...]:
    images = []
    for width, height in shapes:
        out = io.BytesIO()
        Image.new("RGB", (width, height), (10, 20, 30)).save(out, format="PNG")
        data = out.getvalue()
        images.append(await inspect_image(in_memory(data), size=len(data), param="image", max_pixels=50_000_000))
    return tuple(images)


@pytest.mark.parametrize(("count", "field"), [(1, "image"), (2, "image[]")])
async def test_a_compatible_host_gets_files_as_the_sdk_sends_them(count, field, http):
    # A model name that is neither GPT image nor DALL·E: the SDK's own rule, one file as
    # `image` and several as `image[]`, is what every OpenAI-compatible host takes.
    provider = OpenAIImageProvider(upstream(http, "openai"), api_key="", base_url="https://relay.test/v1", dialect="compatible")
    request = ImageRequest(model_id="m", upstream_model="flux-dev", prompt="p", n=1, width=1024, height=1024,
                           quality="standard", operation="edit", images=await _inputs(*[(64, 64)] * count))
    parts = provider.edit_parts(request)
    assert [(name, value[0]) for name, value in parts] == [
        ("model", None), ("prompt", None), ("n", None), ("size", None), ("quality", None), ("response_format", None),
        *[(field, f"image-{i}.png") for i in range(1, count + 1)],
    ]


@pytest.mark.parametrize("dialect", ["xai", "together"])
async def test_hosts_whose_edit_format_is_another_refuse_edits(dialect, http):
    provider = OpenAIImageProvider(upstream(http, "openai"), api_key="k", base_url="https://host.test/v1", dialect=dialect)
    request = ImageRequest(model_id="m", upstream_model="grok-2-image", prompt="p", n=1, width=1024, height=1024,
                           quality="standard", operation="edit", images=await _inputs((64, 64)))
    with pytest.raises(ModelNotSupportedError):
        provider.edit_parts(request)


def test_an_input_image_is_read_piece_by_piece_with_its_length_known(tmp_path):
    # What httpx does with a multipart file: the length from seek/tell, then 64 KiB reads,
    # again from the start for a retry. The upload may sit in a temporary file.
    data = bytes(range(256)) * 1024  # 256 KiB
    with open(tmp_path / "upload", "w+b") as source:
        source.write(data)
        image = InputImage(source, size=len(data), format="png", width=1, height=1, has_alpha=False)
        reader = image.reader()
        assert (reader.seek(0, io.SEEK_END), reader.seek(0)) == (len(data), 0)
        for _ in range(2):
            pieces = list(iter(lambda: reader.read(64 * 1024), b""))
            assert b"".join(pieces) == data and {len(p) for p in pieces} == {64 * 1024}
            reader.seek(0)
        # Another reader of the same image has its own position.
        other = image.reader()
        assert other.read(4) == data[:4] and reader.read(8) == data[:8]
