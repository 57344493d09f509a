"""What every image provider takes and gives back.

A provider turns one validated ``ImageRequest`` into images. It never sees protobuf,
gRPC or the ledger: the generation use case prices, reserves, calls the provider within
the request's deadline, stores the images and settles the money. Providers raise
``server.errors`` exceptions only (``UpstreamError``, ``ContentPolicyError``,
``DeadlineExceededError``, ...); each adapter maps its vendor's failures in one table.

Streaming: the use case may pass a ``Progress``. A provider that makes partial images
(the local renderer, an upstream that streams) reports each one as it exists, and any
provider may report each final image as soon as it is ready (fan-out providers do, call
by call). Whatever a provider did not report is reported by the use case when
``generate`` returns, so a provider that ignores ``progress`` still streams correctly,
one completed event per image at the end.
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Literal, Protocol

if TYPE_CHECKING:
    from server.providers.http import UpstreamHttp

__all__ = [
    "AdapterFactory",
    "GeneratedImage",
    "ImageProvider",
    "ImageRequest",
    "InputImage",
    "Operation",
    "Progress",
    "ProviderResult",
    "TokenUsage",
]

CONTENT_TYPES = {"png": "image/png", "jpeg": "image/jpeg", "webp": "image/webp"}

# What a request asks a model to do: make images from a prompt, edit the caller's images
# (OpenAI's images.edit), or make variations of one image (images.create_variation).
Operation = Literal["generate", "edit", "variation"]


class InputImage:
    """An image the caller sent (an edit's input or mask, a variation's source), already
    checked to be a whole PNG, JPEG or WebP. The bytes stay where the upload put them
    (memory, or a temporary file for large uploads) until a provider reads them."""

    def __init__(
        self, source: BinaryIO, *, size: int, format: str, width: int, height: int, has_alpha: bool, filename: str = ""
    ) -> None:
        self._source = source
        self._lock = threading.Lock()  # providers may read from several threads at once
        self.size = size
        self.format = format
        self.width = width
        self.height = height
        self.has_alpha = has_alpha
        self.filename = filename

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.format]

    def read(self) -> bytes:
        """The encoded image (reads the temporary file when the upload was spooled)."""
        with self._lock:
            self._source.seek(0)
            return self._source.read()

    def read_range(self, offset: int, size: int) -> bytes:
        """``size`` bytes of the encoded image from ``offset`` (fewer at its end)."""
        with self._lock:
            self._source.seek(offset)
            return self._source.read(size)

    def reader(self) -> BinaryIO:
        """A file object over the encoded image with its own position, read piece by piece:
        an upstream request streams the file from it (httpx reads 64 KiB at a time, from
        memory or the page cache) instead of holding a copy of every image at once."""
        return io.BufferedReader(_ImageReader(self), buffer_size=64 * 1024)

    def sha256(self) -> str:
        """SHA-256 of the encoded image, read in chunks (never whole in memory)."""
        digest = hashlib.sha256()
        with self._lock:
            self._source.seek(0)
            while chunk := self._source.read(1 << 20):
                digest.update(chunk)
        return digest.hexdigest()

    def __repr__(self) -> str:
        return f"InputImage({self.format} {self.width}x{self.height}, {self.size} bytes)"


class _ImageReader(io.RawIOBase):
    """The raw side of ``InputImage.reader``: seekable, with its size known (so httpx can
    send a Content-Length), and no file descriptor."""

    def __init__(self, image: InputImage) -> None:
        self._image = image
        self._position = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        start = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self._image.size}[whence]
        self._position = max(0, start + offset)
        return self._position

    def readinto(self, buffer: Any) -> int:
        # Never past the size announced as the part's length.
        data = self._image.read_range(self._position, max(0, min(len(buffer), self._image.size - self._position)))
        buffer[: len(data)] = data
        self._position += len(data)
        return len(data)


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
    # Partial images wanted before each final image (0-3; streaming only, and only from
    # models whose catalog row says they make them).
    partial_images: int = 0
    # Edits and variations: the caller's images (an edit's first image is the one the
    # mask applies to), the mask (transparent where to edit) and the fidelity to them.
    operation: Operation = "generate"
    images: tuple[InputImage, ...] = ()
    mask: InputImage | None = None
    input_fidelity: str | None = None

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


class Progress(Protocol):
    """Receives a streamed generation's images as the provider makes them.

    Both methods return once the event is on its way to the caller (its delivery is what
    gets charged); they may raise ``asyncio.CancelledError`` when the caller went away,
    which the provider must let through.
    """

    async def partial(
        self, image_index: int, partial_index: int, image: GeneratedImage, reported: ProviderResult | None = None
    ) -> None:
        """A partial image of image ``image_index`` (0-based), the ``partial_index``-th;
        ``reported``: what the upstream said with it (size, quality, background, format)."""
        ...

    async def image(self, image_index: int, image: GeneratedImage, reported: ProviderResult | None = None) -> None:
        """Image ``image_index`` is final (it is also part of the ``ProviderResult``);
        ``reported``: what the upstream said with it, its usage included, when it reports
        per image (a fan-out call's own result, one streamed event)."""
        ...


class ImageProvider(Protocol):
    """One upstream wire format (or the embedded renderer)."""

    name: str

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """Makes up to ``request.n`` images, reporting them to ``progress`` when given.

        ``deadline`` is an absolute ``asyncio`` loop time (``loop.time()``) by which the
        answer must be ready; retries and ``Retry-After`` waits must fit before it. The
        caller also enforces it with ``asyncio.timeout_at`` and cancels the call when the
        client goes away: implementations must not swallow ``asyncio.CancelledError``.
        """
        ...

    async def aclose(self) -> None:
        """Releases connections and workers."""
        ...


class AdapterFactory(Protocol):
    """How the registry (``server.providers``) builds an adapter: its class, called so."""

    def __call__(self, http: UpstreamHttp, *, api_key: str, base_url: str) -> ImageProvider: ...
