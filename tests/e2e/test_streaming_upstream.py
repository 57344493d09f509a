"""Streaming from upstream providers through the real Envoy and server processes.

OpenAI's GPT image models stream themselves: the gateway asks the (fake) OpenAI for its
SSE stream and relays each event as it arrives. A model whose upstream cannot stream
(DALL·E here) sends each image's completed event when it is ready. The fake speaks
OpenAI's stream format (tests/fakes/openai_fake.py) and can hold, fail or cut a stream.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.e2e.test_streaming import sse
from tests.fakes.openai_fake import DEFAULT_KEY, OpenAIFake, start_openai_fake
from tests.openai_schema import validator
from tests.stack import ProcessStack, process_stack

pytestmark = pytest.mark.e2e

COMPLETED = validator("ImageGenCompletedEvent")
PARTIAL = validator("ImageGenPartialImageEvent")
MEDIUM = 42_000  # gpt-image-1, medium, 1024x1024 (server/catalog.toml)
PARTIAL_PRICE = 4_000  # gpt-image-1's partial_image_price


@pytest.fixture(scope="module")
async def upstream(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[ProcessStack, OpenAIFake]]:
    async with start_openai_fake() as fake, process_stack(
        tmp_path_factory.mktemp("stream-upstream") / "var", openai_api_key=DEFAULT_KEY, openai_base_url=fake.base_url
    ) as stack:
        yield stack, fake


def stream_request(prompt: str, **fields: object) -> dict[str, object]:
    return {"model": "gpt-image-1", "prompt": prompt, "size": "1024x1024", "stream": True, **fields}


async def test_openais_stream_is_relayed_event_by_event(upstream: tuple[ProcessStack, OpenAIFake]) -> None:
    stack, fake = upstream
    account, key = await stack.admin.funded_key("1.00")
    before = len(fake.generation_requests)
    async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
        stream = await sdk.images.generate(**stream_request("a lighthouse", partial_images=2))  # type: ignore[call-overload]
        events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    sent = fake.generation_requests[before:]
    assert len(sent) == 1 and (sent[0].json()["stream"], sent[0].json()["partial_images"]) == (True, 2)
    assert "response_format" not in sent[0].json()
    pictures = [Image.open(io.BytesIO(base64.b64decode(e.b64_json))) for e in events]
    assert {p.size for p in pictures} == {(1024, 1024)}
    assert len({p.tobytes() for p in pictures}) == 3  # three distinct pictures, as the fake sent them
    final = events[-1]
    # The upstream's own fields and usage come through.
    assert (final.size, final.quality, final.background, final.output_format) == ("1024x1024", "medium", "opaque", "png")
    assert final.usage.output_tokens == 1056 and final.usage.input_tokens == 2  # the fake: one token a word
    for event in events:
        (PARTIAL if event.type.endswith("partial_image") else COMPLETED).validate(event.model_dump(exclude_none=True))
    settled = await stack.admin.settled(account)
    # The image, and each partial image at 100 output tokens ($0.004).
    assert (settled.spent_usd, settled.reserved_usd) == (f"{(MEDIUM + 2 * PARTIAL_PRICE) / 1e6:.6f}", "0.000000")


async def test_each_upstream_event_reaches_the_caller_before_the_next_is_sent(
    upstream: tuple[ProcessStack, OpenAIFake]
) -> None:
    stack, fake = upstream
    _, key = await stack.admin.funded_key("1.00")
    fake._released.clear()
    seen: list[str] = []
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"},
            json=stream_request("[[fake:stream-hold]] a fox", partial_images=1),
        ) as response:
            async for name, _ in sse(response):
                if name is None:
                    continue
                seen.append(name)
                # The fake holds its second event until now: a buffer anywhere on the way
                # (our adapter, the server, Envoy) would keep this loop waiting forever.
                fake.release_stream()
    assert seen == ["image_generation.partial_image", "image_generation.completed"]


@pytest.mark.parametrize(
    ("scenario", "code", "message"),
    [
        ("stream-error-after=2", "upstream_error", "The upstream provider failed while streaming."),
        ("stream-moderated-after=2", "content_policy_violation", "The upstream provider's safety system rejected the request."),
        ("stream-cut-after=2", "upstream_error", None),
    ],
)
async def test_an_upstream_failure_after_two_partials_is_reported_released_and_logged(
    upstream: tuple[ProcessStack, OpenAIFake], scenario: str, code: str, message: str | None
) -> None:
    stack, _ = upstream
    account, key = await stack.admin.funded_key("1.00")
    received: list[str] = []
    async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
        with pytest.raises(openai.APIError) as caught:
            stream = await sdk.images.generate(**stream_request(f"[[fake:{scenario}]] p", partial_images=3))  # type: ignore[call-overload]
            async for event in stream:
                received.append(event.type)
    assert received == ["image_generation.partial_image"] * 2
    body = caught.value.body
    assert isinstance(body, dict) and body["code"] == code
    if message is not None:
        assert body["message"] == message
    settled = await stack.admin.settled(account)
    # The two partial images delivered are paid; the image and the third partial are released.
    assert (settled.spent_usd, settled.reserved_usd) == (f"{2 * PARTIAL_PRICE / 1e6:.6f}", "0.000000")
    assert (await stack.admin.reconcile()).ok
    records = [json.loads(line) for line in stack.server_log().splitlines() if '"imagegw.access"' in line or '"outcome"' in line]
    mine = [r for r in records if r.get("account_id") == account and r.get("method", "").endswith("GenerateImagesHttp")]
    assert [(r["outcome"], r["status"]) for r in mine] == [(code, 400 if code == "content_policy_violation" else 502)]


async def test_an_upstream_that_sends_more_than_asked_is_relayed_only_as_far_as_the_request(
    upstream: tuple[ProcessStack, OpenAIFake],
) -> None:
    """Every partial and completed event an upstream sent was relayed, beyond n and
    partial_images (what the caller asked for and was reserved for)."""
    stack, _ = upstream
    account, key = await stack.admin.funded_key("1.00")
    async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
        stream = await sdk.images.generate(**stream_request("[[fake:stream-extra]] p", partial_images=1))  # type: ignore[call-overload]
        events = [event async for event in stream]
    # The fake sent two partials and a completed image, then two partials and a second image.
    assert [(e.type, getattr(e, "partial_image_index", None)) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.completed", None)
    ]
    settled = await stack.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == (f"{(MEDIUM + PARTIAL_PRICE) / 1e6:.6f}", "0.000000")


async def test_a_model_that_cannot_stream_sends_its_image_when_ready(upstream: tuple[ProcessStack, OpenAIFake]) -> None:
    stack, fake = upstream
    account, key = await stack.admin.funded_key("1.00")
    before = len(fake.generation_requests)
    async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
        stream = await sdk.images.generate(  # type: ignore[call-overload]
            model="dall-e-3", prompt="a tin robot", size="1024x1024", stream=True, partial_images=2
        )
        events = [event async for event in stream]
    # No partial images from this model: partial_images is accepted and yields none.
    assert [e.type for e in events] == ["image_generation.completed"]
    sent = fake.generation_requests[before:]
    assert len(sent) == 1 and "stream" not in sent[0].json() and "partial_images" not in sent[0].json()
    assert Image.open(io.BytesIO(base64.b64decode(events[0].b64_json))).size == (1024, 1024)
    settled = await stack.admin.settled(account)
    assert settled.spent_usd == "0.040000"  # dall-e-3 standard; no partial image was reserved as delivered


async def test_a_quiet_upstream_stream_is_kept_alive(tmp_path: Path) -> None:
    """A scaled-down slow upstream with a 1 s keepalive: the comments cross Envoy and the
    generation finishes (the 240 s case with the default 15 s is in test_slow_generation)."""
    async with start_openai_fake() as fake, process_stack(
        tmp_path / "var", openai_api_key=DEFAULT_KEY, openai_base_url=fake.base_url, stream_keepalive_seconds=1
    ) as stack:
        _, key = await stack.admin.funded_key("1.00")
        comments = 0
        async with httpx.AsyncClient(timeout=60) as http:
            async with http.stream(
                "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"},
                json=stream_request("[[fake:slow=4]] a patient painter", partial_images=0),
            ) as response:
                names = []
                async for name, data in sse(response):
                    if name is None:
                        comments += 1
                    else:
                        names.append(name)
        assert names == ["image_generation.completed"] and comments >= 2
