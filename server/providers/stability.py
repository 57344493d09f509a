"""Stability AI's v2beta Stable Image API (``reference/providers.md`` §3).

``POST {base}/v2beta/stable-image/generate/{ultra|core|sd3}`` with ``authorization:
Bearer``. The body is ``multipart/form-data`` even though there is no file: every field
goes as its own form part (a urlencoded body is refused). The upstream model picks the
endpoint (``ENDPOINTS``); SD3 models also send ``model``. There is no size: the OpenAI
size becomes ``aspect_ratio`` (``server.providers.sizing``). One image per call, so
``n`` fans out with bounded concurrency.

The answer is negotiated with ``accept``: ``image/*`` (the default here, no base64
overhead) gives the bytes with ``finish-reason`` and ``seed`` headers;
``application/json`` gives ``{image, finish_reason, seed}``. Moderation comes in two
forms, both the caller's ``content_policy_violation`` when nothing survives: 403
``content_moderation`` before generation, and a 200 with finish reason
``CONTENT_FILTERED`` (a blurred image we must not deliver). Errors are
``{id, name, errors[]}``; ``ERRORS`` keys on the status and ``name``. A 429 carries no
``Retry-After``: Stability times the key out for 60 s, which its registry entry's
``rate_limit_delay`` encodes, so a request with less time left fails fast and retryable.

Edits: ``POST {base}/v2beta/stable-image/edit/inpaint`` (the upstream model ``inpaint``),
multipart with the files ``image`` and ``mask`` and the fields ``prompt`` and
``output_format`` (Stability's API reference "Inpaint", as generated from its OpenAPI in
aj-foster/open-api-generator ``stability-ai/edit.ex``: required ``image`` and ``prompt``,
optional ``mask``, ``negative_prompt``, ``seed``, ``output_format``; 3 credits per
success; the same answers and errors as the generate endpoints). No size or aspect ratio:
the picture keeps the image's. Stability's mask is a grayscale strength map (black:
keep, white: repaint), OpenAI's a PNG whose fully transparent pixels mark where to edit,
so the mask is converted (transparent -> white, anything else -> black) before it goes.
The catalog requires a mask for these rows (``edit_mask = "required"``): an edit without
one is a 400 before anything is reserved.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image

from server.errors import ContentPolicyError, InvalidRequestError, ModelNotSupportedError
from server.offload import run_sized
from server.providers.base import ImageRequest, InputImage, Progress, ProviderResult
from server.providers.gate import AnswerScope
from server.providers.http import (
    ErrorBody,
    ErrorTable,
    Failure,
    Informational,
    Kind,
    UpstreamHttp,
    UpstreamModel,
    UpstreamResponse,
    fan_out,
    image_from_base64,
    image_from_bytes,
    input_bytes,
    lookup_kind,
    malformed,
)
from server.providers.sizing import STABILITY_ASPECT_RATIOS, nearest_aspect_ratio

__all__ = ["ENDPOINTS", "ERRORS", "StabilityImageProvider", "strength_mask"]

# Upstream model -> (endpoint under /v2beta/stable-image, whether the `model` form field names it).
ENDPOINTS: Mapping[str, tuple[str, bool]] = {
    "stable-image-ultra": ("generate/ultra", False),
    "stable-image-core": ("generate/core", False),
    "sd3.5-large": ("generate/sd3", True),
    "sd3.5-large-turbo": ("generate/sd3", True),
    "sd3.5-medium": ("generate/sd3", True),
    "inpaint": ("edit/inpaint", False),
}
EDIT_ENDPOINTS = frozenset({"edit/inpaint"})
ALL_FORMATS = ("png", "jpeg", "webp")
OUTPUT_FORMATS: Mapping[str, tuple[str, ...]] = {"generate/sd3": ("png", "jpeg")}
Field = tuple[str, tuple[str | None, str | bytes] | tuple[str | None, str | bytes, str]]
ACCEPTS = ("image/*", "application/json")
FILTERED = "CONTENT_FILTERED"

# The one table: (HTTP status, error `name`) -> kind.
ERRORS: ErrorTable = {
    (400, None): Kind.REJECTED,  # bad_request
    (401, None): Kind.CREDENTIALS,
    (402, None): Kind.ACCOUNT,  # payment_required: out of credits
    (403, "content_moderation"): Kind.CONTENT_POLICY,
    (403, None): Kind.CREDENTIALS,
    (404, None): Kind.MODEL_UNAVAILABLE,
    (413, None): Kind.REJECTED,
    (422, None): Kind.REJECTED,
    (429, None): Kind.RATE_LIMITED,
}


class _ErrorBody(ErrorBody):
    name: Informational[str] = None
    errors: Informational[list[Informational[str]]] = None


class JsonAnswer(UpstreamModel):
    """A 200 negotiated as ``application/json``."""

    image: str | None = None
    finish_reason: Informational[str] = None


def classify(response: UpstreamResponse) -> Failure:
    """Maps a non-2xx Stability answer through ``ERRORS`` by its ``name`` field."""
    body = response.parse_or_none(_ErrorBody)
    name = body.name if body is not None else None
    detail = "; ".join(e for e in body.errors or [] if e is not None) if body is not None else ""
    return Failure(lookup_kind(ERRORS, response.status, [name]), detail=detail, status=response.status, code=name)


def _strength_mask(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as opened:
        alpha = opened.convert("RGBA").getchannel("A")
    # Fully transparent (OpenAI: edit here) -> white (Stability: full strength); else black.
    strength = alpha.point(lambda value: 255 if value == 0 else 0)
    out = io.BytesIO()
    strength.save(out, format="PNG")
    return out.getvalue()


async def strength_mask(mask: InputImage) -> bytes:
    """OpenAI's mask (a PNG, transparent where to edit) as Stability's: a grayscale PNG,
    white where to repaint and black elsewhere. Decoded off the loop when large."""
    data = await input_bytes(mask)
    return await run_sized(mask.width * mask.height, _strength_mask, data)


class StabilityImageProvider:
    """Stable Image Ultra, Core and SD3.5 (see the module docstring)."""

    def __init__(
        self,
        http: UpstreamHttp,
        *,
        api_key: str,
        base_url: str,
        accept: str = "image/*",
    ) -> None:
        if accept not in ACCEPTS:
            raise ValueError(f"accept must be one of {ACCEPTS}")
        self.name = http.provider
        self._base = base_url.rstrip("/") + "/v2beta/stable-image"
        self._headers = {"authorization": f"Bearer {api_key}", "accept": accept}
        self._http = http

    async def form(self, request: ImageRequest) -> tuple[str, list[Field]]:
        """The endpoint URL and the multipart parts for one image: text fields (no
        filenames), then an edit's image and converted mask."""
        endpoint = ENDPOINTS.get(request.upstream_model)
        if endpoint is None:
            raise InvalidRequestError(
                f"Model '{request.model_id}' names an unknown Stability model '{request.upstream_model}'.", param="model"
            )
        path, names_model = endpoint
        if (path in EDIT_ENDPOINTS) != (request.operation == "edit"):
            what = "edit images" if request.operation != "generate" else "generate images"
            raise ModelNotSupportedError(f"The model '{request.model_id}' cannot {what}.", param="model")
        formats = OUTPUT_FORMATS.get(path, ALL_FORMATS)
        if request.output_format not in formats:
            raise InvalidRequestError(
                f"Invalid value for 'output_format': model '{request.model_id}' supports "
                f"{', '.join(repr(f) for f in formats)}.",
                param="output_format",
            )
        fields = {"prompt": request.prompt}
        if path not in EDIT_ENDPOINTS:
            fields["aspect_ratio"] = nearest_aspect_ratio(request.width, request.height, STABILITY_ASPECT_RATIOS)
        fields["output_format"] = request.output_format
        if names_model:
            fields["model"] = request.upstream_model
        # (None, value) parts make httpx send multipart/form-data without a dummy file.
        parts: list[Field] = [(key, (None, value)) for key, value in fields.items()]
        if path in EDIT_ENDPOINTS:
            if request.mask is None:  # pragma: no cover - the catalog requires a mask (edit_mask)
                raise InvalidRequestError(f"Model '{request.model_id}' edits only under a mask.", param="mask")
            image = request.images[0]
            parts.append(("image", (f"image.{image.format}", await input_bytes(image), image.content_type)))
            parts.append(("mask", ("mask.png", await strength_mask(request.mask), "image/png")))
        return f"{self._base}/{path}", parts

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """``request.n`` calls of one image each; filtered ones are dropped."""
        url, fields = await self.form(request)
        return await fan_out(
            request.n,
            lambda _index: self._once(url, fields, deadline),
            concurrency=self._http.fan_out_width,
            provider=self.name,
            progress=progress,
        )

    async def _once(self, url: str, fields: list[Field], deadline: float) -> ProviderResult:
        # A large answer keeps its gate slot until its image is decoded and checked.
        async with self._http.answer() as scope:
            return await self._answer(url, fields, deadline, scope)

    async def _answer(self, url: str, fields: list[Field], deadline: float, scope: AnswerScope) -> ProviderResult:
        response = await self._http.send(
            "POST", url, deadline=deadline, classify=classify, headers=self._headers, files=fields,
            operation="generate", scope=scope,
        )
        if response.content_type.startswith("image/"):
            finish = response.headers.get("finish-reason", "SUCCESS")
            if finish == FILTERED:
                raise ContentPolicyError("The upstream provider's safety system rejected the request.")
            return ProviderResult(images=[await image_from_bytes(response.body)])
        if response.content_type == "application/json":
            answer = await response.parse(JsonAnswer)
            del response
            if answer.finish_reason == FILTERED:
                raise ContentPolicyError("The upstream provider's safety system rejected the request.")
            if answer.image is None:
                raise malformed("an answer without an image field")
            return ProviderResult(images=[await image_from_base64(answer.image)])
        raise malformed(f"an answer of content type {response.content_type or 'none'}")

    async def aclose(self) -> None:
        """Nothing to release: the composition root owns and closes the HTTP client."""
