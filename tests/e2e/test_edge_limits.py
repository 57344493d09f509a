"""Every size limit is one setting applied at both hops, through the real Envoy and server.

Each class of oversized request (a long key, many headers, a long URL, a long query, a
large body, HTTP/1.1 and HTTP/2) is sent at several sizes around its limit: below it the
server answers as usual (no grpc-core error from a tighter limit behind Envoy), above it
the client gets the right status in OpenAI's body, never a 429 or a transport error's
text. A stack whose server is deliberately tighter than its Envoy shows that an error
without the server's OpenAI body is answered generically, correctly classed, and logged
with its real cause.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from server.config import KIB, MIB
from server.dev import stop_process, wait_for_envoy
from server.envoy import envoy_binary, write_envoy_config
from tests.stack import ProcessStack, base_env, free_port, process_stack, settings_from

pytestmark = pytest.mark.e2e

HEADER_LIMIT = 16 * KIB  # IMAGEGW_MAX_REQUEST_HEADER_KIB's default
HEADER_COUNT = 100  # IMAGEGW_MAX_REQUEST_HEADERS' default
BODY_LIMIT = 4 * MIB  # IMAGEGW_MAX_REQUEST_BYTES' default
HEADERS_TOO_LARGE = {
    "message": "Request headers too large: this server accepts at most 16 KiB of request headers, the URL included, "
    "in at most 100 header fields.",
    "type": "invalid_request_error",
    "param": None,
    "code": "request_headers_too_large",
}
TOO_LARGE = {
    "message": f"Request body too large: this server accepts at most {BODY_LIMIT} bytes.",
    "type": "invalid_request_error",
    "param": None,
    "code": "request_too_large",
}
BELOW = (-3000, -1500, -600)
ABOVE = (0, 1, 700, 5000, 40000)


def assert_headers_too_large(response: httpx.Response) -> None:
    assert response.status_code == 431, response.text
    assert response.json() == {"error": HEADERS_TOO_LARGE}
    assert len(response.headers["x-request-id"]) >= 16


def assert_server_answered(response: httpx.Response, status: int, code: str | None) -> None:
    """The request crossed Envoy and the server answered it itself."""
    assert response.status_code == status, response.text[:300]
    if code is not None:
        assert response.json()["error"]["code"] == code


async def test_a_long_key_is_431_above_the_limit_and_reaches_the_server_below(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        for delta in BELOW:
            response = await client.get(f"{gateway.api_base}/models", headers={"Authorization": "Bearer " + "k" * (HEADER_LIMIT + delta)})
            assert_server_answered(response, 401, "invalid_api_key")
        for delta in ABOVE:
            response = await client.get(f"{gateway.api_base}/models", headers={"Authorization": "Bearer " + "k" * (HEADER_LIMIT + delta)})
            assert_headers_too_large(response)


async def test_many_headers_are_431_above_the_count_and_reach_the_server_below(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        sent_anyway = len(client.headers) + 1  # httpx's own headers and Host
        for count in (HEADER_COUNT - 20, HEADER_COUNT - 1, HEADER_COUNT):
            headers = {f"x-extra-{i}": "v" * 60 for i in range(count - sent_anyway)}
            assert_server_answered(await client.get(f"{gateway.api_base}/models", headers=headers), 401, "invalid_api_key")
        for count in (HEADER_COUNT + 1, HEADER_COUNT + 50, 1000):
            headers = {f"x-extra-{i}": "v" for i in range(count - sent_anyway)}
            assert_headers_too_large(await client.get(f"{gateway.api_base}/models", headers=headers))
        # Many headers that are each small but add up past the size limit.
        headers = {f"x-extra-{i}": "v" * 300 for i in range(60)}
        assert_headers_too_large(await client.get(f"{gateway.api_base}/models", headers=headers))


async def test_a_long_url_is_431_above_the_limit_and_reaches_the_server_below(gateway: ProcessStack) -> None:
    _, key = await gateway.admin.funded_key("1.00")
    auth = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=30) as client:
        for delta in BELOW:
            # Envoy passes the URL on as x-envoy-original-path: the server's metadata limit
            # allows for it.
            path = await client.get(f"{gateway.api_base}/models/{'m' * (HEADER_LIMIT + delta)}", headers=auth)
            assert_server_answered(path, 404, "model_not_found")
            query = await client.get(f"{gateway.api_base}/models?q={'q' * (HEADER_LIMIT + delta)}", headers=auth)
            assert_server_answered(query, 200, None)
        for delta in ABOVE:
            assert_headers_too_large(await client.get(f"{gateway.api_base}/models/{'m' * (HEADER_LIMIT + delta)}", headers=auth))
            assert_headers_too_large(await client.get(f"{gateway.api_base}/models?q={'q' * (HEADER_LIMIT + delta)}", headers=auth))


async def test_the_worst_case_below_the_limits_reaches_the_server(gateway: ProcessStack) -> None:
    """Everything at once just below the limits: a long URL, a long key and the most header
    fields. The server's metadata limit is derived from the same settings."""
    async with httpx.AsyncClient(timeout=30) as client:
        sent_anyway = len(client.headers) + 2
        headers = {f"x-{i}": "" for i in range(HEADER_COUNT - sent_anyway)}
        headers["Authorization"] = "Bearer " + "k" * 7000
        response = await client.get(f"{gateway.api_base}/models/{'m' * 7500}", headers=headers)
    assert_server_answered(response, 401, "invalid_api_key")


async def test_over_http2_a_stream_over_the_header_limit_is_reset(gateway: ProcessStack) -> None:
    """HTTP/2 has no status for it: Envoy resets the stream (the SDKs speak HTTP/1.1)."""
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
        for delta in BELOW:
            response = await client.get(f"{gateway.api_base}/models", headers={"Authorization": "Bearer " + "k" * (HEADER_LIMIT + delta)})
            assert response.http_version == "HTTP/2"
            assert_server_answered(response, 401, "invalid_api_key")
        for delta in ABOVE:
            with pytest.raises(httpx.RemoteProtocolError):
                await client.get(f"{gateway.api_base}/models", headers={"Authorization": "Bearer " + "k" * (HEADER_LIMIT + delta)})


def json_body(size: int) -> bytes:
    prefix, suffix = b'{"prompt": "', b'"}'
    return prefix + b"x" * (size - len(prefix) - len(suffix)) + suffix


async def test_a_body_over_the_limit_is_413_and_one_at_it_reaches_the_server(gateway: ProcessStack) -> None:
    account_id, key = await gateway.admin.funded_key("1.00")
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(timeout=60) as client:
        for size in (BODY_LIMIT - 1000, BODY_LIMIT - 1, BODY_LIMIT):
            response = await client.post(f"{gateway.api_base}/images/generations", content=json_body(size), headers=headers)
            # The server read the whole body: its own answer about the prompt's length.
            assert_server_answered(response, 400, "string_above_max_length")
        for size in (BODY_LIMIT + 1, BODY_LIMIT + 100_000):
            response = await client.post(f"{gateway.api_base}/images/generations", content=json_body(size), headers=headers)
            assert (response.status_code, response.json()) == (413, {"error": TOO_LARGE})
            assert len(response.headers["x-request-id"]) >= 16

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
            for _ in range(5):
                yield b"x" * MIB

        streamed = await client.post(f"{gateway.api_base}/images/generations", content=chunks(), headers=headers)
    assert (streamed.status_code, streamed.json()) == (413, {"error": TOO_LARGE})
    account = await gateway.admin.get(account_id)
    assert (account.balance_usd, account.reserved_usd) == ("1.000000", "0.000000")


async def test_a_body_far_over_the_limit_is_413_for_a_client_that_reads_while_it_sends(gateway: ProcessStack) -> None:
    """Envoy answers as soon as the limit is passed and closes the connection. A client that
    reads while it sends (curl does) gets the 413; one that only reads after sending
    everything (httpx) sees the connection closed under it once the rest of its body no
    longer fits the socket buffers."""
    body = json_body(3 * BODY_LIMIT)
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.settings.http_port)
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(head.encode())
            for start in range(0, len(body), 64 * KIB):
                writer.write(body[start : start + 64 * KIB])
                await writer.drain()

    sending = asyncio.create_task(send())
    answer = b""
    try:
        # Read as it comes: the connection is reset once the answer is out.
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(64 * KIB), 30):
                answer += chunk
    finally:
        sending.cancel()
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    assert status_line == b"HTTP/1.1 413 Payload Too Large"
    assert json.loads(rest.partition(b"\r\n\r\n")[2]) == {"error": TOO_LARGE}


@pytest.fixture(scope="module")
async def mismatched(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[ProcessStack, str]]:
    """A server with tight limits behind a second Envoy rendered with loose ones: what
    reaches the server is refused by grpc-core itself, without our error metadata."""
    var = tmp_path_factory.mktemp("mismatched")
    async with process_stack(var / "var", max_request_header_kib=8, max_request_bytes=MIB, max_grpc_message_bytes=MIB) as stack:
        env = {
            **stack.env,
            "IMAGEGW_HTTP_PORT": str(free_port()),
            "IMAGEGW_ENVOY_ADMIN_PORT": str(free_port()),
            "IMAGEGW_MAX_REQUEST_HEADER_KIB": "64",
            "IMAGEGW_MAX_REQUEST_BYTES": str(8 * MIB),
        }
        loose = settings_from(env)
        config = write_envoy_config(loose, var / "loose-envoy.yaml", upstreams=[("127.0.0.1", stack.settings.grpc_port)])
        # One worker, so the readiness probe opens the one upstream connection: grpc-core
        # applies its limits to a connection only once its HTTP/2 settings are acknowledged.
        envoy = subprocess.Popen(  # noqa: ASYNC220 - starting a process does not wait for it
            [envoy_binary(loose), "-c", str(config), "--disable-hot-restart", "--concurrency", "1",
             "--log-level", "warn", "--file-flush-interval-msec", "1000"],
            stdout=(stack.logs / "envoy.log").open("ab"), stderr=subprocess.STDOUT,
        )
        try:
            wait_for_envoy(loose, envoy)
            yield stack, f"http://127.0.0.1:{loose.http_port}/v1"
        finally:
            stop_process(envoy, timeout=10)


async def test_grpc_core_refusals_are_answered_generically_and_logged_with_their_cause(
    mismatched: tuple[ProcessStack, str],
) -> None:
    stack, api_base = mismatched
    _, key = await stack.admin.funded_key("1.00")
    async with httpx.AsyncClient(timeout=60) as client:
        metadata = await client.get(f"{api_base}/models", headers={"Authorization": "Bearer " + "k" * 30000, "x-request-id": "mismatch-headers"})
        message = await client.post(
            f"{api_base}/images/generations", content=json_body(2 * MIB),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json", "x-request-id": "mismatch-body"},
        )
    assert metadata.status_code == 431
    assert metadata.json() == {"error": {"message": "Request headers too large.", "type": "invalid_request_error", "param": None, "code": "request_headers_too_large"}}
    assert message.status_code == 413
    assert message.json() == {"error": {"message": "Request too large.", "type": "invalid_request_error", "param": None, "code": "request_too_large"}}
    for response in (metadata, message):
        assert response.headers["x-should-retry"] == "false"
        assert [h for h in response.headers if h.startswith(("grpc-", "x-http-status", "x-openai"))] == []
    lines = await stack.envoy_access_log(["mismatch-headers", "mismatch-body"])
    assert lines["mismatch-headers"]["grpc_status"] == 8
    assert "metadata size exceeds" in lines["mismatch-headers"]["cause"]
    assert lines["mismatch-body"]["grpc_status"] == 8
    assert "larger than max" in lines["mismatch-body"]["cause"]
    assert "without x-openai-error, answered 431 (request mismatch-headers)" in stack.envoy_log()


def test_the_server_metadata_limit_covers_what_envoy_may_send(tmp_path: Path) -> None:
    settings = settings_from(base_env(tmp_path))
    # Two copies of the URL-and-headers budget (x-envoy-original-path repeats the URL) plus
    # grpc-core's 32 bytes per entry and Envoy's own headers.
    assert settings.max_metadata_bytes >= 2 * HEADER_LIMIT + 32 * HEADER_COUNT
