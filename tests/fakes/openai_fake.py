"""A fake OpenAI Images API (and its xAI and Together dialects) on loopback.

Faithful to ``reference/providers.md`` §1, §5 and §8: ``POST /v1/images/generations``
with ``Authorization: Bearer``; the exact ``{"error": {message, type, param, code}}``
envelope (xAI: ``{"code", "error"}``) with ``x-request-id``; per-model validation
(``response_format`` refused by GPT image models, ``n=1`` for dall-e-3, size tables, xAI
refusing ``size``, Together's ``width``/``height`` and ``response_format: base64``);
GPT image answers with ``usage`` and ``size/quality/output_format/background``; DALL·E
answers with ``revised_prompt`` and a ``url`` by default, served from an expiring fake
blob host (403 XML after ``url_ttl``).

Edits and variations (``dialect="openai"``): ``POST /v1/images/edits`` and
``/v1/images/variations`` take ``multipart/form-data`` as the SDK sends it (text fields,
the files ``image`` or ``image[]`` and ``mask``), typed and checked as OpenAI does:
GPT image models take 1-16 PNG/JPEG/WebP images, ``input_fidelity`` and stream; DALL·E 2
one square PNG under 4 MB with an alpha channel unless a mask is given; a mask must be a
PNG with alpha the size of the first image; variations are DALL·E 2 only and carry no
prompt (the scenario token and ``sent()`` use their ``user`` field instead). A GPT image
edit answers ``usage.input_tokens_details.image_tokens``: per input image 85 + 170 per
512-pixel tile (after fitting 1024x1024), plus 4160 (square) or 6240 at high fidelity,
which gpt-image-2 always uses (the fake's rule). A streamed edit sends ``image_edit.*``
events. ``payload()`` of a multipart request is its text fields plus ``files``: the
``(field, filename, content type, bytes)`` of each file, in order.

Endpoints (``tests.fakes.provider``): ``generations``, ``edits``, ``variations``, and
``blob`` for the image links.
Scenarios (prompt token ``[[fake:NAME]]`` or ``fake.enqueue(NAME)``; see
``tests.fakes.scenarios``):

    moderated, moderated-output   400 moderation_blocked (GPT image) / content_policy_violation (DALL·E)
    content-policy                400 content_policy_violation
    partial                       200 with n-1 images       flagged, blocked   xAI 200 moderation forms
    429                           rate_limit_exceeded with retry-after: 2 and retry-after-ms: 2000
    429-ms=MS, 429-s=S            only retry-after-ms / only retry-after (seconds, may be fractional)
    429-date=S                    Retry-After as an HTTP-date S seconds ahead
    429-huge, 429-none            retry-after: 600 / no hint at all
    revoked-key                   401 invalid_api_key, as for a key the provider does not know
    quota, billing                429 insufficient_quota / 400 billing_hard_limit_reached
    spend-limit                   402 (Together)           region  403 unsupported country
    model-gone                    404 model_not_found      invalid  400 invalid_request_error
    500, 503, 500-no-retry        server_error / overloaded / 500 with x-should-retry: false
    url, expired-url              answer a url (even when b64 was asked) / one already expired
    detailed                      images of seeded noise: as large as real photos (1024x1024 PNG: ~3 MB)
    held                          detailed, and the body pauses after its first chunk until release_held()
    missing-image, empty-data, bad-base64, data-url, garbage-image, fake-png, wrong-format
    slow=S, drip=S, reset, truncated, html-502, html-504, html-200, invalid-json (generic)

Streaming (GPT image models, ``"stream": true``): Server-Sent Events as OpenAI sends them,
``event:`` and ``data:`` lines, each image's ``partial_images`` partial images (distinct
pictures of the same size) then its ``image_generation.completed`` event with ``usage``.
Stream scenarios: ``stream-error-after=K`` (an ``error`` event, server_error, after K
events), ``stream-moderated-after=K`` (an ``error`` event, moderation_blocked),
``stream-cut-after=K`` (the connection closes after K events), ``stream-hold`` (the second
event waits until the test calls ``fake.release_stream()``), ``stream-extra`` (a
misbehaving upstream: one partial image more per image than asked, and one image more),
and ``slow=S`` (the head after S seconds).
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager
from dataclasses import replace
from typing import Any

from PIL import Image

from tests.fakes.images import FAKE_PNG, GARBAGE, MIME_TYPES, with_bad_padding
from tests.fakes.provider import REVOKED_KEY, FakeProvider, endpoint, serve_main
from tests.fakes.scenarios import Scenario, transport_variant
from tests.fakes.server import FakeResponse, MultipartPart, RecordedRequest, SignedBlobs

__all__ = ["OpenAIFake", "start_openai_fake"]

DEFAULT_KEY = "sk-test-fake-openai"
GPT_IMAGE = {"gpt-image-1", "gpt-image-1-mini", "gpt-image-1.5", "gpt-image-2", "gpt-image-2-2026-04-21", "chatgpt-image-latest"}
GPT_SIZES = {"1024x1024", "1536x1024", "1024x1536", "auto"}
DALLE_SIZES = {"dall-e-2": {"256x256", "512x512", "1024x1024"}, "dall-e-3": {"1024x1024", "1792x1024", "1024x1792"}}
PROMPT_LIMITS = {"dall-e-2": 1000, "dall-e-3": 4000}
GPT_ONLY = ("output_format", "output_compression", "background", "moderation", "stream", "partial_images")
# gpt-image-1 output image tokens by quality for 1024², 1024x1536 and 1536x1024 (providers.md §1.4).
OUTPUT_TOKENS = {
    "low": {"1024x1024": 272, "1024x1536": 408, "1536x1024": 400},
    "medium": {"1024x1024": 1056, "1024x1536": 1584, "1536x1024": 1568},
    "high": {"1024x1024": 4160, "1024x1536": 6240, "1536x1024": 6208},
}
EDIT_FIELDS = {"prompt": str, "model": str, "n": int, "size": str, "quality": str, "response_format": str,
               "output_format": str, "output_compression": int, "background": str, "input_fidelity": str,
               "stream": bool, "partial_images": int, "user": str}
VARIATION_FIELDS = {"model": str, "n": int, "size": str, "response_format": str, "user": str}
MAX_GPT_FILE = 50 * 1024 * 1024
MAX_DALLE_FILE = 4 * 1024 * 1024
XAI_RATIOS = {"1:1", "3:4", "4:3", "9:16", "16:9", "2:3", "3:2", "9:19.5", "19.5:9", "9:20", "20:9", "1:2", "2:1"}
SIZE_RE = re.compile(r"^(\d+)x(\d+)$")


def _mask(key: str) -> str:
    return key[:3] + "*" * 8 + key[-4:] if len(key) > 8 else "*" * len(key)


class OpenAIFake(FakeProvider):
    """A fake OpenAI Images API; ``dialect`` is ``openai``, ``xai`` or ``together``."""

    default_key = DEFAULT_KEY
    title = "fake OpenAI"

    def __init__(self, *, dialect: str = "openai", url_ttl: float = 3600.0, **options: Any) -> None:
        if dialect not in ("openai", "xai", "together"):
            raise ValueError(f"unknown dialect {dialect!r}")
        super().__init__(**options)
        self.dialect = dialect
        self.url_ttl = url_ttl
        self.blobs = SignedBlobs()
        self._released = asyncio.Event()
        self._held = asyncio.Event()

    def release_stream(self) -> None:
        """Lets a ``stream-hold`` stream send its second event and the rest."""
        self._released.set()

    @property
    def holding(self) -> int:
        """``held`` answers paused after their first body chunk right now."""
        return self.server.holding

    def release_held(self) -> None:
        """Lets every paused ``held`` answer, and any later one, send the rest of its body."""
        self._held.set()

    @property
    def base_url(self) -> str:
        """What the OpenAI SDK calls base_url: the host plus ``/v1``."""
        return f"{self.server.base_url}/v1"

    @property
    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path == "/v1/images/generations"]

    def prompt_of(self, request: RecordedRequest) -> str | None:
        if request.path == "/v1/images/generations":
            return super().prompt_of(request)
        if request.path in ("/v1/images/edits", "/v1/images/variations"):
            # Variations have no prompt: their `user` stands in for it.
            name = "prompt" if request.path.endswith("edits") else "user"
            parts = request.multipart() or []
            return next((p.data.decode() for p in parts if p.name == name and p.filename is None), None)
        return None

    def payload(self, request: RecordedRequest) -> Any:
        """JSON bodies as data; a multipart body as its text fields plus ``files``."""
        parts = request.multipart()
        if parts is None:
            return request.json()
        fields: dict[str, Any] = {p.name: p.data.decode() for p in parts if p.filename is None}
        fields["files"] = [(p.name, p.filename, p.content_type, p.data) for p in parts if p.filename is not None]
        return fields

    def not_found(self, request: RecordedRequest) -> FakeResponse:
        return self._error(404, f"Invalid URL ({request.method} {request.path})")

    # -- errors ----------------------------------------------------------------------------

    def _error(
        self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: tuple[tuple[str, str], ...] = (), extra: dict[str, Any] | None = None,
    ) -> FakeResponse:
        request_id = ("x-request-id", f"req_{secrets.token_hex(16)}")
        if self.dialect == "xai":
            # xAI's own shape: a free-text code and an error string.
            body: dict[str, Any] = {"code": code or type_, "error": message}
        else:
            body = {"error": {"message": message, "type": type_, "param": param, "code": code, **(extra or {})}}
        return FakeResponse.json_body(body, status, headers=(request_id, *headers))

    def _rate_limited(self, scenario: Scenario) -> FakeResponse:
        message = "Rate limit exceeded for images per minute in organization org-fake. Limit: 5/1min. Current: 6/1min."
        headers: tuple[tuple[str, str], ...]
        match scenario.name:
            case "429":
                headers = (("retry-after", "2"), ("retry-after-ms", "2000"))
            case "429-ms":
                headers = (("retry-after-ms", f"{scenario.arg_or(50):g}"),)
            case "429-s":
                headers = (("retry-after", f"{scenario.arg_or(1):g}"),)
            case "429-date":
                when = time.time() + scenario.arg_or(1)
                headers = (("retry-after", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(int(when)))),)
            case "429-huge":
                headers = (("retry-after", "600"),)
            case _:
                headers = ()
        return self._error(429, message, type_="requests", code="rate_limit_exceeded", headers=headers)

    # -- endpoints -------------------------------------------------------------------------

    @endpoint("GET", r"/blob/.+")
    async def blob(self, request: RecordedRequest) -> FakeResponse:
        """The expiring image links of ``url`` answers (no key: they are pre-signed)."""
        served = self.blobs.serve(request)
        assert served is not None
        return served

    def _refuse_key(self, request: RecordedRequest, scenario: Scenario) -> FakeResponse | None:
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or not auth.removeprefix("Bearer "):
            return self._error(
                401,
                "You didn't provide an API key. You need to provide your API key in an Authorization header "
                "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            )
        given = auth.removeprefix("Bearer ")
        if given != self.api_key or scenario.name == REVOKED_KEY:
            return self._error(
                401,
                f"Incorrect API key provided: {_mask(given)}. You can find your API key at "
                "https://platform.openai.com/account/api-keys.",
                code="invalid_api_key",
            )
        return None

    def _json_body(self, request: RecordedRequest) -> tuple[dict[str, Any] | None, FakeResponse | None]:
        if request.content_type != "application/json":
            return None, self._error(400, "Invalid Content-Type header; expected application/json.")
        try:
            body = request.json()
        except ValueError:
            return None, self._error(400, "We could not parse the JSON body of your request.")
        if not isinstance(body, dict):
            return None, self._error(400, "The request body must be a JSON object.")
        return body, None

    @endpoint("POST", r"/v1/images/generations")
    async def generations(self, request: RecordedRequest) -> FakeResponse:
        """``POST /v1/images/generations`` in this fake's dialect."""
        scenario = self.scenarios.pick(self.prompt_of(request))
        refused = self._refuse_key(request, scenario)
        if refused is not None:
            return refused
        body, problem = self._json_body(request)
        if problem is not None:
            return problem
        assert body is not None
        match self.dialect:
            case "openai":
                problem, answer = self._openai(body)
            case "xai":
                problem, answer = self._xai(body)
            case _:
                problem, answer = self._together(body)
        if problem is not None:
            return problem
        assert answer is not None
        return self._apply(scenario, body, answer | {"kind": "image_generation", "image_tokens": 0})

    @endpoint("POST", r"/v1/images/edits")
    async def edits(self, request: RecordedRequest) -> FakeResponse:
        """``POST /v1/images/edits``, multipart (OpenAI's dialect only)."""
        return self._form_request(request, "edit")

    @endpoint("POST", r"/v1/images/variations")
    async def variations(self, request: RecordedRequest) -> FakeResponse:
        """``POST /v1/images/variations``, multipart, DALL·E 2 only."""
        return self._form_request(request, "variation")

    def _form_request(self, request: RecordedRequest, operation: str) -> FakeResponse:
        if self.dialect != "openai":
            return self.not_found(request)
        scenario = self.scenarios.pick(self.prompt_of(request))
        refused = self._refuse_key(request, scenario)
        if refused is not None:
            return refused
        parts = request.multipart()
        if parts is None:
            return self._error(400, "Invalid Content-Type header; expected multipart/form-data.")
        allowed = EDIT_FIELDS if operation == "edit" else VARIATION_FIELDS
        body: dict[str, Any] = {}
        for part in parts:
            if part.filename is not None:
                if part.name not in ("image", "image[]", "mask") or (operation == "variation" and part.name != "image"):
                    return self._error(400, f"Unknown parameter: '{part.name}'.", param=part.name, code="unknown_parameter")
                continue
            kind = allowed.get(part.name)
            if kind is None:
                return self._error(400, f"Unknown parameter: '{part.name}'.", param=part.name, code="unknown_parameter")
            text = part.data.decode()
            if kind is int:
                if not re.fullmatch(r"-?\d+", text):
                    return self._error(400, f"Invalid type for '{part.name}': expected an integer.", param=part.name,
                                       code="invalid_type")
                body[part.name] = int(text)
            elif kind is bool:
                if text not in ("true", "false"):
                    return self._error(400, f"Invalid type for '{part.name}': expected a boolean.", param=part.name,
                                       code="invalid_type")
                body[part.name] = text == "true"
            else:
                body[part.name] = text
        images = [p for p in parts if p.filename is not None and p.name in ("image", "image[]")]
        masks = [p for p in parts if p.filename is not None and p.name == "mask"]
        problem, answer = self._check_form(operation, body, images, masks)
        if problem is not None:
            return problem
        assert answer is not None
        return self._apply(scenario, body, answer)

    def _check_form(
        self, operation: str, body: dict[str, Any], images: list[MultipartPart], masks: list[MultipartPart]
    ) -> tuple[FakeResponse | None, dict[str, Any] | None]:
        model = body.get("model", "gpt-image-1.5" if operation == "edit" else "dall-e-2")
        if operation == "variation" and model != "dall-e-2":
            return self._error(400, f"Invalid model {model}. Variations are only supported for dall-e-2.",
                               param="model"), None
        if model not in GPT_IMAGE and model not in DALLE_SIZES:
            return self._error(404, f"The model `{model}` does not exist or you do not have access to it.",
                               code="model_not_found"), None
        if model == "dall-e-3":
            return self._error(400, "Invalid model dall-e-3. Image edits support dall-e-2 and the GPT image models.",
                               param="model"), None
        gpt = model in GPT_IMAGE
        problem = (
            (self._check_prompt(body, 32000 if gpt else PROMPT_LIMITS[model]) if operation == "edit" else None)
            or self._check_n(body, 10)
            or self._unknown(body, ("response_format",) if gpt else (*GPT_ONLY, "input_fidelity"))
        )
        if problem is not None:
            return problem, None
        if not images:
            return self._error(400, "Missing required parameter: 'image'.", param="image",
                               code="missing_required_parameter"), None
        if len(images) > (16 if gpt else 1) or len(masks) > 1:
            return self._error(400, f"Too many images: at most {16 if gpt else 1}.", param="image",
                               code="invalid_value"), None
        shapes = []
        for part in images:
            shape = _picture(part.data)
            if shape is None or shape[0] not in ("png", "jpeg", "webp"):
                return self._error(400, "Invalid image file or mode for image, please check your image file.",
                                   param="image", code="invalid_image_format"), None
            if gpt and len(part.data) >= MAX_GPT_FILE:
                return self._error(400, "Image file is too large; images must be less than 50 MB.", param="image",
                                   code="image_too_large"), None
            if not gpt and (shape[0] != "png" or shape[1] != shape[2] or len(part.data) >= MAX_DALLE_FILE):
                return self._error(400, "Uploaded image must be a PNG and less than 4 MB.", param="image",
                                   code="invalid_image_format"), None
            shapes.append(shape)
        if masks:
            mask = _picture(masks[0].data)
            if mask is None or mask[0] != "png" or not mask[3]:
                return self._error(400, "Invalid mask image format - mask must be a PNG with an alpha channel.",
                                   param="mask", code="invalid_image_format"), None
            if mask[1:3] != shapes[0][1:3]:
                return self._error(400, "Invalid mask image format - mask size does not match image size.",
                                   param="mask", code="invalid_image_format"), None
        elif operation == "edit" and not gpt and not shapes[0][3]:
            return self._error(400, "Invalid input image - format must be in ['RGBA', 'LA', 'L'], got RGB.",
                               param="image", code="invalid_image_format"), None
        size = body.get("size", "auto" if gpt else "1024x1024")
        if gpt:
            if not self._gpt_size_ok(model, size):
                return self._error(400, "The size is not supported by this model.", param="size", code="invalid_size"), None
            quality = body.get("quality", "auto")
            fmt = body.get("output_format", "png")
            fidelity = body.get("input_fidelity", "low")
            if quality not in ("low", "medium", "high", "auto") or fmt not in ("png", "jpeg", "webp") or fidelity not in (
                "low", "high"
            ):
                bad = "quality" if quality not in ("low", "medium", "high", "auto") else (
                    "output_format" if fmt not in ("png", "jpeg", "webp") else "input_fidelity")
                return self._error(400, f"Invalid value: '{body[bad]}'.", param=bad, code="invalid_value"), None
            high = fidelity == "high" or model.startswith("gpt-image-2")
            tokens = sum(_input_tokens(width, height, high=high) for _, width, height, _ in shapes)
        else:
            if size not in DALLE_SIZES[model]:
                return self._error(400, "The size is not supported by this model.", param="size", code="invalid_size"), None
            if body.get("response_format", "url") not in ("url", "b64_json"):
                return self._error(400, "Invalid response_format.", param="response_format", code="invalid_value"), None
            fmt, tokens = "png", 0
        kind = "image_edit" if operation == "edit" else "image_variation"
        return None, {"model": model, "gpt": gpt, "size": size, "format": fmt, "kind": kind, "image_tokens": tokens}

    def _check_prompt(self, body: dict[str, Any], limit: int) -> FakeResponse | None:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return self._error(400, "Missing required parameter: 'prompt'.", param="prompt", code="missing_required_parameter")
        if len(prompt) > limit:
            return self._error(
                400, f"Invalid 'prompt': string too long. Expected a string with maximum length {limit}.",
                param="prompt", code="string_above_max_length",
            )
        return None

    def _check_n(self, body: dict[str, Any], maximum: int) -> FakeResponse | None:
        n = body.get("n", 1)
        if not isinstance(n, int) or not 1 <= n <= maximum:
            if maximum == 1:
                return self._error(400, "You must provide n=1 for this model.", param="n")
            return self._error(400, f"Invalid 'n': expected a value between 1 and {maximum}.", param="n", code="invalid_value")
        return None

    def _unknown(self, body: dict[str, Any], names: tuple[str, ...]) -> FakeResponse | None:
        for name in names:
            if name in body:
                return self._error(400, f"Unknown parameter: '{name}'.", param=name, code="unknown_parameter")
        return None

    def _openai(self, body: dict[str, Any]) -> tuple[FakeResponse | None, dict[str, Any] | None]:
        model = body.get("model", "dall-e-2")
        if model not in GPT_IMAGE and model not in DALLE_SIZES:
            return self._error(
                404, f"The model `{model}` does not exist or you do not have access to it.", code="model_not_found"
            ), None
        gpt = model in GPT_IMAGE
        problem = (
            self._check_prompt(body, 32000 if gpt else PROMPT_LIMITS[model])
            or self._check_n(body, 1 if model == "dall-e-3" else 10)
            or self._unknown(body, ("response_format", "style") if gpt else GPT_ONLY)
        )
        if problem is None and not gpt and model == "dall-e-2" and "style" in body:
            problem = self._unknown(body, ("style",))
        if problem is not None:
            return problem, None
        size = body.get("size", "auto" if gpt else "1024x1024")
        if gpt:
            if not self._gpt_size_ok(model, size):
                return self._error(400, "The size is not supported by this model.", param="size", code="invalid_size"), None
            quality = body.get("quality", "auto")
            if quality not in ("low", "medium", "high", "auto"):
                return self._error(400, f"Invalid value: '{quality}'.", param="quality", code="invalid_value"), None
            fmt = body.get("output_format", "png")
            if fmt not in ("png", "jpeg", "webp"):
                return self._error(400, f"Invalid value: '{fmt}'.", param="output_format", code="invalid_value"), None
            background = body.get("background", "auto")
            if background == "transparent" and fmt == "jpeg":
                return self._error(400, "Transparent background requires png or webp.", param="background"), None
        else:
            if size not in DALLE_SIZES[model]:
                return self._error(400, "The size is not supported by this model.", param="size", code="invalid_size"), None
            quality = body.get("quality", "standard")
            allowed = ("standard", "hd", "auto") if model == "dall-e-3" else ("standard", "auto")
            if quality not in allowed:
                return self._error(400, f"Invalid value: '{quality}'.", param="quality", code="invalid_value"), None
            if body.get("response_format", "url") not in ("url", "b64_json"):
                return self._error(400, "Invalid response_format.", param="response_format", code="invalid_value"), None
            if body.get("style", "vivid") not in ("vivid", "natural"):
                return self._error(400, "Invalid style.", param="style", code="invalid_value"), None
            fmt = "png"
        return None, {"model": model, "gpt": gpt, "size": size, "format": fmt}

    @staticmethod
    def _gpt_size_ok(model: str, size: object) -> bool:
        if size in GPT_SIZES:
            return True
        if not model.startswith("gpt-image-2") or not isinstance(size, str):
            return False
        match = SIZE_RE.match(size)
        if match is None:
            return False
        width, height = int(match.group(1)), int(match.group(2))
        return width % 16 == 0 and height % 16 == 0 and 1 / 3 <= width / height <= 3 and width * height <= 3840 * 2160

    def _xai(self, body: dict[str, Any]) -> tuple[FakeResponse | None, dict[str, Any] | None]:
        if "size" in body:
            return self._error(400, "Argument not supported: size", code="Client specified an invalid argument"), None
        if "style" in body:
            return self._error(400, "Argument not supported: style", code="Client specified an invalid argument"), None
        problem = self._check_prompt(body, 8000) or self._check_n(body, 10)
        if problem is not None:
            return problem, None
        ratio = body.get("aspect_ratio", "1:1")
        if ratio not in XAI_RATIOS:
            ratio = "1:1"  # xAI silently falls back on unknown values (observed)
        width, height = (float(x) for x in ratio.split(":"))
        return None, {"model": body.get("model"), "gpt": False, "size": f"{round(96 * width / height)}x96", "format": "jpeg"}

    def _together(self, body: dict[str, Any]) -> tuple[FakeResponse | None, dict[str, Any] | None]:
        if not body.get("model"):
            return self._error(400, "model is required", param="model"), None
        problem = self._check_prompt(body, 8000) or self._check_n(body, 4)
        if problem is not None:
            return problem, None
        width, height = body.get("width", 1024), body.get("height", 1024)
        if not isinstance(width, int) or not isinstance(height, int):
            return self._error(400, "width and height must be integers", param="width"), None
        if body.get("response_format", "url") not in ("url", "base64"):
            return self._error(400, "response_format must be one of url, base64", param="response_format"), None
        fmt = body.get("output_format", "jpeg")
        if fmt not in ("jpeg", "png"):
            return self._error(400, "output_format must be one of jpeg, png", param="output_format"), None
        return None, {"model": body["model"], "gpt": False, "size": f"{width}x{height}", "format": fmt}

    # -- answers -----------------------------------------------------------------------------

    def _apply(self, scenario: Scenario, body: dict[str, Any], answer: dict[str, Any]) -> FakeResponse:
        gpt = answer["gpt"]
        match scenario.name:
            case "moderated" | "moderated-output":
                if gpt:
                    stage = "output" if scenario.name == "moderated-output" else "input"
                    return self._error(
                        400,
                        "Your request was rejected by the safety system. If you believe this is an error, contact us "
                        "at help.openai.com and include the request ID req_fake. safety_violations=[sexual].",
                        type_="image_generation_user_error", code="moderation_blocked",
                        extra={"moderation_details": {"moderation_stage": stage, "categories": ["sexual"]}},
                    )
                return self._content_policy()
            case "content-policy":
                return self._content_policy()
            case "429" | "429-ms" | "429-s" | "429-date" | "429-huge" | "429-none":
                return self._rate_limited(scenario)
            case "quota":
                return self._error(
                    429, "You exceeded your current quota, please check your plan and billing details.",
                    type_="insufficient_quota", code="insufficient_quota",
                )
            case "billing":
                return self._error(400, "Billing hard limit has been reached", code="billing_hard_limit_reached")
            case "spend-limit":
                return self._error(402, "Monthly spend limit reached", type_="invalid_request_error", code="payment_required")
            case "region":
                return self._error(403, "Country, region, or territory not supported", type_="request_forbidden",
                                   code="unsupported_country_region_territory")
            case "model-gone":
                return self._error(404, f"The model `{answer['model']}` has been deprecated.", code="model_not_found")
            case "invalid":
                return self._error(400, "Invalid value for 'size'.", param="size", code="invalid_value")
            case "500":
                return self._error(500, "The server had an error while processing your request.", type_="server_error")
            case "500-no-retry":
                return self._error(500, "The server had an error while processing your request.", type_="server_error",
                                   headers=(("x-should-retry", "false"),))
            case "503":
                return self._error(503, "The engine is currently overloaded, please try again later.", type_="server_error")
        if answer["gpt"] and body.get("stream") is True:
            return self._stream(scenario, body, answer)
        ok = self._success(scenario, body, answer)
        if scenario.name == "held":
            return replace(ok, hold=self._held)
        return transport_variant(scenario, ok) or ok

    def _stream(self, scenario: Scenario, body: dict[str, Any], answer: dict[str, Any]) -> FakeResponse:
        partials = body.get("partial_images", 0)
        if not isinstance(partials, int) or not 0 <= partials <= 3:
            return self._error(400, "Invalid 'partial_images'.", param="partial_images", code="invalid_value")
        fields = self._gpt_fields(body, answer, images=1)
        failing = scenario.name in ("stream-error-after", "stream-moderated-after", "stream-cut-after")
        after = int(scenario.arg_or(1)) if failing else -1

        def event(kind: str, data: dict[str, Any]) -> bytes:
            return f"event: {kind}\ndata: {json.dumps(data)}\n\n".encode()

        extra = 1 if scenario.name == "stream-extra" else 0

        async def events() -> AsyncIterator[bytes | None]:
            sent = 0
            for index in range(body.get("n", 1) + extra):
                # Partial pictures differ from the final one (the cache tints by index mod 4).
                pictures = [self._image_bytes(answer, index + 1 + k) for k in range(partials + extra)]
                pictures.append(self._image_bytes(answer, index))
                for k, data in enumerate(pictures):
                    if sent == after:
                        if scenario.name == "stream-cut-after":
                            yield None
                            return
                        code = "moderation_blocked" if scenario.name == "stream-moderated-after" else None
                        kind = "image_generation_user_error" if code else "server_error"
                        yield event("error", {"type": "error", "error": {
                            "message": "Your request was rejected by the safety system." if code
                            else "The server had an error while processing your request.",
                            "type": kind, "param": None, "code": code}})
                        return
                    if sent == 1 and scenario.name == "stream-hold":
                        await self._released.wait()
                    final = k == len(pictures) - 1
                    data_fields = {
                        "type": f"{answer['kind']}.completed" if final else f"{answer['kind']}.partial_image",
                        "b64_json": base64.b64encode(data).decode(),
                        "created_at": int(time.time()),
                        "size": fields["size"], "quality": fields["quality"],
                        "background": fields["background"], "output_format": fields["output_format"],
                    }
                    if final:
                        data_fields["usage"] = fields["usage"]
                    else:
                        data_fields["partial_image_index"] = k
                    yield event(data_fields["type"], data_fields)
                    sent += 1

        headers = (("x-request-id", f"req_{secrets.token_hex(16)}"),)
        delay = scenario.arg_or(5.0) if scenario.name == "slow" else 0.0
        return FakeResponse(status=200, content_type="text/event-stream; charset=utf-8", headers=headers, stream=events(), delay=delay)

    def _gpt_fields(self, body: dict[str, Any], answer: dict[str, Any], *, images: int) -> dict[str, Any]:
        """What a GPT image answer says besides the images: size, quality, usage, ..."""
        quality = body.get("quality", "auto")
        quality = "medium" if quality == "auto" else quality
        size = "1024x1024" if answer["size"] == "auto" else answer["size"]
        per_image = OUTPUT_TOKENS[quality].get(size, 1056)
        text_tokens = len(body["prompt"].split())
        image_tokens = answer["image_tokens"]
        return {
            "background": "transparent" if body.get("background") == "transparent" else "opaque",
            "output_format": answer["format"],
            "quality": quality,
            "size": size,
            "usage": {
                "input_tokens": text_tokens + image_tokens,
                "input_tokens_details": {"image_tokens": image_tokens, "text_tokens": text_tokens},
                "output_tokens": per_image * images,
                "output_tokens_details": {"image_tokens": per_image * images, "text_tokens": 0},
                "total_tokens": text_tokens + image_tokens + per_image * images,
            },
        }

    def _content_policy(self) -> FakeResponse:
        return self._error(
            400,
            "Your request was rejected as a result of our safety system. Your prompt may contain text that is not "
            "allowed by our safety system.",
            code="content_policy_violation",
        )

    def _image_bytes(self, answer: dict[str, Any], index: int, *, detailed: bool = False) -> bytes:
        size = answer["size"]
        width, height = (1024, 1024) if size == "auto" else (int(x) for x in size.split("x"))
        return self.images.get(answer["format"], width, height, index, detailed=detailed)

    def _success(self, scenario: Scenario, body: dict[str, Any], answer: dict[str, Any]) -> FakeResponse:
        n = body.get("n", 1)
        count = max(0, n - 1) if scenario.name == "partial" else n
        fmt = answer["format"]
        if self.dialect == "together":
            wants_url = body.get("response_format", "url") == "url"
        elif answer["gpt"]:
            wants_url = False
        else:
            wants_url = body.get("response_format", "url") == "url"
        if scenario.name in ("url", "expired-url"):
            wants_url = True
        items: list[dict[str, Any]] = []
        for index in range(count):
            data = self._image_bytes(answer, index, detailed=scenario.name in ("detailed", "held"))
            if scenario.name == "garbage-image":
                data = GARBAGE
            elif scenario.name == "fake-png":
                data = FAKE_PNG
            elif scenario.name == "wrong-format":
                data = self.images.get("jpeg" if fmt != "jpeg" else "png", 8, 8, index)
            item: dict[str, Any] = {}
            if wants_url:
                ttl = 0.0 if scenario.name == "expired-url" else self.url_ttl
                item["url"] = self.blobs.put(
                    self.server.base_url, data, MIME_TYPES.get(fmt, "image/png"), ttl=ttl, suffix=fmt,
                    tag=body.get("prompt", body.get("user")),
                )
            else:
                encoded = base64.b64encode(data).decode()
                if scenario.name == "bad-base64":
                    encoded = with_bad_padding(encoded)
                elif scenario.name == "data-url":
                    encoded = f"data:{MIME_TYPES.get(fmt, 'image/png')};base64,{encoded}"
                item["b64_json"] = encoded
            if scenario.name == "missing-image":
                item = {"revised_prompt": "no image here"}
            if answer["model"] == "dall-e-3" or (self.dialect == "xai" and answer["model"] == "grok-2-image"):
                item["revised_prompt"] = f"A detailed rendition of: {body['prompt']}"
            if self.dialect == "together":
                item = {"index": index, "type": "url" if wants_url else "b64_json", **item}
            if self.dialect == "xai" and "b64_json" in item:
                item["mime_type"] = "image/jpeg"
            items.append(item)
        if self.dialect == "xai" and scenario.name == "flagged" and items:
            items[0] = {"url": None, "respect_moderation": False}
        if (self.dialect == "xai" and scenario.name == "blocked") or scenario.name == "empty-data":
            items = []
        payload: dict[str, Any]
        if self.dialect == "together":
            payload = {"id": f"oFuw-{secrets.token_hex(6)}", "model": answer["model"], "object": "list", "data": items}
        elif self.dialect == "xai":
            payload = {"data": items, "usage": {"cost_in_usd_ticks": 200_000_000 * len(items)}}
        else:
            payload = {"created": int(time.time()), "data": items}
            if answer["gpt"]:
                payload |= self._gpt_fields(body, answer, images=len(items))
        headers = (
            ("x-request-id", f"req_{secrets.token_hex(16)}"),
            ("openai-processing-ms", "21873"),
            ("x-ratelimit-limit-requests", "50"),
            ("x-ratelimit-remaining-requests", "49"),
            ("x-ratelimit-reset-requests", "1s"),
        )
        return FakeResponse.json_body(payload, 200, headers=headers)


def _picture(data: bytes) -> tuple[str, int, int, bool] | None:
    """``(format, width, height, has alpha)`` of a whole image, or None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            alpha = image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info
            return (image.format or "").lower(), image.width, image.height, alpha
    except (OSError, SyntaxError, ValueError):
        return None


def _input_tokens(width: int, height: int, *, high: bool) -> int:
    """The fake's count of one input image's tokens (see the module docstring)."""
    scale = min(1.0, 1024 / max(width, height))
    tiles = math.ceil(width * scale / 512) * math.ceil(height * scale / 512)
    extra = (4160 if width == height else 6240) if high else 0
    return 85 + 170 * tiles + extra


def start_openai_fake(**options: Any) -> AbstractAsyncContextManager[OpenAIFake]:
    """A running ``OpenAIFake`` (options as its constructor), stopped on exit."""
    return OpenAIFake.running(**options)


if __name__ == "__main__":
    serve_main(OpenAIFake, 9100)
