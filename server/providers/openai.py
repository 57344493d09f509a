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

``url`` answers are downloaded at once (DALL·E links live 60 minutes, others less) and
never passed on. Errors map by status and ``error.code`` (then ``error.type``) in
``ERRORS``; xAI's ``{"code", "error"}`` body is read the same way.

Streaming: when the caller streams (a ``Progress`` is given) a GPT image model is asked
for OpenAI's own stream (``stream: true``, ``partial_images``), and each
``image_generation.partial_image`` and ``image_generation.completed`` event is validated
and passed on as it arrives. OpenAI's events carry no image index, so with ``n`` > 1 the
partials are taken to belong to the image being made, the images coming one after the
other. An ``error`` event maps through ``ERRORS`` like an error answer; a host that ignores
``stream`` and answers JSON is read as a plain answer.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable

import httpx

from server.config import MIB
from server.errors import ApiError, ContentPolicyError, InvalidRequestError, UpstreamError
from server.offload import run_sized
from server.providers.base import (
    GeneratedImage,
    ImageRequest,
    Progress,
    ProviderResult,
    TokenUsage,
)
from server.providers.http import (
    ErrorTable,
    Failure,
    Kind,
    RetryPolicy,
    SseEvent,
    UpstreamHttp,
    UpstreamResponse,
    image_from_base64,
    lookup_kind,
    malformed,
    sum_usage,
)
from server.providers.sizing import XAI_ASPECT_RATIOS, nearest_aspect_ratio

__all__ = ["DIALECTS", "ERRORS", "OpenAIImageProvider"]

logger = logging.getLogger(__name__)

DIALECTS = ("openai", "compatible", "xai", "together")
DEFAULT_BASE_URL = "https://api.openai.com/v1"

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


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _usage(payload: dict[str, object]) -> TokenUsage:
    usage = payload.get("usage")
    if not isinstance(usage, dict):
        return TokenUsage()
    inputs = usage.get("input_tokens_details")
    outputs = usage.get("output_tokens_details")
    if isinstance(inputs, dict):
        input_text, input_image = _count(inputs.get("text_tokens")), _count(inputs.get("image_tokens"))
    else:
        input_text, input_image = _count(usage.get("input_tokens")), 0
    if isinstance(outputs, dict):
        output_image, output_text = _count(outputs.get("image_tokens")), _count(outputs.get("text_tokens"))
    else:
        # Older answers only give the total; for an image model it is image tokens.
        output_image, output_text = _count(usage.get("output_tokens")), 0
    return TokenUsage(
        input_text_tokens=input_text,
        input_image_tokens=input_image,
        output_image_tokens=output_image,
        output_text_tokens=output_text,
    )


def _string(payload: dict[str, object], key: str) -> str | None:
    value = payload.get(key)
    return value if isinstance(value, str) and value else None


def _reported(payload: dict[str, object], image: GeneratedImage, usage: TokenUsage) -> ProviderResult:
    """What one streamed event says about its image."""
    return ProviderResult(
        images=[image],
        usage=usage,
        size=_string(payload, "size"),
        quality=_string(payload, "quality"),
        background=_string(payload, "background"),
        output_format=_string(payload, "output_format"),
    )


async def _event_payload(event: SseEvent) -> dict[str, object]:
    try:
        payload = await run_sized(len(event.data), json.loads, event.data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise malformed("a stream event that is not JSON") from exc
    if not isinstance(payload, dict):
        raise malformed("a stream event that is not a JSON object")
    return payload


def classify(response: UpstreamResponse) -> Failure:
    """Maps a non-2xx answer through ``ERRORS`` by structured fields only."""
    body = response.json_or_none()
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    codes: list[str | None] = []
    detail = ""
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI, Together, Azure
            codes = [_string(error, "code"), _string(error, "type")]
            detail = _string(error, "message") or ""
        elif isinstance(error, str):  # xAI: {"code": "...", "error": "..."}
            codes = [_string(body, "code")]
            detail = error
    kind = lookup_kind(ERRORS, response.status, codes)
    return Failure(kind, detail=detail, status=response.status, code=next((c for c in codes if c), None))


class OpenAIImageProvider:
    """Images from OpenAI or any host speaking its images API (see the module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        dialect: str = "openai",
        name: str = "openai",
        max_response_bytes: int = 128 * MIB,
        retry: RetryPolicy | None = None,
        key_setting: str = "IMAGEGW_OPENAI_API_KEY",
        on_retry: Callable[[], None] | None = None,
    ) -> None:
        if dialect not in DIALECTS:
            raise ValueError(f"unknown OpenAI dialect {dialect!r}; expected one of {DIALECTS}")
        self.name = name
        self.dialect = dialect
        # The SDK's convention: the base URL includes the version ("https://api.openai.com/v1").
        self._url = base_url.rstrip("/") + "/images/generations"
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = UpstreamHttp(
            http,
            provider=name,
            max_response_bytes=max_response_bytes,
            retry=retry or RetryPolicy(),
            key_setting=key_setting,
            on_retry=on_retry,
        )

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

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """One upstream call returning up to ``request.n`` images; see ``ERRORS`` for failures."""
        if progress is not None and self.family(request.upstream_model) == "gpt-image":
            return await self._generate_streamed(request, deadline, progress)
        response = await self._http.send(
            "POST",
            self._url,
            deadline=deadline,
            classify=classify,
            headers=self._headers,
            json_body=self.request_body(request),
            operation="images/generations",
        )
        return await self._answer(response, deadline)

    async def _generate_streamed(self, request: ImageRequest, deadline: float, progress: Progress) -> ProviderResult:
        body = self.request_body(request) | {"stream": True, "partial_images": request.partial_images}
        async with self._http.stream(
            "POST",
            self._url,
            deadline=deadline,
            classify=classify,
            headers=self._headers,
            json_body=body,
            operation="images/generations (stream)",
        ) as opened:
            if isinstance(opened, UpstreamResponse):
                return await self._answer(opened, deadline)
            images: list[GeneratedImage] = []
            usages: list[TokenUsage] = []
            last: dict[str, object] = {}
            partials = 0
            async for event in opened:
                payload = await _event_payload(event)
                kind = payload.get("type") if isinstance(payload.get("type"), str) else event.event
                if kind == "error" or "error" in payload:
                    raise self._stream_error(payload)
                if kind == "image_generation.partial_image":
                    image = await image_from_base64(payload.pop("b64_json", None))
                    index = payload.get("partial_image_index")
                    reported = _reported(payload, image, TokenUsage())
                    await progress.partial(len(images), index if isinstance(index, int) else partials, image, reported)
                    partials += 1
                elif kind == "image_generation.completed":
                    image = await image_from_base64(payload.pop("b64_json", None))
                    usage = _usage(payload)
                    images.append(image)
                    usages.append(usage)
                    last = payload
                    partials = 0
                    await progress.image(len(images) - 1, image, _reported(payload, image, usage))
                # Other event types (a newer API's) carry nothing we deliver.
        if not images:
            raise malformed("a stream that ended without an image")
        return ProviderResult(
            images=images,
            usage=sum_usage(usages),
            size=_string(last, "size"),
            quality=_string(last, "quality"),
            background=_string(last, "background"),
            output_format=_string(last, "output_format"),
        )

    def _stream_error(self, payload: dict[str, object]) -> ApiError:
        """An ``error`` event, mapped by its code like an error answer of the same kind."""
        error = payload.get("error")
        fields = error if isinstance(error, dict) else payload
        codes = [_string(fields, "code"), _string(fields, "type")]
        status = 500 if _string(fields, "type") == "server_error" else 400
        kind = lookup_kind(ERRORS, status, codes)
        if kind in (Kind.RATE_LIMITED, Kind.TRANSIENT):
            # Not retried here: the caller may hold partial images already.
            logger.warning("%s stream failed midway (code %s)", self.name, codes[0])
            return UpstreamError("The upstream provider failed while streaming.", retryable=True)
        return self._http.error(Failure(kind, detail=_string(fields, "message") or "", status=status, code=codes[0]))

    async def _answer(self, response: UpstreamResponse, deadline: float) -> ProviderResult:
        payload = await response.json()
        del response  # the raw body: one copy of the images fewer while they are decoded
        if not isinstance(payload, dict):
            raise malformed("an answer that is not a JSON object")
        data = payload.get("data")
        if not isinstance(data, list):
            raise malformed("an answer without a data list")
        images: list[GeneratedImage] = []
        flagged = 0
        for item in data:
            if not isinstance(item, dict):
                raise malformed("a data entry that is not an object")
            if item.get("respect_moderation") is False:
                # xAI returns a moderated image as an entry without bytes.
                flagged += 1
                continue
            revised = _string(item, "revised_prompt")
            if item.get("b64_json") is not None:
                # Popped: each base64 text is freed as soon as its image is decoded.
                images.append(await image_from_base64(item.pop("b64_json"), revised_prompt=revised))
            elif isinstance(item.get("url"), str) and item["url"]:
                image = await self._http.download_image(item["url"], deadline=deadline)
                images.append(GeneratedImage(data=image.data, format=image.format, revised_prompt=revised))
            else:
                raise malformed("a data entry without b64_json or url")
        if not images:
            if flagged or (self.dialect == "xai" and not data):
                # xAI's moderation answer is a 200 with nothing usable in it.
                raise ContentPolicyError("The upstream provider's safety system rejected the request.")
            raise malformed("an answer with no images")
        return ProviderResult(
            images=images,
            usage=_usage(payload),
            size=_string(payload, "size"),
            quality=_string(payload, "quality"),
            background=_string(payload, "background"),
            output_format=_string(payload, "output_format"),
        )

    async def aclose(self) -> None:
        """Nothing to release: the composition root owns and closes the HTTP client."""
