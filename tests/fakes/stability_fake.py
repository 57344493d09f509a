"""A fake Stability AI v2beta Stable Image API.

Faithful to ``reference/providers.md`` §3 and §8: ``POST
/v2beta/stable-image/generate/{ultra,core,sd3}`` with ``authorization: Bearer``; the body
must be ``multipart/form-data`` (anything else is 400 ``bad_request``) with a ``prompt``
part; ``aspect_ratio`` and ``output_format`` are validated (SD3: no webp; SD3 ``model``
enum); bodies over 10 MiB are 413. Content negotiation: ``accept: image/*`` answers the
bytes with ``content-type: image/<fmt>``, ``finish-reason`` and ``seed`` headers;
``accept: application/json`` answers ``{image, finish_reason, seed}``; other accepts are
400. Errors are ``{id, name, errors[]}``.

Inpainting (``POST /v2beta/stable-image/edit/inpaint``): the files ``image`` (a PNG, JPEG
or WebP, each side at least 64 pixels, at most 9,437,184 pixels) and ``mask`` (optional
when the image has an alpha channel), the fields ``prompt`` and ``output_format`` (and the
other documented optional ones; anything else, such as ``aspect_ratio``, is a 400); the
answer is at the image's size, negotiated as for the generate endpoints, with the same
scenarios.

Endpoints (``tests.fakes.provider``): ``generate``, ``inpaint``. Scenarios (prompt token or ``fake.enqueue``):

    revoked-key  401 unauthorized, as for a key Stability does not know
    moderated    403 content_moderation          filtered   200 with finish reason CONTENT_FILTERED
    payment      402 payment_required
    429          429 with no Retry-After          500        500 internal_error
    unprocessable 422                             wrong-content-type  image bytes labelled image/png but JPEG
    missing-image, bad-base64 (JSON), garbage-image, fake-png, and the generic
    slow/drip/reset/truncated/html-502/html-504/html-200/invalid-json.
"""

from __future__ import annotations

import base64
import io
import secrets
from contextlib import AbstractAsyncContextManager
from typing import Any

from PIL import Image

from tests.fakes.images import FAKE_PNG, GARBAGE, MIME_TYPES, with_bad_padding
from tests.fakes.provider import REVOKED_KEY, FakeProvider, endpoint, serve_main
from tests.fakes.scenarios import Scenario, transport_variant
from tests.fakes.server import FakeResponse, MultipartPart, RecordedRequest

__all__ = ["StabilityFake", "start_stability_fake"]

DEFAULT_KEY = "sk-test-fake-stability"
RATIOS = {
    "16:9": (1344, 768), "1:1": (1024, 1024), "21:9": (1536, 640), "2:3": (832, 1216), "3:2": (1216, 832),
    "4:5": (896, 1088), "5:4": (1088, 896), "9:16": (768, 1344), "9:21": (640, 1536),
}
SD3_MODELS = {"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"}
MAX_BODY = 10 * 1024 * 1024


def stability_error(status: int, name: str, *messages: str) -> FakeResponse:
    return FakeResponse.json_body({"id": secrets.token_hex(16), "name": name, "errors": list(messages)}, status)


class StabilityFake(FakeProvider):
    """A fake ``api.stability.ai``: the v2beta Stable Image generate endpoints."""

    default_key = DEFAULT_KEY
    title = "fake Stability AI"

    @property
    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path.startswith("/v2beta/stable-image/generate/")]

    def payload(self, request: RecordedRequest) -> dict[str, Any]:
        """The form fields (Stability's body is multipart even without a file), and an
        edit's ``files`` as ``(field, filename, content type, bytes)``."""
        parts = request.multipart()
        assert parts is not None, "not multipart/form-data"
        fields: dict[str, Any] = {part.name: part.data.decode() for part in parts if part.filename is None}
        files = [(p.name, p.filename, p.content_type, p.data) for p in parts if p.filename is not None]
        if files:
            fields["files"] = files
        return fields

    def prompt_of(self, request: RecordedRequest) -> str | None:
        parts = request.multipart() or []
        return next((p.data.decode() for p in parts if p.name == "prompt" and p.filename is None), None)

    def not_found(self, request: RecordedRequest) -> FakeResponse:
        return stability_error(404, "not_found", f"{request.method} {request.path} does not exist")

    @endpoint("POST", r"/v2beta/stable-image/generate/(?P<family>ultra|core|sd3)")
    async def generate(self, request: RecordedRequest, family: str) -> FakeResponse:
        """Text to image on one of the three model families."""
        opened = self._open(request)
        if isinstance(opened, FakeResponse):
            return opened
        scenario, parts, fields, accept = opened
        problem = self._validate(family, fields, parts)
        if problem is not None:
            return problem
        width, height = RATIOS[fields.get("aspect_ratio", "1:1")]
        # Rendered at 1/16 of Stability's pixels.
        return self._answer(scenario, accept, fields.get("output_format", "png"), width // 16, height // 16)

    @endpoint("POST", r"/v2beta/stable-image/edit/inpaint")
    async def inpaint(self, request: RecordedRequest) -> FakeResponse:
        """Inpainting: ``image`` repainted where ``mask`` is white, at the image's size."""
        opened = self._open(request)
        if isinstance(opened, FakeResponse):
            return opened
        scenario, parts, fields, accept = opened
        files = {p.name: p.data for p in parts if p.filename is not None}
        for name in fields:
            if name not in ("prompt", "negative_prompt", "seed", "output_format", "grow_mask", "style_preset"):
                return stability_error(400, "bad_request", f"{name}: not accepted by this endpoint")
        for name in files:
            if name not in ("image", "mask"):
                return stability_error(400, "bad_request", f"{name}: unexpected file")
        if "image" not in files:
            return stability_error(400, "bad_request", "image: required")
        image = _shape(files["image"])
        if image is None:
            return stability_error(400, "bad_request", "image: must be a png, jpeg or webp image")
        _, width, height, alpha = image
        if min(width, height) < 64 or width * height > 9_437_184:
            return stability_error(400, "bad_request", "image: each side at least 64 pixels, at most 9,437,184 pixels")
        if "mask" in files:
            if _shape(files["mask"]) is None:
                return stability_error(400, "bad_request", "mask: must be a png, jpeg or webp image")
        elif not alpha:
            return stability_error(400, "bad_request", "mask: required when image has no alpha channel")
        prompt = fields.get("prompt", "")
        if not prompt or len(prompt) > 10000:
            return stability_error(400, "bad_request", "prompt: must be 1 to 10000 characters")
        fmt = fields.get("output_format", "png")
        if fmt not in ("png", "jpeg", "webp"):
            return stability_error(400, "bad_request", "output_format: must be one of png, jpeg, webp")
        return self._answer(scenario, accept, fmt, width, height)

    def _open(
        self, request: RecordedRequest
    ) -> FakeResponse | tuple[Scenario, list[MultipartPart], dict[str, str], str]:
        """What every endpoint checks first (the key, the size, multipart, ``accept``), then
        the request's scenario, parts, text fields and ``accept``."""
        scenario = self.scenarios.pick(self.prompt_of(request))
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") != self.api_key or scenario.name == REVOKED_KEY:
            return stability_error(401, "unauthorized", "authorization: invalid or missing API key")
        if len(request.body) > MAX_BODY:
            return stability_error(413, "payload_too_large", "body: payloads cannot be larger than 10MiB in size")
        parts = request.multipart()
        if parts is None:
            return stability_error(400, "bad_request", "content-type: must be multipart/form-data")
        accept = request.headers.get("accept", "image/*")
        if accept not in ("image/*", "application/json"):
            return stability_error(400, "bad_request", "accept: must be either image/* or application/json")
        return scenario, parts, {p.name: p.data.decode() for p in parts if p.filename is None}, accept

    def _answer(self, scenario: Scenario, accept: str, fmt: str, width: int, height: int) -> FakeResponse:
        match scenario.name:
            case "moderated":
                return stability_error(
                    403, "content_moderation",
                    "Your request was flagged by our content moderation system, as a result your request was denied "
                    "and you were not charged.",
                )
            case "payment":
                return stability_error(
                    402, "payment_required",
                    "You lack sufficient credits to make this request. Please purchase more credits at "
                    "https://platform.stability.ai/account/credits and try again.",
                )
            case "429":
                return stability_error(429, "rate_limit_exceeded", "You have exceeded the rate limit of 150 requests within a 10 second period.")
            case "500":
                return stability_error(500, "internal_error", "An unexpected server error has occurred, please try again later.")
            case "unprocessable":
                return stability_error(422, "invalid_language", "English is the only supported language for this service.")
        data = self.images.get(fmt, width, height)
        if scenario.name == "garbage-image":
            data = GARBAGE
        elif scenario.name == "fake-png":
            data = FAKE_PNG
        elif scenario.name == "wrong-content-type":
            data = self.images.get("jpeg" if fmt != "jpeg" else "png", 8, 8)
        finish = "CONTENT_FILTERED" if scenario.name == "filtered" else "SUCCESS"
        seed = str(secrets.randbelow(4294967294))
        request_id = secrets.token_hex(16)
        if accept == "image/*":
            ok = FakeResponse(
                body=data,
                content_type=MIME_TYPES[fmt],
                headers=(("finish-reason", finish), ("seed", seed), ("x-request-id", request_id)),
            )
        else:
            encoded = base64.b64encode(data).decode()
            if scenario.name == "bad-base64":
                encoded = with_bad_padding(encoded)
            payload: dict[str, Any] = {"image": encoded, "finish_reason": finish, "seed": int(seed)}
            if scenario.name == "missing-image":
                del payload["image"]
            ok = FakeResponse.json_body(payload, headers=(("x-request-id", request_id),))
        return transport_variant(scenario, ok) or ok

    @staticmethod
    def _validate(endpoint: str, fields: dict[str, str], parts: list[MultipartPart]) -> FakeResponse | None:
        prompt = fields.get("prompt", "")
        if not prompt:
            return stability_error(400, "bad_request", "prompt: cannot be empty")
        if len(prompt) > 10000:
            return stability_error(400, "bad_request", "prompt: must be at most 10000 characters")
        if fields.get("aspect_ratio", "1:1") not in RATIOS:
            return stability_error(400, "bad_request", f"aspect_ratio: must be one of {', '.join(RATIOS)}")
        formats = ("png", "jpeg") if endpoint == "sd3" else ("png", "jpeg", "webp")
        if fields.get("output_format", "png") not in formats:
            return stability_error(400, "bad_request", f"output_format: must be one of {', '.join(formats)}")
        if endpoint == "sd3" and fields.get("model", "sd3.5-large") not in SD3_MODELS:
            return stability_error(400, "bad_request", "model: unknown model")
        if "seed" in fields and not (fields["seed"].isdigit() and int(fields["seed"]) <= 4294967294):
            return stability_error(400, "bad_request", "seed: must be between 0 and 4294967294")
        if endpoint != "sd3" and "model" in fields:
            return stability_error(400, "bad_request", "model: not accepted by this endpoint")
        return None


def _shape(data: bytes) -> tuple[str, int, int, bool] | None:
    """``(format, width, height, has alpha)`` of a whole PNG, JPEG or WebP, else None."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            fmt = (image.format or "").lower()
            return (fmt, image.width, image.height, image.mode in ("RGBA", "LA")) if fmt in ("png", "jpeg", "webp") else None
    except (OSError, SyntaxError, ValueError):
        return None


def start_stability_fake(**options: Any) -> AbstractAsyncContextManager[StabilityFake]:
    """A running ``StabilityFake`` (options as its constructor), stopped on exit."""
    return StabilityFake.running(**options)


if __name__ == "__main__":
    serve_main(StabilityFake, 9102)
