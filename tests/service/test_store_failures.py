"""The generation path on an S3 image store (moto's server): presigned URLs, and what a
caller gets and pays when the store fails after the provider delivered the images."""

from __future__ import annotations

import io
import json
import socket
from contextlib import AsyncExitStack
from pathlib import Path

import grpc
import httpx
import pytest
from imagegw.v1 import images_pb2
from PIL import Image
from prometheus_client import generate_latest

from server.app import build_app
from tests.fakes.s3 import S3Server
from tests.stack import InProcessStack, base_env, in_process_stack, metric_sample, settings_from, status_of


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def assert_store_failure_is_uncharged(stack: InProcessStack, *, should_retry: bool) -> None:
    account_id, key = await stack.admin.funded_key("1.00")
    request = images_pb2.GenerateImagesRequest(prompt="a lost harbour", n=2, size="256x256", response_format="url")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stack.images.GenerateImages(request, metadata=bearer(key))
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    trailers = dict(caught.value.trailing_metadata())
    assert (trailers["x-http-status"], trailers["x-should-retry"]) == ("503", "true" if should_retry else "false")
    error = json.loads(trailers["x-openai-error"])["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "image_store_unavailable", None)
    assert "nothing was charged" in error["message"]
    account = await stack.admin.settled(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
    usage = await stack.admin.usage(account_id)
    assert [(status_of(u), u.error_code, u.images_delivered, u.cost_usd) for u in usage] == [
        ("failed", "image_store_unavailable", 0, "0.000000")
    ]
    page = generate_latest(stack.app.metrics.registry).decode()
    assert metric_sample(page, "imagegw_images_not_stored_total", model="local-1") == 2
    assert metric_sample(page, "imagegw_store_errors_total", operation="put", retryable=str(should_retry).lower()) == 2
    # b64_json never touches the store: it still works, and is charged.
    b64 = await stack.images.GenerateImages(
        images_pb2.GenerateImagesRequest(prompt="a kept harbour", size="256x256", response_format="b64_json"),
        metadata=bearer(key),
    )
    assert Image.open(io.BytesIO(b64.data[0].b64_json)).size == (256, 256)
    assert (await stack.admin.get(account_id)).spent_usd == "0.001000"
    assert (await stack.admin.reconcile()).ok


async def test_a_missing_bucket_fails_the_request_uncharged_and_not_retryable(tmp_path: Path, s3_server: S3Server) -> None:
    async with in_process_stack(
        tmp_path / "var", image_store_url="s3://no-such-bucket/images", extra_env=s3_server.env
    ) as stack:
        await assert_store_failure_is_uncharged(stack, should_retry=False)


async def test_an_unreachable_store_fails_the_request_uncharged_and_retryable(tmp_path: Path, s3_server: S3Server) -> None:
    env = {**s3_server.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{closed_port()}"}
    async with in_process_stack(tmp_path / "var", image_store_url="s3://images/gw", extra_env=env) as stack:
        await assert_store_failure_is_uncharged(stack, should_retry=True)


async def test_presigned_mode_answers_with_the_store_s_own_urls(tmp_path: Path, s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    async with in_process_stack(
        tmp_path / "var", image_store_url=f"s3://{bucket}/images", url_mode="presigned", url_ttl_seconds=900,
        extra_env=s3_server.env,
    ) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        reply = await stack.images.GenerateImages(
            images_pb2.GenerateImagesRequest(prompt="a direct harbour", n=2, size="512x512", response_format="url"),
            metadata=bearer(key),
        )
        assert len(reply.data) == 2
        async with httpx.AsyncClient() as client:
            for image in reply.data:
                assert image.url.startswith(f"{s3_server.endpoint}/{bucket}/images/img-")
                assert "X-Amz-Expires=900" in image.url
                response = await client.get(image.url)
                assert (response.status_code, response.headers["content-type"]) == (200, "image/png")
                assert Image.open(io.BytesIO(response.content)).size == (512, 512)
        assert (await stack.admin.get(account_id)).spent_usd == "0.002000"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"url_mode": "presigned"}, "IMAGEGW_URL_MODE=presigned needs an S3 image store"),
        ({"image_store_url": "gs://bucket"}, "use s3://bucket/prefix"),
        ({"image_store_url": "s3:///prefix-without-bucket"}, "is not s3://bucket[/prefix]"),
    ],
)
async def test_a_bad_store_configuration_stops_the_start(tmp_path: Path, overrides: dict[str, str], message: str) -> None:
    settings = settings_from(base_env(tmp_path / "var", **overrides))
    async with AsyncExitStack() as stack:
        with pytest.raises(ValueError, match=message.replace("[", r"\[")):
            await build_app(settings, stack)
