"""A fake Gemini API: Imagen ``:predict`` and Gemini ``:generateContent`` image output.

Faithful to ``reference/providers.md`` §2 and §8: ``POST /v1beta/models/{model}:{method}``
with ``x-goog-api-key`` (or ``?key=``); a missing key is 403 ``PERMISSION_DENIED``, a wrong
one **400** ``INVALID_ARGUMENT`` with ``ErrorInfo.reason = API_KEY_INVALID``; errors use
``{"error": {code, message, status, details[]}}``; an unknown model or the wrong method
for a model is 404/400; Imagen validates ``sampleCount`` (1..4), ``aspectRatio`` and
refuses the Vertex-only ``negativePrompt``/``seed``; Gemini validates ``imageConfig``.
Imagen answers ``predictions[{mimeType, bytesBase64Encoded}]`` (fewer when filtered, with a
``raiFilteredReason`` entry); Gemini answers one ``inlineData`` part plus ``usageMetadata``
(1290 IMAGE tokens).

Gemini edits: ``inlineData`` parts after the prompt's text part (``{mimeType, data}``,
each a whole PNG/JPEG/WebP of that type, else 400 INVALID_ARGUMENT); their tokens appear in
``usageMetadata.promptTokensDetails`` as IMAGE (258 per image up to 384 pixels a side,
else 258 per 768-pixel tile); without ``imageConfig.aspectRatio`` the output keeps the
first input's shape (the nearest supported ratio).

Endpoints (``tests.fakes.provider``): ``predict`` (Imagen), ``generate_content`` (Gemini).
Scenarios (prompt token or ``fake.enqueue``):

    Imagen:  partial (n-1 images + raiFilteredReason), all-filtered (only the reason entry),
             all-filtered-empty (``{}``), prompt-blocked (400 INVALID_ARGUMENT, no reason),
             safety-attributes (an extra "Positive Prompt" entry), enhanced (``prompt`` per image)
    Gemini:  blocked (promptFeedback.blockReason), image-safety, image-prohibited, no-image,
             image-other (finishReason, no content), text-only (a text reply, STOP),
             with-text (text then image), thought (a thought part first), two-images,
             detailed (images of seeded noise: as large as real photos, ~3 MB at 1024x1024)
    Both:    revoked-key (400 API_KEY_INVALID, as for a key Google does not know),
             429=S (RESOURCE_EXHAUSTED, RetryInfo retryDelay "Ss", per-minute QuotaFailure, no
             Retry-After header), 429-daily (per-day quotaId), permission (403 SERVICE_DISABLED),
             model-gone (404), 500 (INTERNAL), 503 (UNAVAILABLE), list-error (a 503 body wrapped
             in a one-element JSON list), missing-image, bad-base64, garbage-image, fake-png,
             and the generic slow/drip/reset/truncated/html-502/html-504/html-200/invalid-json.
"""

from __future__ import annotations

import base64
import math
from contextlib import AbstractAsyncContextManager
from typing import Any

from tests.fakes.images import FAKE_PNG, GARBAGE, MIME_TYPES, describe, with_bad_padding
from tests.fakes.provider import FakeProvider, endpoint, serve_main
from tests.fakes.scenarios import Scenario, transport_variant
from tests.fakes.server import FakeResponse, RecordedRequest

__all__ = ["GoogleFake", "start_google_fake"]

DEFAULT_KEY = "AIza-test-fake-google"
IMAGEN_MODELS = {"imagen-3.0-generate-002", "imagen-4.0-generate-001", "imagen-4.0-ultra-generate-001", "imagen-4.0-fast-generate-001"}
GEMINI_MODELS = {"gemini-2.5-flash-image", "gemini-3-pro-image-preview", "gemini-3.1-flash-image-preview"}
IMAGEN_RATIOS = {"1:1": (1024, 1024), "3:4": (896, 1280), "4:3": (1280, 896), "9:16": (768, 1408), "16:9": (1408, 768)}
GEMINI_RATIOS = {
    "1:1": (1024, 1024), "2:3": (832, 1248), "3:2": (1248, 832), "3:4": (864, 1184), "4:3": (1184, 864),
    "4:5": (896, 1152), "5:4": (1152, 896), "9:16": (768, 1344), "16:9": (1344, 768), "21:9": (1536, 672),
}
MODEL_PATH = r"/(?:v1beta|v1)/models/(?P<model>[^/:]+)"
STATUS = {400: "INVALID_ARGUMENT", 403: "PERMISSION_DENIED", 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 500: "INTERNAL", 503: "UNAVAILABLE"}
RAI_REASON = (
    "Your current safety filter threshold filtered out {n} generated images. You will not be charged for blocked "
    "images. Try rephrasing the prompt. If you think this was an error, send feedback."
)
BLOCKED_PROMPT = (
    "Image generation failed with the following error: The prompt could not be submitted. This prompt contains "
    "sensitive words that violate Google's Responsible AI practices. Try rephrasing the prompt. If you think this "
    "was an error, send feedback. Support codes: 42876398"
)


INPUT_MIME_TYPES = {"image/png", "image/jpeg", "image/webp", "image/heic", "image/heif"}


def image_token_count(width: int, height: int) -> int:
    """Gemini's count for an input image: 258 when both sides are at most 384 pixels, else
    258 per 768x768 tile (the Gemini API's token guide)."""
    if width <= 384 and height <= 384:
        return 258
    return 258 * math.ceil(width / 768) * math.ceil(height / 768)


def nearest_ratio(width: int, height: int) -> str:
    """The supported ratio nearest an input's shape: what an edit without one keeps."""
    return min(GEMINI_RATIOS, key=lambda r: abs(math.log(GEMINI_RATIOS[r][0] / GEMINI_RATIOS[r][1] * height / width)))


def _inline_image(inline: object) -> tuple[int, int] | None:
    """``(width, height)`` of an ``inlineData`` part holding a whole image of its mimeType."""
    if not isinstance(inline, dict) or inline.get("mimeType") not in INPUT_MIME_TYPES:
        return None
    try:
        data = base64.b64decode(inline.get("data", ""), validate=True)
        fmt, width, height = describe(data)
    except (ValueError, OSError, SyntaxError):
        return None
    return (width, height) if MIME_TYPES.get(fmt) == inline["mimeType"] else None


def google_error(status: int, message: str, details: list[dict[str, Any]] | None = None, *, as_list: bool = False) -> FakeResponse:
    error: dict[str, Any] = {"code": status, "message": message, "status": STATUS.get(status, "UNKNOWN")}
    if details:
        error["details"] = details
    body: Any = [{"error": error}] if as_list else {"error": error}
    return FakeResponse.json_body(body, status, content_type="application/json; charset=UTF-8")


def _invalid_key() -> FakeResponse:
    return google_error(
        400,
        "API key not valid. Please pass a valid API key.",
        [
            {"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
             "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}},
            {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US",
             "message": "API key not valid. Please pass a valid API key."},
        ],
    )


class GoogleFake(FakeProvider):
    """A fake ``generativelanguage.googleapis.com``: Imagen and Gemini image models."""

    default_key = DEFAULT_KEY
    title = "fake Gemini API"

    def calls(self, method: str) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path.endswith(f":{method}")]

    def prompt_of(self, request: RecordedRequest) -> str | None:
        try:
            body = request.json()
            if request.path.endswith(":predict"):
                prompt = body["instances"][0]["prompt"]
            else:
                prompt = body["contents"][0]["parts"][0]["text"]
        except (ValueError, TypeError, KeyError, IndexError):
            return None
        return prompt if isinstance(prompt, str) else None

    def not_found(self, request: RecordedRequest) -> FakeResponse:
        return FakeResponse.text("<html><body>404. That's an error.</body></html>", 404)

    def _refuse(self, request: RecordedRequest, model: str, method: str) -> FakeResponse | None:
        """Google's checks before any model runs: the key, the model, the method, the JSON body."""
        key = request.headers.get("x-goog-api-key") or request.query.get("key")
        if not key:
            return google_error(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). Please use API Key "
                "or other form of API consumer identity to call this API.",
            )
        if key != self.api_key:
            return _invalid_key()
        if model not in IMAGEN_MODELS | GEMINI_MODELS:
            return google_error(404, f"models/{model} is not found for API version v1beta, or is not supported for {method}.")
        if (method == "predict") != (model in IMAGEN_MODELS):
            return google_error(400, f"models/{model} does not support {method}.")
        try:
            body = request.json()
        except ValueError:
            return google_error(400, "Invalid JSON payload received.")
        if not isinstance(body, dict):
            return google_error(400, "Invalid JSON payload received. Expected an object.")
        return None

    @endpoint("POST", MODEL_PATH + r":predict")
    async def predict(self, request: RecordedRequest, model: str) -> FakeResponse:
        """Imagen's ``:predict``."""
        return self._refuse(request, model, "predict") or self._predict(model, request.json())

    @endpoint("POST", MODEL_PATH + r":generateContent")
    async def generate_content(self, request: RecordedRequest, model: str) -> FakeResponse:
        """Gemini's ``:generateContent`` with image output."""
        return self._refuse(request, model, "generateContent") or self._generate_content(model, request.json())

    @endpoint("POST", MODEL_PATH + r":(?P<method>[A-Za-z]+)")
    async def other_method(self, request: RecordedRequest, model: str, method: str) -> FakeResponse:
        return self._refuse(request, model, method) or google_error(400, f"models/{model} does not support {method}.")

    # -- shared error scenarios ---------------------------------------------------------------

    def _common_error(self, scenario: Scenario, model: str) -> FakeResponse | None:
        match scenario.name:
            case "revoked-key":  # tests.fakes.provider.REVOKED_KEY
                return _invalid_key()
            case "429" | "429-daily":
                daily = scenario.name == "429-daily"
                quota_id = "GenerateRequestsPerDayPerProjectPerModel" if daily else "GenerateRequestsPerMinutePerProjectPerModel"
                return google_error(
                    429,
                    "You exceeded your current quota, please check your plan and billing details.",
                    [
                        {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [
                            {"quotaMetric": "generativelanguage.googleapis.com/generate_requests_per_model",
                             "quotaId": quota_id, "quotaDimensions": {"location": "global", "model": model},
                             "quotaValue": "10"}]},
                        {"@type": "type.googleapis.com/google.rpc.Help", "links": [
                            {"description": "Learn more about Gemini API quotas",
                             "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{scenario.arg_or(26):g}s"},
                    ],
                )
            case "permission":
                return google_error(
                    403,
                    "Generative Language API has not been used in project 12345678 before or it is disabled.",
                    [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "SERVICE_DISABLED",
                      "domain": "googleapis.com", "metadata": {"service": "generativelanguage.googleapis.com"}}],
                )
            case "model-gone":
                return google_error(404, f"models/{model} is not found for API version v1beta, or is not supported for predict.")
            case "500":
                return google_error(500, "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting")
            case "503":
                return google_error(503, "The model is overloaded. Please try again later.")
            case "list-error":
                return google_error(503, "The service is currently unavailable.", as_list=True)
        return None

    def _encoded(self, scenario: Scenario, data: bytes) -> str:
        if scenario.name == "garbage-image":
            data = GARBAGE
        elif scenario.name == "fake-png":
            data = FAKE_PNG
        encoded = base64.b64encode(data).decode()
        return with_bad_padding(encoded) if scenario.name == "bad-base64" else encoded

    # -- Imagen -------------------------------------------------------------------------------

    def _predict(self, model: str, body: dict[str, Any]) -> FakeResponse:
        instances = body.get("instances")
        if not isinstance(instances, list) or len(instances) != 1 or not isinstance(instances[0], dict):
            return google_error(400, "instances must hold exactly one prompt.")
        prompt = instances[0].get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return google_error(400, "The prompt is empty.")
        params = body.get("parameters", {})
        for vertex_only in ("negativePrompt", "seed", "addWatermark", "enhancePrompt", "storageUri"):
            if vertex_only in params:
                return google_error(400, f"{vertex_only} parameter is not supported in Gemini API.")
        count = params.get("sampleCount", 4)
        if not isinstance(count, int) or not 1 <= count <= 4:
            return google_error(400, "sampleCount must be between 1 and 4.")
        ratio = params.get("aspectRatio", "1:1")
        if ratio not in IMAGEN_RATIOS:
            return google_error(400, f"Unsupported aspect ratio: {ratio}.")
        mime = params.get("outputOptions", {}).get("mimeType", "image/png")
        if mime not in ("image/png", "image/jpeg"):
            return google_error(400, f"Unsupported mimeType: {mime}.")
        scenario = self.scenarios.pick(prompt)
        error = self._common_error(scenario, model)
        if error is not None:
            return error
        if scenario.name == "prompt-blocked":
            return google_error(400, BLOCKED_PROMPT)
        include_reason = bool(params.get("includeRaiReason"))
        if scenario.name == "all-filtered-empty":
            return FakeResponse.json_body({})
        fmt = "png" if mime == "image/png" else "jpeg"
        width, height = IMAGEN_RATIOS[ratio]
        delivered = {"partial": count - 1, "all-filtered": 0}.get(scenario.name, count)
        predictions: list[dict[str, Any]] = []
        for index in range(delivered):
            entry: dict[str, Any] = {"mimeType": mime}
            if scenario.name != "missing-image":
                entry["bytesBase64Encoded"] = self._encoded(scenario, self.images.get(fmt, width, height, index))
            if scenario.name == "enhanced":
                entry["prompt"] = f"An enhanced, detailed version of: {prompt}"
            predictions.append(entry)
        if delivered < count and include_reason:
            predictions.append({"raiFilteredReason": RAI_REASON.format(n=count - delivered)})
        if scenario.name == "safety-attributes":
            predictions.append({"contentType": "Positive Prompt", "safetyAttributes": {"categories": ["Violence"], "scores": [0.1]}})
        ok = FakeResponse.json_body({"predictions": predictions} if predictions else {}, content_type="application/json; charset=UTF-8")
        return transport_variant(scenario, ok) or ok

    # -- Gemini -------------------------------------------------------------------------------

    def _generate_content(self, model: str, body: dict[str, Any]) -> FakeResponse:
        contents = body.get("contents")
        try:
            prompt = contents[0]["parts"][0]["text"]
        except (TypeError, KeyError, IndexError):
            return google_error(400, "* GenerateContentRequest.contents: contents is not specified")
        config = body.get("generationConfig", {})
        modalities = config.get("responseModalities", ["TEXT"])
        image_config = config.get("imageConfig", {})
        for unsupported in ("outputMimeType", "outputCompressionQuality", "personGeneration", "imageOutputOptions"):
            if unsupported in image_config:
                return google_error(400, f"{unsupported} parameter is not supported in Gemini API.")
        inputs: list[tuple[int, int]] = []
        for part in contents[0]["parts"][1:]:
            inline = part.get("inlineData") if isinstance(part, dict) else None
            shape = _inline_image(inline)
            if shape is None:
                return google_error(400, "Unable to process input image. Please retry or report in "
                                         "https://developers.generativeai.google/guide/troubleshooting")
            inputs.append(shape)
        default = nearest_ratio(*inputs[0]) if inputs else "1:1"
        ratio = image_config.get("aspectRatio", default)
        if ratio not in GEMINI_RATIOS:
            return google_error(400, f"Unsupported aspect ratio: {ratio}.")
        scenario = self.scenarios.pick(prompt)
        error = self._common_error(scenario, model)
        if error is not None:
            return error
        image_tokens = sum(image_token_count(width, height) for width, height in inputs)
        prompt_details = [{"modality": "TEXT", "tokenCount": 12}]
        if image_tokens:
            prompt_details.append({"modality": "IMAGE", "tokenCount": image_tokens})
        usage = {
            "promptTokenCount": 12 + image_tokens, "totalTokenCount": 12 + image_tokens,
            "promptTokensDetails": prompt_details,
        }
        reasons = {"image-safety": "IMAGE_SAFETY", "image-prohibited": "IMAGE_PROHIBITED_CONTENT",
                   "no-image": "NO_IMAGE", "image-other": "IMAGE_OTHER"}
        if scenario.name == "blocked":
            payload: dict[str, Any] = {"promptFeedback": {"blockReason": "PROHIBITED_CONTENT"}, "usageMetadata": usage,
                                       "modelVersion": model}
        elif scenario.name in reasons:
            payload = {"candidates": [{"finishReason": reasons[scenario.name], "index": 0}], "usageMetadata": usage,
                       "modelVersion": model}
        elif scenario.name == "text-only" or "IMAGE" not in modalities:
            payload = {
                "candidates": [{"content": {"role": "model", "parts": [{"text": "I can't create that image, but I can describe it."}]},
                                "finishReason": "STOP", "index": 0}],
                "usageMetadata": usage, "modelVersion": model,
            }
        else:
            width, height = GEMINI_RATIOS[ratio]
            count = 2 if scenario.name == "two-images" else 1
            parts: list[dict[str, Any]] = []
            if scenario.name == "thought":
                parts.append({"text": "Planning the composition...", "thought": True})
            if scenario.name == "with-text":
                parts.append({"text": "Here is your image:"})
            for index in range(count):
                inline: dict[str, Any] = {"mimeType": "image/png"}
                if scenario.name != "missing-image":
                    inline["data"] = self._encoded(
                        scenario, self.images.get("png", width, height, index, detailed=scenario.name == "detailed")
                    )
                parts.append({"inlineData": inline} if scenario.name != "missing-image" else {"text": "(no image)"})
            payload = {
                "candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
                "usageMetadata": {
                    "promptTokenCount": usage["promptTokenCount"], "candidatesTokenCount": 1290 * count,
                    "totalTokenCount": usage["promptTokenCount"] + 1290 * count,
                    "promptTokensDetails": prompt_details,
                    "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290 * count}],
                },
                "modelVersion": model, "responseId": "x5LmaO7QGJ2Mz7IPk8GA-Qo",
            }
        ok = FakeResponse.json_body(payload, content_type="application/json; charset=UTF-8")
        return transport_variant(scenario, ok) or ok


def start_google_fake(**options: Any) -> AbstractAsyncContextManager[GoogleFake]:
    """A running ``GoogleFake`` (options as its constructor), stopped on exit."""
    return GoogleFake.running(**options)


if __name__ == "__main__":
    serve_main(GoogleFake, 9101)
