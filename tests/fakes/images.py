"""Real, decodable images for the fakes (and a few undecodable ones), made with Pillow."""

from __future__ import annotations

import io
import random

from PIL import Image

__all__ = ["FAKE_PNG", "GARBAGE", "MIME_TYPES", "PIL_FORMATS", "ImageCache", "describe", "make_image", "with_bad_padding"]

PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}
# Bytes that are no image at all, and bytes with a PNG signature but nothing valid after it.
GARBAGE = b"this is certainly not an image, just some text bytes"
FAKE_PNG = b"\x89PNG\r\n\x1a\n" + b"\x00\x00\x00\rIHDR" + b"garbage after a valid signature" * 4


def make_image(fmt: str = "png", width: int = 8, height: int = 8, *, index: int = 0, detailed: bool = False) -> bytes:
    """A ``width`` x ``height`` image in ``fmt``; ``index`` tints it so images differ.

    ``detailed``: seeded noise, which no codec can squeeze, so the image is as large as a
    real photo or larger (a 1024x1024 PNG is about 3 MB) instead of a few hundred bytes."""
    if detailed:
        pixels = random.Random(index).randbytes(width * height * 3)
        image = Image.frombytes("RGB", (width, height), pixels)
    else:
        color = ((40 + 50 * index) % 256, (90 + 30 * index) % 256, 160)
        image = Image.new("RGB", (width, height), color)
    out = io.BytesIO()
    image.save(out, format=PIL_FORMATS[fmt])
    return out.getvalue()


def describe(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of an encoded image (fully decoded, so it must be whole)."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.format.lower().replace("jpg", "jpeg"), image.width, image.height


class ImageCache:
    """Per-fake cache: making a 1536x1024 PNG costs a few ms, and tests ask many times."""

    def __init__(self) -> None:
        self._images: dict[tuple[str, int, int, int, bool], bytes] = {}

    def get(self, fmt: str, width: int, height: int, index: int = 0, *, detailed: bool = False) -> bytes:
        key = (fmt, width, height, index % 4, detailed)
        if key not in self._images:
            self._images[key] = make_image(fmt, width, height, index=index % 4, detailed=detailed)
        return self._images[key]


def with_bad_padding(encoded: str) -> str:
    """``encoded`` with its padding broken: the length is no longer a multiple of four."""
    stripped = encoded.rstrip("=")
    return stripped if len(stripped) % 4 else stripped[:-1]
