"""The gRPC surface in-process over a real channel: raw bytes, rich errors, reflection."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status
from imagegw.v1 import images_pb2
from PIL import Image

from server.logs import json_formatter
from server.providers.base import ImageRequest, Progress, ProviderResult
from tests.stack import InProcessStack, in_process_stack, status_of


def bearer(key: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {key}"),)


async def test_generate_returns_raw_image_bytes(service: InProcessStack) -> None:
    account_id, key = await service.admin.funded_key("1.00")
    call = service.images.GenerateImages(
        images_pb2.GenerateImagesRequest(prompt="a quiet harbour", n=3, size="256x256", response_format="b64_json"),
        metadata=bearer(key),
    )
    reply = await call
    assert len(reply.data) == 3
    for image in reply.data:
        assert image.HasField("b64_json") and not image.HasField("url")
        assert image.b64_json[:8] == b"\x89PNG\r\n\x1a\n"  # raw bytes, not base64 text
        assert Image.open(io.BytesIO(image.b64_json)).size == (256, 256)
    assert reply.HasField("usage") and reply.usage.input_tokens_details.text_tokens == 0
    metadata = dict(await call.initial_metadata())
    assert metadata["x-imagegw-cost-usd"] == "0.003000"
    account = await service.admin.get(account_id)
    assert account.spent_usd == "0.003000"


async def test_errors_carry_error_info_and_http_metadata(service: InProcessStack) -> None:
    _, key = await service.admin.funded_key("1.00")
    call = service.images.GenerateImages(
        images_pb2.GenerateImagesRequest(prompt="p", size="7x7"), metadata=bearer(key)
    )
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    status = await rpc_status.aio.from_call(call)
    assert status is not None
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info)
    assert (info.reason, info.domain) == ("INVALID_SIZE", "imagegw")
    assert dict(info.metadata) == {"type": "invalid_request_error", "param": "size", "code": "invalid_size"}
    trailers = dict(caught.value.trailing_metadata())
    assert trailers["x-http-status"] == "400"
    assert trailers["x-should-retry"] == "false"
    assert json.loads(trailers["x-openai-error"])["error"]["param"] == "size"


@pytest.mark.parametrize("header", [None, "Bearer", "Basic abc", "Bearer sk-igw-garbage", "Bearer  "])
async def test_missing_or_bad_keys_are_unauthenticated(service: InProcessStack, header: str | None) -> None:
    metadata = () if header is None else (("authorization", header),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await service.images.GenerateImages(images_pb2.GenerateImagesRequest(prompt="p"), metadata=metadata)
    assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    trailers = dict(caught.value.trailing_metadata())
    assert trailers["x-http-status"] == "401"
    assert json.loads(trailers["x-openai-error"])["error"]["code"] == "invalid_api_key"


async def test_reflection_lists_the_services(service: InProcessStack) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(service.channel)

    async def requests():  # type: ignore[no-untyped-def]
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    names = set()
    async for reply in stub.ServerReflectionInfo(requests()):
        names |= {s.name for s in reply.list_services_response.service}
    assert {
        "imagegw.v1.ImageService",
        "imagegw.v1.ModelService",
        "imagegw.v1.AdminService",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= names


async def test_health_is_serving(service: InProcessStack) -> None:
    stub = health_pb2_grpc.HealthStub(service.channel)
    for name in ("", "imagegw.v1.ImageService"):
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        assert reply.status == health_pb2.HealthCheckResponse.SERVING


class CrashingProvider:
    """A provider with a bug: raises an unexpected exception with internals in it."""

    name = "crashing"

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        raise RuntimeError("secret internal detail /etc/passwd")

    async def aclose(self) -> None:
        return None


async def test_unexpected_exception_is_a_generic_500_and_refunds(tmp_path: Path) -> None:
    # The server's own JSON formatter on the access logger: the traceback's line carries the request id.
    logged, access = io.StringIO(), logging.getLogger("imagegw.access")
    handler = logging.StreamHandler(logged)
    handler.setFormatter(json_formatter())
    async with in_process_stack(tmp_path / "var", providers={"local-1": CrashingProvider()}) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        access.addHandler(handler)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await stack.images.GenerateImages(
                    images_pb2.GenerateImagesRequest(prompt="p"),
                    metadata=(*bearer(key), ("x-request-id", "req-crash-1")),
                )
        finally:
            access.removeHandler(handler)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == "The server had an error while processing your request."
        trailers = dict(caught.value.trailing_metadata())
        assert trailers["x-http-status"] == "500"
        assert "RuntimeError" not in trailers["x-openai-error"] and "passwd" not in trailers["x-openai-error"]
        [crash] = [line for line in map(json.loads, logged.getvalue().splitlines()) if line["level"] == "error"]
        assert (crash["message"], crash["request_id"]) == ("unhandled error", "req-crash-1")
        assert "RuntimeError: secret internal detail" in crash["exception"]
        account = await stack.admin.get(account_id)
        assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
        usage = await stack.admin.usage(account_id)
        assert [(status_of(u), u.error_code, u.cost_usd) for u in usage] == [("failed", "internal_error", "0.000000")]


class SlowProvider:
    """Takes far longer than any test waits; records whether it was cancelled."""

    name = "slow"

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    async def generate(
        self, request: ImageRequest, *, deadline: float, progress: Progress | None = None
    ) -> ProviderResult:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")

    async def aclose(self) -> None:
        return None


async def test_client_deadline_gives_deadline_exceeded_and_no_charge(tmp_path: Path) -> None:
    slow = SlowProvider()
    async with in_process_stack(tmp_path / "var", providers={"local-1": slow}) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stack.images.GenerateImages(
                images_pb2.GenerateImagesRequest(prompt="p", n=4), metadata=bearer(key), timeout=1.5
            )
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.wait_for(slow.cancelled.wait(), 5)
        account = await stack.admin.settled(account_id)
        assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
        assert (await stack.admin.reconcile()).ok


async def test_a_model_timeout_longer_than_the_request_timeout_stops_start_up(tmp_path: Path) -> None:
    from server.catalog import CatalogError

    # gpt-image-1's timeout_seconds is 300 (server/catalog.toml); Envoy would cut it at 60.
    with pytest.raises(CatalogError, match=r"gpt-image-1.*IMAGEGW_REQUEST_TIMEOUT_SECONDS \(60 s\)"):
        async with in_process_stack(tmp_path / "var", request_timeout_seconds=60):
            pass
