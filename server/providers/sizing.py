"""OpenAI ``WIDTHxHEIGHT`` sizes translated into each provider's size knob.

Callers speak OpenAI sizes; most providers take an aspect ratio (Imagen, Gemini,
Stability, xAI) or width/height under their own rules (BFL: multiples of 32 within
256..1440). The translation is deterministic: the allowed ratio nearest to the requested
one on a log scale (so 3:2 and 2:3 are equally far from 1:1), the first listed on a tie.
For the sizes the catalog offers, that gives this table:

    OpenAI size   Imagen   Gemini   Stability   xAI    BFL (width x height)   BFL Kontext
    256x256       1:1      1:1      1:1         1:1    256x256                1:1
    512x512       1:1      1:1      1:1         1:1    512x512                1:1
    1024x1024     1:1      1:1      1:1         1:1    1024x1024              1:1
    1536x1024     4:3      3:2      3:2         3:2    1440x960               3:2
    1024x1536     3:4      2:3      2:3         2:3    960x1440               2:3
    1792x1024     16:9     16:9     16:9        16:9   1440x832               7:4
    1024x1792     9:16     9:16     9:16        9:16   832x1440               4:7

FLUX.1 Kontext takes any ratio from 21:9 to 9:21 (BFL's API reference), so it gets the
exact one, reduced.

Providers choose the pixel count themselves (Imagen and Gemini about 1 MP, Stability
Core about 1.5 MP), so the image delivered has the requested *shape*, not always the
requested pixels; ``tests/providers`` pins the table above.
"""

from __future__ import annotations

import math

__all__ = [
    "GEMINI_ASPECT_RATIOS",
    "IMAGEN_ASPECT_RATIOS",
    "STABILITY_ASPECT_RATIOS",
    "XAI_ASPECT_RATIOS",
    "bfl_dimensions",
    "exact_aspect_ratio",
    "nearest_aspect_ratio",
]

IMAGEN_ASPECT_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9")
GEMINI_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
STABILITY_ASPECT_RATIOS = ("1:1", "16:9", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21")
XAI_ASPECT_RATIOS = ("1:1", "3:4", "4:3", "9:16", "16:9", "2:3", "3:2", "9:19.5", "19.5:9", "9:20", "20:9", "1:2", "2:1")

BFL_STEP = 32
BFL_MIN_SIDE = 256
BFL_MAX_SIDE = 1440


def _ratio(value: str) -> float:
    width, height = value.split(":")
    return float(width) / float(height)


def nearest_aspect_ratio(width: int, height: int, allowed: tuple[str, ...]) -> str:
    """The entry of ``allowed`` ("W:H" strings) closest in shape to ``width`` x ``height``."""
    target = math.log(width / height)
    # min() keeps the first of equal distances, so the order of `allowed` breaks ties.
    return min(allowed, key=lambda ratio: abs(math.log(_ratio(ratio)) - target))


def bfl_dimensions(width: int, height: int) -> tuple[int, int]:
    """Width and height BFL accepts: same shape, longest side at most 1440, multiples of 32."""
    scale = min(1.0, BFL_MAX_SIDE / max(width, height))

    def snap(side: float) -> int:
        stepped = round(side * scale / BFL_STEP) * BFL_STEP
        return max(BFL_MIN_SIDE, min(BFL_MAX_SIDE, stepped))

    return snap(width), snap(height)


def exact_aspect_ratio(width: int, height: int, *, widest: float = 21 / 9) -> str:
    """``width`` x ``height`` as a reduced "W:H", for providers that take any ratio up to
    ``widest`` (and its inverse); a shape beyond that is clamped to it."""
    if width / height > widest:
        return "21:9"
    if height / width > widest:
        return "9:21"
    divisor = math.gcd(width, height)
    return f"{width // divisor}:{height // divisor}"
