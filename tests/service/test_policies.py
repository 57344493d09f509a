"""Every RPC has an access policy: start-up refuses one without, and a call to a method the
interceptor has no policy for is refused, streaming or not."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from imagegw.v1 import images_pb2, images_pb2_grpc

from server.api.interceptors import ServerInterceptor, check_policies
from server.app import METHOD_POLICIES, _registered_methods, build_server
from tests.stack import in_process_stack


def test_every_registered_rpc_has_a_policy() -> None:
    check_policies(_registered_methods(), METHOD_POLICIES)  # raises otherwise
    assert "/imagegw.v1.ImageService/StreamGenerateImages" in _registered_methods()
    assert "/grpc.health.v1.Health/Watch" in _registered_methods()


def test_start_up_refuses_an_rpc_without_a_policy() -> None:
    policies = {name: policy for name, policy in METHOD_POLICIES.items() if not name.endswith("/EditImagesHttp")}
    with pytest.raises(ValueError, match="EditImagesHttp"):
        check_policies(_registered_methods(), policies)


async def test_a_method_the_interceptor_has_no_policy_for_is_unimplemented(tmp_path: Path) -> None:
    async with in_process_stack(tmp_path / "var") as stack:
        app = stack.app
        without = {
            name: policy for name, policy in METHOD_POLICIES.items()
            if not name.endswith(("/GenerateImages", "/StreamGenerateImages"))
        }
        interceptor = ServerInterceptor(
            ledger=app.ledger, admin_token=app.settings.secret("admin_token"), policies=without, metrics=app.metrics
        )
        server = build_server(app, interceptor)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = images_pb2_grpc.ImageServiceStub(channel)
                request = images_pb2.GenerateImagesRequest(prompt="p")
                with pytest.raises(grpc.aio.AioRpcError) as unary:
                    await stub.GenerateImages(request)
                with pytest.raises(grpc.aio.AioRpcError) as streaming:
                    async for _ in stub.StreamGenerateImages(request):
                        pass
        finally:
            await server.stop(None)
    assert unary.value.code() == streaming.value.code() == grpc.StatusCode.UNIMPLEMENTED
