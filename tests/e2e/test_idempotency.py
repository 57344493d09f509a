"""Idempotent retries through the real Envoy: the Idempotency-Key header reaches the server,
a replay is the same response charged once, across replicas too, with the openai SDK."""

from __future__ import annotations

import asyncio
import base64
import secrets

import grpc
import httpx
import openai
import pytest
from imagegw.v1 import images_pb2, images_pb2_grpc

from tests.stack import ProcessStack

pytestmark = pytest.mark.e2e

B64 = {"model": "local-1", "prompt": "a paper boat", "n": 2, "size": "256x256", "response_format": "b64_json"}
URL = {"model": "local-1", "prompt": "a paper boat", "n": 2, "size": "256x256"}
# About two seconds of rendering on the replicas' single render worker.
HEAVY = {"model": "local-1", "prompt": "a storm over the sea", "n": 10, "size": "1792x1024",
         "response_format": "b64_json", "quality": "high"}


def new_key() -> str:
    return f"test-{secrets.token_hex(8)}"


async def post(stack: ProcessStack, key: str, body: dict[str, object], **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(timeout=120) as client:
        return await client.post(
            f"{stack.api_base}/images/generations",
            json=body,
            headers={"Authorization": f"Bearer {key}", **headers},
        )


async def money(stack: ProcessStack, account_id: str) -> tuple[str, str, str]:
    account = await stack.admin.get(account_id)
    return account.balance_usd, account.reserved_usd, account.spent_usd


@pytest.mark.parametrize("body", [B64, URL], ids=["b64_json", "url"])
async def test_a_replay_is_the_same_response_charged_once(gateway: ProcessStack, body: dict[str, object]) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    idempotency_key = new_key()
    first = await post(gateway, key, body, **{"Idempotency-Key": idempotency_key})
    second = await post(gateway, key, body, **{"Idempotency-Key": idempotency_key})
    assert (first.status_code, second.status_code) == (200, 200), (first.text, second.text)
    if body is B64:
        assert second.json() == first.json()  # same images (same bytes), same `created`
    else:
        # The same images (same ids) and `created`; each link signed again for the replay,
        # so that one made late in the idempotency window still works.
        def ids(response: httpx.Response) -> list[tuple[str, int]]:
            parsed = [httpx.URL(image["url"]) for image in response.json()["data"]]
            return [(url.path, int(url.params["expires"])) for url in parsed]

        assert second.json()["created"] == first.json()["created"]
        assert [path for path, _ in ids(second)] == [path for path, _ in ids(first)]
        # Kept as long as a replay may ask for them (swept with the key, not with the link).
        assert all(path.rpartition("/")[2].startswith("imgk-") for path, _ in ids(first))
        assert all(late >= early for (_, late), (_, early) in zip(ids(second), ids(first), strict=True))
        async with httpx.AsyncClient() as http:
            for one, other in zip(first.json()["data"], second.json()["data"], strict=True):
                fetched = [await http.get(one["url"]), await http.get(other["url"])]
                assert [f.status_code for f in fetched] == [200, 200]
                assert fetched[0].content == fetched[1].content
    assert len(first.json()["data"]) == 2
    assert "x-imagegw-idempotent-replay" not in first.headers
    assert second.headers["x-imagegw-idempotent-replay"] == "true"
    assert first.headers["x-imagegw-cost-usd"] == second.headers["x-imagegw-cost-usd"] == "0.002000"
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    assert await money(gateway, account_id) == ("0.998000", "0.000000", "0.002000")
    usage = await gateway.admin.usage(account_id)
    assert [(u.images_delivered, u.cost_usd) for u in usage] == [(2, "0.002000")]
    if body is URL:  # the replayed URLs serve the images
        async with httpx.AsyncClient(timeout=30) as client:
            fetched = await client.get(second.json()["data"][0]["url"])
        assert fetched.status_code == 200 and fetched.content[:8] == b"\x89PNG\r\n\x1a\n"


async def test_without_the_header_each_request_is_charged(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    for _ in range(2):
        response = await post(gateway, key, B64)
        assert response.status_code == 200 and "x-imagegw-idempotent-replay" not in response.headers
    assert await money(gateway, account_id) == ("0.996000", "0.000000", "0.004000")


async def test_the_same_key_with_another_body_is_400(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    idempotency_key = new_key()
    assert (await post(gateway, key, B64, **{"Idempotency-Key": idempotency_key})).status_code == 200
    reused = await post(gateway, key, {**B64, "response_format": "url"}, **{"Idempotency-Key": idempotency_key})
    assert reused.status_code == 400
    assert reused.json() == {
        "error": {
            "message": "This Idempotency-Key was already used with a different request. "
            "Use a new key for a new request, or send exactly the same request to get its result.",
            "type": "invalid_request_error",
            "param": "Idempotency-Key",
            "code": "idempotency_key_reused",
        }
    }
    assert reused.headers["x-should-retry"] == "false"
    assert await money(gateway, account_id) == ("0.998000", "0.000000", "0.002000")


@pytest.mark.parametrize("value", [b"", b"x" * 256, "caf\u00e9".encode()], ids=["empty", "too-long", "non-ascii"])
async def test_a_malformed_key_is_400(gateway: ProcessStack, value: bytes) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            json=B64,
            headers=[(b"authorization", f"Bearer {key}".encode()), (b"idempotency-key", value)],
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "Idempotency-Key", "invalid_value"
    )
    assert await money(gateway, account_id) == ("1.000000", "0.000000", "0.000000")


async def test_openai_sdk_retry_with_the_same_key_returns_the_same_images_and_pays_once(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    headers = {"Idempotency-Key": new_key()}
    async with openai.AsyncOpenAI(api_key=key, base_url=gateway.api_base, max_retries=0, timeout=120) as sdk:
        first = await sdk.images.generate(
            model="local-1", prompt="a paper boat", n=2, size="256x256", response_format="b64_json",
            extra_headers=headers,
        )
        raw = await sdk.images.with_raw_response.generate(
            model="local-1", prompt="a paper boat", n=2, size="256x256", response_format="b64_json",
            extra_headers=headers,
        )
        second = raw.parse()
        assert raw.headers["x-imagegw-idempotent-replay"] == "true"
        assert second.model_dump() == first.model_dump()
        assert first.data is not None and len(first.data) == 2 and first.data[0].b64_json
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.images.generate(
                model="local-1", prompt="another prompt", n=2, size="256x256", response_format="b64_json",
                extra_headers=headers,
            )
    assert (caught.value.code, caught.value.param) == ("idempotency_key_reused", "Idempotency-Key")
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("0.998000", "0.000000", "0.002000")


async def grpc_generate(target: str, key: str, body: dict[str, object], idempotency_key: str) -> bytes:
    """The same request straight to one replica's gRPC port; returns the serialized answer."""
    async with grpc.aio.insecure_channel(target) as channel:
        reply = await images_pb2_grpc.ImageServiceStub(channel).GenerateImages(
            images_pb2.GenerateImagesRequest(**body),  # type: ignore[arg-type]
            metadata=(("authorization", f"Bearer {key}"), ("idempotency-key", idempotency_key)),
            timeout=120,
        )
    return reply.SerializeToString()


async def test_concurrent_retries_on_two_replicas_generate_once(replicas: ProcessStack) -> None:
    account_id, key = await replicas.admin.funded_key("1.00")
    idempotency_key = new_key()
    # Four through Envoy (which picks the replica) and two straight to each replica, all at once.
    http = [post(replicas, key, HEAVY, **{"Idempotency-Key": idempotency_key}) for _ in range(4)]
    direct = [grpc_generate(target, key, HEAVY, idempotency_key) for target in replicas.grpc_targets * 2]
    results = await asyncio.wait_for(asyncio.gather(*http, *direct), 120)
    responses: list[httpx.Response] = list(results[:4])  # type: ignore[arg-type]
    answers: list[bytes] = list(results[4:])  # type: ignore[arg-type]
    assert [r.status_code for r in responses] == [200] * 4
    assert len({r.content for r in responses}) == 1  # byte-identical JSON
    assert len(set(answers)) == 1  # byte-identical protobuf from both replicas
    over_grpc = images_pb2.GenerateImagesResponse.FromString(answers[0])
    assert [image["b64_json"] for image in responses[0].json()["data"]] == [
        base64.b64encode(image.b64_json).decode() for image in over_grpc.data
    ]
    # One generation, one charge, whichever of the eight attempts ran it.
    assert await money(replicas, account_id) == ("0.980000", "0.000000", "0.020000")
    assert len(await replicas.admin.usage(account_id)) == 1
    assert (await replicas.admin.reconcile()).ok


async def test_a_retry_while_the_first_runs_waits_until_its_deadline_then_gets_409(replicas: ProcessStack) -> None:
    account_id, key = await replicas.admin.funded_key("1.00")
    idempotency_key = new_key()
    first = asyncio.create_task(post(replicas, key, HEAVY, **{"Idempotency-Key": idempotency_key}))
    for _ in range(200):  # the first attempt holds the key once its money is reserved
        if (await replicas.admin.get(account_id)).reserved_usd != "0.000000":
            break
        await asyncio.sleep(0.02)
    # A client deadline of half a second (Envoy forwards grpc-timeout to the server).
    busy = await post(replicas, key, HEAVY, **{"Idempotency-Key": idempotency_key, "grpc-timeout": "500m"})
    assert not first.done()
    assert busy.status_code == 409, busy.text
    assert busy.json() == {
        "error": {
            "message": "A request with this Idempotency-Key is still in progress. Retry it later to get its result.",
            "type": "invalid_request_error",
            "param": None,
            "code": "idempotency_key_in_use",
        }
    }
    assert (busy.headers["x-should-retry"], busy.headers["retry-after"]) == ("true", "1")
    original = await first
    assert original.status_code == 200
    replay = await post(replicas, key, HEAVY, **{"Idempotency-Key": idempotency_key})
    assert replay.content == original.content and replay.headers["x-imagegw-idempotent-replay"] == "true"
    assert await money(replicas, account_id) == ("0.980000", "0.000000", "0.020000")
