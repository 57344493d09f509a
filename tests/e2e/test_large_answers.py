"""The largest answers fit end to end; answers that could not fit are refused up front;
large upstream answers are decoded a bounded number at a time."""

from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import httpx
import pytest
from imagegw.v1 import images_pb2
from PIL import Image

from tests.fakes.google_fake import start_google_fake
from tests.fakes.images import make_image
from tests.fakes.openai_fake import start_openai_fake
from tests.stack import ProcessStack, metric_sample, process_stack

pytestmark = pytest.mark.e2e

LARGEST = {"model": "local-1", "prompt": "a wide harbour at noon", "n": 10, "size": "1792x1024",
           "response_format": "b64_json", "quality": "hd"}


async def test_ten_largest_images_as_b64_json_through_envoy(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=120) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations", json=LARGEST, headers={"Authorization": f"Bearer {key}"}
        )
    assert response.status_code == 200, response.text[:500]
    data = response.json()["data"]
    assert len(data) == 10
    sizes = {Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).size for item in data}
    assert sizes == {(1792, 1024)}
    assert (await gateway.admin.get(account_id)).spent_usd == "0.020000"


async def test_ten_largest_images_over_grpc(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    request = images_pb2.GenerateImagesRequest(
        prompt=str(LARGEST["prompt"]), model="local-1", n=10, size="1024x1792", response_format="b64_json"
    )
    reply = await gateway.images.GenerateImages(request, metadata=(("authorization", f"Bearer {key}"),), timeout=120)
    assert [Image.open(io.BytesIO(image.b64_json)).size for image in reply.data] == [(1024, 1792)] * 10


async def test_an_answer_that_could_not_fit_is_400_before_any_charge(tmp_path: Path) -> None:
    async with process_stack(tmp_path / "var", max_response_bytes=1048576) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(timeout=60) as client:
            refused = await client.post(
                f"{stack.api_base}/images/generations",
                json={"prompt": "p", "size": "1024x1024", "response_format": "b64_json"},
                headers=headers,
            )
            as_url = await client.post(
                f"{stack.api_base}/images/generations", json={"prompt": "p", "size": "1024x1024"}, headers=headers
            )
        assert refused.status_code == 400
        error = refused.json()["error"]
        assert (error["param"], error["code"]) == ("n", "response_too_large")
        assert "response_format 'url'" in error["message"]
        assert as_url.status_code == 200
        account = await stack.admin.get(account_id)
        assert (account.balance_usd, account.spent_usd) == ("0.999000", "0.001000")


async def _large_answer_gauges(stack: ProcessStack) -> tuple[float, float]:
    page = await stack.metrics()
    return (
        metric_sample(page, "imagegw_upstream_large_answers", state="decoding"),
        metric_sample(page, "imagegw_upstream_large_answers", state="waiting"),
    )


async def test_large_upstream_answers_take_turns_and_small_ones_pass(tmp_path: Path) -> None:
    """Five ~4 MB upstream answers with two slots: two are read while three wait with their
    bodies in the socket, a small answer meanwhile passes, and all five arrive whole."""
    async with (
        start_openai_fake() as fake,
        process_stack(
            tmp_path / "var", openai_api_key=fake.api_key, openai_base_url=fake.base_url, max_large_upstream_answers=2
        ) as stack,
    ):
        account_id, key = await stack.admin.funded_key("1.00")
        headers = {"Authorization": f"Bearer {key}"}
        large = {"model": "gpt-image-1", "prompt": "a harbour at noon [[fake:held]]", "response_format": "b64_json"}
        async with httpx.AsyncClient(timeout=60) as client:
            url = f"{stack.api_base}/images/generations"
            held = [asyncio.create_task(client.post(url, json=large, headers=headers)) for _ in range(5)]
            # Every upstream answer has sent its head and first chunk and is paused there.
            for _ in range(400):
                if fake.holding == 5 and await _large_answer_gauges(stack) == (2, 3):
                    break
                await asyncio.sleep(0.05)
            assert (fake.holding, await _large_answer_gauges(stack)) == (5, (2, 3))
            small = await client.post(url, json={"model": "gpt-image-1", "prompt": "a small one"}, headers=headers)
            assert small.status_code == 200, small.text[:300]
            assert await _large_answer_gauges(stack) == (2, 3)
            fake.release_held()
            answers = await asyncio.gather(*held)
        assert [answer.status_code for answer in answers] == [200] * 5
        expected = make_image("png", 1024, 1024, detailed=True)
        assert len(expected) > 3_000_000
        assert all(base64.b64decode(answer.json()["data"][0]["b64_json"]) == expected for answer in answers)
        assert await _large_answer_gauges(stack) == (0, 0)
        account = await stack.admin.settled(account_id)
        assert (account.spent_usd, account.reserved_usd) == ("0.252000", "0.000000")  # 6 x 0.042


async def test_a_fan_out_waiting_for_a_full_gate_takes_one_slot(tmp_path: Path) -> None:
    """Gemini makes one image a call: n=2 is two calls, whose ~3 MB answers arrive while
    another request holds the only slot. Both wait for their request's one slot, get it
    together when it frees, and give it back with the answer: neither waits for a second
    slot its own request holds (which never comes), and none is left taken."""
    async with (
        start_openai_fake() as openai_fake,
        start_google_fake() as google_fake,
        process_stack(
            tmp_path / "var", openai_api_key=openai_fake.api_key, openai_base_url=openai_fake.base_url,
            google_api_key=google_fake.api_key, google_base_url=google_fake.base_url, max_large_upstream_answers=1,
        ) as stack,
    ):
        account_id, key = await stack.admin.funded_key("1.00")
        headers = {"Authorization": f"Bearer {key}"}
        url = f"{stack.api_base}/images/generations"
        async with httpx.AsyncClient(timeout=60) as client:
            holder = asyncio.create_task(client.post(url, headers=headers, json={
                "model": "gpt-image-1", "prompt": "[[fake:held]] a harbour", "response_format": "b64_json"}))
            for _ in range(400):
                if openai_fake.holding == 1 and await _large_answer_gauges(stack) == (1, 0):
                    break
                await asyncio.sleep(0.05)
            fan_out = asyncio.create_task(client.post(url, headers=headers, json={
                "model": "gemini-2.5-flash-image", "prompt": "[[fake:detailed]] a lighthouse", "n": 2,
                "response_format": "b64_json"}))
            for _ in range(400):
                if len(google_fake.requests) >= 2 and (await _large_answer_gauges(stack))[1] >= 1:
                    break
                await asyncio.sleep(0.05)
            openai_fake.release_held()
            assert (await holder).status_code == 200
            answer = await asyncio.wait_for(fan_out, 30)
        assert answer.status_code == 200, answer.text[:300]
        assert [len(base64.b64decode(item["b64_json"])) > 2_000_000 for item in answer.json()["data"]] == [True, True]
        assert await _large_answer_gauges(stack) == (0, 0)
        assert (await stack.admin.settled(account_id)).reserved_usd == "0.000000"
