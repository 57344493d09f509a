"""Every refusal through Envoy: exact status, exact OpenAI body, nothing charged."""

from __future__ import annotations

import httpx
import pytest

from tests.stack import ProcessStack

pytestmark = pytest.mark.e2e

LONG = "x" * 32001


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "local-1"}, "prompt", "missing_required_parameter"),
        ({"model": "local-1", "prompt": ""}, "prompt", "missing_required_parameter"),
        ({"model": "local-1", "prompt": "   "}, "prompt", "missing_required_parameter"),
        ({"model": "local-1", "prompt": LONG}, "prompt", "string_above_max_length"),
        ({"model": "local-1", "prompt": "p", "n": 0}, "n", "integer_below_min_value"),
        ({"model": "local-1", "prompt": "p", "n": 11}, "n", "integer_above_max_value"),
        ({"model": "local-1", "prompt": "p", "size": "100x100"}, "size", "invalid_size"),
        ({"model": "local-1", "prompt": "p", "size": "large"}, "size", "invalid_size"),
        ({"model": "local-1", "prompt": "p", "quality": "ultra"}, "quality", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "style": "cubist"}, "style", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "response_format": "png"}, "response_format", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "output_format": "gif"}, "output_format", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "output_format": "jpeg", "output_compression": 101},
         "output_compression", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "output_format": "jpeg", "output_compression": -1},
         "output_compression", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "background": "transparent"}, "background", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "stream": True, "response_format": "url"}, "response_format", "invalid_value"),
        ({"model": "local-1", "prompt": "p", "stream": True, "partial_images": 4}, "partial_images", "integer_above_max_value"),
        ({"model": "no-such-model", "prompt": "p"}, "model", "model_not_found"),
        ({"model": "gpt-4o-mini", "prompt": "p"}, "model", "model_not_supported"),
    ],
)
async def test_validation_errors_are_400_with_the_openai_body(
    gateway: ProcessStack, body: dict[str, object], param: str, code: str
) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations", json=body, headers={"Authorization": f"Bearer {key}"}
        )
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, code)
    assert error["message"]
    assert response.headers["x-should-retry"] == "false"
    assert [h for h in response.headers if h.startswith(("grpc-", "x-envoy", "x-http-status", "x-openai"))] == []
    assert "server" not in response.headers
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
    assert await gateway.admin.usage(account_id) == []


@pytest.mark.parametrize(
    ("content", "message_part"),
    [
        ('{"prompt": "p", "n": "abc"}', "n"),
        ('{"prompt": 123}', "prompt"),
        ('{"prompt": "p", "n": 2.5}', "n"),
        ('{"prompt": "p",', ""),
        ("[1, 2]", ""),
    ],
)
async def test_envoy_rejects_malformed_json_in_the_openai_shape(
    gateway: ProcessStack, content: str, message_part: str
) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            content=content,
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert message_part in error["message"]


async def test_unknown_path_is_404_and_wrong_method_405_in_the_openai_shape(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient() as client:
        unknown = await client.post(f"{gateway.api_base}/images/nope", json={})
        wrong_method = await client.get(f"{gateway.api_base}/images/generations")
        admin_json = await client.post(f"{gateway.base_url}/imagegw.v1.AdminService/CreateAccount", json={})
    for response in (unknown, admin_json):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["code"] == "not_found"
    assert (wrong_method.status_code, wrong_method.headers["allow"]) == (405, "POST")
    assert wrong_method.json()["error"]["code"] == "method_not_allowed"


async def test_oversized_body_is_413(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            json={"prompt": "x" * (5 * 1024 * 1024)},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert response.status_code == 413
    assert response.json()["error"] == {
        "message": "Request body too large: this server accepts at most 4194304 bytes.",
        "type": "invalid_request_error", "param": None, "code": "request_too_large",
    }


async def test_unknown_query_parameters_are_ignored(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations?foo=bar",
            json={"prompt": "p", "size": "256x256", "response_format": "b64_json"},
            headers={"Authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200, response.text


async def test_request_id_is_kept_or_generated(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient() as client:
        kept = await client.get(f"{gateway.api_base}/models", headers={"x-request-id": "my-req-123"})
        generated = await client.get(f"{gateway.api_base}/models")
    assert kept.headers["x-request-id"] == "my-req-123"
    assert len(generated.headers["x-request-id"]) >= 16


async def test_direct_grpc_through_the_public_port_is_refused(gateway: ProcessStack) -> None:
    import grpc
    from imagegw.v1 import admin_pb2, admin_pb2_grpc

    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.settings.http_port}") as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Reconcile(admin_pb2.ReconcileRequest(), metadata=gateway.admin.auth, timeout=10)
    assert caught.value.code() != grpc.StatusCode.OK


async def test_models_list_and_get(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient() as client:
        listing = await client.get(f"{gateway.api_base}/models", headers=headers)
        one = await client.get(f"{gateway.api_base}/models/local-1", headers=headers)
        missing = await client.get(f"{gateway.api_base}/models/nope", headers=headers)
    assert listing.status_code == 200
    assert listing.json() == {
        "object": "list",
        "data": [{"id": "local-1", "object": "model", "created": 1767225600, "owned_by": "imagegw"}],
    }
    assert one.json() == {"id": "local-1", "object": "model", "created": 1767225600, "owned_by": "imagegw"}
    assert missing.status_code == 404
    assert missing.json()["error"] == {
        "message": "The model 'nope' does not exist.", "type": "invalid_request_error", "param": "model",
        "code": "model_not_found",
    }


@pytest.mark.parametrize(
    ("model", "code", "message"),
    [
        ("gpt-image-1", "model_not_available",
         "The model 'gpt-image-1' is not enabled on this server (its provider 'openai' is not configured)."),
        ("dall-e-9", "model_not_found", "The model 'dall-e-9' does not exist."),
    ],
)
async def test_looking_a_model_up_and_asking_for_it_say_the_same(
    gateway: ProcessStack, model: str, code: str, message: str
) -> None:
    """GET names the model in its URL (not served: 404); a generation names it in its body (a
    bad parameter: 400). Both give the same code and message."""
    _, key = await gateway.admin.funded_key("1.00")
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as client:
        looked_up = await client.get(f"{gateway.api_base}/models/{model}", headers=headers)
        asked = await client.post(f"{gateway.api_base}/images/generations", json={"model": model, "prompt": "p"}, headers=headers)
    expected = {"message": message, "type": "invalid_request_error", "param": "model", "code": code}
    assert (looked_up.status_code, looked_up.json()["error"]) == (404, expected)
    assert (asked.status_code, asked.json()["error"]) == (400, expected)
