"""The shared upstream discipline: hint parsing, strict base64, image checks, error lookup, sizes."""

from __future__ import annotations

import base64
import email.utils
import io
import random
import time

import httpx
import pytest

from server.errors import UpstreamError
from server.providers.http import (
    Kind,
    RetryPolicy,
    decode_base64,
    image_from_base64,
    image_from_bytes,
    lookup_kind,
    parse_duration,
    retry_after_from_headers,
    sniff_format,
)
from server.providers.sizing import (
    GEMINI_ASPECT_RATIOS,
    IMAGEN_ASPECT_RATIOS,
    STABILITY_ASPECT_RATIOS,
    XAI_ASPECT_RATIOS,
    bfl_dimensions,
    exact_aspect_ratio,
    nearest_aspect_ratio,
)
from tests.fakes.images import FAKE_PNG, GARBAGE, make_image, with_bad_padding


def test_retry_after_ms_wins_over_retry_after():
    assert retry_after_from_headers(httpx.Headers({"retry-after-ms": "250", "retry-after": "2"})) == 0.25


def test_retry_after_in_seconds_and_fractions():
    assert retry_after_from_headers(httpx.Headers({"retry-after": "2"})) == 2.0
    assert retry_after_from_headers(httpx.Headers({"retry-after": "0.5"})) == 0.5


def test_retry_after_as_an_http_date():
    header = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28.0 <= retry_after_from_headers(httpx.Headers({"retry-after": header})) <= 30.0
    past = email.utils.formatdate(time.time() - 30, usegmt=True)
    assert retry_after_from_headers(httpx.Headers({"retry-after": past})) == 0.0


@pytest.mark.parametrize("headers", [{}, {"retry-after": "soon"}, {"retry-after-ms": "-5"}, {"retry-after": "-1"}])
def test_unusable_hints_are_ignored(headers):
    assert retry_after_from_headers(httpx.Headers(headers)) is None


@pytest.mark.parametrize(("value", "seconds"), [("26s", 26.0), ("12.5s", 12.5), ("45.837906927s", 45.837906927), ("1m", None), (7, None)])
def test_google_durations(value, seconds):
    assert parse_duration(value) == seconds


def test_backoff_is_exponential_capped_and_jittered_down():
    policy = RetryPolicy(base_delay=1.0, max_delay=3.0, jitter=0.25)
    assert 0.75 <= policy.backoff(1) <= 1.0
    assert 1.5 <= policy.backoff(2) <= 2.0
    assert 2.25 <= policy.backoff(5) <= 3.0


def test_base64_is_strict_but_takes_a_data_url():
    raw = make_image("png")
    encoded = base64.b64encode(raw).decode()
    assert decode_base64(encoded) == raw
    assert decode_base64(f"data:image/png;base64,{encoded}") == raw
    for bad in (with_bad_padding(encoded), encoded[:-2], "not base64!", "", None, 42):
        with pytest.raises(UpstreamError) as caught:
            decode_base64(bad)
        assert caught.value.should_retry is False


@pytest.mark.parametrize("fmt", ["png", "jpeg", "webp"])
async def test_real_images_pass_and_report_their_format(fmt):
    data = make_image(fmt, 16, 8)
    assert sniff_format(data) == fmt
    image = await image_from_bytes(data)
    assert (image.format, image.data) == (fmt, data)
    assert (await image_from_base64(base64.b64encode(data).decode())).format == fmt


def _corrupt_png() -> bytes:
    data = bytearray(make_image("png", 64, 64))
    data[60] ^= 0xFF  # inside the first chunk after IHDR: its CRC no longer matches
    return bytes(data)


@pytest.mark.parametrize(
    "data",
    [
        GARBAGE,
        FAKE_PNG,
        make_image("jpeg", 64, 64)[:200],
        make_image("png", 64, 64)[:-20],  # cut before IEND
        make_image("webp", 64, 64)[:-10],  # RIFF length larger than the bytes
        _corrupt_png(),
        b"",
    ],
    ids=["garbage", "fake-png", "truncated-jpeg", "truncated-png", "truncated-webp", "corrupt-png", "empty"],
)
async def test_garbage_and_truncated_images_are_refused(data):
    with pytest.raises(UpstreamError) as caught:
        await image_from_bytes(data)
    assert caught.value.should_retry is False


def test_error_lookup_is_most_specific_first():
    table = {(400, "moderation_blocked"): Kind.CONTENT_POLICY, (None, "API_KEY_INVALID"): Kind.CREDENTIALS,
             (400, None): Kind.REJECTED, (429, "insufficient_quota"): Kind.ACCOUNT}
    assert lookup_kind(table, 400, ["moderation_blocked", "invalid_request_error"]) is Kind.CONTENT_POLICY
    assert lookup_kind(table, 400, [None, "moderation_blocked"]) is Kind.CONTENT_POLICY
    assert lookup_kind(table, 403, ["API_KEY_INVALID"]) is Kind.CREDENTIALS
    assert lookup_kind(table, 400, ["something_else"]) is Kind.REJECTED
    assert lookup_kind(table, 429, ["insufficient_quota"]) is Kind.ACCOUNT
    assert lookup_kind(table, 429, ["rate_limit_exceeded"]) is Kind.RATE_LIMITED
    assert lookup_kind(table, 503, []) is Kind.TRANSIENT
    assert lookup_kind(table, 408, []) is Kind.TRANSIENT
    assert lookup_kind(table, 418, []) is Kind.REJECTED


# The table documented in server/providers/sizing.py, pinned.
SIZE_TABLE = [
    ("256x256", "1:1", "1:1", "1:1", "1:1", (256, 256), "1:1"),
    ("512x512", "1:1", "1:1", "1:1", "1:1", (512, 512), "1:1"),
    ("1024x1024", "1:1", "1:1", "1:1", "1:1", (1024, 1024), "1:1"),
    ("1536x1024", "4:3", "3:2", "3:2", "3:2", (1440, 960), "3:2"),
    ("1024x1536", "3:4", "2:3", "2:3", "2:3", (960, 1440), "2:3"),
    ("1792x1024", "16:9", "16:9", "16:9", "16:9", (1440, 832), "7:4"),
    ("1024x1792", "9:16", "9:16", "9:16", "9:16", (832, 1440), "4:7"),
]


@pytest.mark.parametrize(("size", "imagen", "gemini", "stability", "xai", "bfl", "kontext"), SIZE_TABLE)
def test_the_documented_size_table(size, imagen, gemini, stability, xai, bfl, kontext):
    width, height = (int(x) for x in size.split("x"))
    assert nearest_aspect_ratio(width, height, IMAGEN_ASPECT_RATIOS) == imagen
    assert nearest_aspect_ratio(width, height, GEMINI_ASPECT_RATIOS) == gemini
    assert nearest_aspect_ratio(width, height, STABILITY_ASPECT_RATIOS) == stability
    assert nearest_aspect_ratio(width, height, XAI_ASPECT_RATIOS) == xai
    assert bfl_dimensions(width, height) == bfl
    assert exact_aspect_ratio(width, height) == kontext


def test_kontext_ratios_beyond_21_9_are_clamped():
    assert (exact_aspect_ratio(3000, 1000), exact_aspect_ratio(1000, 3000)) == ("21:9", "9:21")
    assert exact_aspect_ratio(2100, 900) == "7:3"  # exactly 21:9, reduced


def test_bfl_dimensions_stay_within_limits():
    for width, height in [(64, 64), (4096, 256), (3840, 2160), (100, 3000)]:
        w, h = bfl_dimensions(width, height)
        assert w % 32 == 0 and h % 32 == 0 and 256 <= w <= 1440 and 256 <= h <= 1440


def _noisy_png(size: int) -> bytes:
    from PIL import Image

    noise = Image.frombytes("RGB", (size, size), random.Random(size).randbytes(size * size * 3))
    out = io.BytesIO()
    noise.save(out, format="PNG")
    return out.getvalue()


async def test_every_chunk_of_a_large_png_is_checked():
    data = _noisy_png(400)
    assert data.count(b"IDAT") > 3  # several IDAT chunks
    assert (await image_from_bytes(data)).format == "png"
    last_idat = data.rindex(b"IDAT")
    for where in (last_idat + 100, len(data) - 20):  # inside the last IDAT, then inside its CRC
        corrupt = bytearray(data)
        corrupt[where] ^= 0x01
        with pytest.raises(UpstreamError):
            await image_from_bytes(bytes(corrupt))
    with pytest.raises(UpstreamError):
        await image_from_bytes(data[: last_idat + 50])  # cut inside a chunk
