"""A fake Stability AI v2beta Stable Image API.

Faithful to ``reference/providers.md`` §3 and §8: ``POST
/v2beta/stable-image/generate/{ultra,core,sd3}`` with ``authorization: Bearer``; the body
must be ``multipart/form-data`` (anything else is 400 ``bad_request``) with a ``prompt``
part; ``aspect_ratio`` and ``output_format`` are validated (SD3: no webp; SD3 ``model``
enum); bodies over 10 MiB are 413. Content negotiation: ``accept: image/*`` answers the
bytes with ``content-type: image/<fmt>``, ``finish-reason`` and ``seed`` headers;
``accept: application/json`` answers ``{image, finish_reason, seed}``; other accepts are
400. Errors are ``{id, name, errors[]}``.

Scenarios (prompt token or ``fake.enqueue``):

    moderated    403 content_moderation          filtered   200 with finish reason CONTENT_FILTERED
    payment      402 payment_required
    429          429 with no Retry-After          500        500 internal_error
    unprocessable 422                             wrong-content-type  image bytes labelled image/png but JPEG
    missing-image, bad-base64 (JSON), garbage-image, fake-png, and the generic
    slow/drip/reset/truncated/html-502/html-504/html-200/invalid-json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tests.fakes.images import FAKE_PNG, GARBAGE, ImageCache, MIME_TYPES, with_bad_padding
from tests.fakes.scenarios import Scenario, ScenarioPicker, transport_variant
from tests.fakes.server import FakeHttpServer, FakeResponse, MultipartPart, RecordedRequest

__all__ = ["StabilityFake", "start_stability_fake"]

DEFAULT_KEY = "sk-test-fake-stability"
ENDPOINTS = ("ultra", "core", "sd3")
RATIOS = {
    "16:9": (1344, 768), "1:1": (1024, 1024), "21:9": (1536, 640), "2:3": (832, 1216), "3:2": (1216, 832),
    "4:5": (896, 1088), "5:4": (1088, 896), "9:16": (768, 1344), "9:21": (640, 1536),
}
SD3_MODELS = {"sd3.5-large", "sd3.5-large-turbo", "sd3.5-medium"}
MAX_BODY = 10 * 1024 * 1024


def stability_error(status: int, name: str, *messages: str) -> FakeResponse:
    return FakeResponse.json_body({"id": secrets.token_hex(16), "name": name, "errors": list(messages)}, status)


class StabilityFake:
    """One fake ``api.stability.ai``."""

    def __init__(self, *, api_key: str = DEFAULT_KEY, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.server = FakeHttpServer(self._handle, host=host, port=port)
        self.scenarios = ScenarioPicker()
        self._images = ImageCache()

    @property
    def base_url(self) -> str:
        return self.server.base_url

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.server.requests

    @property
    def generation_requests(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.path.startswith("/v2beta/stable-image/generate/")]

    def enqueue(self, *scenarios: str | Scenario) -> None:
        self.scenarios.enqueue(*scenarios)

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    async def _handle(self, request: RecordedRequest) -> FakeResponse:
        endpoint = request.path.removeprefix("/v2beta/stable-image/generate/")
        if request.method != "POST" or endpoint not in ENDPOINTS:
            return stability_error(404, "not_found", f"{request.method} {request.path} does not exist")
        auth = request.headers.get("authorization", "")
        if not auth.startswith("Bearer ") or auth.removeprefix("Bearer ") != self.api_key:
            return stability_error(401, "unauthorized", "authorization: invalid or missing API key")
        if len(request.body) > MAX_BODY:
            return stability_error(413, "payload_too_large", "body: payloads cannot be larger than 10MiB in size")
        parts = request.multipart()
        if parts is None:
            return stability_error(400, "bad_request", "content-type: must be multipart/form-data")
        fields = {p.name: p.data.decode() for p in parts if p.filename is None}
        accept = request.headers.get("accept", "image/*")
        if accept not in ("image/*", "application/json"):
            return stability_error(400, "bad_request", "accept: must be either image/* or application/json")
        problem = self._validate(endpoint, fields, parts)
        if problem is not None:
            return problem
        scenario = self.scenarios.pick(fields["prompt"])
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
        fmt = fields.get("output_format", "png")
        width, height = RATIOS[fields.get("aspect_ratio", "1:1")]
        data = self._images.get(fmt, width // 16, height // 16)
        if scenario.name == "garbage-image":
            data = GARBAGE
        elif scenario.name == "fake-png":
            data = FAKE_PNG
        elif scenario.name == "wrong-content-type":
            data = self._images.get("jpeg" if fmt != "jpeg" else "png", 8, 8)
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


@asynccontextmanager
async def start_stability_fake(**options: Any) -> AsyncIterator[StabilityFake]:
    """A running ``StabilityFake`` (options as its constructor), stopped on exit."""
    fake = StabilityFake(**options)
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


async def _serve(args: argparse.Namespace) -> None:
    fake = StabilityFake(api_key=args.key, host=args.host, port=args.port)
    await fake.start()
    print(f"fake Stability AI at {fake.base_url}  key {args.key}", flush=True)  # noqa: T201
    await fake.server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9102)
    parser.add_argument("--key", default=DEFAULT_KEY)
    asyncio.run(_serve(parser.parse_args()))


if __name__ == "__main__":
    main()
