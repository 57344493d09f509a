"""What every image provider takes and gives back.

A provider turns one validated ``ImageRequest`` into images. It never sees protobuf,
gRPC or the ledger: the generation use case prices, reserves, calls the provider within
the request's deadline, stores the images and settles the money. Providers raise
``server.errors`` exceptions only (``UpstreamError``, ``ContentPolicyError``,
``DeadlineExceededError``, ...); each adapter maps its vendor's failures in one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "GeneratedImage",
    "ImageProvider",
    "ImageRequest",
    "ProviderResult",
    "TokenUsage",
]

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}


@dataclass(frozen=True, slots=True)
class ImageRequest:
    """A generation request after catalog validation: every value is concrete and allowed.

    ``size`` is never ``auto`` here (the catalog resolves it, so pricing and rendering
    agree), and ``quality`` is the model's resolved quality.
    """

    model_id: str
    upstream_model: str
    prompt: str
    n: int
    width: int
    height: int
    quality: str
    output_format: str = "png"
    output_compression: int = 100
    style: str | None = None
    background: str | None = None
    moderation: str | None = None
    user: str | None = None
    # Whether the caller asked for `auto` size/quality; some upstreams pick themselves.
    size_is_auto: bool = False
    quality_is_auto: bool = False

    @property
    def size(self) -> str:
        return f"{self.width}x{self.height}"


@dataclass(frozen=True, slots=True)
class GeneratedImage:
    """One encoded image as bytes, with what the model says about it."""

    data: bytes
    format: str  # png | jpeg | webp
    revised_prompt: str | None = None

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]


@dataclass(frozen=True, slots=True)
class TokenUsage:
    """Token counts an upstream reported; zeros where it reported none."""

    input_text_tokens: int = 0
    input_image_tokens: int = 0
    output_image_tokens: int = 0
    output_text_tokens: int = 0

    @property
    def input_tokens(self) -> int:
        return self.input_text_tokens + self.input_image_tokens

    @property
    def output_tokens(self) -> int:
        return self.output_image_tokens + self.output_text_tokens


@dataclass(frozen=True, slots=True)
class ProviderResult:
    """What a provider delivered. Fewer images than asked is allowed (for example when
    the provider's safety filter dropped some); none is not: raise instead."""

    images: list[GeneratedImage]
    usage: TokenUsage = field(default_factory=TokenUsage)
    # Echoed in the response when the upstream reports them (GPT image models do).
    size: str | None = None
    quality: str | None = None
    background: str | None = None
    output_format: str | None = None


class ImageProvider(Protocol):
    """One upstream wire format (or the embedded renderer)."""

    name: str

    async def generate(self, request: ImageRequest, *, deadline: float) -> ProviderResult:
        """Makes up to ``request.n`` images.

        ``deadline`` is an absolute ``asyncio`` loop time (``loop.time()``) by which the
        answer must be ready; retries and ``Retry-After`` waits must fit before it. The
        caller also enforces it with ``asyncio.timeout_at`` and cancels the call when the
        client goes away: implementations must not swallow ``asyncio.CancelledError``.
        """
        ...

    async def aclose(self) -> None:
        """Releases connections and workers."""
        ...
