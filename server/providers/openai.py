"""OpenAI's ``POST /v1/images/generations``, and the hosts that speak it with differences.

One adapter, several dialects (``reference/providers.md`` §1 and §5):

    dialect      request body                                                   answer
    openai       GPT image models: size, quality, output_format (+compression,  data[].b64_json, usage,
                 background, moderation); never response_format or style.       size/quality/...
                 DALL·E (upstream model "dall-e-*"): size, quality, style,       data[].b64_json,
                 response_format=b64_json.                                      revised_prompt
    compatible   another OpenAI-shaped host (a relay, another imagegw): GPT     data[].b64_json or url
                 image names as above, anything else DALL·E-style plus the
                 optional GPT fields the caller set.
    xai          aspect_ratio instead of size (xAI answers 400 to size),         data[].b64_json or url;
                 response_format=b64_json; no quality, no style.                 respect_moderation flag
    together     width/height instead of size, response_format=base64,          data[{index,type,b64_json|url}]
                 output_format png|jpeg.

Edits and variations (``request.operation``): ``POST {base}/images/edits`` and
``{base}/images/variations``, ``multipart/form-data`` as the official SDK sends them
(openai-python ``resources/images.py``: ``extract_files`` paths ``image``, ``image[]``,
``mask``; fields typed by ``types/image_edit_params.py`` and
``image_create_variation_params.py``; ``reference/openai-images-openapi.yaml``
``CreateImageEditRequest``). The text fields are the generation body's (``style`` and
``moderation`` excepted: edits have neither) plus ``input_fidelity`` when the caller set
it; numbers and booleans go as their JSON text. Files: GPT image models get every image as
``image[]`` (up to 16), DALL·E 2 its one square PNG as ``image`` (and variations always
``image``), another compatible host ``image`` for one file and ``image[]`` for several,
exactly as the SDK would; the mask goes as ``mask``. Files carry neutral names
(``image-1.png``, ``mask.png``: never the caller's file names) with their real content
type, and are streamed from where the upload put them (``InputImage.reader``), again
whole on a retry, never copied into memory together. A GPT image model's answer reports ``usage.input_tokens_details.image_tokens``: the
input images' tokens, which the catalog's ``input_token_price`` turns into the input charge.
xAI's and Together's edits are other formats (JSON with image URLs) and are not spoken here.

``url`` answers are downloaded at once (DALL·E links live 60 minutes, others less) and
never passed on. Errors map by status and ``error.code`` (then ``error.type``) in
``ERRORS``; xAI's ``{"code", "error"}`` body is read the same way.

Streaming: when the caller streams (a ``Progress`` is given) a GPT image model is asked
for OpenAI's own stream (``stream: true``, ``partial_images``; for an edit as form fields),
and each ``image_generation.partial_image`` / ``image_generation.completed`` event (an
edit's: ``image_edit.partial_image`` / ``image_edit.completed``, openai-python
``types/image_edit_partial_image_event.py``, ``image_edit_completed_event.py``) is
validated and passed on as it arrives. OpenAI's events carry no image index, so with ``n`` > 1 the
partials are taken to belong to the image being made, the images coming one after the
other. An ``error`` event maps through ``ERRORS`` like an error answer; a host that ignores
``stream`` and answers JSON is read as a plain answer.
"""

from __future__ import annotations

import logging
from typing import Annotated, BinaryIO

from pydantic import Strict

from server.errors import ApiError, ContentPolicyError, InvalidRequestError, ModelNotSupportedError, UpstreamError
from server.providers.base import (
    GeneratedImage,
    ImageRequest,
    Progress,
    ProviderResult,
    TokenUsage,
)
from server.providers.gate import AnswerScope
from server.providers.http import (
    Count,
    ErrorBody,
    ErrorTable,
    Failure,
    Informational,
    Kind,
    SseEvent,
    UpstreamHttp,
    UpstreamModel,
    UpstreamResponse,
    image_from_base64,
    lookup_kind,
    malformed,
    parse_json,
    sum_usage,
)
from server.providers.sizing import XAI_ASPECT_RATIOS, nearest_aspect_ratio

__all__ = ["DIALECTS", "ERRORS", "OpenAIImageProvider"]

logger = logging.getLogger(__name__)

DIALECTS = ("openai", "compatible", "xai", "together")
# Stream event types, a generation's and an edit's.
PARTIAL_EVENTS = frozenset({"image_generation.partial_image", "image_edit.partial_image"})
COMPLETED_EVENTS = frozenset({"image_generation.completed", "image_edit.completed"})
# httpx multipart parts: (field, (filename or None, content, content type)).
Part = tuple[str, tuple[str | None, str] | tuple[str, BinaryIO, str]]

# The one table: (HTTP status, error.code or error.type) -> what it means for us.
ERRORS: ErrorTable = {
    (400, "moderation_blocked"): Kind.CONTENT_POLICY,  # GPT image models
    (400, "content_policy_violation"): Kind.CONTENT_POLICY,  # DALL·E
    (400, "content_filter"): Kind.CONTENT_POLICY,  # Azure OpenAI
    (400, "billing_hard_limit_reached"): Kind.ACCOUNT,
    (400, "model_not_found"): Kind.MODEL_UNAVAILABLE,  # retired models (dall-e-3 after 2026-05-12)
    (401, None): Kind.CREDENTIALS,
    (402, None): Kind.ACCOUNT,  # Together's monthly spend limit
    (403, None): Kind.CREDENTIALS,  # region not supported, organization not verified
    (404, None): Kind.MODEL_UNAVAILABLE,
    (429, "insufficient_quota"): Kind.ACCOUNT,  # OpenAI's "out of credit" is a 429, never a 402
    (429, "billing_hard_limit_reached"): Kind.ACCOUNT,
    (429, None): Kind.RATE_LIMITED,
}


class _TokenDetails(UpstreamModel):
    text_tokens: Count = 0
    image_tokens: Count = 0


class _Usage(UpstreamModel):
    input_tokens: Count = 0
    output_tokens: Count = 0
    input_tokens_details: Informational[_TokenDetails] = None
    output_tokens_details: Informational[_TokenDetails] = None

    def tokens(self) -> TokenUsage:
        inputs, outputs = self.input_tokens_details, self.output_tokens_details
        return TokenUsage(
            input_text_tokens=inputs.text_tokens if inputs is not None else self.input_tokens,
            input_image_tokens=inputs.image_tokens if inputs is not None else 0,
            # Older answers only give the total; for an image model it is image tokens.
            output_image_tokens=outputs.image_tokens if outputs is not None else self.output_tokens,
            output_text_tokens=outputs.text_tokens if outputs is not None else 0,
        )


class _Image(UpstreamModel):
    b64_json: str | None = None
    url: Informational[str] = None
    revised_prompt: Informational[str] = None
    # xAI marks a moderated image with false and leaves out its bytes.
    respect_moderation: Informational[Annotated[bool, Strict()]] = None


class _Reported(UpstreamModel):
    """What a GPT image answer (or stream event) says it made; echoed to the caller."""

    usage: Informational[_Usage] = None
    size: Informational[str] = None
    quality: Informational[str] = None
    background: Informational[str] = None
    output_format: Informational[str] = None

    def result(self, images: list[GeneratedImage], usage: TokenUsage | None = None) -> ProviderResult:
        return ProviderResult(
            images=images,
            usage=usage if usage is not None else self.tokens(),
            size=self.size or None,
            quality=self.quality or None,
            background=self.background or None,
            output_format=self.output_format or None,
        )

    def tokens(self) -> TokenUsage:
        return self.usage.tokens() if self.usage is not None else TokenUsage()


class ImagesAnswer(_Reported):
    """A 200 from ``images/generations``: OpenAI's, and its dialects' (extra fields ignored)."""

    data: list[_Image]


class _ErrorDetail(UpstreamModel):
    message: Informational[str] = None
    code: Informational[str] = None
    type: Informational[str] = None


class StreamEvent(_Reported, _ErrorDetail):
    """One event of OpenAI's image stream: ``image_generation.partial_image``,
    ``image_generation.completed`` (an edit's ``image_edit.*``) or ``error`` (its fields
    nested or at the top)."""

    b64_json: str | None = None
    partial_image_index: Informational[Annotated[int, Strict()]] = None
    error: Informational[_ErrorDetail] = None


class _ErrorBody(ErrorBody):
    # OpenAI, Together and Azure: {"error": {...}}; xAI: {"code": "...", "error": "..."}.
    error: Informational[_ErrorDetail | str] = None
    code: Informational[str] = None


def _form_value(value: object) -> str:
    """A JSON value as a form field's text, as the SDK sends it (``true``, ``2``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def _event(sse: SseEvent) -> StreamEvent:
    return await parse_json(sse.data, StreamEvent, invalid="a stream event that is not JSON")


def classify(response: UpstreamResponse) -> Failure:
    """Maps a non-2xx answer through ``ERRORS`` by structured fields only."""
    body = response.parse_or_none(_ErrorBody)
    codes: list[str | None] = []
    detail = ""
    if body is not None and isinstance(body.error, _ErrorDetail):
        codes = [body.error.code or None, body.error.type or None]
        detail = body.error.message or ""
    elif body is not None and isinstance(body.error, str):
        codes = [body.code or None]
        detail = body.error
    kind = lookup_kind(ERRORS, response.status, codes)
    return Failure(kind, detail=detail, status=response.status, code=next((c for c in codes if c), None))


class OpenAIImageProvider:
    """Images from OpenAI or any host speaking its images API (see the module docstring)."""

    def __init__(self, http: UpstreamHttp, *, api_key: str, base_url: str, dialect: str = "openai") -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown OpenAI dialect {dialect!r}; expected one of {DIALECTS}")
        self.name = http.provider
        self.dialect = dialect
        # The SDK's convention: the base URL includes the version ("https://api.openai.com/v1").
        self._base = base_url.rstrip("/")
        self._url = self._base + "/images/generations"
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = http

    def family(self, upstream_model: str) -> str:
        """Which request shape a model gets: gpt-image, dall-e, xai, together or compatible."""
        if self.dialect in ("xai", "together"):
            return self.dialect
        if upstream_model.startswith("dall-e"):
            return "dall-e"
        if self.dialect == "openai" or upstream_model.startswith(("gpt-image", "chatgpt-image")):
            return "gpt-image"
        return "compatible"

    def request_body(self, request: ImageRequest) -> dict[str, object]:
        """The JSON body for ``request`` in this host's dialect (concrete size and quality)."""
        family = self.family(request.upstream_model)
        body: dict[str, object] = {"model": request.upstream_model, "prompt": request.prompt, "n": request.n}
        match family:
            case "gpt-image":
                # GPT image models always answer b64 and refuse response_format with a 400.
                body |= {"size": request.size, "quality": request.quality, "output_format": request.output_format}
                self._gpt_extras(request, body)
            case "dall-e":
                body |= {"size": request.size, "quality": request.quality, "response_format": "b64_json"}
                if request.style is not None:
                    body["style"] = request.style
            case "compatible":
                body |= {"size": request.size, "quality": request.quality, "response_format": "b64_json"}
                if request.style is not None:
                    body["style"] = request.style
                if request.output_format != "png":
                    body["output_format"] = request.output_format
                self._gpt_extras(request, body)
            case "xai":
                # xAI answers 400 "Argument not supported: size"; it takes a ratio instead.
                body["aspect_ratio"] = nearest_aspect_ratio(request.width, request.height, XAI_ASPECT_RATIOS)
                body["response_format"] = "b64_json"
            case "together":
                if request.output_format not in ("png", "jpeg"):
                    raise InvalidRequestError(
                        f"Invalid value for 'output_format': model '{request.model_id}' supports 'png' and 'jpeg'.",
                        param="output_format",
                    )
                body |= {
                    "width": request.width,
                    "height": request.height,
                    "response_format": "base64",
                    "output_format": request.output_format,
                }
        if request.user is not None and family != "together":
            body["user"] = request.user
        return body

    @staticmethod
    def _gpt_extras(request: ImageRequest, body: dict[str, object]) -> None:
        if request.output_format != "png" and request.output_compression < 100:
            body["output_compression"] = request.output_compression
        if request.background is not None:
            body["background"] = request.background
        if request.moderation is not None:
            body["moderation"] = request.moderation

    def edit_fields(self, request: ImageRequest) -> dict[str, str]:
        """The text fields of an edit or variation form (concrete size and quality)."""
        family = self.family(request.upstream_model)
        if family in ("xai", "together"):
            raise ModelNotSupportedError(
                f"The model '{request.model_id}' cannot edit images: its host's edit format is not supported.",
                param="model",
            )
        if request.operation == "variation":
            body: dict[str, object] = {
                "model": request.upstream_model,
                "n": request.n,
                "size": request.size,
                "response_format": "b64_json",
            }
            if request.user is not None:
                body["user"] = request.user
        else:
            body = {name: value for name, value in self.request_body(request).items() if name != "style"}
            if request.input_fidelity is not None:
                body["input_fidelity"] = request.input_fidelity
        return {name: _form_value(value) for name, value in body.items()}

    def edit_parts(self, request: ImageRequest, *, stream: bool = False) -> list[Part]:
        """The whole multipart form of an edit or variation: text fields, then the files."""
        fields = self.edit_fields(request)
        if stream:
            fields |= {"stream": "true", "partial_images": str(request.partial_images)}
        parts: list[Part] = [(name, (None, value)) for name, value in fields.items()]
        family = self.family(request.upstream_model)
        several = len(request.images) > 1
        if request.operation == "variation" or family == "dall-e" or (family == "compatible" and not several):
            name = "image"
        else:
            name = "image[]"
        # Each file is streamed from where the upload put it (up to 16 x 50 MB), not copied.
        for index, image in enumerate(request.images, start=1):
            parts.append((name, (f"image-{index}.{image.format}", image.reader(), image.content_type)))
        if request.mask is not None:
            mask = request.mask
            parts.append(("mask", (f"mask.{mask.format}", mask.reader(), mask.content_type)))
        return parts

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """One upstream call returning up to ``request.n`` images; see ``ERRORS`` for failures."""
        streams = progress is not None and self.family(request.upstream_model) == "gpt-image"
        if request.operation != "generate":
            operation = "images/variations" if request.operation == "variation" else "images/edits"
            streams = streams and request.operation == "edit"
            url, body, parts = f"{self._base}/{operation}", None, self.edit_parts(request, stream=streams)
        else:
            operation, url, parts = "images/generations", self._url, None
            body = self.request_body(request)
            if streams:
                body |= {"stream": True, "partial_images": request.partial_images}
        if streams:
            assert progress is not None
            return await self._streamed(url, body, parts, operation, deadline, progress)
        # A large answer keeps its gate slot until its images are decoded and checked. The
        # answer goes straight into _answer (no name here), which drops the raw body once parsed.
        async with self._http.answer() as scope:
            return await self._answer(
                await self._http.send(
                    "POST",
                    url,
                    deadline=deadline,
                    classify=classify,
                    headers=self._headers,
                    json_body=body,
                    files=parts,
                    operation=operation,
                    scope=scope,
                ),
                deadline,
                scope,
            )

    async def _streamed(
        self,
        url: str,
        body: dict[str, object] | None,
        parts: list[Part] | None,
        operation: str,
        deadline: float,
        progress: Progress,
    ) -> ProviderResult:
        async with self._http.answer() as scope, self._http.stream(
            "POST",
            url,
            deadline=deadline,
            classify=classify,
            headers=self._headers,
            json_body=body,
            files=parts,
            operation=f"{operation} (stream)",
            scope=scope,
        ) as opened:
            if isinstance(opened, UpstreamResponse):
                return await self._answer(opened, deadline, scope)
            images: list[GeneratedImage] = []
            usages: list[TokenUsage] = []
            last: StreamEvent | None = None
            partials = 0
            async for sse in opened:
                event = await _event(sse)
                kind = event.type or sse.event
                if kind == "error" or "error" in event.model_fields_set:
                    raise self._stream_error(event)
                if kind in PARTIAL_EVENTS:
                    image = await image_from_base64(event.b64_json)
                    index = event.partial_image_index
                    reported = event.result([image], TokenUsage())
                    await progress.partial(len(images), index if index is not None else partials, image, reported)
                    partials += 1
                elif kind in COMPLETED_EVENTS:
                    image = await image_from_base64(event.b64_json)
                    event.b64_json = None
                    images.append(image)
                    usages.append(event.tokens())
                    last = event
                    partials = 0
                    await progress.image(len(images) - 1, image, event.result([image]))
                # Other event types (a newer API's) carry nothing we deliver.
        if not images or last is None:
            raise malformed("a stream that ended without an image")
        return last.result(images, sum_usage(usages))

    def _stream_error(self, event: StreamEvent) -> ApiError:
        """An ``error`` event, mapped by its code like an error answer of the same kind."""
        fields: _ErrorDetail = event.error if event.error is not None else event
        codes = [fields.code or None, fields.type or None]
        status = 500 if fields.type == "server_error" else 400
        kind = lookup_kind(ERRORS, status, codes)
        if kind in (Kind.RATE_LIMITED, Kind.TRANSIENT):
            # Not retried here: the caller may hold partial images already.
            logger.warning("%s stream failed midway (code %s)", self.name, codes[0])
            return UpstreamError("The upstream provider failed while streaming.", retryable=True)
        return self._http.error(Failure(kind, detail=fields.message or "", status=status, code=codes[0]))

    async def _answer(self, response: UpstreamResponse, deadline: float, scope: AnswerScope) -> ProviderResult:
        answer = await response.parse(ImagesAnswer)
        del response  # the raw body: one copy of the images fewer while they are decoded
        images: list[GeneratedImage] = []
        flagged = 0
        for item in answer.data:
            if item.respect_moderation is False:
                flagged += 1
                continue
            revised = item.revised_prompt or None
            if item.b64_json is not None:
                encoded, item.b64_json = item.b64_json, None  # freed as soon as its image is decoded
                images.append(await image_from_base64(encoded, revised_prompt=revised))
                del encoded
            elif item.url:
                image = await self._http.download_image(item.url, deadline=deadline, scope=scope)
                images.append(GeneratedImage(data=image.data, format=image.format, revised_prompt=revised))
            else:
                raise malformed("a data entry without b64_json or url")
        if not images:
            if flagged or (self.dialect == "xai" and not answer.data):
                # xAI's moderation answer is a 200 with nothing usable in it.
                raise ContentPolicyError("The upstream provider's safety system rejected the request.")
            raise malformed("an answer with no images")
        return answer.result(images)

    async def aclose(self) -> None:
        """Nothing to release: the composition root owns and closes the HTTP client."""
