"""Edits and variations through the real Envoy and server processes, with local-1.

local-1's edits are checkable pixel by pixel: under a mask, exactly the fully transparent
pixels are repainted and every other pixel is the input's; the other input images show
as insets. Refusals are exact (status, param, code) and cost nothing; uploads stream
through Envoy and the server refuses what crosses a limit as soon as it does.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import socket
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from imagegw.v1 import images_pb2, images_pb2_grpc
from PIL import Image

from tests.fakes.server import FakeHttpServer, FakeResponse, RecordedRequest
from tests.openai_schema import validator
from tests.stack import ProcessStack, process_stack

pytestmark = pytest.mark.e2e

RED, GREEN, BLUE = (200, 10, 10), (10, 200, 10), (10, 10, 200)
UNIT, INPUT = 1000, 100  # local-1: micro-dollars per image and per input image (server/catalog.toml)
EDIT_PARTIAL = validator("ImageEditPartialImageEvent")
EDIT_COMPLETED = validator("ImageEditCompletedEvent")
ERROR = validator("ErrorResponse")


def png(size: tuple[int, int], color: tuple[int, ...], mode: str = "RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, color).save(out, format="PNG")
    return out.getvalue()


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


def bottom_half_mask(size: tuple[int, int] = (256, 256)) -> bytes:
    """Opaque on top, fully transparent (edit here) on the bottom half."""
    mask = Image.new("RGBA", size, (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, size[1] // 2, size[0], size[1]))
    return encoded(mask)


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


def client(stack: ProcessStack, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0, timeout=120)


async def test_sdk_edit_with_a_mask_repaints_exactly_the_transparent_pixels(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        result = await sdk.images.edit(
            model="local-1",
            image=[("red.png", png((256, 256), RED)), ("green.png", png((128, 128), GREEN))],
            mask=("mask.png", bottom_half_mask()),
            prompt="a lake at night",
            response_format="b64_json",
        )
    assert result.data is not None and len(result.data) == 1
    edited = decode(result.data[0].b64_json or "").convert("RGB")
    assert edited.size == (256, 256)  # size auto: the first image's
    pixels = edited.load()
    assert all(pixels[x, y] == RED for x in range(256) for y in range(128))  # untouched, exactly
    painted = [pixels[x, y] for x in range(256) for y in range(128, 256)]
    assert sum(p != RED for p in painted) > 0.9 * len(painted)  # the prompt's picture
    # The second image as an inset (a quarter of the short side) in the repainted part.
    assert pixels[30, 220] == GREEN
    settled = await gateway.admin.settled(account)
    # One image and two input images.
    assert settled.spent_usd == f"{(UNIT + 2 * INPUT) / 1e6:.6f}"


async def test_one_file_is_sent_as_image_and_the_edit_blends_it_whole(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        result = await sdk.images.edit(
            model="local-1", image=("blue.png", png((320, 200), BLUE)), prompt="a desert at noon", n=2, size="512x512"
        )
    assert result.data is not None and [d.url is not None for d in result.data] == [True, True]
    async with httpx.AsyncClient() as http:
        pictures = [decode(base64.b64encode((await http.get(d.url or "")).content).decode()) for d in result.data]
    assert {p.size for p in pictures} == {(512, 512)}  # an explicit size resizes the input first
    assert pictures[0].tobytes() != pictures[1].tobytes()
    assert (await gateway.admin.settled(account)).spent_usd == f"{(2 * UNIT + INPUT) / 1e6:.6f}"


async def test_streamed_edit_sends_image_edit_events(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        stream = await sdk.images.edit(
            model="local-1", image=("red.png", png((1024, 1024), RED)), prompt="a forest", stream=True,
            partial_images=2, quality="low",
        )
        events = [event async for event in stream]
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.partial_image", "image_edit.completed"]
    for event in events:
        data = event.model_dump(exclude_none=True)
        (EDIT_PARTIAL if event.type.endswith("partial_image") else EDIT_COMPLETED).validate(data)
        assert decode(event.b64_json).size == (1024, 1024)


async def test_json_edit_with_a_data_url(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    url = "data:image/png;base64," + base64.b64encode(png((64, 64), RED)).decode()
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            json={"model": "local-1", "prompt": "a paper boat", "images": [{"image_url": url}], "mask": None,
                  "response_format": "b64_json", "n": 1},
        )
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == (64, 64)
    assert (await gateway.admin.settled(account)).spent_usd == f"{(UNIT + INPUT) / 1e6:.6f}"


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("https://127.0.0.1/x.png", "image_url_forbidden"),
        ("https://169.254.169.254/latest/meta-data/", "image_url_forbidden"),
        ("https://10.1.2.3/x.png", "image_url_forbidden"),
        ("https://[::1]/x.png", "image_url_forbidden"),
        ("https://0.0.0.0/x.png", "image_url_forbidden"),
        ("https://2130706433/x.png", "image_url_forbidden"),  # 127.0.0.1 in decimal
        ("https://0177.0.0.1/x.png", "invalid_image_url"),  # 127.0.0.1 in octal: not a URL to httpx
        ("https://[::ffff:127.0.0.1]/x.png", "image_url_forbidden"),  # IPv4-mapped
        ("https://[::7f00:1]/x.png", "image_url_forbidden"),  # IPv4-compatible (reserved ::/8)
        ("https://[64:ff9b::a9fe:a9fe]/x.png", "image_url_forbidden"),  # NAT64 of 169.254.169.254
        ("https://[64:ff9b:1::a00:5]/x.png", "image_url_forbidden"),  # local-use NAT64 of 10.0.0.5
        ("https://[2002:a9fe:a9fe::1]/x.png", "image_url_forbidden"),  # 6to4 of 169.254.169.254
        ("http://example.com/x.png", "invalid_image_url"),
        ("ftp://example.com/x.png", "invalid_image_url"),
        # A label over 63 characters: the resolver's IDNA encoding raised (a 500).
        ("https://" + "a" * 100 + ".example/x.png", "invalid_image_url"),
    ],
)
async def test_json_edit_never_fetches_into_private_networks(gateway: ProcessStack, url: str, code: str) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            json={"model": "local-1", "prompt": "p", "images": [{"image_url": url}]},
        )
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("images[0]", code)
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"


async def test_json_edit_nested_past_the_parsers_depth_is_400(gateway: ProcessStack) -> None:
    """json.loads raised RecursionError past about 1000 levels: a 500."""
    account, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits",
            content=b'{"prompt": "p", "extra": ' + b"[" * 5000 + b"]" * 5000 + b"}",
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {"message": "The JSON body is nested too deeply to be read.", "type": "invalid_request_error",
                  "param": None, "code": "invalid_value"}
    }
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"


JSON_PARSE_ERROR = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)"
)


@pytest.mark.parametrize(
    ("body", "message", "code"),
    [
        # The words and codes of the edge's check of generation bodies (test_edge_requests).
        (b'{"prompt": "p",', JSON_PARSE_ERROR, "invalid_json"),
        (b"\xef\xbb\xbf" + b'{"prompt": "p"}', JSON_PARSE_ERROR, "invalid_json"),
        (b"[1, 2]", "Invalid type for the request body: expected an object, but got an array instead.", "invalid_type"),
        (b'"prompt"', "Invalid type for the request body: expected an object, but got a string instead.", "invalid_type"),
        (b"42", "Invalid type for the request body: expected an object, but got a number instead.", "invalid_type"),
        (b"null", "Invalid type for the request body: expected an object, but got null instead.", "invalid_type"),
    ],
)
async def test_a_json_edit_body_that_is_not_an_object_is_refused_as_generations_are(
    gateway: ProcessStack, body: bytes, message: str, code: str
) -> None:
    """Edits said "The OpenAI API expects...", took a byte-order mark, and had no code."""
    account, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=body,
            headers={"authorization": f"Bearer {key}", "content-type": "application/json"},
        )
    assert response.status_code == 400, response.text
    assert response.json() == {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"


async def test_json_edit_refuses_file_ids(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            json={"model": "local-1", "prompt": "p", "images": [{"file_id": "file-abc123"}]},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("images[0]", "unsupported_parameter")
    assert "file ids are not supported" in error["message"]


def multipart(files: list[tuple[str, str, bytes, str]], fields: dict[str, str]) -> tuple[bytes, str]:
    """A multipart/form-data body (fields first, as the SDKs send them)."""
    boundary = "imagegw" + secrets.token_hex(8)
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    for field_name, filename, data, content_type in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{filename}"\r\n'
        parts.append(f"{head}Content-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


RGB256 = png((256, 256), RED)
JPEG256 = encoded(Image.new("RGB", (256, 256), RED), "JPEG")


@pytest.mark.parametrize(
    ("files", "fields", "param", "code"),
    [
        ([("image", "a.txt", b"just some text, not an image", "text/plain")], {}, "image", "invalid_image"),
        ([("image", "cut.png", RGB256[: len(RGB256) // 2], "image/png")], {}, "image", "invalid_image"),
        ([("image[]", f"{i}.png", png((8, 8), RED), "image/png") for i in range(17)], {}, "image", "too_many_images"),
        ([("image", "a.png", RGB256, "image/png"), ("mask", "m.jpg", JPEG256, "image/jpeg")], {}, "mask", "invalid_mask"),
        ([("image", "a.png", RGB256, "image/png"), ("mask", "m.png", RGB256, "image/png")], {}, "mask", "invalid_mask"),
        ([("image", "a.png", RGB256, "image/png"), ("mask", "m.png", bottom_half_mask((128, 128)), "image/png")], {},
         "mask", "invalid_mask"),
        ([], {}, "image", "missing_required_parameter"),
        ([("image", "a.png", RGB256, "image/png")], {"prompt": ""}, "prompt", "missing_required_parameter"),
        ([("image", "a.png", RGB256, "image/png")], {"model": "gpt-4o-mini"}, "model", "model_not_supported"),
        ([("image", "a.png", RGB256, "image/png")], {"model": "no-such-model"}, "model", "model_not_found"),
        ([("image", "a.png", RGB256, "image/png")], {"input_fidelity": "high"}, "input_fidelity", "unsupported_parameter"),
        ([("image", "a.png", RGB256, "image/png")], {"style": "vivid"}, "style", "unknown_parameter"),
        ([("image", "a.png", RGB256, "image/png")], {"n": "two"}, "n", "invalid_type"),
        # Integers as JSON writes them: Python's int() would read these as 10, 3 and 2.
        ([("image", "a.png", RGB256, "image/png")], {"n": "1_0"}, "n", "invalid_type"),
        ([("image", "a.png", RGB256, "image/png")], {"n": "\u0663"}, "n", "invalid_type"),
        ([("image", "a.png", RGB256, "image/png")], {"n": "02"}, "n", "invalid_type"),
        ([("image", "a.png", RGB256, "image/png")], {"stream": "maybe"}, "stream", "invalid_type"),
        ([("image", "a.png", RGB256, "image/png")], {"n": "11"}, "n", "integer_above_max_value"),
        ([("image", "a.png", RGB256, "image/png"), ("other", "x.png", RGB256, "image/png")], {}, "other", "unknown_parameter"),
    ],
)
async def test_edit_refusals_are_exact_and_free(
    gateway: ProcessStack, files: list[tuple[str, str, bytes, str]], fields: dict[str, str], param: str, code: str
) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    body, content_type = multipart(files, {"model": "local-1", "prompt": "a lake", **fields})
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=body,
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        )
    assert response.status_code == 400, response.text
    ERROR.validate(response.json())
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)
    assert response.headers["x-request-id"]
    account_now = await gateway.admin.get(account)
    assert (account_now.balance_usd, account_now.reserved_usd) == ("1.000000", "0.000000")


async def test_a_body_that_is_neither_multipart_nor_json_is_400(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=b"prompt=x",
            headers={"authorization": f"Bearer {key}", "content-type": "application/x-www-form-urlencoded"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "unsupported_content_type"
    assert "multipart/form-data" in response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("content_type", "mangle", "message"),
    [
        # The body's boundary is not the Content-Type's.
        ("multipart/form-data; boundary=other", lambda body: body,
         "The multipart body could not be parsed: it must be multipart/form-data whose parts each start with '--' "
         "and the Content-Type's boundary, with CRLF line endings."),
        (None, lambda body: body.replace(b"\r\n", b"\n"),
         "The multipart body could not be parsed: it must be multipart/form-data whose parts each start with '--' "
         "and the Content-Type's boundary, with CRLF line endings."),
        # RFC 2046 allows 70 characters; python-multipart raised its own error past 256 (a 500).
        ("multipart/form-data; boundary=" + "b" * 300, lambda body: body,
         "The multipart/form-data boundary is 300 characters long; at most 70 are allowed."),
    ],
)
async def test_a_multipart_body_that_does_not_parse_is_400_in_our_words(
    gateway: ProcessStack, content_type: str | None, mangle: Callable[[bytes], bytes], message: str
) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    body, own_type = multipart([("image", "a.png", RGB256, "image/png")], {"model": "local-1", "prompt": "p"})
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=mangle(body),
            headers={"authorization": f"Bearer {key}", "content-type": content_type or own_type},
        )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_value"}
    }
    assert response.headers["x-request-id"]
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"


async def test_part_filenames_are_read_as_their_bytes(gateway: ProcessStack) -> None:
    """A filename that is not UTF-8 made the part-header parser raise (a 500), and a UTF-8
    one came back garbled in messages ("\ufffda.txt")."""
    account, key = await gateway.admin.funded_key("1.00")
    body, content_type = multipart([("image", "x.png", RGB256, "image/png")], {"model": "local-1", "prompt": "p"})
    text, _ = multipart([("image", "x.png", b"just text", "text/plain")], {"model": "local-1", "prompt": "p"})
    text = text.replace(text[2 : text.index(b"\r\n")], body[2 : body.index(b"\r\n")])  # one boundary for both
    headers = {"authorization": f"Bearer {key}", "content-type": content_type}
    async with httpx.AsyncClient(timeout=60) as http:
        latin1 = await http.post(
            f"{gateway.api_base}/images/edits", content=body.replace(b'"x.png"', b'"\xe7a.png"'), headers=headers
        )
        utf8 = await http.post(
            f"{gateway.api_base}/images/edits", content=text.replace(b'"x.png"', '"ça.txt"'.encode()), headers=headers
        )
    assert latin1.status_code == 200, latin1.text
    assert utf8.status_code == 400, utf8.text
    assert utf8.json()["error"]["message"] == "Invalid 'image': ça.txt is not a PNG, JPEG or WebP image, or it is corrupt."
    assert (await gateway.admin.settled(account)).spent_usd == f"{(UNIT + INPUT) / 1e6:.6f}"


def one_bit_png(size: tuple[int, int]) -> bytes:
    """A blank picture of ``size`` in a few kilobytes: what a decompression bomb looks like."""
    out = io.BytesIO()
    Image.new("1", size).save(out, "PNG")
    return out.getvalue()


@pytest.mark.parametrize(
    ("size", "what"),
    [
        ((8000, 8000), "over IMAGEGW_UPLOAD_MAX_PIXELS (50 million)"),
        ((20000, 20000), "over Pillow's own limit, which Image.open refuses"),
    ],
)
async def test_an_image_of_too_many_pixels_is_refused_unread(
    gateway: ProcessStack, size: tuple[int, int], what: str
) -> None:
    """A few-kilobyte PNG of 13000x13000 pixels took the server to 2 GB and 7 s of CPU for
    $0.0011; several at once would have exhausted its memory."""
    del what
    account, key = await gateway.admin.funded_key("1.00")
    data = one_bit_png(size)
    assert len(data) < 100_000
    body, content_type = multipart(
        [("image", "bomb.png", data, "image/png")], {"model": "local-1", "prompt": "p", "size": "256x256"}
    )
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=body,
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {"message": "Invalid 'image': bomb.png has more than 50000000 pixels, the server's limit.",
                  "type": "invalid_request_error", "param": "image", "code": "invalid_image"}
    }
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"


async def test_an_auto_sized_edit_of_a_large_input_is_drawn_at_most_4096_a_side(gateway: ProcessStack) -> None:
    """`size: auto` keeps the input's shape, within local-1's largest side, as a requested size is."""
    account, key = await gateway.admin.funded_key("1.00")
    body, content_type = multipart(
        [("image", "wide.png", png((5000, 1000), RED), "image/png")],
        {"model": "local-1", "prompt": "p", "response_format": "b64_json"},
    )
    async with httpx.AsyncClient(timeout=120) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=body,
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        )
    assert response.status_code == 200, response.text
    assert decode(response.json()["data"][0]["b64_json"]).size == (4096, 819)
    assert (await gateway.admin.settled(account)).spent_usd == f"{(UNIT + INPUT) / 1e6:.6f}"


async def test_a_cut_off_upload_is_refused_before_any_charge(gateway: ProcessStack) -> None:
    """The body ends (chunked, properly terminated) but the multipart has no closing
    boundary: what a client or a proxy that gave up midway leaves."""
    account, key = await gateway.admin.funded_key("1.00")
    body, content_type = multipart([("image", "a.png", png((512, 512), RED), "image/png")], {"prompt": "p"})
    cut = body[: len(body) - 40]

    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(cut), 16384):
            yield cut[start : start + 16384]

    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{gateway.api_base}/images/edits", content=chunks(),
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "incomplete_upload"
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"


async def test_a_60_mb_file_is_refused_with_413_as_soon_as_it_crosses_the_limit(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    big = os.urandom(60 * 1024 * 1024)
    async with client(gateway, key) as sdk:
        with pytest.raises(openai.APIStatusError) as caught:
            await sdk.images.edit(model="local-1", image=("big.png", big), prompt="p")
    assert caught.value.status_code == 413
    assert caught.value.body == {
        "message": "The file 'big.png' (image) is larger than the server's limit of 52428800 bytes.",
        "type": "invalid_request_error", "param": None, "code": "request_too_large",
    }
    assert (await gateway.admin.get(account)).balance_usd == "1.000000"
    # Refused early: parsing and storing stopped one Envoy message (at most 1 MiB) past the
    # limit; the rest was read and dropped so that the client, still sending, gets the 413.
    lines = [json.loads(line) for line in gateway.server_log().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("request_id") == caught.value.request_id and "upload_bytes" in line]
    assert [(line["status"], line["outcome"]) for line in mine] == [(413, "request_too_large")]
    assert 50 * 1024 * 1024 < mine[0]["refused_at_bytes"] <= 52 * 1024 * 1024


async def test_grpc_edit_and_stream_edit_with_raw_bytes(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    stub = images_pb2_grpc.ImageServiceStub(gateway.channel)
    meta = (("authorization", f"Bearer {key}"),)
    request = images_pb2.EditImagesRequest(
        image=[images_pb2.InputImage(data=png((128, 128), RED), filename="r.png")],
        mask=images_pb2.InputImage(data=bottom_half_mask((128, 128)), filename="m.png"),
        prompt="a city at night", model="local-1", response_format="b64_json",
    )
    response = await stub.EditImages(request, metadata=meta)
    edited = Image.open(io.BytesIO(response.data[0].b64_json)).convert("RGB")
    assert edited.getpixel((5, 5)) == RED and edited.size == (128, 128)
    events = [event async for event in stub.StreamEditImages(request, metadata=meta)]
    assert [e.type for e in events] == ["image_edit.completed"]
    assert events[0].b64_json == response.data[0].b64_json  # deterministic: the same edit twice
    assert (await gateway.admin.settled(account)).spent_usd == f"{2 * (UNIT + INPUT) / 1e6:.6f}"


async def test_variations_turn_the_hue_deterministically(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    async with client(gateway, key) as sdk:
        result = await sdk.images.create_variation(
            model="local-1", image=("red.png", png((256, 256), RED)), n=2, size="256x256", response_format="b64_json"
        )
    assert result.data is not None and len(result.data) == 2
    first, second = (decode(d.b64_json or "").convert("RGB") for d in result.data)
    assert first.size == second.size == (256, 256)
    # Variation k: the hue turned by (k + 1) / 8 of a circle (and mirrored when k is odd).
    h, s, v = Image.new("RGB", (1, 1), RED).convert("HSV").split()
    for k, picture in enumerate((first, second)):
        turned = h.point(lambda x, k=k: (x + round(256 * (k + 1) / 8)) % 256)
        expected = Image.merge("HSV", (turned, s, v)).convert("RGB").getpixel((0, 0))
        assert set(picture.getdata()) == {expected}
    assert (await gateway.admin.settled(account)).spent_usd == "0.002000"


@pytest.mark.parametrize(
    ("image", "fields", "param", "code"),
    [
        (png((256, 128), RED), {}, "image", "invalid_image"),  # not square
        (JPEG256, {}, "image", "invalid_image"),  # not a PNG
        (RGB256, {"prompt": "no prompt here"}, "prompt", "unknown_parameter"),
        (RGB256, {"stream": "true"}, "stream", "unknown_parameter"),
    ],
)
async def test_variation_refusals(
    gateway: ProcessStack, image: bytes, fields: dict[str, str], param: str, code: str
) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    body, content_type = multipart([("image", "i.png", image, "image/png")], {"model": "local-1", **fields})
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{gateway.api_base}/images/variations", content=body,
            headers={"authorization": f"Bearer {key}", "content-type": content_type},
        )
    assert response.status_code == 400, response.text
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == (param, code)


# -- a model that cannot edit, and image URLs from an allowlisted host ----------------------

CATALOG_EXTRA = """
[[models]]
id = "paint-only-1"
provider = "local"
sizes = ["256x256", "auto"]
default_size = "256x256"
prices = { "*" = { "*" = 1000 } }
"""


@pytest.fixture(scope="module")
def image_host() -> Iterator[dict[str, bytes]]:
    yield {"/a.png": png((96, 96), BLUE), "/notes.txt": b"not an image"}


@pytest.fixture(scope="module")
async def allowlisted(
    tmp_path_factory: pytest.TempPathFactory, image_host: dict[str, bytes]
) -> AsyncIterator[tuple[ProcessStack, FakeHttpServer]]:
    async def serve(request: RecordedRequest) -> FakeResponse:
        body = image_host.get(request.path)
        if body is None:
            return FakeResponse(status=404, body=b"missing", content_type="text/plain")
        return FakeResponse(body=body, content_type="image/png")

    host = FakeHttpServer(serve)
    await host.start()
    var = tmp_path_factory.mktemp("edits") / "var"
    var.mkdir(parents=True)
    catalog = var / "catalog.toml"
    shipped = (Path(__file__).resolve().parents[2] / "server" / "catalog.toml").read_text()
    catalog.write_text(shipped + CATALOG_EXTRA)
    try:
        async with process_stack(var, catalog_file=catalog, image_url_allowlist="127.0.0.1") as stack:
            yield stack, host
    finally:
        await host.stop()


async def test_an_allowlisted_host_is_fetched(allowlisted: tuple[ProcessStack, FakeHttpServer]) -> None:
    stack, host = allowlisted
    account, key = await stack.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            json={"model": "local-1", "prompt": "p", "response_format": "b64_json",
                  "images": [{"image_url": f"{host.base_url}/a.png"}]},
        )
        assert response.status_code == 200, response.text
        assert decode(response.json()["data"][0]["b64_json"]).size == (96, 96)
        for path, code in (("/notes.txt", "invalid_image"), ("/missing.png", "image_url_unavailable")):
            refused = await http.post(
                f"{stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
                json={"model": "local-1", "prompt": "p", "images": [{"image_url": f"{host.base_url}{path}"}]},
            )
            assert refused.status_code == 400
            assert (refused.json()["error"]["param"], refused.json()["error"]["code"]) == ("images[0]", code)
    assert [r.path for r in host.requests if r.path == "/a.png"] == ["/a.png"]
    assert (await stack.admin.settled(account)).spent_usd == f"{(UNIT + INPUT) / 1e6:.6f}"


async def test_an_image_url_that_cannot_be_fetched_is_400_in_our_words(
    allowlisted: tuple[ProcessStack, FakeHttpServer],
) -> None:
    """The message named httpx's exception class ("ConnectError")."""
    stack, _ = allowlisted
    account, key = await stack.admin.funded_key("1.00")
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        port = unused.getsockname()[1]
    # Nothing listens on the port once it is closed.
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            json={"model": "local-1", "prompt": "p", "images": [{"image_url": f"http://127.0.0.1:{port}/a.png"}]},
        )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {
            "message": "Invalid 'images[0]': the image URL could not be fetched (the connection failed or the answer "
            "was not valid HTTP).",
            "type": "invalid_request_error", "param": "images[0]", "code": "image_url_unavailable",
        }
    }
    assert (await stack.admin.get(account)).balance_usd == "1.000000"


async def test_json_edit_image_urls_are_counted_before_any_is_fetched(
    allowlisted: tuple[ProcessStack, FakeHttpServer],
) -> None:
    """Every URL was fetched (up to 50 MB each, held in memory) and only then counted: a
    JSON body of 3000 URLs made 3000 fetches. A multipart upload's files are counted as
    they arrive; the URLs of a JSON edit now are too."""
    stack, host = allowlisted
    account, key = await stack.admin.funded_key("1.00")
    before = len(host.requests)
    async with httpx.AsyncClient(timeout=60) as http:
        response = await http.post(
            f"{stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
            json={"model": "local-1", "prompt": "p", "images": [{"image_url": f"{host.base_url}/a.png"}] * 17},
        )
    assert response.status_code == 400, response.text
    assert response.json() == {
        "error": {"message": "Invalid 'images': at most 16 images are allowed, but 17 were given.",
                  "type": "invalid_request_error", "param": "images", "code": "too_many_images"}
    }
    assert len(host.requests) == before
    assert (await stack.admin.get(account)).balance_usd == "1.000000"


async def test_a_model_that_cannot_edit_or_vary_is_model_not_supported(
    allowlisted: tuple[ProcessStack, FakeHttpServer],
) -> None:
    stack, _ = allowlisted
    account, key = await stack.admin.funded_key("1.00")
    async with client(stack, key) as sdk:
        for call in (
            sdk.images.edit(model="paint-only-1", image=("a.png", RGB256), prompt="p"),
            sdk.images.create_variation(model="paint-only-1", image=("a.png", RGB256)),
        ):
            with pytest.raises(openai.BadRequestError) as caught:
                await call
            assert (caught.value.param, caught.value.code) == ("model", "model_not_supported")
    assert (await stack.admin.get(account)).balance_usd == "1.000000"



def noise_png(side: int) -> bytes:
    """A PNG that does not compress: its size on the wire is about 3 bytes a pixel."""
    buffer = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buffer, format="PNG")
    return buffer.getvalue()


async def test_fetched_images_are_spooled_and_count_against_the_requests_total(tmp_path: Path) -> None:
    """Image URLs were fetched whole into memory (sixteen of up to 50 MB each) and only
    each file's limit applied; a multipart upload spools to disk and has a total limit."""
    noisy = noise_png(450)  # about 600 KB
    assert 550_000 < len(noisy) < 700_000

    async def serve(request: RecordedRequest) -> FakeResponse:
        return FakeResponse(body=noisy, content_type="image/png")

    host = FakeHttpServer(serve)
    await host.start()
    try:
        # Files past 1 KiB go to disk; two of these images fit the total, three do not.
        async with process_stack(
            tmp_path / "var", image_url_allowlist="127.0.0.1", upload_spool_bytes=1024,
            upload_max_file_bytes=1_048_576, upload_max_bytes=1_572_864,
        ) as stack:
            account, key = await stack.admin.funded_key("1.00")
            async with httpx.AsyncClient(timeout=60) as http:
                two = await http.post(
                    f"{stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
                    json={"model": "local-1", "prompt": "p", "response_format": "b64_json",
                          "images": [{"image_url": f"{host.base_url}/{i}.png"} for i in range(2)]},
                )
                assert two.status_code == 200, two.text
                assert decode(two.json()["data"][0]["b64_json"]).size == (450, 450)
                three = await http.post(
                    f"{stack.api_base}/images/edits", headers={"authorization": f"Bearer {key}"},
                    json={"model": "local-1", "prompt": "p",
                          "images": [{"image_url": f"{host.base_url}/{i}.png"} for i in range(3)]},
                )
            assert three.status_code == 413, three.text
            assert three.json() == {"error": {
                "message": "Invalid 'images[2]': the request's images together are larger than the server's limit of "
                "1572864 bytes.",
                "type": "invalid_request_error", "param": "images[2]", "code": "request_too_large",
            }}
            assert (await stack.admin.settled(account)).spent_usd == f"{(UNIT + 2 * INPUT) / 1e6:.6f}"
    finally:
        await host.stop()
