"""What the edge refuses itself, through the real Envoy: other methods and paths, other
content types, bodies that are not JSON or have members of the wrong JSON type. Each
answer is OpenAI's error body with the exact wording, `param` and `code`, an x-request-id,
and nothing reaches the server (nothing charged, no usage row)."""

from __future__ import annotations

import re
import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf.descriptor import FieldDescriptor
from imagegw.v1 import admin_pb2, admin_pb2_grpc, images_pb2, models_pb2

from tests.stack import ProcessStack

pytestmark = pytest.mark.e2e

GENERATIONS = "/v1/images/generations"
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "QUERY")
PARSE_ERROR = (
    "We could not parse the JSON body of your request. (HINT: This likely means you aren't using your HTTP "
    "library correctly. The API expects a JSON payload, but what was sent was not valid JSON.)"
)

# JSON values of every type, as OpenAI names them in its messages.
SAMPLES: list[tuple[str, Any]] = [
    ("a string", "3"),
    ("an integer", 3),
    ("a decimal number", 3.5),
    ("a boolean", True),
    ("an array", [3]),
    ("an object", {"n": 3}),
]
EXPECTED = {
    FieldDescriptor.TYPE_STRING: "a string",
    FieldDescriptor.TYPE_INT32: "an integer",
    FieldDescriptor.TYPE_BOOL: "a boolean",
}


def bindings() -> list[tuple[str, str]]:
    """Every (HTTP method, concrete path) the proto binds, from its google.api.http options."""
    found = []
    for module in (images_pb2, models_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                rule = method.GetOptions().Extensions[annotations_pb2.http]
                verb = rule.WhichOneof("pattern")
                if verb is not None:
                    found.append((verb.upper(), re.sub(r"\{[^}]+\}", "x1", getattr(rule, verb))))
    return found


def assert_openai_error(response: httpx.Response, status: int, message: str, param: str | None, code: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": {"message": message, "type": "invalid_request_error", "param": param, "code": code}
    }
    assert len(response.headers["x-request-id"]) >= 16
    assert [h for h in response.headers if h.startswith(("grpc-", "x-envoy", "x-http-status", "x-openai", "x-imagegw-t"))] == []


async def unharmed(stack: ProcessStack, account_id: str) -> None:
    account = await stack.admin.get(account_id)
    assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("1.000000", "0.000000", "0.000000")
    assert await stack.admin.usage(account_id) == []


async def test_every_member_of_the_wrong_json_type_is_400_invalid_type_naming_it(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    fields = images_pb2.GenerateImagesRequest.DESCRIPTOR.fields
    checked = 0
    async with httpx.AsyncClient(timeout=30) as client:
        for field in fields:
            expected = EXPECTED[field.type]
            for got, value in SAMPLES:
                if got == expected:
                    continue
                response = await client.post(
                    f"{gateway.api_base}/images/generations",
                    json={"prompt": "p", field.name: value},
                    headers={"Authorization": f"Bearer {key}"},
                )
                assert_openai_error(
                    response, 400, f"Invalid type for '{field.name}': expected {expected}, but got {got} instead.",
                    field.name, "invalid_type",
                )
                assert response.headers["x-should-retry"] == "false"
                checked += 1
    assert checked == len(fields) * (len(SAMPLES) - 1)
    await unharmed(gateway, account_id)


@pytest.mark.parametrize(
    ("body", "message", "param", "code"),
    [
        # Strings that hold numbers or booleans are refused, as OpenAI refuses them (protobuf's
        # JSON mapping alone would take "3" for 3).
        ('{"prompt": "p", "n": "3"}', "Invalid type for 'n': expected an integer, but got a string instead.", "n", "invalid_type"),
        ('{"prompt": "p", "stream": "true"}', "Invalid type for 'stream': expected a boolean, but got a string instead.", "stream", "invalid_type"),
        ('{"prompt": "p", "n": 2.5}', "Invalid type for 'n': expected an integer, but got a decimal number instead.", "n", "invalid_type"),
        ('{"prompt": "p", "n": 1e-3}', "Invalid type for 'n': expected an integer, but got a decimal number instead.", "n", "invalid_type"),
        # The transcoder also takes lowerCamelCase names; they are checked the same way.
        ('{"prompt": "p", "outputCompression": "9"}', "Invalid type for 'outputCompression': expected an integer, but got a string instead.", "outputCompression", "invalid_type"),
        ('{"prompt": "p", "n": 2147483648}', "Invalid 'n': integer above maximum value. Expected a value <= 2147483647, but got 2147483648 instead.", "n", "integer_above_max_value"),
        ('{"prompt": "p", "n": -2147483649}', "Invalid 'n': integer below minimum value. Expected a value >= -2147483648, but got -2147483649 instead.", "n", "integer_below_min_value"),
        ('{"prompt": "p", "n": 1e40}', "Invalid 'n': integer above maximum value. Expected a value <= 2147483647, but got 1e40 instead.", "n", "integer_above_max_value"),
        ("[1, 2]", "Invalid type for the request body: expected an object, but got an array instead.", None, "invalid_type"),
        ('"prompt"', "Invalid type for the request body: expected an object, but got a string instead.", None, "invalid_type"),
        ("42", "Invalid type for the request body: expected an object, but got a number instead.", None, "invalid_type"),
        ("null", "Invalid type for the request body: expected an object, but got null instead.", None, "invalid_type"),
        ('{"prompt": "p",', PARSE_ERROR, None, "invalid_json"),
        ("{bad}", PARSE_ERROR, None, "invalid_json"),
        ("{'prompt': 'p'}", PARSE_ERROR, None, "invalid_json"),
        ('{"prompt": "p"} {}', PARSE_ERROR, None, "invalid_json"),
        ('{"prompt": "a\tb"}', PARSE_ERROR, None, "invalid_json"),
        ('{"prompt": "\\x41"}', PARSE_ERROR, None, "invalid_json"),
        ('{"prompt": "p", "n": 01}', PARSE_ERROR, None, "invalid_json"),
        ('{"prompt": "p", "n": 3,}', PARSE_ERROR, None, "invalid_json"),
        ("[" * 200 + "]" * 200, PARSE_ERROR, None, "invalid_json"),
        # A body that is not JSON at all is a parse error, whatever its type problems.
        ('{"n": "3", "prompt": ', PARSE_ERROR, None, "invalid_json"),
    ],
)
async def test_json_the_edge_refuses(
    gateway: ProcessStack, body: str, message: str, param: str | None, code: str
) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            content=body.encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-request-id": "edge-json-request-1"},
        )
    assert_openai_error(response, 400, message, param, code)
    assert response.headers["x-request-id"] == "edge-json-request-1"
    await unharmed(gateway, account_id)


@pytest.mark.parametrize(
    ("body", "images"),
    [
        ('{"prompt": "p", "n": 2.0, "size": "256x256"}', 2),  # an integral number is an integer
        ('{"prompt": "p", "n": null, "size": "256x256"}', 1),  # null is unset
        ('{"prompt": "p", "size": "256x256", "future_field": {"x": [1, "y"]}}', 1),  # unknown members are ignored
        ('{"prompt": "q", "size": "256x256", "prompt": "p"}', 1),  # the last of a repeated member wins
        ('{"prompt": "caf\\u00e9 \\"quoted\\" \\\\ \\/", "size": "256x256"}', 1),
    ],
)
async def test_json_the_edge_accepts(gateway: ProcessStack, body: str, images: int) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            content=body.encode(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json; charset=utf-8"},
        )
    assert response.status_code == 200, response.text
    assert len(response.json()["data"]) == images


async def test_a_body_of_another_content_type_is_400_naming_json(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as client:
        multipart = await client.post(
            f"{gateway.api_base}/images/generations", data={"prompt": "p"}, files={"image": ("a.png", b"x")}, headers=auth
        )
        form = await client.post(f"{gateway.api_base}/images/generations", data={"prompt": "p"}, headers=auth)
        text = await client.post(
            f"{gateway.api_base}/images/generations", content=b'{"prompt": "p"}', headers={**auth, "Content-Type": "text/plain"}
        )
    boundary = multipart.request.headers["content-type"]
    for response, sent in ((multipart, boundary), (form, "application/x-www-form-urlencoded"), (text, "text/plain")):
        assert_openai_error(
            response, 400,
            f"Invalid Content-Type header ({sent}): /v1/images/generations takes a JSON body, "
            "sent as 'Content-Type: application/json'.",
            None, "invalid_content_type",
        )
    await unharmed(gateway, account_id)


async def test_a_json_body_without_content_type_is_read_as_json(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            content=b'{"prompt": "p", "size": "256x256"}',
            headers={"Authorization": f"Bearer {key}"},
        )
    assert response.status_code == 200, response.text


def test_the_edge_table_covers_every_proto_binding() -> None:
    assert sorted(bindings()) == [
        ("GET", "/v1/images/files/x1"),
        ("GET", "/v1/models"),
        ("GET", "/v1/models/x1"),
        ("POST", "/v1/images/edits"),
        ("POST", "/v1/images/generations"),
        ("POST", "/v1/images/variations"),
    ], "a new binding: add it to ENDPOINTS in server/edge/openai_compat.lua and to this list"


async def test_every_other_method_on_a_known_path_is_405_with_allow(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for allowed, path in bindings():
            for method in (*METHODS, "HEAD"):
                if method == allowed:
                    continue
                # QUERY needs a Content-Type to reach the filters (RFC 10008; see below).
                response = await client.request(method, gateway.base_url + path, headers={"Content-Type": "application/json"})
                assert response.status_code == 405, (method, path, response.text)
                assert response.headers["allow"] == allowed
                assert len(response.headers["x-request-id"]) >= 16
                if method != "HEAD":
                    assert_openai_error(response, 405, f"Invalid method for URL ({method} {path}).", None, "method_not_allowed")


async def test_the_right_method_is_not_refused_by_the_edge(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for allowed, path in bindings():
            response = await client.request(allowed, gateway.base_url + path, json={} if allowed == "POST" else None)
            # The server answers: no key (401), or for the public image files no such image.
            expected = (404, "image_id") if path.startswith("/v1/images/files/") else (401, None)
            assert (response.status_code, response.json()["error"]["param"]) == expected, (allowed, path, response.text)


async def test_methods_envoy_refuses_before_the_filters_get_a_message_and_a_request_id(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        query = await client.request("QUERY", f"{gateway.api_base}/models/local-1?x=1")
        custom = await client.request("FOO", f"{gateway.api_base}/models")
        underscore = await client.get(f"{gateway.api_base}/models", headers={"Idempotency_Key": "k"})
    assert query.json()["error"] == {
        "message": "Invalid method for URL (QUERY /v1/models/local-1).", "type": "invalid_request_error",
        "param": None, "code": "method_not_allowed",
    }
    assert custom.json()["error"] == {
        "message": "The request is not valid HTTP and could not be read.", "type": "invalid_request_error",
        "param": None, "code": "invalid_request",
    }
    assert underscore.json()["error"] == {
        "message": "Header names with underscores are refused: write them with dashes (for example 'Idempotency-Key').",
        "type": "invalid_request_error", "param": None, "code": "invalid_header",
    }
    for response in (query, custom, underscore):
        assert response.status_code == 400
        uuid.UUID(response.headers["x-request-id"])


@pytest.mark.parametrize("path", ["/v1/images/nope", "/v1/images", "/", "/v1/models/a/b", "/imagegw.v1.AdminService/CreateAccount"])
async def test_an_unknown_path_is_404_invalid_url(gateway: ProcessStack, path: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.post(gateway.base_url + path + "?q=1", json={})
    assert_openai_error(response, 404, f"Invalid URL (POST {path}).", None, "not_found")


async def test_a_query_parameter_of_the_wrong_type_is_400_naming_it(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        word = await client.get(f"{gateway.api_base}/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png?expires=soon&signature=s")
        huge = await client.get(
            f"{gateway.api_base}/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png?expires=99999999999999999999&signature=s"
        )
    assert_openai_error(
        word, 400, "Invalid type for 'expires': expected an integer, but got a string instead.", "expires", "invalid_type"
    )
    assert_openai_error(
        huge, 400, "Invalid 'expires': 99999999999999999999 is out of range.", "expires", "integer_out_of_range"
    )


async def test_the_edge_answers_http2_clients_alike(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
        wrong_method = await client.get(f"{gateway.api_base}/images/generations")
        wrong_type = await client.post(f"{gateway.api_base}/images/generations", json={"prompt": "p", "n": "3"})
    assert wrong_method.http_version == "HTTP/2"
    assert_openai_error(wrong_method, 405, "Invalid method for URL (GET /v1/images/generations).", None, "method_not_allowed")
    assert_openai_error(wrong_type, 400, "Invalid type for 'n': expected an integer, but got a string instead.", "n", "invalid_type")


async def test_a_grpc_client_on_the_public_port_gets_unimplemented(gateway: ProcessStack) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.settings.http_port}") as channel:
        stub = admin_pb2_grpc.AdminServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Reconcile(admin_pb2.ReconcileRequest(), metadata=gateway.admin.auth, timeout=10)
    assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert caught.value.details() == "gRPC is not served on this port; call the gRPC port."


async def test_refusals_are_in_the_access_log(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        await client.put(f"{gateway.api_base}/images/generations", headers={"x-request-id": "edge-log-405"})
        await client.post(
            f"{gateway.api_base}/images/generations", content=b"{", headers={"x-request-id": "edge-log-400", "Content-Type": "application/json"}
        )
    lines = await gateway.envoy_access_log(["edge-log-405", "edge-log-400"])
    assert {k: lines["edge-log-405"][k] for k in ("status", "method", "path", "grpc_status", "details")} == {
        "status": 405, "method": "PUT", "path": GENERATIONS, "grpc_status": None, "details": "lua_response",
    }
    assert (lines["edge-log-400"]["status"], lines["edge-log-400"]["upstream"]) == (400, None)
