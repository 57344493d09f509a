"""Google's Gemini API: Imagen ``:predict`` and Gemini native image output ``:generateContent``.

Both live under ``{base}/v1beta/models/{model}:{method}`` with the ``x-goog-api-key``
header (``reference/providers.md`` §2); the base URL is the host, as in google-genai.
The method follows the upstream model name: ``imagen-*`` models use ``:predict``, every
other model ``:generateContent`` (LiteLLM #17923: sending Gemini to ``:predict`` is a 400).

* Imagen: ``n`` -> ``sampleCount`` exactly (LiteLLM #3482: a missing one gives four images),
  size -> ``aspectRatio`` (``server.providers.sizing``), output format ->
  ``outputOptions.mimeType``; ``includeRaiReason`` is always on so filtered slots are
  visible. Fewer predictions than asked is a partial success; none is the caller's
  ``content_policy_violation``.
* Gemini: one image per call, so ``n`` fans out with bounded concurrency; size ->
  ``imageConfig.aspectRatio``. An edit sends the prompt's text part, then each input image
  as an ``inlineData`` part (``{mimeType, data}``, base64; python-genai ``_Part_to_mldev``,
  the Gemini API's "Image generation" guide, text-and-image-to-image; Vertex AI's "Edit
  images with Gemini"), on every call of the fan-out (each call bills them as input
  tokens, ``usageMetadata.promptTokensDetails`` IMAGE, which the catalog prices); with
  ``size: auto`` no aspect ratio, so the output keeps the input's. Gemini takes no mask
  (the catalog refuses one). The body, megabytes of base64, is encoded off the loop once. ``promptFeedback.blockReason`` and the image finish reasons
  in ``FINISH_REASONS`` are moderation; an answer with no image part is never a success.
  ``usageMetadata`` becomes ``TokenUsage`` (1290 output image tokens per 1024² image).

Errors follow Google's model ``{"error": {code, message, status, details[]}}`` (sometimes
wrapped in a one-element list). ``ERRORS`` keys on the HTTP status and, most specific
first, the ``ErrorInfo.reason``, a per-day quota marker, ``{method}:{status}`` and
``status``. An invalid key is a **400** ``API_KEY_INVALID``, not a 401. A 429 carries no
``Retry-After`` header: the wait is ``RetryInfo.retryDelay`` in the body. Imagen refuses a
prompt with a bare 400 ``INVALID_ARGUMENT`` and no reason field; since every parameter we
send was validated by the catalog first, that row reads as moderation.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import ConfigDict, Field
from pydantic.alias_generators import to_camel

from server.errors import ContentPolicyError, InvalidRequestError, ModelNotSupportedError, UpstreamError
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
    UpstreamHttp,
    UpstreamModel,
    UpstreamResponse,
    fan_out,
    image_from_base64,
    input_base64,
    json_content,
    lookup_kind,
    malformed,
    parse_duration,
)
from server.providers.sizing import (
    GEMINI_ASPECT_RATIOS,
    IMAGEN_ASPECT_RATIOS,
    nearest_aspect_ratio,
)

__all__ = ["ERRORS", "FINISH_REASONS", "GoogleImageProvider"]

IMAGEN_MIME_TYPES = {"png": "image/png", "jpeg": "image/jpeg"}
QUOTA_PER_DAY = "QUOTA_PER_DAY"

# The one table: (HTTP status, reason | marker | "{method}:{status}" | status) -> kind.
ERRORS: ErrorTable = {
    (400, "API_KEY_INVALID"): Kind.CREDENTIALS,
    (400, "API_KEY_EXPIRED"): Kind.CREDENTIALS,
    (400, "predict:INVALID_ARGUMENT"): Kind.CONTENT_POLICY,  # "The prompt could not be submitted..."
    (400, "FAILED_PRECONDITION"): Kind.ACCOUNT,  # free tier unavailable here: billing must be enabled
    (400, "INVALID_ARGUMENT"): Kind.REJECTED,
    (401, None): Kind.CREDENTIALS,  # UNAUTHENTICATED
    (403, None): Kind.CREDENTIALS,  # PERMISSION_DENIED, SERVICE_DISABLED, missing key
    (404, None): Kind.MODEL_UNAVAILABLE,  # shut-down or misspelled model ids
    (429, QUOTA_PER_DAY): Kind.ACCOUNT,  # a per-day quota does not come back within a request
    (429, None): Kind.RATE_LIMITED,
}

# Gemini's 200-with-a-flag moderation: why a candidate carries no image.
FINISH_REASONS: Mapping[str, Kind] = {
    "IMAGE_SAFETY": Kind.CONTENT_POLICY,
    "IMAGE_PROHIBITED_CONTENT": Kind.CONTENT_POLICY,
    "IMAGE_RECITATION": Kind.CONTENT_POLICY,
    "SAFETY": Kind.CONTENT_POLICY,
    "PROHIBITED_CONTENT": Kind.CONTENT_POLICY,
    "BLOCKLIST": Kind.CONTENT_POLICY,
    "SPII": Kind.CONTENT_POLICY,
    "RECITATION": Kind.CONTENT_POLICY,
}


class _Camel(UpstreamModel):
    model_config = ConfigDict(alias_generator=to_camel)


class _Violation(_Camel):
    # An identifier such as GenerateRequestsPerDayPerProjectPerModel.
    quota_id: Informational[str] = None


class _ErrorDetail(_Camel):
    type: Informational[str] = Field(default=None, alias="@type")
    reason: Informational[str] = None  # ErrorInfo
    retry_delay: Informational[str] = None  # RetryInfo, a protobuf Duration ("26s")
    violations: Informational[list[Informational[_Violation]]] = None  # QuotaFailure


class _Error(_Camel):
    status: Informational[str] = None
    message: Informational[str] = None
    details: Informational[list[Informational[_ErrorDetail]]] = None


class _ErrorBody(ErrorBody):
    error: Informational[_Error] = None


def classify(method: str, response: UpstreamResponse) -> Failure:
    """Maps a non-2xx Google answer through ``ERRORS`` by its structured fields."""
    body = response.parse_or_none(_ErrorBody)
    error = body.error if body is not None else None
    if error is None:
        return Failure(lookup_kind(ERRORS, response.status, []), status=response.status)
    status = error.status or None
    reason: str | None = None
    retry_after: float | None = None
    per_day = False
    for detail in [d for d in error.details or [] if d is not None]:
        if detail.type == "type.googleapis.com/google.rpc.ErrorInfo" and detail.reason is not None:
            reason = detail.reason
        elif detail.type == "type.googleapis.com/google.rpc.RetryInfo":
            retry_after = parse_duration(detail.retry_delay)
        elif detail.type == "type.googleapis.com/google.rpc.QuotaFailure":
            per_day |= any(v is not None and v.quota_id is not None and "PerDay" in v.quota_id for v in detail.violations or [])
    codes = [reason, QUOTA_PER_DAY if per_day else None, f"{method}:{status}" if status else None, status]
    return Failure(
        lookup_kind(ERRORS, response.status, codes),
        detail=error.message or "",
        status=response.status,
        code=next((c for c in codes if c), None),
        retry_after=retry_after,
    )


class _Prediction(_Camel):
    # Which of these is *present* says what the entry is (an image, a filter note, safety scores).
    bytes_base64_encoded: str | None = None
    rai_filtered_reason: Informational[str] = None
    content_type: Informational[str] = None
    prompt: Informational[str] = None  # Imagen's enhanced prompt


class ImagenAnswer(_Camel):
    """A 200 from ``:predict``: ``{}`` when every image was filtered and reasons are off."""

    predictions: list[_Prediction] = []


class _InlineData(_Camel):
    data: str | None = None


class _Part(_Camel):
    thought: Informational[bool] = None
    inline_data: Informational[_InlineData] = None


class _Content(_Camel):
    parts: Informational[list[Informational[_Part]]] = None


class _Candidate(_Camel):
    finish_reason: Informational[str] = None
    content: Informational[_Content] = None


class _PromptFeedback(_Camel):
    block_reason: Informational[str] = None


class _ModalityCount(_Camel):
    modality: Informational[str] = None
    token_count: Count = 0


class _UsageMetadata(_Camel):
    prompt_token_count: Count = 0
    candidates_token_count: Count = 0
    prompt_tokens_details: Informational[list[Informational[_ModalityCount]]] = None
    candidates_tokens_details: Informational[list[Informational[_ModalityCount]]] = None

    def tokens(self) -> TokenUsage:
        """Token counts by modality (the totals when an answer gives no breakdown)."""
        prompt = _by_modality(self.prompt_tokens_details)
        output = _by_modality(self.candidates_tokens_details)
        return TokenUsage(
            input_text_tokens=prompt.get("TEXT", self.prompt_token_count if not prompt else 0),
            input_image_tokens=prompt.get("IMAGE", 0),
            output_image_tokens=output.get("IMAGE", self.candidates_token_count if not output else 0),
            output_text_tokens=output.get("TEXT", 0),
        )


def _by_modality(details: list[_ModalityCount | None] | None) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in details or []:
        if entry is not None and entry.modality is not None:
            counts[entry.modality] = counts.get(entry.modality, 0) + entry.token_count
    return counts


class GeminiAnswer(_Camel):
    """A 200 from ``:generateContent``."""

    prompt_feedback: Informational[_PromptFeedback] = None
    candidates: list[_Candidate] = []
    usage_metadata: Informational[_UsageMetadata] = None


class GoogleImageProvider:
    """Imagen and Gemini image models on the Gemini API (see the module docstring)."""

    def __init__(
        self,
        http: UpstreamHttp,
        *,
        api_key: str,
        base_url: str,
        api_version: str = "v1beta",
    ) -> None:
        self.name = http.provider
        self._base = f"{base_url.rstrip('/')}/{api_version}/models"
        self._headers = {"x-goog-api-key": api_key}
        self._http = http

    @staticmethod
    def method(upstream_model: str) -> str:
        """``predict`` for Imagen models, ``generateContent`` for Gemini image models."""
        return "predict" if upstream_model.startswith("imagen") else "generateContent"

    def imagen_body(self, request: ImageRequest) -> dict[str, object]:
        """The ``:predict`` body for ``request``."""
        mime = IMAGEN_MIME_TYPES.get(request.output_format)
        if mime is None:
            raise InvalidRequestError(
                f"Invalid value for 'output_format': model '{request.model_id}' supports 'png' and 'jpeg'.",
                param="output_format",
            )
        output: dict[str, object] = {"mimeType": mime}
        if request.output_format == "jpeg" and request.output_compression < 100:
            output["compressionQuality"] = request.output_compression
        return {
            "instances": [{"prompt": request.prompt}],
            "parameters": {
                "sampleCount": request.n,
                "aspectRatio": nearest_aspect_ratio(request.width, request.height, IMAGEN_ASPECT_RATIOS),
                "includeRaiReason": True,
                "outputOptions": output,
            },
        }

    async def gemini_body(self, request: ImageRequest) -> dict[str, object]:
        """The ``:generateContent`` body for one image of ``request`` (an edit's images inline)."""
        if request.output_format != "png":
            # The Gemini API has no output MIME type option (Vertex only); it answers PNG.
            raise InvalidRequestError(
                f"Invalid value for 'output_format': model '{request.model_id}' supports 'png' only.",
                param="output_format",
            )
        parts: list[dict[str, object]] = [{"text": request.prompt}]
        for image in request.images:
            parts.append({"inlineData": {"mimeType": image.content_type, "data": await input_base64(image)}})
        config: dict[str, object] = {"responseModalities": ["IMAGE"]}
        if not (request.operation == "edit" and request.size_is_auto):
            # An edit without a size keeps its input's shape (Gemini's default for edits).
            ratio = nearest_aspect_ratio(request.width, request.height, GEMINI_ASPECT_RATIOS)
            config["imageConfig"] = {"aspectRatio": ratio}
        return {"contents": [{"role": "user", "parts": parts}], "generationConfig": config}

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """Up to ``request.n`` images; partial when the safety filter dropped some."""
        if self.method(request.upstream_model) == "predict":
            if request.operation != "generate":
                raise ModelNotSupportedError(
                    f"The model '{request.model_id}' cannot edit images (Imagen's :predict takes a prompt only).",
                    param="model",
                )
            return await self._imagen(request, deadline)
        body = await json_content(await self.gemini_body(request), size=sum(image.size for image in request.images) * 2)
        result = await fan_out(
            request.n,
            lambda _index: self._gemini_once(request, body, deadline),
            concurrency=self._http.fan_out_width,
            provider=self.name,
            progress=progress,
        )
        if len(result.images) > request.n:
            # Never deliver (or charge) more than was asked, even if a call returned two.
            result = ProviderResult(images=result.images[: request.n], usage=result.usage)
        return result

    async def _post(
        self, request: ImageRequest, method: str, body: dict[str, object] | bytes, deadline: float, scope: AnswerScope
    ) -> UpstreamResponse:
        encoded = isinstance(body, bytes)
        return await self._http.send(
            "POST",
            f"{self._base}/{request.upstream_model}:{method}",
            deadline=deadline,
            classify=lambda response: classify(method, response),
            headers=self._headers | {"content-type": "application/json"} if encoded else self._headers,
            json_body=None if encoded else body,
            content=body if isinstance(body, bytes) else None,
            operation=method,
            scope=scope,
        )

    async def _imagen(self, request: ImageRequest, deadline: float) -> ProviderResult:
        # A large answer keeps its gate slot until its images are decoded and checked.
        async with self._http.answer() as scope:
            return await self._imagen_answer(request, deadline, scope)

    async def _imagen_answer(self, request: ImageRequest, deadline: float, scope: AnswerScope) -> ProviderResult:
        response = await self._post(request, "predict", self.imagen_body(request), deadline, scope)
        answer = await response.parse(ImagenAnswer)
        del response
        images: list[GeneratedImage] = []
        for prediction in answer.predictions:
            present = prediction.model_fields_set
            if "bytes_base64_encoded" in present:
                encoded, prediction.bytes_base64_encoded = prediction.bytes_base64_encoded, None
                images.append(await image_from_base64(encoded, revised_prompt=prediction.prompt or None))
                del encoded
            elif "rai_filtered_reason" in present:
                continue  # filtered images: fewer than asked, a partial success
            elif prediction.content_type == "Positive Prompt":
                continue  # prompt safety attributes, not an image
            else:
                raise malformed("a prediction without bytesBase64Encoded")
        if images:
            return ProviderResult(images=images[: request.n])
        # All filtered: only the reason entry, or `{}` when reasons are off (python-genai guards the same).
        raise ContentPolicyError("The upstream provider's safety system rejected the request.")

    async def _gemini_once(self, request: ImageRequest, body: bytes, deadline: float) -> ProviderResult:
        async with self._http.answer() as scope:
            return await self._gemini_answer(request, body, deadline, scope)

    async def _gemini_answer(self, request: ImageRequest, body: bytes, deadline: float, scope: AnswerScope) -> ProviderResult:
        response = await self._post(request, "generateContent", body, deadline, scope)
        answer = await response.parse(GeminiAnswer)
        del response
        if answer.prompt_feedback is not None and answer.prompt_feedback.block_reason:
            raise ContentPolicyError("The upstream provider's safety system rejected the request.")
        images: list[GeneratedImage] = []
        reasons = [c.finish_reason for c in answer.candidates if c.finish_reason is not None]
        for candidate in answer.candidates:
            parts = candidate.content.parts if candidate.content is not None else None
            for part in parts or []:
                if part is None or part.thought:
                    continue  # Gemini 3 thinking parts are drafts, not answers
                if part.inline_data is not None:
                    encoded, part.inline_data.data = part.inline_data.data, None
                    images.append(await image_from_base64(encoded))
                    del encoded
        if images:
            usage = answer.usage_metadata.tokens() if answer.usage_metadata is not None else TokenUsage()
            return ProviderResult(images=images, usage=usage)
        if any(FINISH_REASONS.get(reason) is Kind.CONTENT_POLICY for reason in reasons):
            raise ContentPolicyError("The upstream provider's safety system rejected the request.")
        if not answer.candidates:
            raise malformed("an answer with neither candidates nor a block reason")
        # NO_IMAGE, IMAGE_OTHER, or a text-only reply: the model chose not to draw.
        finish = reasons[0] if reasons else "none"
        raise UpstreamError(f"The upstream model answered without an image (finishReason {finish}).", retryable=False)

    async def aclose(self) -> None:
        """Nothing to release: the composition root owns and closes the HTTP client."""
