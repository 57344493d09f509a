"""Signed URLs and the filesystem image store."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from server.errors import PermissionDeniedError
from server.storage import FilesystemImageStore, UrlSigner, new_image_id, valid_image_id


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_url_round_trip_and_expiry() -> None:
    clock = Clock(1_800_000_000)
    signer = UrlSigner(b"secret", base_url="http://gw.example/", ttl_seconds=3600, clock=clock)
    url = signer.url("img-AAAAAAAAAAAAAAAAAAAAAA.png")
    prefix = "http://gw.example/v1/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png?expires=1800003600&signature="
    assert url.startswith(prefix)
    signature = url[len(prefix):]
    assert signer.verify("img-AAAAAAAAAAAAAAAAAAAAAA.png", 1800003600, signature) == 3600
    clock.now += 3599
    assert signer.verify("img-AAAAAAAAAAAAAAAAAAAAAA.png", 1800003600, signature) == 1
    clock.now += 1
    with pytest.raises(PermissionDeniedError) as expired:
        signer.verify("img-AAAAAAAAAAAAAAAAAAAAAA.png", 1800003600, signature)
    assert expired.value.code == "url_expired"


@pytest.mark.parametrize(
    ("image_id", "expires", "secret"),
    [
        ("img-BBBBBBBBBBBBBBBBBBBBBB.png", 1800003600, b"secret"),  # another image
        ("img-AAAAAAAAAAAAAAAAAAAAAA.png", 1800007200, b"secret"),  # a longer life
        ("img-AAAAAAAAAAAAAAAAAAAAAA.png", 1800003600, b"other"),  # another server's secret
    ],
)
def test_signature_binds_id_expiry_and_secret(image_id: str, expires: int, secret: bytes) -> None:
    clock = Clock(1_800_000_000)
    good = UrlSigner(b"secret", base_url="http://gw", ttl_seconds=3600, clock=clock)
    signature = good.signature("img-AAAAAAAAAAAAAAAAAAAAAA.png", 1800003600)
    checker = UrlSigner(secret, base_url="http://gw", ttl_seconds=3600, clock=clock)
    with pytest.raises(PermissionDeniedError) as caught:
        checker.verify(image_id, expires, signature)
    assert caught.value.code == "invalid_signature"


@pytest.mark.parametrize(
    "image_id",
    ["../secrets/admin_token", "img-AAAAAAAAAAAAAAAAAAAAAA.png/../x", "img-AAAA.png", "img-AAAAAAAAAAAAAAAAAAAAAA.gif",
     "/etc/passwd", "img-AAAAAAAAAAAAAAAAAAAAA/.png", ""],
)
def test_only_ids_we_could_have_made_are_valid(image_id: str) -> None:
    assert not valid_image_id(image_id)


def test_new_ids_are_valid_and_unique() -> None:
    ids = {new_image_id("webp") for _ in range(1000)}
    assert len(ids) == 1000
    assert all(valid_image_id(i) and i.endswith(".webp") for i in ids)


async def test_filesystem_store_put_get_sweep(tmp_path: Path) -> None:
    store = FilesystemImageStore(tmp_path / "images")
    old, fresh = new_image_id("png"), new_image_id("jpeg")
    await store.put(old, b"old-bytes")
    await store.put(fresh, b"fresh-bytes")
    stored = await store.get(fresh)
    assert stored is not None and (stored.data, stored.content_type) == (b"fresh-bytes", "image/jpeg")
    assert await store.get("../../etc/passwd") is None
    assert await store.get(new_image_id("png")) is None
    past = time.time() - 7200
    os.utime(tmp_path / "images" / old, (past, past))
    assert await store.delete_older_than(time.time() - 3600) == 1
    assert await store.get(old) is None
    assert await store.get(fresh) is not None
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == [fresh]  # no temp files left


def test_kept_images_outlive_the_url_lifetime(tmp_path: Path) -> None:
    """Images of a keyed request (``imgk-``) are swept at their own, later cutoff."""
    import asyncio

    async def run() -> None:
        store = FilesystemImageStore(tmp_path / "images")
        plain, kept = new_image_id("png"), new_image_id("png", kept=True)
        assert kept.startswith("imgk-") and valid_image_id(kept)
        for image_id in (plain, kept):
            await store.put(image_id, b"x")
            past = time.time() - 7200
            os.utime(tmp_path / "images" / image_id, (past, past))
        removed = await store.delete_older_than(time.time() - 3600, kept_cutoff=time.time() - 86400)
        assert removed == 1
        assert await store.get(plain) is None and await store.get(kept) is not None

    asyncio.run(run())
