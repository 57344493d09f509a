"""The provider test matrix: rows, what each row checks, and the run that checks them.

A ``Row`` is one scenario of one provider: a request (a generation, or an edit or a
variation with its ``files``; model, a fake's scenario token in the prompt, fields, a
caller deadline) and everything that must follow, exactly: the
status, the OpenAI error body or the images (decoded, at their size), the headers, the
money to the micro-dollar (balance, reservation, spend, the usage row, reconciliation),
the requests the fake received (how many, their payloads, with our credentials), the
server's error log lines, the caller's wait. ``check`` runs one row through Envoy against
the shared stack; nothing in a row is checked loosely unless the row says so.

``MatrixRun`` runs the rows: each with its own funded account and a prompt no other row
uses, so rows are independent and run concurrently (``CONCURRENCY`` at a time); rows that
read the server's log or metrics (``alone``) run afterwards, one at a time. Each pytest
test awaits its row's result; a failure is reported with the row's own traceback.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.fakes.provider import FakeProvider
from tests.fakes.server import RecordedRequest
from tests.stack import ProcessStack, metric_sample, status_of

__all__ = [
    "CREDENTIALS_MESSAGE",
    "FUNDED",
    "MALFORMED",
    "MODERATED",
    "ZERO_USAGE",
    "Env",
    "Err",
    "LogWatch",
    "MatrixRun",
    "Row",
    "Upload",
    "catalog_with",
    "expect_error",
    "expect_money",
    "fetch_images",
    "generate",
    "list_models",
    "mask_png",
    "png",
    "unique",
    "usage",
    "usd",
]

CATALOG_FILE = Path(__file__).resolve().parents[2] / "server" / "catalog.toml"
FUNDED = "1.00"
FUNDED_MICROS = 1_000_000
# Rows checked at once. The deadline rows bound the caller's wait from above, so this stays
# well below what would slow one request down by a second on two shared cores.
CONCURRENCY = 12
ROW_SECONDS = 60
CREDENTIALS_MESSAGE = "The upstream provider rejected the gateway's credentials"
MALFORMED = "The upstream provider returned a malformed answer: "
MODERATED = "The upstream provider's safety system rejected the request."
ZERO_USAGE = {
    "prompt_tokens": 0,
    "completion_tokens": 0,
    "total_tokens": 0,
    "input_tokens": 0,
    "output_tokens": 0,
    "input_tokens_details": {"text_tokens": 0, "image_tokens": 0},
    "output_tokens_details": {"image_tokens": 0, "text_tokens": 0},
}
URL_RE = r"^{base}/images/files/img-[A-Za-z0-9_-]{{22}}\.{ext}\?expires=\d+&signature=[A-Za-z0-9_-]+$"
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp"}


def unique(prompt: str) -> str:
    """``prompt`` with a tag no other test uses (a fake's ``xN`` counters are per prompt)."""
    return f"{prompt} #{secrets.token_hex(4)}"


def usd(micros: int) -> str:
    """Six-decimal dollars, exactly as the gateway prints them."""
    return f"{micros // 1_000_000}.{micros % 1_000_000:06d}"


def usage(input_text: int = 0, output_image: int = 0, input_image: int = 0, output_text: int = 0) -> dict[str, Any]:
    """The OpenAI ``usage`` object the gateway answers for these token counts."""
    inputs, outputs = input_text + input_image, output_image + output_text
    return {
        "prompt_tokens": inputs,
        "completion_tokens": outputs,
        "total_tokens": inputs + outputs,
        "input_tokens": inputs,
        "output_tokens": outputs,
        "input_tokens_details": {"text_tokens": input_text, "image_tokens": input_image},
        "output_tokens_details": {"image_tokens": output_image, "text_tokens": output_text},
    }


# -- talking to the stack ------------------------------------------------------------------------


@dataclass
class Reply:
    """One answer through Envoy and how long it took."""

    response: httpx.Response
    seconds: float
    finished_at: float  # time.monotonic() when the whole answer had arrived

    @property
    def status(self) -> int:
        return self.response.status_code

    def json(self) -> Any:
        return self.response.json()

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers


async def generate(stack: ProcessStack, key: str, body: Mapping[str, Any], **headers: str) -> Reply:
    """``POST /v1/images/generations`` through Envoy."""
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        response = await client.post(
            f"{stack.api_base}/images/generations", json=dict(body), headers={"Authorization": f"Bearer {key}", **headers}
        )
        finished = time.monotonic()
        return Reply(response, finished - started, finished)


@dataclass(frozen=True)
class Upload:
    """One file of an edit or variation: its form field, name, content type and bytes."""

    field: str  # image, image[] or mask
    filename: str
    content_type: str
    data: bytes


def form_value(value: object) -> str:
    """A JSON value as the SDKs put it in a form field."""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


async def upload(
    stack: ProcessStack, key: str, path: str, fields: Mapping[str, Any], files: Sequence[Upload], **headers: str
) -> Reply:
    """``POST /v1/images/{edits,variations}`` through Envoy, multipart as the SDKs send it."""
    parts: list[tuple[str, tuple[str | None, bytes | str] | tuple[str, bytes, str]]] = [
        (name, (None, form_value(value))) for name, value in fields.items()
    ]
    parts += [(f.field, (f.filename, f.data, f.content_type)) for f in files]
    async with httpx.AsyncClient(timeout=60) as client:
        started = time.monotonic()
        response = await client.post(
            f"{stack.api_base}/images/{path}", files=parts, headers={"Authorization": f"Bearer {key}", **headers}
        )
        finished = time.monotonic()
        return Reply(response, finished - started, finished)


def png(width: int, height: int, color: tuple[int, ...] = (200, 40, 40), mode: str = "RGB") -> bytes:
    """A solid ``width`` x ``height`` PNG (``mode`` RGBA for one with an alpha channel)."""
    out = io.BytesIO()
    Image.new(mode, (width, height), color).save(out, format="PNG")
    return out.getvalue()


def mask_png(width: int, height: int) -> bytes:
    """An OpenAI mask: opaque on top, fully transparent (edit here) on the bottom half."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, height // 2, width, height))
    out = io.BytesIO()
    mask.save(out, format="PNG")
    return out.getvalue()


async def list_models(stack: ProcessStack, key: str) -> list[str]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{stack.api_base}/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return [model["id"] for model in body["data"]]


def _decode(data: bytes) -> Image.Image:
    # In a thread: the rows share this event loop, and the caller's wait is timed on it.
    image = Image.open(io.BytesIO(data))
    image.load()  # a full decode: a truncated image fails here
    return image


async def fetch_images(stack: ProcessStack, reply: Reply, response_format: str) -> list[tuple[str, int, int]]:
    """``(PIL format, width, height)`` of every image in a 200 answer, fetching URLs.

    Checks each item carries the field ``response_format`` asks for, that URLs are the
    gateway's own signed links (never a provider's) and serve the right type.
    """
    assert reply.status == 200, reply.response.text
    found = []
    async with httpx.AsyncClient(timeout=30) as client:
        for item in reply.json()["data"]:
            if response_format == "url":
                assert "b64_json" not in item
                fetched = await client.get(item["url"])
                assert fetched.status_code == 200, fetched.text
                image = await asyncio.to_thread(_decode, fetched.content)
                assert fetched.headers["content-type"] == CONTENT_TYPES[image.format]
                pattern = URL_RE.format(base=re.escape(stack.api_base), ext=EXTENSIONS[image.format])
                assert re.match(pattern, item["url"]), item["url"]
            else:
                assert "url" not in item
                image = await asyncio.to_thread(_decode, base64.b64decode(item["b64_json"], validate=True))
            found.append((image.format, image.width, image.height))
    return found


def expect_error(
    reply: Reply, status: int, *, code: str, message: str, should_retry: bool, type_: str | None = None,
    param: str | None = None,
) -> None:
    """The exact OpenAI error body, status and ``x-should-retry``; no internals leak."""
    assert reply.status == status, reply.response.text
    expected_type = type_ or ("invalid_request_error" if status == 400 else "server_error")
    assert reply.json() == {"error": {"message": message, "type": expected_type, "param": param, "code": code}}, (
        reply.response.text
    )
    assert reply.headers["x-should-retry"] == ("true" if should_retry else "false")
    assert reply.headers["content-type"] == "application/json"
    assert "x-imagegw-cost-usd" not in reply.headers and "x-imagegw-model" not in reply.headers
    assert [h for h in reply.headers if h.startswith(("grpc-", "x-envoy", "x-http-status", "x-openai"))] == []


async def expect_money(
    stack: ProcessStack,
    account_id: str,
    *,
    spent: int,
    usage_rows: Sequence[tuple[str, str, int, int, int]],
    funded: int = FUNDED_MICROS,
) -> None:
    """Balance, reservation and spend to the micro-dollar; the usage rows as
    ``(status, error_code, images_requested, images_delivered, cost_micros)``, newest
    first; the ledger reconciles. Waits for a reservation to settle (a cancelled request
    settles just after its answer)."""
    account = await stack.admin.settled(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == (usd(funded - spent), "0.000000", usd(spent))
    rows = await stack.admin.usage(account_id)
    assert [(status_of(u), u.error_code, u.images_requested, u.images_delivered, u.cost_usd) for u in rows] == [
        (status, code, requested, delivered, usd(cost)) for status, code, requested, delivered, cost in usage_rows
    ]
    report = await stack.admin.reconcile()
    assert report.ok, report.mismatches


class LogWatch:
    """The server log's JSON lines written after it was created."""

    def __init__(self, stack: ProcessStack) -> None:
        self._stack = stack
        self._mark = len(stack.server_log())

    def text(self) -> str:
        return self._stack.server_log()[self._mark :]

    def errors(self) -> list[str]:
        """Messages logged at level error (the operator's alarms)."""
        found = []
        for line in self.text().splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("level") == "error":
                found.append(entry["message"])
        return found


def catalog_with(path: Path, changes: Mapping[str, Mapping[str, Any]], extra_rows: str = "") -> Path:
    """A copy of the shipped catalog with keys set (added or replaced) on some rows, plus
    ``extra_rows`` of TOML appended; written to ``path``."""
    blocks = CATALOG_FILE.read_text().split("[[models]]\n")
    for model_id, keys in changes.items():
        blocks[_block(blocks, model_id)] = _with_keys(blocks[_block(blocks, model_id)], keys)
    path.write_text("[[models]]\n".join(blocks) + "\n" + extra_rows)
    return path


def clone_row(model_id: str, new_id: str, **keys: Any) -> str:
    """A TOML row copying the shipped ``model_id`` under ``new_id`` (same upstream model and
    prices), with ``keys`` set: an operator's variant of a model."""
    blocks = CATALOG_FILE.read_text().split("[[models]]\n")
    block = blocks[_block(blocks, model_id)]
    upstream = re.search(r'^upstream_model = "([^"]+)"$', block, re.MULTILINE)
    keys = {"upstream_model": upstream.group(1) if upstream else model_id, **keys}
    block = _with_keys(block, keys).replace(f'id = "{model_id}"\n', f'id = "{new_id}"\n', 1)
    return "[[models]]\n" + block.split("\n\n")[0] + "\n\n"


def _block(blocks: list[str], model_id: str) -> int:
    matching = [i for i, block in enumerate(blocks) if block.startswith(f'id = "{model_id}"\n')]
    assert len(matching) == 1, f"{model_id} is not a catalog row"
    return matching[0]


def _with_keys(block: str, keys: Mapping[str, Any]) -> str:
    kept = [row for row in block.splitlines(keepends=True) if row.split(" = ")[0] not in keys]
    added = [f"{key} = {json.dumps(value)}\n" for key, value in keys.items()]
    return "".join(kept[:1] + added + kept[1:])


# -- rows ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Err:
    """The OpenAI error a row's caller gets. ``message`` is exact unless ``pattern``."""

    code: str
    message: str | None = None  # None: not checked (catalog refusals: their param and code are)
    should_retry: bool = False
    retry_after: str | None = None  # the Retry-After header, when the provider named a wait
    param: str | None = None
    pattern: bool = False  # message is a regular expression (a byte count that varies)


@dataclass(frozen=True)
class Row:
    """One provider scenario and everything that must follow (see the module docstring)."""

    provider: str  # the fake that serves it: a key of Env.fakes
    outcome: str  # success, partial, refused, moderation, credentials, rate-limited, ... (the id)
    model: str
    scenario: str = ""  # the fake's behaviour: "[[fake:SCENARIO]]" goes into the prompt
    operation: str = "generate"  # or edit (POST /v1/images/edits), variation (/v1/images/variations)
    files: Sequence[Upload] = ()  # an edit's or variation's images and mask
    body: Mapping[str, Any] = field(default_factory=dict)  # request fields besides model and prompt
    deadline: str | None = None  # the caller's grpc-timeout header, e.g. "2S"
    label: str = ""  # distinguishes rows of one provider, outcome and model in the test id
    # -- what the caller gets
    status: int = 200
    images: Sequence[tuple[str, int, int]] = ()  # a 200's images as (format, width, height)
    cost: int = 0  # micro-dollars charged: the header, the spend and the usage row
    served_by: str | None = None  # x-imagegw-model when a fallback served (default: model)
    answer: Mapping[str, Any] = field(default_factory=dict)  # a 200's fields besides created, data, usage
    usage: Mapping[str, Any] | Callable[[str], Mapping[str, Any]] = field(default_factory=lambda: ZERO_USAGE)
    revised: str | Callable[[str], str] | None = None  # every item's revised_prompt ("{prompt}" is replaced)
    error: Err | None = None
    # -- what the upstream saw
    calls: int = 1  # generation requests (BFL: submits) carrying the prompt
    sent: Callable[[str], list[Any]] | None = None  # exactly their payloads, given the prompt
    log: Sequence[str] | None = None  # the server's error lines (the row then runs alone)
    retries: int | None = None  # imagegw_upstream_retries_total's increase (runs alone)
    seconds: tuple[float, float] | None = None  # bounds of the caller's wait
    disconnects: int = 0  # upstream requests the gateway closed (deadline rows)
    extra: Callable[[Env, Row, str, Reply], Any] | None = None  # a row's own further checks

    @property
    def id(self) -> str:
        operation = "" if self.operation == "generate" else self.operation
        parts = [self.provider, operation, self.outcome, self.model, self.scenario, self.label]
        return "-".join(part for part in parts if part)

    @property
    def alone(self) -> bool:
        """Whether the row reads shared server state (logs, metrics) and must run alone."""
        return self.log is not None or self.retries is not None

    @property
    def n(self) -> int:
        return int(self.body.get("n", 1))


@dataclass
class Env:
    """The shared stack and every provider's fake, by the name rows use."""

    stack: ProcessStack
    fakes: Mapping[str, FakeProvider]
    credentials: Mapping[str, Callable[[RecordedRequest], bool]]  # the request carried our key


async def check(env: Env, row: Row) -> None:
    """Runs one row through Envoy and checks everything it states."""
    fake = env.fakes[row.provider]
    account_id, key = await env.stack.admin.funded_key(FUNDED)
    prompt = unique(f"{row.outcome} {row.model}" + (f" [[fake:{row.scenario}]]" if row.scenario else ""))
    if "prompt" in row.body:  # a refused prompt (too long): the row's, tagged
        prompt = f"{row.body['prompt']} {prompt}"
    logs = LogWatch(env.stack) if row.log is not None else None
    retries_before = await _retries(env, row)
    headers = {"grpc-timeout": row.deadline} if row.deadline else {}
    if row.operation == "variation":
        # A variation has no prompt: its `user` carries the row's tag and scenario token.
        reply = await upload(env.stack, key, "variations", {"model": row.model, **row.body, "user": prompt}, row.files, **headers)
    elif row.operation == "edit":
        request = {"model": row.model, **row.body, "prompt": prompt}
        reply = await upload(env.stack, key, "edits", request, row.files, **headers)
    else:
        reply = await generate(env.stack, key, {"model": row.model, **row.body, "prompt": prompt}, **headers)

    if row.error is None:
        assert reply.status == row.status == 200, reply.response.text
        assert reply.headers["x-imagegw-model"] == (row.served_by or row.model)
        assert reply.headers["x-imagegw-cost-usd"] == usd(row.cost)
        response_format = row.body.get("response_format", "url")
        assert await fetch_images(env.stack, reply, response_format) == list(row.images)
        answer = reply.json()
        assert set(answer) == {"created", "data", "usage", *row.answer}
        assert {name: answer[name] for name in row.answer} == dict(row.answer)
        assert answer["usage"] == (row.usage(prompt) if callable(row.usage) else row.usage)
        if callable(row.revised):
            revised: str | None = row.revised(prompt)
        else:
            revised = row.revised.format(prompt=prompt) if row.revised is not None else None
        assert [set(item) for item in answer["data"]] == [{response_format, *(["revised_prompt"] if revised else [])}] * len(
            row.images
        )
        assert [item.get("revised_prompt") for item in answer["data"]] == [revised] * len(row.images)
    else:
        error = row.error
        assert reply.status == row.status, reply.response.text
        message = reply.json()["error"]["message"]
        if error.pattern:
            assert re.fullmatch(error.message or "", message), message
        elif error.message is not None:
            assert message == error.message
        expect_error(reply, row.status, code=error.code, message=message, should_retry=error.should_retry, param=error.param)
        if error.retry_after is None:
            assert "retry-after" not in reply.headers
        else:
            assert reply.headers["retry-after"] == error.retry_after

    sent = fake.sent(prompt)
    assert len(sent) == row.calls, [r.target for r in sent]
    assert all(env.credentials[row.provider](r) for r in sent)
    if row.sent is not None:
        assert [fake.payload(r) for r in sent] == row.sent(prompt)
    if row.seconds is not None:
        low, high = row.seconds
        assert low <= reply.seconds < high, reply.seconds
    if row.disconnects:
        def gone() -> list[RecordedRequest]:
            return [r for r in fake.server.disconnects if fake.prompt_of(r) == prompt]

        await fake.server.wait_for(lambda: len(gone()) >= row.disconnects)
        assert len(gone()) == row.disconnects
    if logs is not None:
        assert logs.errors() == list(row.log or ())
        assert fake.api_key not in logs.text() and fake.api_key not in reply.response.text
    if row.retries is not None:
        assert await _retries(env, row) == (retries_before or 0) + row.retries
    if row.extra is not None:
        await row.extra(env, row, prompt, reply)

    if row.status == 200:
        usage_rows = [("succeeded", "", row.n, len(row.images), row.cost)]
    elif row.outcome == "refused":
        usage_rows = []  # refused before anything was reserved
    else:
        assert row.error is not None
        usage_rows = [("failed", row.error.code, row.n, 0, 0)]
    await expect_money(env.stack, account_id, spent=row.cost, usage_rows=usage_rows)


async def _retries(env: Env, row: Row) -> float | None:
    if row.retries is None:
        return None
    return metric_sample(await env.stack.metrics(), "imagegw_upstream_retries_total", provider=row.provider)


class MatrixRun:
    """Checks rows in the background: the shared ones concurrently, then those that run alone.

    ``result(row)`` waits for one row and raises what its check raised; ``finished()``
    waits for all, for tests that read shared state after the matrix.
    """

    def __init__(self, env: Env, rows: Sequence[Row]) -> None:
        loop = asyncio.get_running_loop()
        self._results: dict[str, asyncio.Future[None]] = {row.id: loop.create_future() for row in rows}
        self._main = asyncio.create_task(self._run(env, rows))

    async def _run(self, env: Env, rows: Sequence[Row]) -> None:
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(row: Row) -> None:
            async with semaphore:
                try:
                    async with asyncio.timeout(ROW_SECONDS):
                        await check(env, row)
                except Exception as exc:  # recorded for the row's test; the run goes on
                    self._results[row.id].set_exception(exc)
                else:
                    self._results[row.id].set_result(None)

        shared = [asyncio.create_task(one(row)) for row in rows if not row.alone]
        if shared:
            await asyncio.wait(shared)
        for row in rows:
            if row.alone:
                await one(row)

    async def result(self, row: Row) -> None:
        await asyncio.shield(self._results[row.id])

    async def finished(self) -> None:
        await asyncio.shield(self._main)

    async def close(self) -> None:
        self._main.cancel()
        await asyncio.wait({self._main})
        for future in self._results.values():
            if not future.done():
                future.cancel()
            elif not future.cancelled():
                future.exception()  # retrieved: a row nobody awaited (deselected) is no warning
