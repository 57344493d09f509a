"""REST through the real Envoy to the server process: shapes, images, money, URLs."""

from __future__ import annotations

import base64
import io
import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from PIL import Image

from tests.stack import ProcessStack

pytestmark = pytest.mark.e2e

USAGE_ZEROS = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "total_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
    "output_tokens_details": {"image_tokens": 0, "text_tokens": 0},
}
LOCAL_UNIT_MICROS = 1000  # local-1 medium quality, from server/catalog.toml


async def post(stack: ProcessStack, key: str, body: dict[str, object], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(
            f"{stack.api_base}/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}", **headers},
        )


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


async def test_quickstart_url_answer_and_the_url_serves_the_png(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    response = await post(
        gateway,
        key,
        {"model": "local-1", "prompt": "A watercolor painting of a mountain lake", "n": 1, "size": "1024x1024"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"created", "data", "usage"}
    assert isinstance(body["created"], int)
    assert body["usage"] == USAGE_ZEROS
    assert len(body["data"]) == 1
    item = body["data"][0]
    assert set(item) == {"url", "revised_prompt"}
    assert item["revised_prompt"].startswith("A watercolor painting of a mountain lake")
    assert re.match(
        rf"^{re.escape(gateway.api_base)}/images/files/img-[A-Za-z0-9_-]{{22}}\.png\?expires=\d+&signature=[A-Za-z0-9_-]+$",
        item["url"],
    )
    assert response.headers["x-imagegw-cost-usd"] == "0.001000"
    assert response.headers["x-imagegw-model"] == "local-1"
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-request-id"]
    for leaked in ("grpc-status", "grpc-message", "server", "x-envoy-upstream-service-time", "x-http-status"):
        assert leaked not in response.headers
    async with httpx.AsyncClient() as client:
        image = await client.get(item["url"])
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/png"
    assert image.headers["cache-control"].startswith("private, max-age=")
    assert decode(image.content).size == (1024, 1024)
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.spent_usd, account.reserved_usd) == ("0.999000", "0.001000", "0.000000")


@pytest.mark.parametrize(
    ("size", "fmt", "pil_format"),
    [("512x512", "png", "PNG"), ("1792x1024", "jpeg", "JPEG"), ("1024x1536", "webp", "WEBP")],
)
async def test_b64_json_images_decode_to_the_requested_size_and_format(
    gateway: ProcessStack, size: str, fmt: str, pil_format: str
) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    body: dict[str, object] = {"model": "local-1", "prompt": "a red fox", "n": 2, "size": size,
                               "response_format": "b64_json", "output_format": fmt}
    if fmt != "png":
        body["output_compression"] = 80
    response = await post(gateway, key, body)
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [set(item) for item in data] == [{"b64_json", "revised_prompt"}] * 2
    width, height = map(int, size.split("x"))
    images = [decode(base64.b64decode(item["b64_json"], validate=True)) for item in data]
    assert [(image.format, image.size) for image in images] == [(pil_format, (width, height))] * 2
    assert data[0]["b64_json"] != data[1]["b64_json"]
    assert (await gateway.admin.get(account_id)).spent_usd == "0.002000"


async def test_auto_size_renders_the_default_size_and_is_priced(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    response = await post(gateway, key, {"prompt": "a lighthouse", "response_format": "b64_json"})
    assert response.status_code == 200, response.text
    assert decode(base64.b64decode(response.json()["data"][0]["b64_json"])).size == (1024, 1024)
    assert response.headers["x-imagegw-cost-usd"] == "0.001000"


async def test_url_signature_tamper_expiry_and_unknown_id(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    response = await post(gateway, key, {"model": "local-1", "prompt": "a small boat", "size": "256x256"})
    url = response.json()["data"][0]["url"]
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    image_path = f"{gateway.base_url}{parts.path}"
    expires, signature = query["expires"][0], query["signature"][0]
    tampered = signature[:-2] + ("AA" if signature[-2:] != "AA" else "BB")
    async with httpx.AsyncClient() as client:
        bad_sig = await client.get(image_path, params={"expires": expires, "signature": tampered})
        longer = await client.get(image_path, params={"expires": str(int(expires) + 3600), "signature": signature})
        missing = await client.get(image_path)
        unknown = await client.get(
            f"{gateway.api_base}/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png",
            params={"expires": expires, "signature": signature},
        )
        escape = await client.get(f"{gateway.api_base}/images/files/..%2F..%2Fsecrets%2Fadmin_token")
    for reply in (bad_sig, longer, missing):
        assert reply.status_code == 403
        assert reply.json()["error"]["code"] == "invalid_signature"
        assert reply.json()["error"]["type"] == "invalid_request_error"
    assert unknown.status_code == 403  # its signature belongs to another id
    assert escape.status_code == 404
    assert set(escape.json()["error"]) == {"message", "type", "param", "code"}


async def test_signed_url_for_a_missing_file_is_404_and_expired_is_403(gateway: ProcessStack) -> None:
    from server.storage import UrlSigner

    secret = gateway.env["IMAGEGW_URL_SIGNING_SECRET"].encode()
    expired = UrlSigner(secret, base_url=gateway.base_url, ttl_seconds=-10).url("img-AAAAAAAAAAAAAAAAAAAAAA.png")
    gone = UrlSigner(secret, base_url=gateway.base_url, ttl_seconds=600).url("img-BBBBBBBBBBBBBBBBBBBBBB.png")
    async with httpx.AsyncClient() as client:
        expired_reply = await client.get(expired)
        gone_reply = await client.get(gone)
    assert expired_reply.status_code == 403
    assert expired_reply.json() == {
        "error": {"message": "The image URL has expired.", "type": "invalid_request_error",
                  "param": "expires", "code": "url_expired"}
    }
    assert gone_reply.status_code == 404
    assert gone_reply.json()["error"]["code"] == "not_found"
