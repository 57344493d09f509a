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
  ``imageConfig.aspectRatio``. ``promptFeedback.blockReason`` and the image finish reasons
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

from collections.abc import Callable, Mapping

import httpx

from server.config import MIB
from server.errors import ContentPolicyError, InvalidRequestError, UpstreamError
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
    UpstreamHttp,
    UpstreamResponse,
    fan_out,
    image_from_base64,
    lookup_kind,
    malformed,
    parse_duration,
    sum_usage,
)
from server.providers.sizing import (
    GEMINI_ASPECT_RATIOS,
    IMAGEN_ASPECT_RATIOS,
    nearest_aspect_ratio,
)

__all__ = ["ERRORS", "FINISH_REASONS", "GoogleImageProvider"]

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
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


def classify(method: str, response: UpstreamResponse) -> Failure:
    """Maps a non-2xx Google answer through ``ERRORS`` by its structured fields."""
    body = response.json_or_none()
    if isinstance(body, list) and len(body) == 1:
        body = body[0]
    error = body.get("error") if isinstance(body, dict) else None
    if not isinstance(error, dict):
        return Failure(lookup_kind(ERRORS, response.status, []), status=response.status)
    status = error.get("status") if isinstance(error.get("status"), str) else None
    reason: str | None = None
    retry_after: float | None = None
    per_day = False
    details = error.get("details")
    for detail in details if isinstance(details, list) else []:
        if not isinstance(detail, dict):
            continue
        kind = detail.get("@type")
        if kind == "type.googleapis.com/google.rpc.ErrorInfo" and isinstance(detail.get("reason"), str):
            reason = detail["reason"]
        elif kind == "type.googleapis.com/google.rpc.RetryInfo":
            retry_after = parse_duration(detail.get("retryDelay"))
        elif kind == "type.googleapis.com/google.rpc.QuotaFailure":
            violations = detail.get("violations")
            for violation in violations if isinstance(violations, list) else []:
                quota_id = violation.get("quotaId") if isinstance(violation, dict) else None
                # quotaId is an identifier such as GenerateRequestsPerDayPerProjectPerModel.
                if isinstance(quota_id, str) and "PerDay" in quota_id:
                    per_day = True
    codes = [reason, QUOTA_PER_DAY if per_day else None, f"{method}:{status}" if status else None, status]
    message = error.get("message")
    return Failure(
        lookup_kind(ERRORS, response.status, codes),
        detail=message if isinstance(message, str) else "",
        status=response.status,
        code=next((c for c in codes if c), None),
        retry_after=retry_after,
    )


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def _by_modality(details: object) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in details if isinstance(details, list) else []:
        if isinstance(entry, dict) and isinstance(entry.get("modality"), str):
            counts[entry["modality"]] = counts.get(entry["modality"], 0) + _count(entry.get("tokenCount"))
    return counts


def gemini_usage(payload: dict[str, object]) -> TokenUsage:
    """``usageMetadata`` as token counts by modality."""
    meta = payload.get("usageMetadata")
    if not isinstance(meta, dict):
        return TokenUsage()
    prompt = _by_modality(meta.get("promptTokensDetails"))
    output = _by_modality(meta.get("candidatesTokensDetails"))
    return TokenUsage(
        input_text_tokens=prompt.get("TEXT", _count(meta.get("promptTokenCount")) if not prompt else 0),
        input_image_tokens=prompt.get("IMAGE", 0),
        output_image_tokens=output.get("IMAGE", _count(meta.get("candidatesTokenCount")) if not output else 0),
        output_text_tokens=output.get("TEXT", 0),
    )


class GoogleImageProvider:
    """Imagen and Gemini image models on the Gemini API (see the module docstring)."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        *,
        api_key: str,
        base_url: str = DEFAULT_BASE_URL,
        api_version: str = "v1beta",
        name: str = "google",
        max_response_bytes: int = 128 * MIB,
        retry: RetryPolicy | None = None,
        key_setting: str = "IMAGEGW_GOOGLE_API_KEY",
        on_retry: Callable[[], None] | None = None,
        fan_out_concurrency: int = 4,
    ) -> None:
        self.name = name
        self._base = f"{base_url.rstrip('/')}/{api_version}/models"
        self._headers = {"x-goog-api-key": api_key}
        self._concurrency = fan_out_concurrency
        self._http = UpstreamHttp(
            http,
            provider=name,
            max_response_bytes=max_response_bytes,
            retry=retry or RetryPolicy(),
            key_setting=key_setting,
            on_retry=on_retry,
        )

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

    def gemini_body(self, request: ImageRequest) -> dict[str, object]:
        """The ``:generateContent`` body for one image of ``request``."""
        if request.output_format != "png":
            # The Gemini API has no output MIME type option (Vertex only); it answers PNG.
            raise InvalidRequestError(
                f"Invalid value for 'output_format': model '{request.model_id}' supports 'png' only.",
                param="output_format",
            )
        return {
            "contents": [{"role": "user", "parts": [{"text": request.prompt}]}],
            "generationConfig": {
                "responseModalities": ["IMAGE"],
                "imageConfig": {
                    "aspectRatio": nearest_aspect_ratio(request.width, request.height, GEMINI_ASPECT_RATIOS)
                },
            },
        }

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        """Up to ``request.n`` images; partial when the safety filter dropped some."""
        if self.method(request.upstream_model) == "predict":
            return await self._imagen(request, deadline)
        body = self.gemini_body(request)
        result = await fan_out(
            request.n,
            lambda _index: self._gemini_once(request, body, deadline),
            concurrency=self._concurrency,
            provider=self.name,
            progress=progress,
        )
        if len(result.images) > request.n:
            # Never deliver (or charge) more than was asked, even if a call returned two.
            result = ProviderResult(images=result.images[: request.n], usage=result.usage)
        return result

    async def _post(self, request: ImageRequest, method: str, body: dict[str, object], deadline: float) -> UpstreamResponse:
        return await self._http.send(
            "POST",
            f"{self._base}/{request.upstream_model}:{method}",
            deadline=deadline,
            classify=lambda response: classify(method, response),
            headers=self._headers,
            json_body=body,
            operation=method,
        )

    async def _imagen(self, request: ImageRequest, deadline: float) -> ProviderResult:
        response = await self._post(request, "predict", self.imagen_body(request), deadline)
        payload = await response.json()
        if not isinstance(payload, dict):
            raise malformed("an answer that is not a JSON object")
        predictions = payload.get("predictions", [])
        if not isinstance(predictions, list):
            raise malformed("predictions that are not a list")
        images: list[GeneratedImage] = []
        filtered = 0
        for prediction in predictions:
            if not isinstance(prediction, dict):
                raise malformed("a prediction that is not an object")
            if "bytesBase64Encoded" in prediction:
                revised = prediction.get("prompt") if isinstance(prediction.get("prompt"), str) else None
                images.append(await image_from_base64(prediction["bytesBase64Encoded"], revised_prompt=revised))
            elif "raiFilteredReason" in prediction:
                filtered += 1
            elif prediction.get("contentType") == "Positive Prompt":
                continue  # prompt safety attributes, not an image
            else:
                raise malformed("a prediction without bytesBase64Encoded")
        if images:
            return ProviderResult(images=images[: request.n])
        # All filtered: only the reason entry, or `{}` when reasons are off (python-genai guards the same).
        raise ContentPolicyError("The upstream provider's safety system rejected the request.")

    async def _gemini_once(self, request: ImageRequest, body: dict[str, object], deadline: float) -> ProviderResult:
        response = await self._post(request, "generateContent", body, deadline)
        payload = await response.json()
        if not isinstance(payload, dict):
            raise malformed("an answer that is not a JSON object")
        feedback = payload.get("promptFeedback")
        if isinstance(feedback, dict) and feedback.get("blockReason"):
            raise ContentPolicyError("The upstream provider's safety system rejected the request.")
        candidates = payload.get("candidates", [])
        if not isinstance(candidates, list):
            raise malformed("candidates that are not a list")
        images: list[GeneratedImage] = []
        reasons: list[str] = []
        for candidate in candidates:
            if not isinstance(candidate, dict):
                raise malformed("a candidate that is not an object")
            if isinstance(candidate.get("finishReason"), str):
                reasons.append(candidate["finishReason"])
            content = candidate.get("content")
            parts = content.get("parts", []) if isinstance(content, dict) else []
            for part in parts if isinstance(parts, list) else []:
                if not isinstance(part, dict) or part.get("thought"):
                    continue  # Gemini 3 thinking parts are drafts, not answers
                inline = part.get("inlineData")
                if isinstance(inline, dict):
                    images.append(await image_from_base64(inline.get("data")))
        if images:
            return ProviderResult(images=images, usage=sum_usage([gemini_usage(payload)]))
        if any(FINISH_REASONS.get(reason) is Kind.CONTENT_POLICY for reason in reasons):
            raise ContentPolicyError("The upstream provider's safety system rejected the request.")
        if not candidates:
            raise malformed("an answer with neither candidates nor a block reason")
        # NO_IMAGE, IMAGE_OTHER, or a text-only reply: the model chose not to draw.
        finish = reasons[0] if reasons else "none"
        raise UpstreamError(f"The upstream model answered without an image (finishReason {finish}).", retryable=False)

    async def aclose(self) -> None:
        """Nothing to release: the composition root owns and closes the HTTP client."""
