"""What the edge refuses itself, through the real Envoy: other methods and paths, other
content types, bodies that are not JSON or have members of the wrong JSON type. Each
answer is OpenAI's error body with the exact wording, `param` and `code`, an x-request-id,
and nothing reaches the server (nothing charged, no usage row)."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import uuid
from typing import Any

import grpc
import httpx
import pytest
from google.api import annotations_pb2
from google.protobuf.descriptor import FieldDescriptor
from imagegw.v1 import admin_pb2, admin_pb2_grpc, images_pb2, models_pb2
from PIL import Image

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
        # A member name is read as the transcoder reads it, escapes decoded: "\u006e" is n.
        ('{"prompt": "p", "\\u006e": "3"}', "Invalid type for 'n': expected an integer, but got a string instead.", "n", "invalid_type"),
        ('{"prompt": "p", "\\u0073tream": "true"}', "Invalid type for 'stream': expected a boolean, but got a string instead.", "stream", "invalid_type"),
        ('{"prompt": "p", "output\\u005fcompression": 0.5}', "Invalid type for 'output_compression': expected an integer, but got a decimal number instead.", "output_compression", "invalid_type"),
        # Every occurrence of a repeated member is checked, not only the one that is used.
        ('{"prompt": "p", "n": "3", "n": 2}', "Invalid type for 'n': expected an integer, but got a string instead.", "n", "invalid_type"),
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
        ('{"prompt": "p", "n": 3, "size": "256x256", "n": 2}', 2),  # optional fields too
        ('{"prompt": "p", "model": "no-such-model", "size": "256x256", "model": "local-1"}', 1),
        ('{"prompt": "p", "n": 3, "size": "256x256", "\\u006e": 2}', 2),  # however the name is written
        ('{"prompt": "p", "n": 3, "size": "256x256", "n": null}', 1),  # null, last, unsets it
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


async def test_a_field_set_twice_takes_its_last_value_and_is_charged_for_it(gateway: ProcessStack) -> None:
    """`response_format` and `responseFormat` set one field; the transcoder would refuse the
    pair (and any repeated optional field) as "not valid JSON"."""
    account_id, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as client:
        response = await client.post(
            f"{gateway.api_base}/images/generations",
            content=b'{"prompt": "p", "size": "256x256", "n": 1, "response_format": "url", "n": 3, '
            b'"responseFormat": "b64_json"}',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        )
    assert response.status_code == 200, response.text
    assert [sorted(image) for image in response.json()["data"]] == [["b64_json", "revised_prompt"]] * 3
    assert response.headers["x-imagegw-cost-usd"] == "0.003000"
    assert (await gateway.admin.get(account_id)).balance_usd == "0.997000"


async def test_query_parameters_never_become_request_fields(gateway: ProcessStack) -> None:
    """The transcoder makes a query parameter a field of the request, past every check of the
    body (`?stream=true` is a string; `?model=` overrides the path): the edge drops every query
    parameter an endpoint does not read, as OpenAI ignores them."""
    account_id, key = await gateway.admin.funded_key("1.00")
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=60) as client:
        generated = await client.post(
            f"{gateway.api_base}/images/generations?stream=true&n=3&size=512x512&user=%ff&api-version=2024-02-01",
            json={"prompt": "p", "size": "256x256", "response_format": "b64_json"}, headers=auth,
        )
        model = await client.get(f"{gateway.api_base}/models/local-1?model=no-such-model", headers=auth)
        image = await client.get(
            f"{gateway.api_base}/images/files/first?image_id=second&expires=1&signature=s"
        )
    assert generated.status_code == 200, generated.text
    assert generated.headers["content-type"] == "application/json"
    assert len(generated.json()["data"]) == 1
    assert Image.open(io.BytesIO(base64.b64decode(generated.json()["data"][0]["b64_json"]))).size == (256, 256)
    assert (await gateway.admin.get(account_id)).balance_usd == "0.999000"
    assert (model.status_code, model.json()["id"]) == (200, "local-1")
    assert image.status_code == 404, image.text
    assert image.json()["error"]["message"] == "No image with id 'first'."


@pytest.mark.parametrize(
    "path",
    [
        "/v1/models/%ff",
        "/v1/models/caf%e9",
        "/v1/images/files/img-%c0%af.png?expires=1&signature=s",
        "/v1/images/files/img-AAAAAAAAAAAAAAAAAAAAAA.png?expires=1&signature=%ed%a0%80",
    ],
)
async def test_a_url_that_is_not_utf8_once_decoded_is_400_invalid_url(gateway: ProcessStack, path: str) -> None:
    """Path and query values become protobuf strings, which must be UTF-8: the server could
    not decode such a request at all (it was a 500)."""
    _, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(gateway.base_url + path, headers={"Authorization": f"Bearer {key}"})
    assert_openai_error(
        response, 400,
        f"Invalid URL (GET {path.partition('?')[0]}): the path and query must be UTF-8 text once percent-decoded.",
        None, "invalid_url",
    )


async def test_grpc_web_and_other_non_grpc_types_get_openai_answers(gateway: ProcessStack) -> None:
    """Only what Envoy itself treats as gRPC (application/grpc, application/grpc+proto) gets
    the gRPC refusal; application/grpc-web is an HTTP request with a content type."""
    account_id, key = await gateway.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=30) as client:
        generation = await client.post(
            f"{gateway.api_base}/images/generations", content=b'{"prompt": "p"}',
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/grpc-web"},
        )
        admin = await client.post(
            gateway.base_url + "/imagegw.v1.AdminService/Reconcile", content=b"",
            headers={"Content-Type": "application/grpc-web-text"},
        )
    assert_openai_error(
        generation, 400,
        "Invalid Content-Type header (application/grpc-web): /v1/images/generations takes a JSON body, "
        "sent as 'Content-Type: application/json'.",
        None, "invalid_content_type",
    )
    assert_openai_error(admin, 404, "Invalid URL (POST /imagegw.v1.AdminService/Reconcile).", None, "not_found")
    await unharmed(gateway, account_id)


async def test_an_http1_upgrade_request_is_answered_at_once(gateway: ProcessStack) -> None:
    """`Upgrade: websocket` made Envoy take the rest of the connection as the request's body:
    nothing was answered until the idle timeout (60 s, 600 s on the generation route)."""
    for path, body in (("/v1/models", b""), ("/v1/images/generations", b'{"prompt": "p"}')):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.settings.http_port)
        method = "POST" if body else "GET"
        writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: gw\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        )
        await writer.drain()
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        finally:
            writer.close()
        # No key: the server's own 401, so the request went through as plain HTTP.
        assert head.startswith(b"HTTP/1.1 401 "), head


@pytest.mark.parametrize(
    ("request_head", "status", "message"),
    [
        (b"GET /v1/models HTTP/1.0\r\nHost: gw\r\n\r\n", 426, "This server speaks HTTP/1.1 and HTTP/2 only."),
        (
            b"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: gzip\r\n\r\n",
            501,
            "The request's Transfer-Encoding is not supported: send the body with Content-Length or chunked.",
        ),
    ],
)
async def test_envoys_own_protocol_refusals_say_what_is_wrong(
    gateway: ProcessStack, request_head: bytes, status: int, message: str
) -> None:
    """These were "The request could not be processed." and, for the 501, "The server had an
    error while processing your request." with type server_error: the client's doing."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.settings.http_port)
    writer.write(request_head)
    await writer.drain()
    try:
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status), head
    assert re.search(rb"(?im)^x-request-id: \S{16,}\r?$", head), head
    if status >= 500:
        assert re.search(rb"(?im)^x-should-retry: false\r?$", head), head
    assert json.loads(body) == {
        "error": {"message": message, "type": "invalid_request_error", "param": None, "code": "invalid_request"}
    }
