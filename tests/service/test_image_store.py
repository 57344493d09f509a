"""The image store contract, against both stores: the folder, and S3 over a real S3 API
(moto's server on 127.0.0.1, tests/fakes/s3.py). The same tests run on each; what differs
by design (expiry, presigned URLs) is tested per store."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.metrics import Metrics
from server.storage import (
    FilesystemImageStore,
    ImageStore,
    MeteredImageStore,
    S3ImageStore,
    StoreError,
    new_image_id,
)
from tests.fakes.s3 import S3Server
from tests.stack import metric_sample

ROOT = Path(__file__).resolve().parent.parent.parent


def s3_store(s3: S3Server, bucket: str, prefix: str = "images", **overrides: str) -> S3ImageStore:
    options = {
        "endpoint": s3.endpoint,
        "region": s3.region,
        "access_key_id": s3.access_key,
        "secret_access_key": s3.secret_key,
        **overrides,
    }
    return S3ImageStore(bucket, prefix, **options)


@pytest.fixture(params=["folder", "s3"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ImageStore]:
    if request.param == "folder":
        chosen: ImageStore = FilesystemImageStore(tmp_path / "images")
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        chosen = s3_store(s3, s3.create_bucket())
    try:
        yield chosen
    finally:
        await chosen.aclose()


@pytest.mark.parametrize(("fmt", "content_type"), [("png", "image/png"), ("jpeg", "image/jpeg"), ("webp", "image/webp")])
async def test_put_then_get_returns_the_same_bytes(store: ImageStore, fmt: str, content_type: str) -> None:
    image_id = new_image_id(fmt)
    data = secrets.token_bytes(1_500_000)  # incompressible, the size of a large PNG
    await store.put(image_id, data)
    stored = await store.get(image_id)
    assert stored is not None
    assert (stored.data, stored.content_type) == (data, content_type)


async def test_unknown_and_invalid_ids_are_none(store: ImageStore) -> None:
    assert await store.get(new_image_id("png")) is None
    for bad in ("../secrets/admin_token", "img-short.png", "img-AAAAAAAAAAAAAAAAAAAAAA.gif", ""):
        assert await store.get(bad) is None
    with pytest.raises(ValueError):
        await store.put("../escape.png", b"x")


async def test_concurrent_puts_and_gets_keep_every_image_apart(store: ImageStore) -> None:
    images = {new_image_id("png"): secrets.token_bytes(20_000 + i) for i in range(24)}
    await asyncio.gather(*(store.put(image_id, data) for image_id, data in images.items()))
    stored = await asyncio.gather(*(store.get(image_id) for image_id in images))
    assert [image.data if image else None for image in stored] == list(images.values())


async def test_folder_sweeper_deletes_what_is_older_than_the_cutoff(tmp_path: Path) -> None:
    store = FilesystemImageStore(tmp_path / "images")
    old, new = new_image_id("png"), new_image_id("png")
    await store.put(old, b"old")
    await store.put(new, b"new")
    past = time.time() - 7200
    os.utime(tmp_path / "images" / old, (past, past))
    assert await store.delete_older_than(time.time() - 3600) == 1
    assert await store.get(old) is None
    assert (await store.get(new)) is not None


async def test_s3_leaves_expiry_to_the_lifecycle_rule_shipped_in_deploy(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    store = s3_store(s3_server, bucket)
    image_id = new_image_id("png")
    await store.put(image_id, b"kept until the bucket's rule expires it")
    assert await store.delete_older_than(time.time() + 3600) == 0
    assert (await store.get(image_id)) is not None
    # The documented rule is one the S3 API accepts as it is, for the prefix the README uses.
    rule = json.loads((ROOT / "deploy" / "s3-lifecycle.json").read_text())
    client = s3_server.client()
    client.put_bucket_lifecycle_configuration(Bucket=bucket, LifecycleConfiguration=rule)
    (applied,) = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert (applied["Status"], applied["Expiration"], applied["Filter"]) == ("Enabled", {"Days": 1}, {"Prefix": "images/"})


async def test_s3_objects_live_under_the_prefix_with_their_content_type(s3_server: S3Server) -> None:
    bucket = s3_server.create_bucket()
    store = s3_store(s3_server, bucket, prefix="team-a/images")
    image_id = new_image_id("webp")
    await store.put(image_id, b"RIFF....WEBP")
    head = s3_server.client().head_object(Bucket=bucket, Key=f"team-a/images/{image_id}")
    assert (head["ContentType"], head["ContentLength"]) == ("image/webp", 12)


async def test_presigned_urls_serve_the_image_without_the_gateway(s3_server: S3Server, tmp_path: Path) -> None:
    store = s3_store(s3_server, s3_server.create_bucket())
    image_id = new_image_id("png")
    data = secrets.token_bytes(50_000)
    await store.put(image_id, data)
    url = await store.presigned_url(image_id, 600)
    assert url is not None and url.startswith(f"{s3_server.endpoint}/") and "X-Amz-Expires=600" in url
    async with httpx.AsyncClient() as client:
        response = await client.get(url)  # no credentials: the signature is the credential
    assert (response.status_code, response.headers["content-type"], response.content) == (200, "image/png", data)
    assert await FilesystemImageStore(tmp_path).presigned_url(image_id, 600) is None


async def test_a_missing_bucket_is_a_permanent_error(s3_server: S3Server) -> None:
    store = s3_store(s3_server, "no-such-bucket")
    with pytest.raises(StoreError) as failed:
        await store.put(new_image_id("png"), b"x")
    assert (failed.value.operation, failed.value.retryable) == ("put", False)
    assert "not found" in str(failed.value)


async def test_an_unreachable_store_is_a_retryable_error_after_bounded_retries(s3_server: S3Server) -> None:
    import socket

    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    store = s3_store(s3_server, "images", endpoint=f"http://127.0.0.1:{port}")
    started = time.monotonic()
    for operation in ("put", "get"):
        with pytest.raises(StoreError) as failed:
            if operation == "put":
                await store.put(new_image_id("png"), b"x")
            else:
                await store.get(new_image_id("png"))
        assert (failed.value.operation, failed.value.retryable) == (operation, True)
    assert time.monotonic() - started < 10  # two retries with short backoff, never minutes


async def test_a_folder_that_is_a_file_is_a_permanent_error(tmp_path: Path) -> None:
    (tmp_path / "images").write_text("not a folder")
    store = FilesystemImageStore(tmp_path / "images")
    with pytest.raises(StoreError) as failed:
        await store.put(new_image_id("png"), b"x")
    assert (failed.value.operation, failed.value.retryable) == ("put", False)


async def test_the_metered_store_counts_latency_and_errors(s3_server: S3Server) -> None:
    metrics = Metrics()
    good = MeteredImageStore(s3_store(s3_server, s3_server.create_bucket()), metrics)
    bad = MeteredImageStore(s3_store(s3_server, "no-such-bucket"), metrics)
    image_id = new_image_id("png")
    await good.put(image_id, b"x")
    assert (await good.get(image_id)) is not None
    assert await good.get(new_image_id("png")) is None
    with pytest.raises(StoreError):
        await bad.put(new_image_id("png"), b"x")
    from prometheus_client import generate_latest

    page = generate_latest(metrics.registry).decode()
    count = "imagegw_store_duration_seconds_count"
    assert metric_sample(page, count, operation="put", outcome="ok") == 1
    assert metric_sample(page, count, operation="get", outcome="ok") == 1
    assert metric_sample(page, count, operation="get", outcome="not_found") == 1
    assert metric_sample(page, count, operation="put", outcome="permanent") == 1
    assert metric_sample(page, "imagegw_store_errors_total", operation="put", retryable="false") == 1
