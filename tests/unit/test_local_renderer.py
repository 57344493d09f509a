"""The embedded ``local-1`` renderer: what it encodes, that it is deterministic across
processes, that it paints a picture rather than noise, and the async provider around it
(executor use, ordering, cancellation, failure mapping)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import io
import multiprocessing
import os
import random
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image, ImageChops, ImageStat

from server.errors import InvalidRequestError, ServiceUnavailableError
from server.providers.base import ImageRequest, TokenUsage
from server.providers.local import LocalRenderer, render_image, revised_prompt

REPO_ROOT = Path(__file__).resolve().parents[2]
SIZES = [(256, 256), (512, 512), (1024, 1024), (1536, 1024), (1024, 1536), (1792, 1024), (1024, 1792)]
FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
PROMPT = "a quiet mountain lake at sunset"


def decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def request(**overrides: Any) -> ImageRequest:
    fields: dict[str, Any] = {
        "model_id": "local-1",
        "upstream_model": "local-1",
        "prompt": PROMPT,
        "n": 1,
        "width": 256,
        "height": 256,
        "quality": "medium",
        "output_format": "png",
        "output_compression": 100,
        "style": None,
    }
    fields.update(overrides)
    return ImageRequest(**fields)


def direct(req: ImageRequest, index: int) -> bytes:
    """What the provider should return for one index: the top-level function's bytes."""
    return render_image(
        req.prompt, req.width, req.height, index, req.style, req.quality,
        req.output_format, req.output_compression,
    )


def neighbour_difference(image: Image.Image) -> float:
    """Mean absolute difference between horizontally and vertically adjacent pixels,
    averaged over the channels: about 85 for uniform noise, low for a picture."""
    w, h = image.size
    across = ImageChops.difference(image.crop((0, 0, w - 1, h)), image.crop((1, 0, w, h)))
    down = ImageChops.difference(image.crop((0, 0, w, h - 1)), image.crop((0, 1, w, h)))
    return (sum(ImageStat.Stat(across).mean) + sum(ImageStat.Stat(down).mean)) / 6


class RecordingExecutor(concurrent.futures.ThreadPoolExecutor):
    """A thread pool that remembers what was submitted to it."""

    def __init__(self, max_workers: int) -> None:
        super().__init__(max_workers=max_workers)
        self.submitted: list[concurrent.futures.Future[Any]] = []

    def submit(  # type: ignore[override]
        self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any
    ) -> concurrent.futures.Future[Any]:
        future = super().submit(fn, *args, **kwargs)
        self.submitted.append(future)
        return future


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("fmt", sorted(FORMATS))
@pytest.mark.parametrize(("width", "height"), SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
def test_every_size_and_format_decodes_to_the_requested_image(width: int, height: int, fmt: str) -> None:
    data = render_image(PROMPT, width, height, 0, "vivid", "medium", fmt, 80)

    image = decode(data)

    assert image.format == FORMATS[fmt]
    assert image.size == (width, height)
    assert image.mode == "RGB"


def test_jpeg_output_compression_trades_bytes_for_quality() -> None:
    low = render_image(PROMPT, 512, 512, 0, "vivid", "medium", "jpeg", 10)
    high = render_image(PROMPT, 512, 512, 0, "vivid", "medium", "jpeg", 95)

    assert len(low) < len(high)


def test_webp_output_compression_trades_bytes_for_quality() -> None:
    low = render_image(PROMPT, 512, 512, 0, "vivid", "medium", "webp", 10)
    high = render_image(PROMPT, 512, 512, 0, "vivid", "medium", "webp", 95)

    assert len(low) < len(high)


def test_unknown_output_format_is_refused() -> None:
    with pytest.raises(ValueError, match="gif"):
        render_image(PROMPT, 256, 256, 0, None, "medium", "gif", 100)


# --------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_same_inputs_give_identical_bytes(fmt: str) -> None:
    args = ("snowy forest at night", 512, 512, 2, "natural", "hd", fmt, 70)

    assert render_image(*args) == render_image(*args)


def test_bytes_do_not_depend_on_the_process_hash_seed() -> None:
    """hash() is salted per process; two interpreters with different seeds must agree
    with this one, byte for byte."""
    args = ("desert dunes under a city skyline", 256, 256, 1, "vivid", "high", "png", 100)
    expected = hashlib.sha256(render_image(*args)).hexdigest()
    script = (
        "import hashlib, sys\n"
        "from server.providers.local import render_image\n"
        f"print(hashlib.sha256(render_image(*{args!r})).hexdigest())\n"
    )
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO_ROOT)}
        done = subprocess.run(
            [sys.executable, "-c", script], cwd=REPO_ROOT, env=env, capture_output=True,
            text=True, timeout=120, check=True,
        )
        assert done.stdout.strip() == expected


def test_each_index_is_a_different_picture() -> None:
    pictures = [decode(render_image(PROMPT, 256, 256, i, None, "medium", "png", 100)) for i in range(4)]

    for a in range(len(pictures)):
        for b in range(a + 1, len(pictures)):
            assert ImageChops.difference(pictures[a], pictures[b]).getbbox() is not None


@pytest.mark.parametrize(
    "change",
    [
        {"prompt": "a quiet mountain lake at night"},
        {"style": "natural"},
        {"quality": "low"},
        {"width": 512, "height": 256},
    ],
    ids=["prompt", "style", "quality", "size"],
)
def test_each_input_changes_the_output(change: dict[str, Any]) -> None:
    base = request(style="vivid", quality="high")
    changed = request(**{"style": "vivid", "quality": "high", **change})

    assert direct(changed, 0) != direct(base, 0)


def test_style_natural_is_more_muted_than_vivid() -> None:
    vivid = decode(render_image(PROMPT, 256, 256, 0, "vivid", "medium", "png", 100))
    natural = decode(render_image(PROMPT, 256, 256, 0, "natural", "medium", "png", 100))

    def saturation(image: Image.Image) -> float:
        return ImageStat.Stat(image.convert("HSV").getchannel("S")).mean[0]

    assert saturation(natural) < saturation(vivid) * 0.8


# --------------------------------------------------------------------------- a picture


@pytest.mark.parametrize(
    "prompt",
    [
        "a sunset over the mountains",
        "night city skyline by the ocean",
        "snowy pine forest",
        "desert dunes at noon",
        "a cat wearing a hat",  # no scene words: the abstract landscape
    ],
)
@pytest.mark.parametrize("quality", ["low", "hd"])
def test_output_is_a_picture_not_noise_or_blank(prompt: str, quality: str) -> None:
    image = decode(render_image(prompt, 512, 512, 0, None, quality, "png", 100))
    noise = Image.frombytes("RGB", image.size, random.Random(0).randbytes(512 * 512 * 3))

    colours = image.getcolors(maxcolors=512 * 512)
    assert colours is not None
    assert len(colours) >= 1000  # gradients, shading: far from a flat fill
    assert min(ImageStat.Stat(image).stddev) >= 15  # light and dark regions in every channel
    # Smooth where noise is not: neighbouring pixels mostly agree.
    assert neighbour_difference(image) < 8
    assert neighbour_difference(noise) > 80


def test_sky_is_above_and_land_below() -> None:
    """Daytime prompt: the top rows are sky blue, the bottom rows are darker ground."""
    image = decode(render_image("green hills on a sunny day", 512, 512, 0, "vivid", "medium", "png", 100))
    top = ImageStat.Stat(image.crop((0, 0, 512, 40))).mean
    bottom = ImageStat.Stat(image.crop((0, 440, 512, 480))).mean

    assert top[2] > top[0] + 60  # blue sky
    assert bottom[1] > bottom[2]  # green land
    assert sum(bottom) < sum(top)


# --------------------------------------------------------------------------- revised prompt


def test_revised_prompt_names_what_was_drawn() -> None:
    assert revised_prompt("  misty  forest\nlake at night ", style=None, quality="hd") == (
        "misty forest lake at night \u2014 rendered by local-1 as a vivid night forest lake"
        " landscape, hd detail"
    )
    assert revised_prompt("a cat wearing a hat", style="natural", quality="low") == (
        "a cat wearing a hat \u2014 rendered by local-1 as a natural abstract landscape, low detail"
    )


# --------------------------------------------------------------------------- provider


async def test_generate_on_a_thread_pool_returns_n_images_in_index_order() -> None:
    req = request(n=3, prompt="ocean at sunset", output_format="webp", output_compression=60)
    with RecordingExecutor(max_workers=3) as executor:
        renderer = LocalRenderer(executor)
        result = await renderer.generate(req, deadline=asyncio.get_running_loop().time() + 60)

    assert renderer.name == "local"
    assert len(executor.submitted) == 3  # every render ran on the executor
    assert [image.data for image in result.images] == [direct(req, i) for i in range(3)]
    assert len({image.data for image in result.images}) == 3
    expected_revision = revised_prompt(req.prompt, style=None, quality="medium")
    for image in result.images:
        assert image.format == "webp"
        assert image.content_type == "image/webp"
        assert image.revised_prompt == expected_revision
    assert result.usage == TokenUsage()


async def test_generate_on_a_process_pool() -> None:
    """Spawned workers import the module afresh: the job must pickle by reference."""
    req = request(prompt="forest lake")
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as executor:
        result = await LocalRenderer(executor).generate(
            req, deadline=asyncio.get_running_loop().time() + 120
        )

    assert [image.data for image in result.images] == [direct(req, 0)]


async def test_cancelling_generate_raises_and_drops_queued_renders() -> None:
    req = request(n=6, width=1792, height=1024, quality="hd")
    executor = RecordingExecutor(max_workers=1)
    try:
        task = asyncio.create_task(
            LocalRenderer(executor).generate(req, deadline=asyncio.get_running_loop().time() + 60)
        )
        async with asyncio.timeout(30):
            while not (executor.submitted and executor.submitted[0].running()):
                await asyncio.sleep(0.001)

        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert task.cancelled()
        assert len(executor.submitted) == 6
        # The first render was already running; the five queued behind it never start.
        assert [f.cancelled() for f in executor.submitted[1:]] == [True] * 5
    finally:
        executor.shutdown(wait=True)


async def test_caller_timeout_interrupts_generate() -> None:
    req = request(n=4, width=1792, height=1024)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        renderer = LocalRenderer(executor)
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout_at(loop.time() + 0.01):
                await renderer.generate(req, deadline=loop.time() + 0.01)


async def test_generate_on_a_shut_down_executor_is_service_unavailable() -> None:
    executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    executor.shutdown()

    with pytest.raises(ServiceUnavailableError):
        await LocalRenderer(executor).generate(request(), deadline=asyncio.get_running_loop().time() + 60)


async def test_generate_refuses_a_format_it_cannot_write() -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        with pytest.raises(InvalidRequestError) as caught:
            await LocalRenderer(executor).generate(
                request(output_format="gif"), deadline=asyncio.get_running_loop().time() + 60
            )

    assert caught.value.param == "output_format"


async def test_aclose_leaves_the_executor_to_its_owner() -> None:
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as executor:
        renderer = LocalRenderer(executor)
        await renderer.aclose()

        assert executor.submit(sum, [1, 2]).result(timeout=10) == 3
