"""A fake Black Forest Labs FLUX API: submit on one host, poll and download on another.

Faithful to ``reference/providers.md`` §4 and §8. Two real servers: the global API
(``base_url``) takes ``POST /v1/{model}`` with ``x-key`` and answers ``{id, polling_url,
cost, input_mp, output_mp}`` where ``polling_url`` points at the *regional* server (another
port); the global host's own ``/v1/get_result`` answers ``Task not found`` for those tasks,
as a wrong cluster does. The regional server runs each task's state machine: ``Pending``
``pending`` times (rising ``progress``), then ``Ready`` with ``result.sample`` on its
delivery path, a signed URL that expires after ``sample_ttl`` seconds (403 XML after).
Submit validation follows FastAPI: 422 ``{"detail": [{loc, msg, type}]}`` for width/height
not a multiple of 32 or outside 256..1440 and ``safety_tolerance`` above 6; a missing or
wrong key is 403; more than ``max_active`` unfinished tasks is 429.

FLUX.1 Kontext (``flux-kontext-pro``, ``-max``): the body takes ``aspect_ratio`` (21:9 to
9:21) instead of width/height (422 for those), ``input_image`` and ``input_image_2..4`` as
base64 images (422 if one does not decode, or a reference comes without ``input_image``),
``output_format`` defaulting to png; the result is about one megapixel at the ratio asked
for, else the input image's, else square (rendered at 1/16, like every sample here).

Endpoints (``tests.fakes.provider``): ``submit`` and ``global_poll`` on the global host;
``poll`` and ``sample`` on the regional one. Scenarios (prompt token or ``fake.enqueue``,
both read at submit):

    request-moderated, content-moderated, error, task-not-found    terminal poll states
    pending=K          K Pending polls before Ready (default ``pending``)
    poll-5xx=K         the first K polls answer 502/503 alternately (retry the poll, not the submit)
    expired-sample     result.sample expires at once (403 on download)
    garbage-sample     result.sample serves bytes that are no image
    revoked-key (403, as for a key BFL does not know), payment (402), forbidden (403), 429, 500, 503 at submit; no-polling-url (submit answers only an id)
    foreign-polling-url (a polling_url on an unrelated host), poll-invalid-json, unknown-status
    and the generic slow/drip/reset/truncated/html-502/html-504/html-200/invalid-json at submit.
"""

from __future__ import annotations

import base64
import math
import secrets
import uuid
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from tests.fakes.images import GARBAGE, MIME_TYPES, describe
from tests.fakes.provider import REVOKED_KEY, FakeProvider, endpoint, serve_main
from tests.fakes.scenarios import Scenario, transport_variant
from tests.fakes.server import FakeResponse, RecordedRequest, SignedBlobs

__all__ = ["BflFake", "start_bfl_fake"]

DEFAULT_KEY = "bfl-test-fake-key"
MODELS = {"flux-pro-1.1", "flux-pro-1.1-ultra", "flux-pro", "flux-dev", "flux-kontext-pro", "flux-kontext-max"}


@dataclass(slots=True)
class _Task:
    id: str
    prompt: str
    width: int
    height: int
    fmt: str
    scenario: Scenario
    pending: int
    poll_failures: int
    polls: int = 0
    done: bool = False


class BflFake(FakeProvider):
    """A fake BFL API: the global host plus a regional host that serves polls and deliveries."""

    default_key = DEFAULT_KEY
    title = "fake BFL API"

    def __init__(
        self, *, regional_port: int = 0, pending: int = 2, sample_ttl: float = 600.0, max_active: int = 24,
        **options: Any,
    ) -> None:
        super().__init__(**options)
        self.pending = pending
        self.sample_ttl = sample_ttl
        self.max_active = max_active
        # The regional host is a second server with its own endpoints (``Regional``).
        self.regional = Regional(self, host=options.get("host", "127.0.0.1"), port=regional_port)
        self.blobs = SignedBlobs(prefix="/results")
        self.tasks: dict[str, _Task] = {}

    @property
    def submits(self) -> list[RecordedRequest]:
        return [r for r in self.server.requests if r.method == "POST"]

    @property
    def polls(self) -> list[RecordedRequest]:
        return [r for r in self.regional.requests + self.server.requests if r.path == "/v1/get_result"]

    @property
    def downloads(self) -> list[RecordedRequest]:
        return [r for r in self.regional.requests if r.path.startswith("/results/")]

    def polls_of(self, prompt: str) -> list[RecordedRequest]:
        """The polls of the tasks submitted with ``prompt``, on either host."""
        ids = {task.id for task in self.tasks.values() if task.prompt == prompt}
        return [r for r in self.polls if r.query.get("id") in ids]

    def prompt_of(self, request: RecordedRequest) -> str | None:
        return super().prompt_of(request) if request.method == "POST" else None

    def describe(self) -> str:
        return f"{super().describe()} (regional {self.regional.base_url})"

    def not_found(self, request: RecordedRequest) -> FakeResponse:
        return FakeResponse.json_body({"detail": "Not Found"}, 404)

    async def start(self) -> None:
        await self.server.start()
        await self.regional.start()

    async def stop(self) -> None:
        await self.regional.stop()
        await self.server.stop()

    def _authorized(self, request: RecordedRequest) -> bool:
        return request.headers.get("x-key") == self.api_key

    # -- global API: submit -------------------------------------------------------------------

    @endpoint("GET", r"/v1/get_result")
    async def global_poll(self, request: RecordedRequest) -> FakeResponse:
        """Polls on the global host: tasks live on the regional cluster, so it does not know them."""
        if not self._authorized(request):
            return FakeResponse.json_body({"detail": "Invalid or missing API key"}, 403)
        task = self.tasks.get(request.query.get("id", ""))
        if task is not None and task.scenario.name == "no-polling-url":
            return self.poll(task.id)
        return FakeResponse.json_body({"id": request.query.get("id"), "status": "Task not found"})

    @endpoint("POST", r"/v1/(?P<model>[a-z0-9.-]+)")
    async def submit(self, request: RecordedRequest, model: str) -> FakeResponse:
        """``POST /v1/{model}``: a new task, answered with its id and ``polling_url``."""
        if model not in MODELS:
            return FakeResponse.json_body({"detail": "Not Found"}, 404)
        scenario = self.scenarios.pick(self.prompt_of(request))
        if not self._authorized(request) or scenario.name == REVOKED_KEY:
            return FakeResponse.json_body({"detail": "Invalid or missing API key"}, 403)
        try:
            body = request.json()
        except ValueError:
            return FakeResponse.json_body({"detail": [{"loc": ["body"], "msg": "JSON decode error", "type": "json_invalid"}]}, 422)
        problems = self._validate_kontext(body) if model.startswith("flux-kontext") else self._validate(body)
        if problems:
            return FakeResponse.json_body({"detail": problems}, 422)
        if model.startswith("flux-kontext"):
            # About one megapixel at the ratio asked for, else the input's, else square.
            width, height = _kontext_size(body)
            body = body | {"width": width, "height": height}
        match scenario.name:
            case "payment":
                return FakeResponse.json_body({"detail": "Insufficient credits"}, 402)
            case "forbidden":
                return FakeResponse.json_body({"detail": "Not authenticated: key lacks permission"}, 403)
            case "429":
                return FakeResponse.json_body({"detail": "Too many active tasks"}, 429)
            case "500":
                return FakeResponse.json_body({"detail": "Internal Server Error"}, 500)
            case "503":
                return FakeResponse.json_body({"detail": "Service Unavailable"}, 503)
        active = sum(1 for task in self.tasks.values() if not task.done)
        if active >= self.max_active:
            return FakeResponse.json_body({"detail": f"You have reached the limit of {self.max_active} active tasks"}, 429)
        task = _Task(
            id=str(uuid.uuid4()),
            prompt=body["prompt"],
            width=body.get("width", 1024),
            height=body.get("height", 768),
            fmt=body.get("output_format", "png" if model.startswith("flux-kontext") else "jpeg"),
            scenario=scenario,
            pending=int(scenario.arg_or(self.pending)) if scenario.name == "pending" else self.pending,
            poll_failures=int(scenario.arg_or(2)) if scenario.name == "poll-5xx" else 0,
        )
        self.tasks[task.id] = task
        payload: dict[str, Any] = {"id": task.id, "polling_url": f"{self.regional.base_url}/v1/get_result?id={task.id}",
                                   "cost": 4.0, "input_mp": 0.0, "output_mp": round(task.width * task.height / 1e6, 2)}
        if scenario.name == "no-polling-url":
            # Older API versions answered only the id; polls then go to the global host.
            del payload["polling_url"]
            task.pending = 0
        elif scenario.name == "foreign-polling-url":
            payload["polling_url"] = f"https://collector.example.net/v1/get_result?id={task.id}"
        ok = FakeResponse.json_body(payload)
        return transport_variant(scenario, ok) or ok

    @staticmethod
    def _validate(body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, dict):
            return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
        problems = []
        if not isinstance(body.get("prompt"), str):
            problems.append({"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"})
        for side in ("width", "height"):
            value = body.get(side, 1024)
            if not isinstance(value, int) or value % 32 or not 256 <= value <= 1440:
                problems.append({"loc": ["body", side], "msg": f"{side} must be a multiple of 32 between 256 and 1440",
                                 "type": "value_error"})
        tolerance = body.get("safety_tolerance", 2)
        if not isinstance(tolerance, int) or not 0 <= tolerance <= 6:
            problems.append({"loc": ["body", "safety_tolerance"], "msg": "Input should be less than or equal to 6",
                             "type": "less_than_equal"})
        if body.get("output_format", "jpeg") not in ("jpeg", "png", "webp"):
            problems.append({"loc": ["body", "output_format"], "msg": "Input should be 'jpeg', 'png' or 'webp'", "type": "enum"})
        return problems

    @staticmethod
    def _validate_kontext(body: Any) -> list[dict[str, Any]]:
        if not isinstance(body, dict):
            return [{"loc": ["body"], "msg": "Input should be a valid dictionary", "type": "dict_type"}]
        problems = []
        if not isinstance(body.get("prompt"), str):
            problems.append({"loc": ["body", "prompt"], "msg": "Field required", "type": "missing"})
        for name in ("width", "height", "image_prompt"):
            if name in body:
                problems.append({"loc": ["body", name], "msg": "Extra inputs are not permitted", "type": "extra_forbidden"})
        ratio = body.get("aspect_ratio")
        if ratio is not None and _ratio(ratio) is None:
            problems.append({"loc": ["body", "aspect_ratio"], "msg": "Aspect ratio must be between 21:9 and 9:21",
                             "type": "value_error"})
        references = [name for name in ("input_image_2", "input_image_3", "input_image_4") if name in body]
        if references and "input_image" not in body:
            problems.append({"loc": ["body", references[0]], "msg": "Additional references need input_image",
                             "type": "value_error"})
        for name in ("input_image", *references):
            if name in body and _decoded(body[name]) is None:
                problems.append({"loc": ["body", name], "msg": "Input should be a base64 encoded image or an URL",
                                 "type": "value_error"})
        tolerance = body.get("safety_tolerance", 2)
        if not isinstance(tolerance, int) or not 0 <= tolerance <= 6:
            problems.append({"loc": ["body", "safety_tolerance"], "msg": "Input should be less than or equal to 6",
                             "type": "less_than_equal"})
        if body.get("output_format", "png") not in ("jpeg", "png", "webp"):
            problems.append({"loc": ["body", "output_format"], "msg": "Input should be 'jpeg', 'png' or 'webp'", "type": "enum"})
        return problems

    # -- the regional host's state machine -----------------------------------------------------

    def poll(self, task_id: str) -> FakeResponse:
        task = self.tasks.get(task_id)
        if task is None:
            return FakeResponse.json_body({"id": task_id, "status": "Task not found"})
        if task.poll_failures:
            # A flaky regional gateway: the task itself is unaffected.
            task.poll_failures -= 1
            status = 502 if task.poll_failures % 2 else 503
            return FakeResponse.text(f"<html><body><h1>{status}</h1></body></html>", status)
        task.polls += 1
        state: dict[str, Any] = {"id": task.id, "result": None, "progress": None, "details": None, "preview": None}
        name = task.scenario.name
        if name == "poll-invalid-json":
            return FakeResponse(body=b'{"id": "' + task.id.encode() + b'", "status": "Rea')
        if task.polls <= task.pending:
            return FakeResponse.json_body(state | {"status": "Pending", "progress": round(task.polls / (task.pending + 1), 2)})
        task.done = True
        terminal = {"request-moderated": "Request Moderated", "content-moderated": "Content Moderated",
                    "error": "Error", "task-not-found": "Task not found", "unknown-status": "Sleeping"}
        if name in terminal:
            details = {"Moderation Reasons": ["Derivative Works Filter"]} if "moderated" in name else None
            return FakeResponse.json_body(state | {"status": terminal[name], "details": details})
        data = GARBAGE if name == "garbage-sample" else self.images.get(task.fmt, task.width // 16, task.height // 16)
        ttl = 0.0 if name == "expired-sample" else self.sample_ttl
        sample = self.blobs.put(self.regional.base_url, data, MIME_TYPES[task.fmt], ttl=ttl, suffix=task.fmt, tag=task.prompt)
        return FakeResponse.json_body(
            state | {"status": "Ready", "result": {"sample": sample, "prompt": task.prompt, "seed": secrets.randbelow(2**31),
                                                    "start_time": 1767225600.1, "end_time": 1767225606.4, "duration": 6.3}}
        )


def _ratio(value: object) -> float | None:
    """A "W:H" string's ratio when Kontext takes it (21:9 .. 9:21), else None."""
    if not isinstance(value, str) or value.count(":") != 1:
        return None
    width, height = value.split(":")
    if not (width.isdigit() and height.isdigit()) or not int(width) or not int(height):
        return None
    ratio = int(width) / int(height)
    return ratio if 9 / 21 - 1e-9 <= ratio <= 21 / 9 + 1e-9 else None


def _decoded(value: object) -> tuple[int, int] | None:
    """``(width, height)`` of a base64 image, or None."""
    if not isinstance(value, str):
        return None
    try:
        _, width, height = describe(base64.b64decode(value, validate=True))
    except (ValueError, OSError, SyntaxError):
        return None
    return width, height


def _kontext_size(body: dict[str, Any]) -> tuple[int, int]:
    ratio = _ratio(body.get("aspect_ratio"))
    if ratio is None:
        shape = _decoded(body.get("input_image")) or (1, 1)
        ratio = shape[0] / shape[1]
    # One megapixel at that shape, sides in multiples of 32.
    width = round(math.sqrt(1024 * 1024 * ratio) / 32) * 32
    return width, round(1024 * 1024 / width / 32) * 32


class Regional(FakeProvider):
    """The regional cluster of a ``BflFake``: polls and result deliveries, on its own port."""

    title = "fake BFL regional host"

    def __init__(self, api: BflFake, **options: Any) -> None:
        super().__init__(api_key=api.api_key, **options)
        self.api = api

    def not_found(self, request: RecordedRequest) -> FakeResponse:
        return FakeResponse.json_body({"detail": "Not Found"}, 404)

    @endpoint("GET", r"/v1/get_result")
    async def poll(self, request: RecordedRequest) -> FakeResponse:
        """A task's state, with ``x-key``."""
        if request.headers.get("x-key") != self.api.api_key:
            return FakeResponse.json_body({"detail": "Invalid or missing API key"}, 403)
        return self.api.poll(request.query.get("id", ""))

    @endpoint("GET", r"/results/.+")
    async def sample(self, request: RecordedRequest) -> FakeResponse:
        """A Ready task's ``result.sample``: a signed link, no key."""
        served = self.api.blobs.serve(request)
        assert served is not None
        return served


def start_bfl_fake(**options: Any) -> AbstractAsyncContextManager[BflFake]:
    """A running ``BflFake`` (options as its constructor), both hosts stopped on exit."""
    return BflFake.running(**options)


if __name__ == "__main__":
    serve_main(BflFake, 9103)
