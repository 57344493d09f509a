"""The two images every row is run with, made deterministically with Pillow.

``tiny``: a 12x12 noise PNG of about 500 bytes. ``large``: a 1024x1024 PNG of about
1.5 MB: a colour gradient plus 3 bits of seeded noise per channel, so that PNG's
filters and deflate cannot squeeze it to nothing (a flat image would be a few KB and
measure nothing). Same bytes on every machine and every run.
"""

from __future__ import annotations

import functools
import io
import random

from PIL import Image, ImageChops

__all__ = ["IMAGES", "image_bytes"]

IMAGES = ("tiny", "large")


def _png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _tiny() -> bytes:
    rnd = random.Random(7)
    return _png(Image.frombytes("RGB", (12, 12), rnd.randbytes(12 * 12 * 3)))


def _large() -> bytes:
    rnd = random.Random(20240601)
    size = 1024
    noise = Image.frombytes("RGB", (size, size), rnd.randbytes(size * size * 3)).point(lambda v: v & 7)
    gradient = Image.linear_gradient("L").resize((size, size))
    base = Image.merge(
        "RGB",
        (
            gradient,
            gradient.rotate(90),
            gradient.transpose(Image.Transpose.FLIP_TOP_BOTTOM),
        ),
    )
    return _png(ImageChops.add(base, noise))


@functools.cache
def image_bytes(name: str) -> bytes:
    """The PNG bytes of ``tiny`` or ``large``."""
    if name == "tiny":
        return _tiny()
    if name == "large":
        return _large()
    raise ValueError(f"unknown bench image {name!r}")
