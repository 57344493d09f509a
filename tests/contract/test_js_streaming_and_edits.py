"""The official openai JavaScript SDK streams and edits through the gateway, like Python's.

Scenarios in tests/js/scenarios (stream.mjs, edit.mjs) run on Node against the shared
``gateway`` (local-1) and, for a stream that fails midway, against an in-process server
whose model is a scripted provider, behind the real Envoy (tests/e2e/test_streaming.py).
"""

from __future__ import annotations

import base64
import io
from typing import Any

import pytest
from PIL import Image

from tests.e2e.test_edits import RED, bottom_half_mask, png
from tests.e2e.test_streaming import Scripted, request, scripted  # noqa: F401 - the fixture
from tests.js_harness import run_js
from tests.stack import InProcessStack, ProcessStack

pytestmark = pytest.mark.contract


def picture(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64, validate=True)))
    image.load()
    return image


async def test_js_sdk_streams_partials_then_each_image(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(gateway, key, "scenarios/stream.mjs", input={"request": {
        "model": "local-1", "prompt": "a lighthouse", "size": "256x256", "stream": True, "partial_images": 2, "n": 2,
    }})
    assert outcome["ok"], outcome
    result: dict[str, Any] = outcome["result"]
    assert result["error"] is None
    events = result["events"]
    assert [(e["type"], e.get("partial_image_index")) for e in events] == [
        ("image_generation.partial_image", 0), ("image_generation.partial_image", 1), ("image_generation.completed", None),
    ] * 2
    assert {picture(e["b64_json"]).size for e in events} == {(256, 256)}
    assert (await gateway.admin.settled(account)).spent_usd == "0.002000"


async def test_js_sdk_raises_on_a_failure_after_two_partials(scripted: tuple[InProcessStack, Scripted]) -> None:  # noqa: F811
    stack, provider = scripted
    provider.reset("fail", partials=2)
    account, key = await stack.admin.funded_key("1.00")
    outcome = await run_js(stack, key, "scenarios/stream.mjs", input={"request": request(2)})  # type: ignore[arg-type]
    assert outcome["ok"], outcome
    result = outcome["result"]
    assert [e["type"] for e in result["events"]] == ["image_generation.partial_image"] * 2
    error = result["error"]
    assert "APIError" in error["classes"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "upstream_error", None)
    assert (await stack.admin.settled(account)).spent_usd == "0.000500"  # the two partials delivered


async def test_js_sdk_edits_with_one_and_several_files(gateway: ProcessStack) -> None:
    account, key = await gateway.admin.funded_key("1.00")
    red = base64.b64encode(png((128, 128), RED)).decode()
    green = base64.b64encode(png((64, 64), (10, 200, 10))).decode()
    mask = base64.b64encode(bottom_half_mask((128, 128))).decode()
    one = await run_js(gateway, key, "scenarios/edit.mjs", input={
        "images": [red], "request": {"model": "local-1", "prompt": "a lake", "response_format": "b64_json"},
    })
    several = await run_js(gateway, key, "scenarios/edit.mjs", input={
        "images": [red, green], "mask": mask,
        "request": {"model": "local-1", "prompt": "a lake", "response_format": "b64_json", "n": 2},
    })
    assert one["ok"] and one["result"]["ok"], one
    assert several["ok"] and several["result"]["ok"], several
    assert picture(one["result"]["value"]["data"][0]["b64_json"]).size == (128, 128)
    edited = [picture(d["b64_json"]).convert("RGB") for d in several["result"]["value"]["data"]]
    assert len(edited) == 2 and all(e.getpixel((3, 3)) == RED for e in edited)  # outside the mask: untouched
    # 1 image + 1 input, then 2 images + 2 inputs.
    assert (await gateway.admin.settled(account)).spent_usd == "0.003300"


async def test_js_sdk_streams_an_edit(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(gateway, key, "scenarios/stream.mjs", input={
        "request": {"model": "local-1", "prompt": "a forest", "stream": True, "partial_images": 1},
        "edit": {"images": [base64.b64encode(png((96, 96), RED)).decode()]},
    })
    assert outcome["ok"], outcome
    assert [e["type"] for e in outcome["result"]["events"]] == ["image_edit.partial_image", "image_edit.completed"]


async def test_js_sdk_edit_refusal_is_a_bad_request_error(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    outcome = await run_js(gateway, key, "scenarios/edit.mjs", input={
        "images": [base64.b64encode(png((128, 128), RED)).decode()],
        "mask": base64.b64encode(png((128, 128), RED)).decode(),  # no alpha channel
        "request": {"model": "local-1", "prompt": "a lake"},
    })
    error = outcome["result"]["error"]
    assert "BadRequestError" in error["classes"]
    assert (error["status"], error["param"], error["code"]) == (400, "mask", "invalid_mask")
