"""The embedded ``local-1`` model: a deterministic, offline landscape painter.

Why it exists: the gateway must be able to answer ``/v1/images/generations`` with real
images when there is no network, no GPU and no API key -- in development, in the test
suites (which compare bytes across runs and processes) and as the default model of a
fresh install. So this renderer is:

* offline: Pillow only. It composes simple shapes -- a sky gradient, a sun or moon with
  a glow, soft clouds, layered ridges fading into haze, water with a reflection, trees,
  buildings, dunes -- into something a person would call a picture, and letters the
  prompt's first words in a corner so a picture can be traced back to its request.
* deterministic: the same inputs give byte-identical output in any process, on any day.
  All randomness comes from ``random.Random`` instances seeded with SHA-256 of the
  whitespace-collapsed prompt and the image index, never ``hash()`` (salted per
  process). Size, style, quality and encoding change *how* that scene is drawn, not
  *which* scene it is, so one prompt looks alike at every size; the bytes are still a
  pure function of all eight arguments of ``render_image``.
* cheap: every shape is drawn by Pillow's C code and gradients are one-pixel columns
  stretched with ``resize``; there is no per-pixel Python loop. Painting a 1792x1024
  picture takes well under 0.1 s on one core; PNG encoding (zlib) takes about as long.

A few words in the prompt steer the scene: a time of day (``sunset``, ``night``, ...)
picks the sky, and terrain words (``ocean``, ``lake``, ``forest``, ``mountain``,
``snow``, ``desert``, ``city``) pick what stands under it. Prompts with none of them get
an "abstract" landscape whose colours come from the prompt's SHA-256.

The CPU work is ``render_image``, a top-level function of plain values, so the
composition root may give ``LocalRenderer`` a thread pool or a process pool.

Edits and variations, deterministic and checkable pixel by pixel:

* an edit paints the prompt's composition (the same picture a generation of that prompt
  and size would have) into the first input image: under a mask, exactly where the mask
  is fully transparent, and every other pixel stays exactly as it was; without a mask,
  over the whole picture, blended half and half with it. The other input images appear
  as insets along the bottom of the painted part. With ``size: auto`` the result has the
  first image's size; another size resizes the inputs first.
* variation ``k`` of an image is the image at the requested size, its hue turned by
  ``(k + 1) / 8`` of a circle, mirrored when ``k`` is odd.

Streaming: partial images are the finished picture at increasing detail, coarse to fine:
partial ``k`` is the picture averaged over a grid of ``PARTIAL_GRID_CELLS[k]`` cells along
its short side and scaled back with hard edges (a mosaic), so every partial has the final
composition and the requested size, and a test can compute each one from the final image.
"""

from __future__ import annotations

import asyncio
import colorsys
import concurrent.futures
import hashlib
import io
import json
import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

from PIL import Image, ImageChops, ImageDraw, ImageFilter, ImageFont, ImageOps

from server.errors import InvalidRequestError, ServiceUnavailableError
from server.providers.base import (
    GeneratedImage,
    ImageRequest,
    InputImage,
    Progress,
    ProviderResult,
    TokenUsage,
)

__all__ = [
    "PARTIAL_GRID_CELLS",
    "LocalRenderer",
    "mosaic",
    "render_edit",
    "render_image",
    "render_variation",
    "render_with_partials",
    "revised_prompt",
]

MODEL_ID: Final = "local-1"
OUTPUT_FORMATS: Final = frozenset({"png", "jpeg", "webp"})
# Below this the composition (margins, text band, layered ridges) has no room.
_MIN_SIDE: Final = 16
_MAX_SIDE: Final = 4096
# Cells along the short side of partial image 0, 1, 2: coarse, then finer.
PARTIAL_GRID_CELLS: Final = (12, 48, 192)

Color = tuple[float, float, float]  # r, g, b in 0..1; converted to bytes only when drawn
RGB = tuple[int, int, int]
Point = tuple[float, float]

# Prompt words -> the scene keyword they stand for. Read-only: shared by every render.
_KEYWORDS: Final = MappingProxyType(
    {
        **dict.fromkeys(
            ("sunset", "sunsets", "sunrise", "dusk", "dawn", "twilight", "evening"), "sunset"
        ),
        **dict.fromkeys(
            ("night", "nights", "midnight", "moon", "moonlit", "moonlight", "stars",
             "starry", "starlit", "nocturnal"),
            "night",
        ),
        **dict.fromkeys(("day", "daytime", "noon", "morning", "sunny", "daylight"), "day"),
        **dict.fromkeys(
            ("ocean", "oceans", "sea", "seas", "seaside", "beach", "coast", "coastal",
             "waves", "harbor", "harbour"),
            "ocean",
        ),
        **dict.fromkeys(
            ("lake", "lakes", "river", "rivers", "pond", "reflection", "fjord", "lagoon"),
            "lake",
        ),
        **dict.fromkeys(
            ("forest", "forests", "woods", "woodland", "tree", "trees", "pine", "pines",
             "jungle", "taiga"),
            "forest",
        ),
        **dict.fromkeys(
            ("mountain", "mountains", "peak", "peaks", "alps", "alpine", "summit",
             "volcano", "cliffs"),
            "mountain",
        ),
        **dict.fromkeys(
            ("hill", "hills", "meadow", "meadows", "valley", "countryside", "field",
             "fields", "grassland", "prairie"),
            "hills",
        ),
        **dict.fromkeys(
            ("snow", "snowy", "winter", "ice", "icy", "glacier", "frozen", "snowfall",
             "arctic"),
            "snow",
        ),
        **dict.fromkeys(
            ("desert", "deserts", "dune", "dunes", "sand", "sandy", "sahara", "canyon",
             "cactus"),
            "desert",
        ),
        **dict.fromkeys(
            ("city", "cities", "skyline", "town", "urban", "buildings", "downtown",
             "metropolis", "skyscraper", "skyscrapers"),
            "city",
        ),
    }
)
_TIMES: Final = ("day", "sunset", "night")
# 0 = low, 1 = medium/standard, 2 = high/hd. Unknown qualities render at the middle level
# rather than failing: quality only changes how busy the picture is.
_DETAIL: Final = MappingProxyType({"low": 0, "medium": 1, "standard": 1, "high": 2, "hd": 2})


@dataclass(frozen=True, slots=True)
class _Scene:
    """What the prompt asked for, in the renderer's vocabulary."""

    keywords: tuple[str, ...]  # in order of first mention, for the revised prompt
    time: str | None
    terrain: frozenset[str]

    @property
    def label(self) -> str:
        """'night lake', 'forest', 'abstract': the time of day first, then the land."""
        words = ([self.time] if self.time else []) + [k for k in self.keywords if k not in _TIMES]
        return " ".join(words) if words else "abstract"


@dataclass(frozen=True, slots=True)
class _Palette:
    sky_top: Color
    sky_mid: Color
    sky_horizon: Color
    light: Color  # the sun's or moon's disc
    glow: Color
    glow_alpha: float
    cloud_lit: Color
    cloud_shade: Color
    land: Color  # the ground of the dominant terrain, already darkened for the time
    rock: Color  # far mountains
    tree: Color
    snow: Color
    water: Color
    building: Color
    window: Color
    lit_windows: float  # share of windows with a light on
    window_glow: bool  # windows lit from inside (dusk, night) rather than reflecting the sky


# --------------------------------------------------------------------------- colours


def _hsl(h: float, s: float, l: float) -> Color:
    return colorsys.hls_to_rgb(h % 1.0, min(1.0, max(0.0, l)), min(1.0, max(0.0, s)))


def _mix(a: Color, b: Color, t: float) -> Color:
    return (a[0] + (b[0] - a[0]) * t, a[1] + (b[1] - a[1]) * t, a[2] + (b[2] - a[2]) * t)


def _scale(c: Color, k: float) -> Color:
    return (c[0] * k, c[1] * k, c[2] * k)


def _rotate_hue(c: Color, turn: float) -> Color:
    h, l, s = colorsys.rgb_to_hls(*c)
    return colorsys.hls_to_rgb((h + turn) % 1.0, l, s)


def _styler(style: str | None) -> Callable[[Color], RGB]:
    """Maps palette colours to bytes; the style is a global saturation/contrast knob so
    every element of the picture shifts together."""
    natural = style == "natural"

    def to_rgb(c: Color) -> RGB:
        h, l, s = colorsys.rgb_to_hls(
            min(1.0, max(0.0, c[0])), min(1.0, max(0.0, c[1])), min(1.0, max(0.0, c[2]))
        )
        if natural:
            s *= 0.6
            l = 0.5 + (l - 0.5) * 0.88
        else:  # vivid, and OpenAI's default when no style is given
            s = min(1.0, s * 1.2)
        r, g, b = colorsys.hls_to_rgb(h, l, s)
        return (round(r * 255), round(g * 255), round(b * 255))

    return to_rgb


# --------------------------------------------------------------------------- prompt


def _collapse(prompt: str) -> str:
    return " ".join(prompt.split())


def _interpret(prompt: str) -> _Scene:
    keywords: list[str] = []
    for word in re.findall(r"[a-z]+", prompt.lower()):
        keyword = _KEYWORDS.get(word)
        if keyword is not None and keyword not in keywords:
            keywords.append(keyword)
    time = next((k for k in keywords if k in _TIMES), None)
    return _Scene(tuple(keywords), time, frozenset(k for k in keywords if k not in _TIMES))


def revised_prompt(prompt: str, *, style: str | None, quality: str) -> str:
    """What ``local-1`` made of the prompt; the same for every image of a request."""
    text = _collapse(prompt)
    scene = _interpret(text)
    return (
        f"{text} \u2014 rendered by {MODEL_ID} as a {style or 'vivid'} {scene.label} "
        f"landscape, {quality} detail"
    )


# --------------------------------------------------------------------------- randomness


def _streams(prompt: str, index: int) -> Callable[[str], random.Random]:
    """One independent generator per picture element, so that drawing more clouds at
    high quality does not move the mountains: each element's draws stay the same."""
    root = hashlib.sha256(json.dumps([MODEL_ID, prompt, index]).encode()).digest()

    def stream(label: str) -> random.Random:
        digest = hashlib.sha256(root + label.encode()).digest()
        return random.Random(int.from_bytes(digest, "big"))

    return stream


def _pick(rng: random.Random, weighted: Sequence[tuple[str, float]]) -> str:
    roll = rng.random() * sum(w for _, w in weighted)
    for value, weight in weighted:
        roll -= weight
        if roll < 0:
            return value
    return weighted[-1][0]


# --------------------------------------------------------------------------- palette


def _palette(scene: _Scene, time: str, rng: random.Random) -> _Palette:
    j = rng.uniform(-0.03, 0.03)  # small hue drift so repeated images are not clones
    if time == "day":
        sky = (_hsl(0.61 + j, 0.70, 0.45), _hsl(0.58 + j, 0.65, 0.66), _hsl(0.55 + j, 0.50, 0.86))
        light, glow, glow_alpha = _hsl(0.14, 1.0, 0.95), _hsl(0.13, 1.0, 0.88), 0.55
        cloud_lit, cloud_shade = (1.0, 1.0, 1.0), _hsl(0.60 + j, 0.20, 0.80)
        tint, darkness = _hsl(0.6, 0.3, 0.3), 0.0
        snow, window, lit = _hsl(0.60, 0.35, 0.95), _hsl(0.57, 0.35, 0.72), 0.45
    elif time == "sunset":
        sky = (_hsl(0.70 + j, 0.55, 0.26), _hsl(0.93 + j, 0.60, 0.55), _hsl(0.08 + j, 0.95, 0.63))
        light, glow, glow_alpha = _hsl(0.12, 1.0, 0.82), _hsl(0.08, 1.0, 0.66), 0.7
        cloud_lit, cloud_shade = _hsl(0.06 + j, 0.95, 0.72), _hsl(0.88 + j, 0.35, 0.45)
        tint, darkness = _hsl(0.76 + j, 0.40, 0.16), 0.82
        snow, window, lit = _hsl(0.95, 0.60, 0.82), _hsl(0.12, 0.95, 0.66), 0.3
    else:
        sky = (_hsl(0.66 + j, 0.65, 0.05), _hsl(0.64 + j, 0.55, 0.13), _hsl(0.58 + j, 0.45, 0.28))
        light, glow, glow_alpha = _hsl(0.14, 0.35, 0.92), _hsl(0.60, 0.45, 0.70), 0.45
        cloud_lit, cloud_shade = _hsl(0.62, 0.15, 0.36), _hsl(0.65, 0.25, 0.16)
        tint, darkness = _hsl(0.64 + j, 0.35, 0.09), 0.8
        snow, window, lit = _hsl(0.62, 0.25, 0.55), _hsl(0.13, 0.95, 0.66), 0.4

    terrain = scene.terrain
    if "snow" in terrain:
        land_day = _hsl(0.60, 0.25, 0.88)
    elif "desert" in terrain:
        land_day = _hsl(0.09 + j, 0.60, 0.60)
    elif "forest" in terrain:
        land_day = _hsl(0.36 + j, 0.45, 0.27)
    elif "city" in terrain:
        land_day = _hsl(0.30 + j, 0.25, 0.30)
    else:
        land_day = _hsl(0.28 + j, 0.42, 0.40)
    # Snow stays pale at dusk; everything else sinks into silhouette.
    land = _mix(land_day, tint, darkness * (0.6 if "snow" in terrain else 1.0))
    rock = _mix(_hsl(0.62, 0.15, 0.45), tint, darkness)
    tree = _mix(_hsl(0.38 + j, 0.50, 0.20), tint, darkness)
    water_day = _hsl(0.56, 0.60, 0.36) if "ocean" in terrain else _hsl(0.52, 0.45, 0.36)
    water = _mix(water_day, tint, darkness * 0.8)
    building = _mix(_hsl(0.60, 0.12, 0.40), tint, darkness * 0.9)

    if not scene.keywords:
        # No words to go by: turn the whole palette by a prompt-chosen angle, which gives
        # the "abstract" scenes their own colours (teal skies, violet hills, ...).
        turn = rng.uniform(-0.2, 0.2)
        sky = (_rotate_hue(sky[0], turn), _rotate_hue(sky[1], turn), _rotate_hue(sky[2], turn))
        land, rock, tree, water = (_rotate_hue(c, turn) for c in (land, rock, tree, water))
    return _Palette(
        sky_top=sky[0], sky_mid=sky[1], sky_horizon=sky[2], light=light, glow=glow,
        glow_alpha=glow_alpha, cloud_lit=cloud_lit, cloud_shade=cloud_shade, land=land,
        rock=rock, tree=tree, snow=snow, water=water, building=building, window=window,
        lit_windows=lit, window_glow=time != "day",
    )


# --------------------------------------------------------------------------- drawing


@dataclass(slots=True)
class _Canvas:
    image: Image.Image
    draw: ImageDraw.ImageDraw
    width: int
    height: int
    rgb: Callable[[Color], RGB]

    @property
    def short(self) -> int:
        """Element sizes follow the short side so portrait and landscape both fit."""
        return min(self.width, self.height)


def _gradient(size: tuple[int, int], top: RGB, bottom: RGB) -> Image.Image:
    # A 1-pixel column blended in C, then stretched: no per-pixel Python work.
    w, h = size
    ramp = Image.linear_gradient("L").resize((1, h), Image.Resampling.BILINEAR)
    column = Image.composite(Image.new("RGB", (1, h), bottom), Image.new("RGB", (1, h), top), ramp)
    return column.resize((w, h), Image.Resampling.NEAREST)


def _smoothstep(t: float) -> float:
    t = min(1.0, max(0.0, t))
    return t * t * (3.0 - 2.0 * t)


def _sky_color(p: _Palette, y: float, horizon: float) -> Color:
    t = y / max(1.0, horizon)
    if t < 0.55:
        return _mix(p.sky_top, p.sky_mid, _smoothstep(t / 0.55))
    return _mix(p.sky_mid, p.sky_horizon, _smoothstep((t - 0.55) / 0.45))


def _sky(
    size: tuple[int, int], p: _Palette, horizon: float, rgb: Callable[[Color], RGB]
) -> Image.Image:
    """The canvas itself, starting as the sky: one colour per row, stretched sideways."""
    width, height = size
    # 128 samples interpolated in C are indistinguishable from one per row, and cheaper.
    samples = min(height, 128)
    column = bytearray()
    for k in range(samples):
        column += bytes(rgb(_sky_color(p, k * (height - 1) / max(1, samples - 1), horizon)))
    strip = Image.frombytes("RGB", (1, samples), bytes(column))
    strip = strip.resize((1, height), Image.Resampling.BILINEAR)
    return strip.resize(size, Image.Resampling.NEAREST)


def _radial_mask(
    c: _Canvas, cx: float, cy: float, diameter: float, curve: Callable[[float], float]
) -> tuple[tuple[int, int, int, int], Image.Image] | None:
    """A round mask whose value at relative radius r (0 centre, 1 rim) is curve(r),
    clipped to the canvas: (box, mask), or None when it falls off the canvas."""
    left, top = cx - diameter / 2, cy - diameter / 2
    x0, y0 = max(0, math.floor(left)), max(0, math.floor(top))
    x1, y1 = min(c.width, math.ceil(left + diameter)), min(c.height, math.ceil(top + diameter))
    if x1 <= x0 or y1 <= y0:
        return None
    # radial_gradient is 256x256 with value = 255 * distance / 181 (its corner distance).
    lut = [max(0, min(255, round(255 * curve(v * 181.02 / 255 / 128)))) for v in range(256)]
    k = 256 / diameter
    # Only the visible part of the ramp is stretched: a sunset glow can outgrow the canvas.
    src = (
        max(0.0, (x0 - left) * k), max(0.0, (y0 - top) * k),
        min(256.0, (x1 - left) * k), min(256.0, (y1 - top) * k),
    )
    ramp = Image.radial_gradient("L").resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR, box=src)
    return (x0, y0, x1, y1), ramp.point(lut)


def _paint_light(
    c: _Canvas, p: _Palette, time: str, horizon: float, rng: random.Random
) -> tuple[float, float, float]:
    """The sun (or moon) with its glow; returns (x, y, radius) for the water's glitter."""
    m = c.short
    x = c.width * rng.uniform(0.18, 0.82)
    if time == "sunset":
        r = m * rng.uniform(0.07, 0.10)
        y = horizon - rng.uniform(0.35, 1.6) * r - c.height * 0.04
        spread = 9.0
    elif time == "night":
        r = m * rng.uniform(0.035, 0.055)
        y = horizon * rng.uniform(0.18, 0.45)
        spread = 7.0
    else:
        r = m * rng.uniform(0.045, 0.065)
        y = horizon * rng.uniform(0.18, 0.5)
        spread = 7.0
    glow_alpha = p.glow_alpha
    glow = _radial_mask(c, x, y, 2 * r * spread, lambda d: glow_alpha * max(0.0, 1.0 - d) ** 2.4)
    if glow is not None:
        c.image.paste(c.rgb(p.glow), *glow)

    # The disc is a thresholded ramp too: the stretched ramp gives a soft, anti-aliased
    # rim that ImageDraw.ellipse would not.
    size = 2 * r + 4
    edge, rim = 1.5 / size, r / (size / 2)
    disc = _radial_mask(c, x, y, size, lambda d: min(1.0, max(0.0, (rim - d) / edge + 0.5)))
    if disc is not None:
        box, mask = disc
        if time == "night":
            # A crescent: the disc minus itself shifted, so the dark side shows the sky.
            bite = Image.new("L", mask.size, 0)
            shift = round(r * rng.uniform(0.45, 0.8))
            bite.paste(mask, (shift, -round(shift * 0.35)))
            mask = ImageChops.subtract(mask, bite)
        c.image.paste(c.rgb(p.light), box, mask)
    return x, y, r


def _paint_stars(c: _Canvas, p: _Palette, horizon: float, detail: int, rng: random.Random) -> None:
    band = horizon * 0.85
    count = round(c.width * band / (5200, 2600, 1300)[detail])
    for _ in range(count):
        x, y = rng.random() * c.width, rng.random() ** 1.4 * band  # thinner near the horizon
        colour = c.rgb(_mix(_sky_color(p, y, horizon), (1.0, 1.0, 0.95), rng.uniform(0.35, 1.0)))
        if rng.random() < 0.08:
            s = max(1.0, c.short / 700)
            c.draw.ellipse((x - s, y - s, x + s, y + s), fill=colour)
        else:
            c.draw.point((x, y), fill=colour)


def _paint_clouds(
    c: _Canvas, p: _Palette, time: str, horizon: float, detail: int, rng: random.Random
) -> None:
    count = (2, 4, 7)[detail] + int(rng.random() * 3)
    if time == "night":
        count //= 2
    if count == 0 or horizon < 16:
        return
    # Drawn at half size, blurred and stretched back: soft edges for little work.
    f = 2
    w, h = max(1, c.width // f), max(1, round(horizon) // f)
    body = Image.new("L", (w, h), 0)
    light = Image.new("L", (w, h), 0)
    db, dl = ImageDraw.Draw(body), ImageDraw.Draw(light)
    opacity = 150 if time == "night" else 230  # night clouds are thin veils
    for _ in range(count):
        cw = w * rng.uniform(0.12, 0.28)
        cx = rng.uniform(-0.1, 1.1) * w
        base = h * rng.uniform(0.15, 0.75)
        for _ in range(5 + int(rng.random() * 5)):
            ex = cx + rng.uniform(-0.5, 0.5) * cw
            centre = 1.0 - abs(ex - cx) / cw  # taller puffs in the middle
            rx = cw * rng.uniform(0.12, 0.22)
            ry = rx * rng.uniform(0.55, 0.8) * (0.6 + centre)
            ey = base - ry * 0.55
            db.ellipse((ex - rx, ey - ry, ex + rx, base), fill=opacity)
            # The lit part: the same puff raised, so the shade gathers underneath.
            lift = ry * 0.35
            dl.ellipse((ex - rx * 0.9, ey - ry - lift, ex + rx * 0.9, base - lift * 1.6), fill=255)
    blur = ImageFilter.GaussianBlur(max(0.5, 1.2 * min(1.0, c.short / 768)))
    body, light = body.filter(blur), light.filter(blur)
    bbox = body.getbbox()
    if bbox is None:
        return
    # Only the rows and columns that hold clouds are stretched and pasted.
    x0, y0 = bbox[0] * f, bbox[1] * f
    x1, y1 = min(c.width, bbox[2] * f), min(round(horizon), bbox[3] * f)
    if x1 <= x0 or y1 <= y0:
        return
    size, src = (x1 - x0, y1 - y0), (bbox[0], bbox[1], x1 / f, y1 / f)
    body = body.resize(size, Image.Resampling.BILINEAR, box=src)
    light = light.resize(size, Image.Resampling.BILINEAR, box=src)
    c.image.paste(c.rgb(p.cloud_shade), (x0, y0, x1, y1), body)
    c.image.paste(c.rgb(p.cloud_lit), (x0, y0, x1, y1), ImageChops.multiply(body, light))


@dataclass(frozen=True, slots=True)
class _Ridge:
    """A skyline sampled at evenly spaced x; y grows downwards like image rows."""

    ys: tuple[float, ...]
    step: float

    def at(self, x: float) -> float:
        i = min(len(self.ys) - 2, max(0, int(x / self.step)))
        t = min(1.0, max(0.0, x / self.step - i))
        return self.ys[i] + (self.ys[i + 1] - self.ys[i]) * t

    def points(self) -> list[Point]:
        return [(i * self.step, y) for i, y in enumerate(self.ys)]


def _segments(width: int) -> int:
    # About 6 px per segment: jagged enough to read as rock, few enough to stay cheap.
    return 2 ** max(4, min(9, round(math.log2(max(16, width) / 6))))


def _fractal(rng: random.Random, segments: int, roughness: float) -> list[float]:
    """Midpoint displacement, normalised to 0..1 (1 = highest)."""
    vals = [0.0] * (segments + 1)
    vals[0], vals[-1] = rng.random(), rng.random()
    step, amp = segments, 0.7
    while step > 1:
        half = step // 2
        for i in range(half, segments, step):
            vals[i] = (vals[i - half] + vals[i + half]) / 2 + rng.uniform(-amp, amp)
        step, amp = half, amp * roughness
    lo, hi = min(vals), max(vals)
    return [(v - lo) / (hi - lo or 1.0) for v in vals]


def _waves(rng: random.Random, segments: int) -> list[float]:
    """A sum of three sines: rolling hills and dunes, smoother than _fractal."""
    parts = [
        (rng.uniform(0.6, 1.4), rng.random() * math.tau, 1.0),
        (rng.uniform(1.6, 3.0), rng.random() * math.tau, 0.4),
        (rng.uniform(3.5, 6.0), rng.random() * math.tau, 0.12),
    ]
    total = sum(a for _, _, a in parts)
    def height(u: float) -> float:
        return 0.5 + 0.5 * sum(a * math.sin(math.tau * f * u + ph) for f, ph, a in parts) / total

    return [height(i / segments) for i in range(segments + 1)]


def _ridge(
    c: _Canvas, heights: Sequence[float], base: float, amp: float, floor: float = 0.0
) -> _Ridge:
    """Heights (0..1) standing on `base`, the highest reaching `amp` above it; `floor`
    lifts the lowest dips so a range never sinks to its base line."""
    step = c.width / (len(heights) - 1)
    return _Ridge(tuple(base - amp * (floor + (1 - floor) * v) for v in heights), step)


def _fill_ridge(
    c: _Canvas, ridge: _Ridge, top: Color, bottom: Color, floor: float | None = None
) -> None:
    """Fills under the ridge with a vertical gradient, lighter at the crest like air
    between the viewer and the land. The gradient always runs to the canvas bottom;
    ``floor`` only says where to stop painting because nearer land covers the rest."""
    high = max(0, math.floor(min(ridge.ys)))
    low = c.height if floor is None else max(high, min(c.height, math.ceil(floor) + 1))
    if low <= high:
        return
    reach = (low - high) / (c.height - high)
    pts = [(x, y - high) for x, y in ridge.points()]
    pts += [(c.width, low - high), (0, low - high)]
    mask = Image.new("L", (c.width, low - high), 0)
    ImageDraw.Draw(mask).polygon(pts, fill=255)
    shade = _gradient((c.width, low - high), c.rgb(top), c.rgb(_mix(top, bottom, reach)))
    c.image.paste(shade, (0, high), mask)


def _snow_caps(c: _Canvas, ridge: _Ridge, colour: Color, depth: float, rng: random.Random) -> None:
    # Snow from the crest down to a wavy snowline, never deeper than `depth`, so only
    # the peaks above the line turn white.
    snowline = min(ridge.ys) + (max(ridge.ys) - min(ridge.ys)) * rng.uniform(0.35, 0.6)
    top = ridge.points()
    wave = _waves(rng, len(top) - 1)
    bottom = [
        (x, max(y, min(snowline + (w - 0.5) * depth * 0.6, y + depth)))
        for (x, y), w in zip(top, wave, strict=True)
    ]
    c.draw.polygon(top + bottom[::-1], fill=c.rgb(colour))


def _conifer(c: _Canvas, x: float, ground: float, h: float, colour: RGB) -> None:
    trunk = max(1.0, h * 0.05)
    c.draw.rectangle((x - trunk, ground - h * 0.25, x + trunk, ground), fill=colour)
    for k in range(3):
        apex = ground - h + k * h * 0.22
        half = h * (0.15 + 0.07 * k)
        base = apex + h * 0.45
        c.draw.polygon([(x, apex), (x + half, base), (x - half, base)], fill=colour)


def _round_tree(c: _Canvas, x: float, ground: float, h: float, colour: RGB, trunk: RGB) -> None:
    tw = max(1.0, h * 0.05)
    c.draw.rectangle((x - tw, ground - h * 0.5, x + tw, ground), fill=trunk)
    r = h * 0.3
    c.draw.ellipse((x - r, ground - h, x + r, ground - h + 2 * r), fill=colour)


def _plant_trees(
    c: _Canvas, ridge: _Ridge, colour: Color, height: float, spacing: float, rng: random.Random,
    *, conifers: bool, x_range: tuple[float, float] | None = None,
) -> None:
    lo, hi = x_range or (0.0, float(c.width))
    x = lo + rng.random() * spacing
    fill = c.rgb(colour)
    trunk = c.rgb(_scale(colour, 0.7))
    while x < hi:
        h = height * rng.uniform(0.6, 1.3)
        ground = ridge.at(x) + h * 0.12  # roots below the crest, not floating on it
        if conifers:
            _conifer(c, x, ground, h, fill)
        else:
            _round_tree(c, x, ground, h, fill, trunk)
        x += spacing * rng.uniform(0.4, 1.6)


def _paint_city(c: _Canvas, p: _Palette, base: float, detail: int, rng: random.Random) -> None:
    m, W = c.short, c.width
    haze = p.sky_horizon
    for row, (haze_k, tall) in enumerate(((0.5, 1.25), (0.0, 1.0))):
        colour = _mix(p.building, haze, haze_k)
        fill = c.rgb(colour)
        ground = base + row * c.height * 0.012
        x = -rng.random() * m * 0.05
        while x < W:
            bw = m * rng.uniform(0.04, 0.09)
            bh = c.height * rng.uniform(0.05, 0.2) * tall
            if rng.random() < 0.15:
                bh *= 1.7  # the odd tower breaks the skyline
            top = ground - bh
            c.draw.rectangle((x, top, x + bw, ground), fill=fill)
            if bh > c.height * 0.25:
                mast = (x + bw / 2, top, x + bw / 2, top - bh * 0.12)
                c.draw.line(mast, fill=fill, width=max(1, round(m / 400)))
            # Lit windows are what makes a city at night; by day they are only detail.
            if row == 1 and (detail > 0 or p.window_glow):
                cell = max(3.0, m / (50, 70, 95)[detail])
                win = c.rgb(p.window)
                cols = max(1, int((bw - cell * 0.5) / cell))
                rows = max(1, int((bh - cell) / cell))
                pad = (bw - cols * cell) / 2
                for r in range(rows):
                    wy = top + cell * 0.6 + r * cell
                    for k in range(cols):
                        if rng.random() < p.lit_windows:
                            wx = x + pad + k * cell + cell * 0.25
                            c.draw.rectangle((wx, wy, wx + cell * 0.5, wy + cell * 0.45), fill=win)
            x += bw + m * rng.uniform(0.0, 0.012)


def _paint_water(
    c: _Canvas, p: _Palette, horizon: float, ocean: bool, light: tuple[float, float, float] | None,
    detail: int, rng: random.Random,
) -> None:
    top_y = round(horizon)
    depth = c.height - top_y
    if depth <= 0:
        return
    surface = _mix(p.water, p.sky_horizon, 0.45)
    water = _gradient((c.width, depth), c.rgb(surface), c.rgb(_scale(p.water, 0.7)))
    # The reflection: whatever stands above the waterline, upside down and tinted.
    mirror = min(top_y, depth)
    if mirror > 0:
        above = c.image.crop((0, top_y - mirror, c.width, top_y))
        flipped = above.transpose(Image.Transpose.FLIP_TOP_BOTTOM)
        # Still water mirrors nearly all of it; open sea only what is near the horizon.
        near, far = (0.45, 0.0) if ocean else (0.65, 0.35)
        fade = Image.linear_gradient("L").resize((1, mirror), Image.Resampling.BILINEAR)
        fade = fade.point([round(255 * (near + (far - near) * v / 255)) for v in range(256)])
        fade = fade.resize((c.width, mirror), Image.Resampling.NEAREST)
        water.paste(flipped, (0, 0), fade)
    c.image.paste(water, (0, top_y))

    m = c.short
    thick = max(1, round(m / 600))
    if ocean:
        edge = c.rgb(_mix(p.sky_horizon, (1, 1, 1), 0.3))
        c.draw.line((0, top_y, c.width, top_y), fill=edge, width=thick)
    if light is not None:
        lx, ly, lr = light
        if ly < horizon:
            # Glitter: the light's path on the water widens towards the viewer.
            glint = c.rgb(_mix(p.light, p.water, 0.25))
            y = horizon + thick * 2
            while y < c.height:
                t = (y - horizon) / depth
                half = lr * (0.4 + 1.6 * t) * rng.uniform(0.2, 1.0)
                dx = rng.uniform(-0.3, 0.3) * lr
                c.draw.line((lx + dx - half, y, lx + dx + half, y), fill=glint, width=thick)
                y += thick * (2 + 6 * t) * rng.uniform(1.0, 2.5)
    # Ripples: short lines that grow and spread out towards the viewer.
    count = round((30, 70, 140)[detail] * c.width * depth / (1024 * 400))
    light_line = c.rgb(_mix(surface, (1, 1, 1), 0.25))
    dark_line = c.rgb(_mix(surface, _scale(p.water, 0.7), 0.6))
    for _ in range(count):
        t = rng.random() ** 1.5
        y = horizon + 2 + t * (depth - 3)
        half = c.width * rng.uniform(0.005, 0.03) * (0.3 + t)
        x = rng.random() * c.width
        ink = light_line if rng.random() < 0.6 else dark_line
        c.draw.line((x - half, y, x + half, y), fill=ink, width=thick)


def _cactus(c: _Canvas, x: float, ground: float, h: float, colour: RGB) -> None:
    w = max(2.0, h * 0.14)
    c.draw.rounded_rectangle((x - w / 2, ground - h, x + w / 2, ground), radius=w / 2, fill=colour)
    for side, at, up in ((-1, 0.45, 0.3), (1, 0.6, 0.25)):
        arm_x = x + side * w * 1.4
        y0 = ground - h * at
        elbow = (min(x, arm_x) - w * 0.3, y0 - w * 0.6, max(x, arm_x) + w * 0.3, y0)
        c.draw.rounded_rectangle(elbow, radius=w * 0.3, fill=colour)
        arm = (arm_x - w * 0.4, y0 - h * up - w * 0.4, arm_x + w * 0.4, y0)
        c.draw.rounded_rectangle(arm, radius=w * 0.4, fill=colour)


def _paint_snowfall(c: _Canvas, p: _Palette, detail: int, rng: random.Random) -> None:
    flake = c.rgb(_mix(p.snow, (1, 1, 1), 0.5))
    count = round((0, 60, 160)[detail] * c.width * c.height / (1024 * 1024))
    for _ in range(count):
        x, y = rng.random() * c.width, rng.random() * c.height
        s = c.short * rng.uniform(0.0015, 0.004)
        c.draw.ellipse((x - s, y - s, x + s, y + s), fill=flake)


def _load_font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError, AttributeError, TypeError):
        # Without FreeType (or on an old Pillow) there is only the fixed bitmap font.
        return ImageFont.load_default()


def _letter_prompt(c: _Canvas, prompt: str) -> None:
    """Writes the prompt's first words bottom-left, on a dark band so they stay legible
    whatever the picture behind them is."""
    m = c.short
    size = max(11, round(m / 48))
    font = _load_font(size)
    words = prompt.split()
    text = "".join(ch for ch in " ".join(words[:8]) if ch.isprintable())[:80]
    truncated = len(words) > 8 or len(" ".join(words[:8])) > 80
    ellipsis = "\u2026"
    if not isinstance(font, ImageFont.FreeTypeFont):
        # The bitmap font is Latin-1 only.
        text = text.encode("latin-1", "replace").decode("latin-1")
        ellipsis = "..."
    text = text.strip()
    if not text:
        return
    pad, margin = max(3, size // 3), max(4, round(m / 64))
    room = c.width - 2 * margin - 2 * pad
    shown = text + (ellipsis if truncated else "")
    while c.draw.textlength(shown, font=font) > room and len(text) > 1:
        text = text[:-1].rstrip()
        shown = text + ellipsis
    if c.draw.textlength(shown, font=font) > room:
        return
    # Band height from fixed letters, so it does not jump with the prompt's letters.
    _, t, _, b = c.draw.textbbox((0, 0), "Ag", font=font)
    band_h = round(b - t) + 2 * pad
    band_w = round(c.draw.textlength(shown, font=font)) + 2 * pad
    box = (margin, c.height - margin - band_h, margin + band_w, c.height - margin)
    band = Image.new("L", (band_w, band_h), 0)
    ImageDraw.Draw(band).rounded_rectangle((0, 0, band_w - 1, band_h - 1), radius=pad, fill=120)
    c.image.paste((0, 0, 0), box, band)
    c.draw.text((box[0] + pad, box[1] + pad - t), shown, font=font, fill=(245, 245, 245))


def _paint(
    prompt: str, width: int, height: int, index: int, style: str | None, quality: str
) -> Image.Image:
    text = _collapse(prompt)
    scene = _interpret(text)
    stream = _streams(text, index)
    detail = _DETAIL.get(quality, 1)
    terrain = scene.terrain
    choose = stream("scene")
    time = scene.time or _pick(choose, (("day", 0.6), ("sunset", 0.28), ("night", 0.12)))
    p = _palette(scene, time, choose)
    water = "ocean" in terrain or "lake" in terrain
    ocean = "ocean" in terrain
    mountains = bool(terrain & {"mountain", "snow"}) or (not terrain and choose.random() < 0.4)
    if ocean and not mountains:
        horizon_at = choose.uniform(0.5, 0.58)
    else:
        # Portraits get a lower horizon: their extra height is sky, not foreground.
        horizon_at = choose.uniform(0.58, 0.66) if width >= height else choose.uniform(0.62, 0.7)

    rgb = _styler(style)
    image = _sky((width, height), p, horizon_at * height, rgb)
    c = _Canvas(image, ImageDraw.Draw(image), width, height, rgb)
    m, W, H = c.short, width, height
    horizon = horizon_at * H
    segments = _segments(W)
    haze = p.sky_horizon

    if time == "night":
        _paint_stars(c, p, horizon, detail, stream("stars"))
    light = _paint_light(c, p, time, horizon, stream("light"))
    _paint_clouds(c, p, time, horizon, detail, stream("clouds"))

    # Ridges are made before anything is filled so each layer knows the lowest point of
    # the one in front of it: below that it is hidden, and not compositing it there
    # saves most of the drawing time.
    near = stream("near")
    near_layers: list[tuple[_Ridge, float]] = []
    if not water:
        count = 2 + (detail == 2)
        ground = H - horizon
        for i in range(count):
            t = (i + 1) / count
            amp = ground * (0.35 - 0.12 * t) * near.uniform(0.8, 1.2)
            base = horizon + ground * (0.12 + 0.6 * t)
            near_layers.append((_ridge(c, _waves(near, segments), base, amp), t))
    far_floor = max(near_layers[0][0].ys) if near_layers else horizon + 2

    # Far land: everything that stands on the horizon, fading into the haze with distance.
    far = stream("far")
    if mountains:
        count = 2 + detail
        ranges: list[tuple[_Ridge, float, float]] = []
        for i in range(count):
            t = i / count
            amp = min(H * 0.45, W * 0.32) * (0.95 - 0.4 * t) * far.uniform(0.85, 1.1)
            heights = _fractal(far, segments, far.uniform(0.45, 0.55))
            ranges.append((_ridge(c, heights, horizon + t * H * 0.02, amp, 0.15), t, amp))
        for i, (ridge, t, amp) in enumerate(ranges):
            colour = _mix(p.rock, haze, 0.7 * (1 - t) + 0.05)
            floor = max(ranges[i + 1][0].ys) if i + 1 < count else far_floor
            _fill_ridge(c, ridge, _mix(colour, haze, 0.2), colour, floor)
            if "snow" in terrain or (i == 0 and far.random() < 0.7):
                _snow_caps(c, ridge, _mix(p.snow, haze, 0.35 * (1 - t)), amp * 0.35, far)
    elif ocean:
        if far.random() < 0.6:  # a distant island
            a, b = sorted((far.uniform(-0.2, 0.9), far.uniform(0.1, 1.2)))
            b = max(b, a + 0.25)
            heights = _fractal(far, segments, 0.5)
            shape = [
                max(0.0, math.sin(math.pi * (i / segments - a) / (b - a))) ** 0.7 * (0.5 + 0.5 * v)
                if a <= i / segments <= b else 0.0
                for i, v in enumerate(heights)
            ]
            ridge = _ridge(c, shape, horizon + 1, H * far.uniform(0.03, 0.07))
            colour = _mix(p.land, haze, 0.55)
            _fill_ridge(c, ridge, colour, colour, horizon + 2)
    else:
        count = 1 + (detail > 0)
        hills: list[tuple[_Ridge, float]] = []
        for i in range(count):
            amp = H * far.uniform(0.05, 0.11) * (1 - 0.15 * i)
            hills.append((_ridge(c, _waves(far, segments), horizon + 1, amp, 0.1), i / 2))
        for i, (ridge, t) in enumerate(hills):
            colour = _mix(p.land, haze, 0.62 - 0.25 * t)
            floor = max(hills[i + 1][0].ys) if i + 1 < count else far_floor
            _fill_ridge(c, ridge, _mix(colour, haze, 0.1), colour, floor)
            if "forest" in terrain:
                tree = _mix(p.tree, haze, 0.55 - 0.25 * t)
                _plant_trees(c, ridge, tree, m * 0.03, m * 0.012, far, conifers=True)

    if "city" in terrain:
        _paint_city(c, p, horizon + 1, detail, stream("city"))

    if water:
        _paint_water(c, p, horizon, ocean, light, detail, stream("water"))
        if not ocean and near.random() < (0.9 if "forest" in terrain else 0.6):
            # A foreground shore on one side frames the lake.
            left = near.random() < 0.5
            reach = near.uniform(0.35, 0.6)
            heights = _waves(near, segments)
            shape = []
            for i, v in enumerate(heights):
                u = i / segments if left else 1 - i / segments
                if u < reach:
                    shape.append((1 - u / reach) ** 0.8 * (0.75 + 0.25 * v))
                else:
                    shape.append(-0.05)  # beyond its reach the shore dips below the canvas
            ridge = _ridge(c, shape, H, (H - horizon) * near.uniform(0.45, 0.7))
            colour = _scale(p.land, 0.8)
            _fill_ridge(c, ridge, colour, _scale(colour, 0.8))
            if "forest" in terrain or detail == 2:
                span = (0.0, W * reach * 0.9) if left else (W * (1 - reach * 0.9), float(W))
                tree = _scale(p.tree, 0.8)
                _plant_trees(c, ridge, tree, m * 0.11, m * 0.035, near, conifers=True, x_range=span)
    plain = not terrain - {"mountain", "snow", "hills"}
    for i, (ridge, t) in enumerate(near_layers):
        last = i == len(near_layers) - 1
        colour = _mix(p.land, haze, 0.35 * (1 - t))
        if "snow" in terrain:
            colour = _mix(colour, p.snow, 0.2)
        else:
            colour = _scale(colour, 1 - 0.28 * t)  # nearer land is darker
        near_floor = None if last else max(near_layers[i + 1][0].ys)
        if "desert" in terrain:
            # Dunes: a sunlit crest over a shaded flank.
            _fill_ridge(c, ridge, _mix(colour, p.light, 0.2), _scale(colour, 0.7), near_floor)
        else:
            _fill_ridge(c, ridge, _mix(colour, haze, 0.12), _scale(colour, 0.85), near_floor)
        if "forest" in terrain:
            tree = _mix(p.tree, haze, 0.3 * (1 - t))
            spacing = m * (0.04 - 0.012 * detail)
            _plant_trees(c, ridge, tree, m * (0.05 + 0.06 * t), spacing, near, conifers=True)
        elif "desert" in terrain and last and detail > 0:
            cactus = c.rgb(_mix(_hsl(0.3, 0.45, 0.25), p.tree, 0.5))
            for _ in range(1 + int(near.random() * 3)):
                x = near.uniform(0.05, 0.95) * W
                _cactus(c, x, ridge.at(x) + m * 0.01, m * near.uniform(0.08, 0.14), cactus)
        elif plain and i >= len(near_layers) - 2 and detail > 0 and near.random() < 0.6:
            # Plain hills get a few round trees (snowy ones firs); forests have their own.
            tree = _mix(p.tree, haze, 0.2 * (1 - t))
            tree_height = m * (0.05 + 0.05 * t)
            _plant_trees(c, ridge, tree, tree_height, W * 0.12, near, conifers="snow" in terrain)

    if "snow" in terrain:
        _paint_snowfall(c, p, detail, stream("snowfall"))
    _letter_prompt(c, text)
    return image


# --------------------------------------------------------------------------- encoding


def _encode(image: Image.Image, output_format: str, output_compression: int) -> bytes:
    buffer = io.BytesIO()
    if output_format == "png":
        # Level 6 is zlib's usual trade: level 9 costs several times the CPU for ~2%.
        image.save(buffer, format="PNG", compress_level=6, optimize=False)
    elif output_format == "jpeg":
        # Above 95 libjpeg's files grow a lot for no visible gain.
        quality = max(1, min(95, output_compression))
        image.save(buffer, format="JPEG", quality=quality, optimize=False)
    elif output_format == "webp":
        # method 2 instead of libwebp's default 4: half the CPU for files ~7% larger.
        image.save(buffer, format="WEBP", quality=max(0, min(100, output_compression)), method=2)
    else:
        raise ValueError(f"unsupported output format {output_format!r}")
    return buffer.getvalue()


def _fits(side: int) -> bool:
    return _MIN_SIDE <= side <= _MAX_SIDE


def _kept_size(width: int, height: int) -> tuple[int, int]:
    """The size of an edit or variation with ``size: auto``: its input's, scaled down (same
    shape) to at most ``_MAX_SIDE`` a side, as a requested size is bounded: a 50-megapixel
    input must not make a 50-megapixel picture for the price of any other."""
    scale = min(1.0, _MAX_SIDE / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def render_image(
    prompt: str,
    width: int,
    height: int,
    index: int,
    style: str | None,
    quality: str,
    output_format: str,
    output_compression: int,
) -> bytes:
    """Paints and encodes one picture. Pure: equal arguments give equal bytes.

    Top-level and plain-valued on purpose, so a ProcessPoolExecutor can pickle the call.
    """
    _check(output_format, width, height)
    image = _paint(prompt, width, height, index, style, quality)
    return _encode(image, output_format, output_compression)


def _check(output_format: str, width: int, height: int) -> None:
    if output_format not in OUTPUT_FORMATS:
        raise ValueError(f"unsupported output format {output_format!r}")
    if not (_fits(width) and _fits(height)):
        raise ValueError(f"unsupported size {width}x{height}")


def mosaic(image: Image.Image, cells: int) -> Image.Image:
    """``image`` averaged over ``cells`` cells along its short side, at its own size."""
    width, height = image.size
    block = max(1, min(width, height) / cells)
    small = (max(1, round(width / block)), max(1, round(height / block)))
    return image.resize(small, Image.Resampling.BOX).resize((width, height), Image.Resampling.NEAREST)


def render_with_partials(
    prompt: str,
    width: int,
    height: int,
    index: int,
    style: str | None,
    quality: str,
    output_format: str,
    output_compression: int,
    partial_images: int,
) -> tuple[list[bytes], bytes]:
    """``render_image``'s picture and ``partial_images`` (0-3) mosaics of it, coarse first."""
    if not 0 <= partial_images <= len(PARTIAL_GRID_CELLS):
        raise ValueError(f"partial_images must be 0-{len(PARTIAL_GRID_CELLS)}")
    if not partial_images:
        return [], render_image(prompt, width, height, index, style, quality, output_format, output_compression)
    _check(output_format, width, height)
    image = _paint(prompt, width, height, index, style, quality)
    final = _encode(image, output_format, output_compression)
    partials = [
        _encode(mosaic(image, cells), output_format, output_compression)
        for cells in PARTIAL_GRID_CELLS[:partial_images]
    ]
    return partials, final


def _open_rgba(data: bytes, size: tuple[int, int] | None = None) -> Image.Image:
    with Image.open(io.BytesIO(data)) as opened:
        image = opened.convert("RGBA")
    if size is not None and image.size != size:
        image = image.resize(size, Image.Resampling.LANCZOS)
    return image


def _encode_any(image: Image.Image, output_format: str, output_compression: int) -> bytes:
    # JPEG has no alpha; PNG and WebP keep the input's.
    return _encode(image.convert("RGB") if output_format == "jpeg" else image, output_format, output_compression)


def render_edit(
    prompt: str,
    width: int,
    height: int,
    index: int,
    quality: str,
    output_format: str,
    output_compression: int,
    images: list[InputImage],
    mask: InputImage | None,
    partial_images: int,
) -> tuple[list[bytes], bytes]:
    """Edit ``index`` of ``images`` (see the module docstring), with its partial images."""
    base = _open_rgba(images[0].read(), (width, height))
    painted = _paint(prompt, width, height, index, None, quality).convert("RGBA")
    # The other inputs as insets, a quarter of the short side each, left to right.
    side = max(8, min(width, height) // 4)
    margin = max(2, side // 10)
    for position, extra in enumerate(images[1:]):
        inset = _open_rgba(extra.read())
        inset.thumbnail((side, side), Image.Resampling.LANCZOS)
        per_row = max(1, (width - margin) // (side + margin))
        row, column = divmod(position, per_row)
        painted.alpha_composite(inset, (margin + column * (side + margin), height - (row + 1) * (side + margin)))
    if mask is not None:
        with Image.open(io.BytesIO(mask.read())) as opened:
            alpha = opened.convert("RGBA").getchannel("A")
        if alpha.size != (width, height):
            alpha = alpha.resize((width, height), Image.Resampling.NEAREST)
        where = alpha.point(lambda a: 255 if a == 0 else 0)  # fully transparent: edit here
        edited = Image.composite(painted, base, where)
    else:
        edited = Image.blend(base, painted, 0.5)
    final = _encode_any(edited, output_format, output_compression)
    partials = [
        _encode_any(mosaic(edited, cells), output_format, output_compression)
        for cells in PARTIAL_GRID_CELLS[:partial_images]
    ]
    return partials, final


def render_variation(
    image: InputImage, width: int, height: int, index: int, output_format: str, output_compression: int
) -> bytes:
    """Variation ``index`` of ``image`` (see the module docstring)."""
    source = _open_rgba(image.read(), (width, height))
    hue, saturation, value = source.convert("RGB").convert("HSV").split()
    turn = round(256 * (index + 1) / 8)
    hue = hue.point(lambda h: (h + turn) % 256)
    varied = Image.merge("HSV", (hue, saturation, value)).convert("RGBA")
    varied.putalpha(source.getchannel("A"))
    if index % 2:
        varied = ImageOps.mirror(varied)
    return _encode_any(varied, output_format, output_compression)


# --------------------------------------------------------------------------- provider


class LocalRenderer:
    """The ``local`` provider: renders on an executor the composition root owns."""

    name = "local"

    def __init__(self, executor: concurrent.futures.Executor) -> None:
        self._executor = executor

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        # The deadline is enforced by the caller's asyncio.timeout_at; a render in progress
        # cannot be shortened, and queued ones are cancelled below when that fires.
        del deadline
        if request.output_format not in OUTPUT_FORMATS:
            raise InvalidRequestError(
                f"{MODEL_ID} cannot write {request.output_format!r} images", param="output_format"
            )
        if request.n < 1:
            raise InvalidRequestError("n must be at least 1", param="n")
        if not (_fits(request.width) and _fits(request.height)):
            raise InvalidRequestError(f"{MODEL_ID} cannot render {request.size}", param="size")

        # Partial images only when someone streams them (they cost an extra encode each).
        partials = request.partial_images if progress is not None else 0
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[tuple[list[bytes], bytes]]] = []
        revised = None
        if request.operation == "generate":
            revised = revised_prompt(request.prompt, style=request.style, quality=request.quality)
        images: list[GeneratedImage] = []
        try:
            try:
                for index in range(request.n):
                    futures.append(loop.run_in_executor(self._executor, self._render, request, index, partials))
            except concurrent.futures.BrokenExecutor as exc:
                raise ServiceUnavailableError("the local renderer's workers died") from exc
            except RuntimeError as exc:  # "cannot schedule new futures after shutdown"
                raise ServiceUnavailableError("the local renderer is shutting down") from exc
            # In index order, so a stream never interleaves two images' partials.
            for index, future in enumerate(futures):
                partial_data, data = await future
                image = GeneratedImage(data=data, format=request.output_format, revised_prompt=revised)
                images.append(image)
                if progress is not None:
                    for partial_index, partial in enumerate(partial_data):
                        await progress.partial(index, partial_index, GeneratedImage(data=partial, format=request.output_format))
                    await progress.image(index, image)
        except concurrent.futures.BrokenExecutor as exc:
            raise ServiceUnavailableError("the local renderer's workers died") from exc
        finally:
            # On cancellation or a failed render, drop the renders still queued: nobody
            # will read them. (No-op for finished futures; a running one runs out.)
            for future in futures:
                future.cancel()

        return ProviderResult(images=images, usage=TokenUsage())  # nothing is metered: there are no tokens

    @staticmethod
    def _render(request: ImageRequest, index: int, partials: int) -> tuple[list[bytes], bytes]:
        """One image of ``request`` (in a worker): generated, edited or varied."""
        width, height = request.width, request.height
        if request.operation != "generate" and request.size_is_auto:
            width, height = _kept_size(request.images[0].width, request.images[0].height)
        if request.operation == "edit":
            return render_edit(
                request.prompt, width, height, index, request.quality, request.output_format,
                request.output_compression, list(request.images), request.mask, partials,
            )
        if request.operation == "variation":
            image = request.images[0]
            return [], render_variation(image, width, height, index, request.output_format, request.output_compression)
        return render_with_partials(
            request.prompt, width, height, index, request.style, request.quality,
            request.output_format, request.output_compression, partials,
        )

    async def aclose(self) -> None:
        """Nothing to release: the executor belongs to whoever passed it in."""
