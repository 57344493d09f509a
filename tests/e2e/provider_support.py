"""Helpers for the provider end-to-end tests: one process stack per provider, behind Envoy.

Every test creates its own funded account (``FUNDED`` dollars) and checks the money to the
micro-dollar with ``expect_money``, which also runs the ledger's reconciliation. Prompts
carry a unique tag (``unique``) so a fake's ``[[fake:NAMExK]]`` counters and recorded
requests belong to one test only.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from PIL import Image

from tests.fakes.server import RecordedRequest
from tests.stack import ProcessStack

__all__ = [
    "CATALOG_FILE",
    "FUNDED",
    "LogWatch",
    "Reply",
    "catalog_with",
    "expect_error",
    "expect_money",
    "expect_refunded",
    "expect_timeout",
    "fetch_images",
    "generate",
    "list_models",
    "unique",
    "usd",
    "wait_for_disconnect",
]

CATALOG_FILE = Path(__file__).resolve().parents[2] / "server" / "catalog.toml"
FUNDED = "1.00"
FUNDED_MICROS = 1_000_000
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
CREDENTIALS_MESSAGE = "The upstream provider rejected the gateway's credentials"


def unique(prompt: str) -> str:
    """``prompt`` with a tag no other test uses."""
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


@dataclass
class Reply:
    """One answer through Envoy and how long it took."""

    response: httpx.Response
    seconds: float

    @property
    def status(self) -> int:
        return self.response.status_code

    def json(self) -> Any:
        return self.response.json()

    @property
    def headers(self) -> httpx.Headers:
        return self.response.headers


async def generate(stack: ProcessStack, key: str, body: dict[str, Any], *, timeout: float = 60, **headers: str) -> Reply:
    """``POST /v1/images/generations`` through Envoy."""
    async with httpx.AsyncClient(timeout=timeout) as client:
        started = time.monotonic()
        response = await client.post(
            f"{stack.api_base}/images/generations", json=body, headers={"Authorization": f"Bearer {key}", **headers}
        )
        return Reply(response, time.monotonic() - started)


async def list_models(stack: ProcessStack, key: str) -> list[str]:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(f"{stack.api_base}/models", headers={"Authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list"
    return [model["id"] for model in body["data"]]


def _decode(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()  # a full decode: a truncated image fails here
    return image


async def fetch_images(stack: ProcessStack, reply: Reply, response_format: str) -> list[tuple[str, int, int]]:
    """``(PIL format, width, height)`` of every image in a 200 answer, fetching URLs.

    Checks each item carries exactly the field ``response_format`` asks for, that URLs
    are the gateway's own signed links (never a provider's) and serve the right type.
    """
    assert reply.status == 200, reply.response.text
    found = []
    async with httpx.AsyncClient(timeout=30) as client:
        for item in reply.json()["data"]:
            if response_format == "url":
                assert "b64_json" not in item
                fetched = await client.get(item["url"])
                assert fetched.status_code == 200, fetched.text
                image = _decode(fetched.content)
                assert fetched.headers["content-type"] == CONTENT_TYPES[image.format]
                pattern = URL_RE.format(base=re.escape(stack.api_base), ext=EXTENSIONS[image.format])
                assert re.match(pattern, item["url"]), item["url"]
            else:
                assert "url" not in item
                image = _decode(base64.b64decode(item["b64_json"], validate=True))
            found.append((image.format, image.width, image.height))
    return found


def expect_error(reply: Reply, status: int, *, code: str, message: str, should_retry: bool, type_: str | None = None) -> None:
    """The exact OpenAI error body, status and ``x-should-retry``; no internals leak."""
    assert reply.status == status, reply.response.text
    expected_type = type_ or ("invalid_request_error" if status == 400 else "server_error")
    assert reply.json() == {"error": {"message": message, "type": expected_type, "param": None, "code": code}}, (
        reply.response.text
    )
    assert reply.headers["x-should-retry"] == ("true" if should_retry else "false")
    assert reply.headers["content-type"] == "application/json"
    assert "x-imagegw-cost-usd" not in reply.headers and "x-imagegw-model" not in reply.headers
    assert [h for h in reply.headers if h.startswith(("grpc-", "x-envoy", "x-http-status", "x-openai"))] == []


def expect_timeout(reply: Reply, model: str) -> None:
    """A 504 ``timeout``: the deadline ran out while waiting for the upstream.

    Two timers end such a request at the same instant, the generation's (naming the model)
    and the HTTP call's own; either may fire first, and both messages are true.
    """
    assert reply.status == 504, reply.response.text
    message = reply.json()["error"]["message"]
    assert message in (
        f"The model '{model}' did not finish before the request's deadline.",
        "The upstream provider did not answer before the request's deadline.",
    ), message
    expect_error(reply, 504, code="timeout", should_retry=False, message=message)


async def expect_money(
    stack: ProcessStack,
    account_id: str,
    *,
    spent: int,
    usage_rows: Sequence[tuple[str, str, int, int, int]],
    funded: int = FUNDED_MICROS,
) -> None:
    """Balance, reservation and spend to the micro-dollar; the usage rows as
    ``(status, error_code, images_requested, images_delivered, cost_micros)``; the ledger reconciles.

    Waits briefly for a reservation to settle (a cancelled request settles after its answer).
    """
    account = await stack.admin.settled(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == (usd(funded - spent), "0.000000", usd(spent))
    rows = await stack.admin.usage(account_id)
    assert [(u.status, u.error_code, u.images_requested, u.images_delivered, u.cost_usd) for u in rows] == [
        (status, code, requested, delivered, usd(cost)) for status, code, requested, delivered, cost in usage_rows
    ]
    report = await stack.admin.reconcile()
    assert report.ok, report.mismatches


async def expect_refunded(stack: ProcessStack, account_id: str, *, code: str, images: int = 1) -> None:
    """Nothing charged, the reservation released, one failed usage row with ``code``."""
    await expect_money(stack, account_id, spent=0, usage_rows=[("failed", code, images, 0, 0)])


class LogWatch:
    """The server log's JSON lines written after ``start()``."""

    def __init__(self, stack: ProcessStack) -> None:
        self._stack = stack
        self._mark = len(stack.server_log())

    def text(self) -> str:
        return self._stack.server_log()[self._mark :]

    def lines(self) -> list[dict[str, Any]]:
        found = []
        for line in self.text().splitlines():
            try:
                found.append(json.loads(line))
            except ValueError:
                continue
        return found

    def errors(self) -> list[str]:
        """Messages logged at level error (the operator's alarms)."""
        return [line["message"] for line in self.lines() if line.get("level") == "error"]


async def wait_for_disconnect(
    disconnects: Callable[[], list[RecordedRequest]], matches: Callable[[RecordedRequest], bool], timeout: float = 5.0
) -> RecordedRequest:
    """The recorded request (``matches``) whose client went away before the answer was complete."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for request in disconnects():
            if matches(request):
                return request
        await asyncio.sleep(0.05)
    raise AssertionError("the upstream never saw the gateway disconnect")


def catalog_with(path: Path, changes: dict[str, dict[str, Any]], extra_rows: str = "") -> Path:
    """A copy of the shipped catalog with keys set (added or replaced) on some rows, plus
    ``extra_rows`` of TOML appended; written to ``path``."""
    blocks = CATALOG_FILE.read_text().split("[[models]]\n")
    for model_id, keys in changes.items():
        line = f'id = "{model_id}"\n'
        matching = [i for i, block in enumerate(blocks) if block.startswith(line)]
        assert len(matching) == 1, f"{model_id} is not a catalog row"
        kept = [row for row in blocks[matching[0]].splitlines(keepends=True) if row.split(" = ")[0] not in keys]
        added = [f"{key} = {json.dumps(value)}\n" for key, value in keys.items()]
        blocks[matching[0]] = "".join(kept[:1] + added + kept[1:])
    path.write_text("[[models]]\n".join(blocks) + "\n" + extra_rows)
    return path
