"""Streaming (`stream: true`) through the real Envoy and server: OpenAI's SSE events, the
official SDKs, gRPC streaming, errors before and after the first event, money.

Two stacks: the shared ``gateway`` (``imagegw serve`` processes, ``local-1`` making real
partial images), and an in-process server behind the real Envoy whose model is a
scripted provider (a real ``ImageProvider`` that emits partial images and then waits on a
gate the test opens, fails, or hangs), so that a test can see an event arrive before the
next one exists, fail a stream midway, or walk away from it. No sleeps: the tests wait on
events.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import secrets
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from imagegw.v1 import images_pb2, images_pb2_grpc
from PIL import Image

from server.errors import UpstreamError
from server.providers.base import GeneratedImage, ImageRequest, Progress, ProviderResult
from tests.openai_schema import validator
from tests.stack import InProcessStack, ProcessStack, in_process_stack, status_of

pytestmark = pytest.mark.e2e

PARTIAL = validator("ImageGenPartialImageEvent")
COMPLETED = validator("ImageGenCompletedEvent")
ERROR = validator("Error")
LOCAL_HIGH = 2000  # local-1 at quality high, micro-dollars per image (server/catalog.toml)
GRID = (12, 48, 192)  # local-1's partial images: cells along the short side (server/providers/local.py)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def mosaic(image: Image.Image, cells: int) -> Image.Image:
    """What local-1 documents partial image k to be: the final picture averaged over
    ``cells`` cells along its short side, scaled back with hard edges."""
    width, height = image.size
    block = max(1, min(width, height) / cells)
    small = (max(1, round(width / block)), max(1, round(height / block)))
    return image.resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.NEAREST)


async def sse(response: httpx.Response) -> AsyncIterator[tuple[str | None, str]]:
    """(event name, data) of each SSE event; comments as (None, comment)."""
    name: str | None = None
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield None, line
        elif line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: "):
            yield name, line.removeprefix("data: ")
            name = None


# -- local-1 through imagegw serve + Envoy ----------------------------------------------


async def test_sdk_streams_partials_then_each_image(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    sdk = openai.OpenAI(api_key=key, base_url=gateway.api_base, max_retries=0, timeout=120)

    def run() -> list[Any]:
        with sdk:
            stream = sdk.images.generate(
                model="local-1", prompt="a lighthouse at dusk", n=2, size="1024x1024", quality="high",
                stream=True, partial_images=2,
            )
            return list(stream)

    events = await asyncio.to_thread(run)
    assert [e.type for e in events] == [
        "image_generation.partial_image", "image_generation.partial_image", "image_generation.completed",
    ] * 2
    for image in range(2):
        partials, final = events[3 * image : 3 * image + 2], events[3 * image + 2]
        assert [p.partial_image_index for p in partials] == [0, 1]
        picture = decode(final.b64_json)
        assert picture.size == (1024, 1024) and picture.format == "PNG"
        for index, partial in enumerate(partials):
            # Coarse to fine, the same composition: each partial is a mosaic of the final.
            assert decode(partial.b64_json).tobytes() == mosaic(picture.convert(decode(partial.b64_json).mode), GRID[index]).tobytes()
        assert (final.size, final.quality, final.output_format, final.background) == ("1024x1024", "high", "png", "auto")
        assert final.usage.total_tokens == 0
        for event in [*partials, final]:
            (PARTIAL if event.type.endswith("partial_image") else COMPLETED).validate(event.model_dump(exclude_none=True))
    assert decode(events[2].b64_json).tobytes() != decode(events[5].b64_json).tobytes()
    settled = await gateway.admin.settled(account)
    # Two images at the high price; local-1's partial images are free.
    assert (settled.balance_usd, settled.reserved_usd, settled.spent_usd) == ("0.996000", "0.000000", "0.004000")


async def test_async_sdk_partial_images_zero_gives_one_event_per_image(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    async with openai.AsyncOpenAI(api_key=key, base_url=gateway.api_base, max_retries=0, timeout=120) as sdk:
        stream = await sdk.images.generate(
            model="local-1", prompt="a paper boat", size="512x512", stream=True, partial_images=0, n=3
        )
        events = [event async for event in stream]
    assert [e.type for e in events] == ["image_generation.completed"] * 3
    assert {decode(e.b64_json).size for e in events} == {(512, 512)}
    assert (await gateway.admin.settled(account)).spent_usd == "0.003000"


async def test_the_wire_is_openais_event_stream(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=120) as http:
        async with http.stream(
            "POST", f"{gateway.api_base}/images/generations", headers={"authorization": f"Bearer {key}"},
            # OpenAI's event schema lists only the GPT image models' sizes and qualities.
            json={"model": "local-1", "prompt": "a red kite", "size": "1024x1024", "quality": "low", "stream": True, "partial_images": 1},
        ) as response:
            body = (await response.aread()).decode()
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["x-request-id"] and response.headers["x-imagegw-model"] == "local-1"
    assert not any(name.startswith(("grpc-", "x-envoy", "x-http-status")) for name in response.headers)
    blocks = body.split("\n\n")
    assert blocks[-1] == "" and len(blocks) == 3  # two events, each ended by a blank line, no [DONE]
    for block, kind in zip(blocks[:2], ("partial_image", "completed"), strict=True):
        event_line, data_line = block.split("\n")
        assert event_line == f"event: image_generation.{kind}"
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == f"image_generation.{kind}"
        assert list(data)[:7] == ["type", "b64_json", "created_at", "size", "quality", "background", "output_format"]
        (PARTIAL if kind == "partial_image" else COMPLETED).validate(data)


@pytest.mark.parametrize(
    ("body", "balance", "status", "code", "param"),
    [
        ({"prompt": "p", "stream": True, "n": 2}, "0.001500", 402, "insufficient_balance", None),
        ({"prompt": "p", "stream": True, "response_format": "url"}, "1.00", 400, "invalid_value", "response_format"),
        ({"prompt": "p", "stream": True, "partial_images": 4}, "1.00", 400, "integer_above_max_value", "partial_images"),
    ],
)
async def test_errors_before_the_first_event_keep_their_http_status(
    gateway: ProcessStack, body: dict[str, Any], balance: str, status: int, code: str, param: str | None
) -> None:
    account, key = await gateway.admin.funded_key(balance)
    async with openai.AsyncOpenAI(api_key=key, base_url=gateway.api_base, max_retries=0) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.images.generate(model="local-1", **body)
    assert caught.value.status_code == status
    assert caught.value.body == {"message": caught.value.body["message"], "type": caught.value.body["type"], "param": param, "code": code}  # type: ignore[index]
    account_now = await gateway.admin.get(account)
    assert (account_now.balance_usd, account_now.reserved_usd) == (f"{float(balance):.6f}", "0.000000")


async def test_unauthenticated_stream_is_401(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient() as http:
        response = await http.post(f"{gateway.api_base}/images/generations", json={"prompt": "p", "stream": True})
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


async def test_idempotent_replay_of_a_stream_sends_its_images_again_free(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    request = {
        "model": "local-1", "prompt": "a tin robot", "size": "1024x1024", "quality": "low", "stream": True,
        "partial_images": 2, "n": 2,
    }
    headers = {"authorization": f"Bearer {key}", "idempotency-key": f"stream-{secrets.token_hex(4)}"}
    runs = []
    async with httpx.AsyncClient(timeout=120) as http:
        for _ in range(2):
            async with http.stream("POST", f"{gateway.api_base}/images/generations", headers=headers, json=request) as response:
                runs.append((response.headers, [(name, json.loads(data)) async for name, data in sse(response)]))
    (first_headers, first), (replay_headers, replay) = runs
    assert [name for name, _ in first].count("image_generation.partial_image") == 4
    assert "x-imagegw-idempotent-replay" not in first_headers and replay_headers["x-imagegw-idempotent-replay"] == "true"
    # The replay: the final images only, the same bytes, as completed events.
    assert [name for name, _ in replay] == ["image_generation.completed"] * 2
    finals = [data["b64_json"] for name, data in first if name == "image_generation.completed"]
    assert [data["b64_json"] for _, data in replay] == finals
    for _, data in replay:
        COMPLETED.validate(data)
    settled = await gateway.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == ("0.002000", "0.000000")


async def test_grpc_callers_stream_typed_events_with_raw_bytes(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    stub = images_pb2_grpc.ImageServiceStub(gateway.channel)
    call = stub.StreamGenerateImages(
        images_pb2.GenerateImagesRequest(prompt="a snowy forest", size="256x256", partial_images=3, n=2, model="local-1"),
        metadata=(("authorization", f"Bearer {key}"),),
    )
    events = [event async for event in call]
    assert [(e.type.rpartition(".")[2], e.image_index, e.partial_image_index if e.HasField("partial_image_index") else None) for e in events] == [
        ("partial_image", 0, 0), ("partial_image", 0, 1), ("partial_image", 0, 2), ("completed", 0, None),
        ("partial_image", 1, 0), ("partial_image", 1, 1), ("partial_image", 1, 2), ("completed", 1, None),
    ]
    for event in events:
        assert Image.open(io.BytesIO(event.b64_json)).size == (256, 256)  # raw bytes, not base64
    trailers = dict(await call.trailing_metadata())
    assert (trailers["x-imagegw-cost-usd"], trailers["x-imagegw-model"]) == ("0.002000", "local-1")
    assert dict(await call.initial_metadata())["x-request-id"]
    assert (await gateway.admin.settled(account)).spent_usd == "0.002000"


async def test_unary_generate_images_refuses_the_stream_flag(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    stub = images_pb2_grpc.ImageServiceStub(gateway.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.GenerateImages(
            images_pb2.GenerateImagesRequest(prompt="p", stream=True), metadata=(("authorization", f"Bearer {key}"),)
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StreamGenerateImages" in (caught.value.details() or "")


async def test_streaming_rpcs_need_a_key_like_every_other(gateway: ProcessStack) -> None:
    stub = images_pb2_grpc.ImageServiceStub(gateway.channel)
    for call in (
        stub.StreamGenerateImages(images_pb2.GenerateImagesRequest(prompt="p")),
        stub.GenerateImagesHttp(images_pb2.GenerateImagesRequest(prompt="p", stream=True)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            async for _ in call:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert dict(caught.value.trailing_metadata())["x-http-status"] == "401"


# -- a scripted provider behind the REST surface -----------------------------------------

PARTIAL_PRICE = 250
UNIT = 1000
# A dearer model that fails at once and falls back to scripted-1.
DEAR_PARTIAL_PRICE = 2000
DEAR_UNIT = 9000
CATALOG = f"""
[[models]]
id = "scripted-1"
provider = "local"
sizes = ["256x256", "auto"]
default_size = "256x256"
max_n = 2
streaming = true
partial_image_price = {PARTIAL_PRICE}
prices = {{ "*" = {{ "*" = {UNIT} }} }}
timeout_seconds = 60

[[models]]
id = "scripted-dear"
provider = "local"
sizes = ["256x256", "auto"]
default_size = "256x256"
max_n = 2
streaming = true
partial_image_price = {DEAR_PARTIAL_PRICE}
prices = {{ "*" = {{ "*" = {DEAR_UNIT} }} }}
fallbacks = ["scripted-1"]
timeout_seconds = 60
"""


def png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (256, 256), (seed % 256, 40, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


FINAL = GeneratedImage(data=png(201), format="png")


class Scripted:
    """Emits partial images of image 0, each after the test opens its gate, then
    finishes as told: ``complete``, ``fail`` (a retryable upstream error), ``hang``
    until cancelled, or ``linger``: reports the image as soon as it is ready (as an
    upstream stream's completed event is relayed) and then waits for the last gate
    before it returns (an upstream that has not closed its stream yet)."""

    name = "scripted"

    def __init__(self) -> None:
        self.reset("complete", partials=2)

    def reset(self, ending: str, *, partials: int, gated: bool = False) -> None:
        self.ending, self.partials = ending, partials
        self.gates = [asyncio.Event() for _ in range(partials + 1)]
        if not gated:
            for gate in self.gates:
                gate.set()
        self.cancelled = asyncio.Event()
        self.partials_sent = asyncio.Event()  # every partial handed over (their sends returned)
        self.calls = 0

    async def generate(self, request: ImageRequest, *, deadline: float, progress: Progress | None = None) -> ProviderResult:
        self.calls += 1
        assert progress is not None
        try:
            for index in range(min(self.partials, request.partial_images)):
                await self.gates[index].wait()
                await progress.partial(0, index, GeneratedImage(data=png(index), format="png"))
            self.partials_sent.set()
            if self.ending == "linger":
                await progress.image(0, FINAL)
            await self.gates[-1].wait()
            if self.ending == "fail":
                raise UpstreamError("The upstream provider failed.", retryable=True)
            if self.ending == "hang":
                await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return ProviderResult(images=[FINAL if self.ending == "linger" else GeneratedImage(data=png(200), format="png")])

    async def aclose(self) -> None:
        return None


class Failing:
    """A model whose upstream fails at once with a retryable error (its fallback runs)."""

    name = "failing"

    async def generate(self, request: ImageRequest, *, deadline: float, progress: Progress | None = None) -> ProviderResult:
        raise UpstreamError("The upstream provider is overloaded.", retryable=True)

    async def aclose(self) -> None:
        return None


@pytest.fixture(scope="module")
async def scripted(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[InProcessStack, Scripted]]:
    var = tmp_path_factory.mktemp("scripted") / "var"
    var.mkdir(parents=True)
    catalog = var / "catalog.toml"
    catalog.write_text(CATALOG)
    provider = Scripted()
    async with in_process_stack(
        var, providers={"scripted-1": provider, "scripted-dear": Failing()}, envoy=True, catalog_file=catalog, default_model="scripted-1",
        stream_keepalive_seconds=0.2,
    ) as stack:
        yield stack, provider


def request(partials: int) -> dict[str, Any]:
    return {"model": "scripted-1", "prompt": "p", "stream": True, "partial_images": partials}


async def test_each_event_arrives_before_the_next_exists(scripted: tuple[InProcessStack, Scripted]) -> None:
    stack, provider = scripted
    provider.reset("complete", partials=2, gated=True)
    account, key = await stack.admin.funded_key("1.00")
    provider.gates[0].set()
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"}, json=request(2)
        ) as response:
            assert response.status_code == 200, await response.aread()
            seen = []
            async for name, data in sse(response):
                if name is None:
                    continue  # a keepalive comment
                seen.append(json.loads(data))
                # The provider makes the next event only now: had Envoy or the server
                # buffered, this loop would never get here.
                for gate in provider.gates:
                    if not gate.is_set():
                        gate.set()
                        break
    assert [(e["type"], e.get("partial_image_index")) for e in seen] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1), ("image_generation.completed", None),
    ]
    settled = await stack.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == (f"{(UNIT + 2 * PARTIAL_PRICE) / 1e6:.6f}", "0.000000")


async def test_a_quiet_stream_gets_keepalive_comments(scripted: tuple[InProcessStack, Scripted]) -> None:
    stack, provider = scripted
    provider.reset("complete", partials=0, gated=True)
    _, key = await stack.admin.funded_key("1.00")
    comments = 0
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"}, json=request(0)
        ) as response:
            assert response.status_code == 200  # the first comment sent the headers
            events = []
            async for name, data in sse(response):
                if name is None:
                    assert data == ": keepalive"
                    comments += 1
                    if comments == 3:
                        provider.gates[-1].set()
                else:
                    events.append(name)
    assert comments >= 3 and events == ["image_generation.completed"]


@pytest.mark.parametrize("client", ["sync", "async"])
async def test_a_failure_after_two_partials_is_an_error_event_and_pays_for_what_arrived(
    scripted: tuple[InProcessStack, Scripted], client: str
) -> None:
    stack, provider = scripted
    provider.reset("fail", partials=2)
    account, key = await stack.admin.funded_key("1.00")
    received: list[str] = []

    def run_sync() -> None:
        with openai.OpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
            for event in sdk.images.generate(**request(2)):
                received.append(event.type)

    with pytest.raises(openai.APIError) as caught:
        if client == "sync":
            await asyncio.to_thread(run_sync)
        else:
            async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
                async for event in await sdk.images.generate(**request(2)):
                    received.append(event.type)
    assert received == ["image_generation.partial_image"] * 2
    assert caught.value.message == "The upstream provider failed."
    assert caught.value.body == {"message": "The upstream provider failed.", "type": "server_error", "param": None, "code": "upstream_error"}
    assert provider.calls == 1  # no fallback, no retry once the caller holds pictures
    settled = await stack.admin.settled(account)
    # The two partial images that arrived are paid for; the image that never came is not.
    assert (settled.spent_usd, settled.reserved_usd, settled.balance_usd) == ("0.000500", "0.000000", "0.999500")
    usage = await stack.admin.usage(account)
    assert [(status_of(row), row.images_delivered, row.cost_usd, row.error_code) for row in usage] == [
        ("failed", 0, "0.000500", "upstream_error")
    ]


async def test_the_raw_error_event(scripted: tuple[InProcessStack, Scripted]) -> None:
    stack, provider = scripted
    provider.reset("fail", partials=1)
    _, key = await stack.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"}, json=request(1)
        ) as response:
            events = [(name, json.loads(data)) async for name, data in sse(response) if name is not None]
    assert response.status_code == 200
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    error = events[-1][1]
    assert error == {"type": "error", "error": {"message": "The upstream provider failed.", "type": "server_error", "param": None, "code": "upstream_error"}}
    ERROR.validate(error["error"])


async def test_a_client_that_goes_away_cancels_the_upstream_and_pays_for_what_it_got(
    scripted: tuple[InProcessStack, Scripted]
) -> None:
    stack, provider = scripted
    provider.reset("hang", partials=1)
    account, key = await stack.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"}, json=request(1)
        ) as response:
            async for name, _ in sse(response):
                if name == "image_generation.partial_image":
                    break  # leave mid-stream: the connection closes
    await asyncio.wait_for(provider.cancelled.wait(), 10)
    settled = await stack.admin.settled(account)
    # Delivered: the one partial image. The reservation for the image is released.
    assert (settled.spent_usd, settled.reserved_usd) == (f"{PARTIAL_PRICE / 1e6:.6f}", "0.000000")
    usage = await stack.admin.usage(account)
    assert [(status_of(row), row.error_code) for row in usage] == [("failed", "cancelled")]


async def test_grpcurl_streams_through_reflection(gateway: ProcessStack) -> None:
    """The operator's tool: grpcurl finds StreamGenerateImages by reflection and prints
    each event as it arrives (bytes as base64, as grpcurl prints them)."""
    account, key = await gateway.admin.funded_key("1.00")
    grpcurl = Path(sys.executable).with_name("grpcurl")
    process = await asyncio.create_subprocess_exec(
        str(grpcurl), "-plaintext", "-H", f"authorization: Bearer {key}",
        "-d", json.dumps({"prompt": "a red fox", "size": "256x256", "partialImages": 1, "model": "local-1"}),
        gateway.grpc_targets[0], "imagegw.v1.ImageService/StreamGenerateImages",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode == 0, stderr.decode()
    events = [json.loads(chunk) for chunk in stdout.decode().replace("}\n{", "}\x00{").split("\x00") if chunk.strip()]
    assert [e["type"] for e in events] == ["image_generation.partial_image", "image_generation.completed"]
    assert {decode(e["b64_json"]).size for e in events} == {(256, 256)}  # grpcurl keeps proto names
    assert (await gateway.admin.settled(account)).spent_usd == "0.001000"


async def test_a_stream_ended_by_the_shutdown_gets_a_retryable_error_event(
    scripted: tuple[InProcessStack, Scripted]
) -> None:
    """Past the shutdown's grace period a stream that already sent events ends with an error
    event (never a bare end of stream), and pays for what it delivered."""
    stack, provider = scripted
    provider.reset("hang", partials=1)
    account, key = await stack.admin.funded_key("1.00")
    assert stack.interceptor is not None
    events: list[tuple[str | None, dict[str, Any]]] = []
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"}, json=request(1)
        ) as response:
            async for name, data in sse(response):
                if name is None:
                    continue
                events.append((name, json.loads(data)))
                if name == "image_generation.partial_image":
                    await provider.partials_sent.wait()  # delivered, by the server's count
                    assert stack.interceptor.abort_in_flight() == 1
    assert [name for name, _ in events] == ["image_generation.partial_image", "error"]
    assert events[-1][1]["error"] == {
        "message": "The server is shutting down; retry the request.", "type": "server_error", "param": None,
        "code": "shutting_down",
    }
    settled = await stack.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == (f"{PARTIAL_PRICE / 1e6:.6f}", "0.000000")


@pytest.mark.parametrize("ending", ["hang", "fail"])
async def test_a_fallback_that_streamed_is_paid_at_its_own_prices(
    scripted: tuple[InProcessStack, Scripted], ending: str
) -> None:
    """scripted-dear fails before anything streamed; its fallback scripted-1 streams a
    partial image and then fails, or the caller leaves: the partial image is paid at
    scripted-1's price, the model that made it, as a finished stream would be."""
    stack, provider = scripted
    provider.reset(ending, partials=1)
    account, key = await stack.admin.funded_key("1.00")
    names: list[str] = []
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers={"authorization": f"Bearer {key}"},
            json={**request(1), "model": "scripted-dear"},
        ) as response:
            assert response.status_code == 200
            async for name, _ in sse(response):
                if name is None:
                    continue
                names.append(name)
                if ending == "hang":
                    break  # leave mid-stream
    if ending == "hang":
        await asyncio.wait_for(provider.cancelled.wait(), 10)
        assert names == ["image_generation.partial_image"]
    else:
        assert names == ["image_generation.partial_image", "error"]
    settled = await stack.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == (f"{PARTIAL_PRICE / 1e6:.6f}", "0.000000")
    assert (await stack.admin.reconcile()).ok


@pytest.mark.parametrize("upstream_open", [True, False], ids=["upstream-still-open", "settling"])
async def test_a_stream_whose_images_all_arrived_is_kept_for_its_idempotency_key(
    scripted: tuple[InProcessStack, Scripted], upstream_open: bool
) -> None:
    """The caller leaves as soon as it holds the completed event, while the upstream has
    not closed its stream yet (or, with the upstream done, while the server settles and
    stores the answer). It got (and pays for) every image it asked for, so the request
    is done: a retry with its Idempotency-Key replays it, free, rather than generating
    and charging a second time."""
    stack, provider = scripted
    provider.reset("linger", partials=1, gated=upstream_open)
    provider.gates[0].set()  # the partial image comes at once; the upstream lingers after the image
    account, key = await stack.admin.funded_key("1.00")
    headers = {"authorization": f"Bearer {key}", "idempotency-key": f"linger-{secrets.token_hex(4)}"}
    async with httpx.AsyncClient(timeout=60) as http:
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers=headers, json=request(1)
        ) as response:
            first = []
            async for name, data in sse(response):
                if name is not None:
                    first.append((name, json.loads(data)))
                if name == "image_generation.completed":
                    break  # every image is here: leave
        settled = await stack.admin.settled(account)
        assert (settled.spent_usd, settled.reserved_usd) == (f"{(UNIT + PARTIAL_PRICE) / 1e6:.6f}", "0.000000")
        provider.gates[-1].set()  # a second generation, if one ran, would not wait
        async with http.stream(
            "POST", f"{stack.api_base}/images/generations", headers=headers, json=request(1)
        ) as response:
            assert response.status_code == 200
            replay = [(name, json.loads(data)) async for name, data in sse(response) if name is not None]
            replayed = response.headers.get("x-imagegw-idempotent-replay")
    assert [name for name, _ in first] == ["image_generation.partial_image", "image_generation.completed"]
    assert [name for name, _ in replay] == ["image_generation.completed"]
    assert replay[0][1]["b64_json"] == first[-1][1]["b64_json"] == base64.b64encode(FINAL.data).decode()
    assert (replayed, provider.calls) == ("true", 1)
    settled = await stack.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == (f"{(UNIT + PARTIAL_PRICE) / 1e6:.6f}", "0.000000")
    usage = await stack.admin.usage(account)
    assert [(status_of(row), row.images_delivered, row.cost_usd) for row in usage] == [
        ("succeeded", 1, f"{(UNIT + PARTIAL_PRICE) / 1e6:.6f}")
    ]
    assert (await stack.admin.reconcile()).ok


async def test_a_shutdown_after_the_last_image_ends_the_stream_as_a_success(
    scripted: tuple[InProcessStack, Scripted]
) -> None:
    """The server stops while the upstream is still closing a stream whose every image
    was delivered: the caller gets a plain end of stream (not an error event that the
    SDKs would raise on after handing over every image), and the request is a success."""
    stack, provider = scripted
    provider.reset("linger", partials=1, gated=True)
    provider.gates[0].set()  # the partial image comes at once; the upstream lingers after the image
    account, key = await stack.admin.funded_key("1.00")
    assert stack.interceptor is not None
    names: list[str] = []
    async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=60) as sdk:
        async for event in await sdk.images.generate(**request(1)):
            names.append(event.type)
            if event.type == "image_generation.completed":
                assert stack.interceptor.abort_in_flight() == 1
    assert names == ["image_generation.partial_image", "image_generation.completed"]
    settled = await stack.admin.settled(account)
    assert (settled.spent_usd, settled.reserved_usd) == (f"{(UNIT + PARTIAL_PRICE) / 1e6:.6f}", "0.000000")
    usage = await stack.admin.usage(account)
    assert [(status_of(row), row.images_delivered, row.error_code) for row in usage] == [("succeeded", 1, "")]
