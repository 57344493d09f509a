"""Envoy's edge-proxy protections, through the real Envoy: a client that trickles its headers
is cut at the header timeout, HTTP/2 clients get the edge's stream and window limits, and
the overload manager watches memory and connections. That a long generation is never cut
within its model's timeout is tests/e2e/test_slow_generation.py (240 s through the same
config, longer than the 60 s stream idle timeout)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx
import pytest

from tests.stack import ProcessStack

pytestmark = pytest.mark.e2e

HEADERS_TIMEOUT = 10  # request_headers_timeout in server/edge/envoy.yaml


async def trickle_headers(stack: ProcessStack, headers: int, interval: float) -> tuple[float, bytes]:
    """Sends a request's headers one line every ``interval`` seconds; returns how long until
    the connection ended and what came back."""
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection("127.0.0.1", stack.settings.http_port)
    started = loop.time()

    async def send() -> None:
        with contextlib.suppress(ConnectionError):
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw\r\n")
            for index in range(headers):
                await asyncio.sleep(interval)
                writer.write(b"x-slow-%d: 1\r\n" % index)
                await writer.drain()
            writer.write(b"Connection: close\r\n\r\n")
            await writer.drain()

    sending = asyncio.create_task(send())
    answer = b""
    try:
        with contextlib.suppress(ConnectionError):
            while chunk := await asyncio.wait_for(reader.read(65536), 4 * HEADERS_TIMEOUT):
                answer += chunk
    finally:
        sending.cancel()
        writer.close()
    return loop.time() - started, answer


async def test_a_client_trickling_its_headers_is_cut_at_the_header_timeout(gateway: ProcessStack) -> None:
    # One header a second for a minute: it would hold the connection that long.
    elapsed, answer = await trickle_headers(gateway, headers=60, interval=1)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b"\r\n")[0] == b"HTTP/1.1 408 Request Timeout"
    assert b"connection: close" in head.lower()
    assert json.loads(body) == {
        "error": {
            "message": "The request was not received in time: send the headers within 10 seconds and the whole "
            "request within 600 seconds.",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
    }
    assert b"x-request-id: " in head
    # Cut by the header timeout: not before it, and not much after.
    assert HEADERS_TIMEOUT - 0.5 <= elapsed < HEADERS_TIMEOUT + 5


async def test_a_slow_client_within_the_header_timeout_is_served(gateway: ProcessStack) -> None:
    elapsed, answer = await trickle_headers(gateway, headers=3, interval=1)
    assert answer.split(b"\r\n")[0] == b"HTTP/1.1 401 Unauthorized"
    assert elapsed < HEADERS_TIMEOUT


async def test_http2_clients_get_the_edge_stream_and_window_limits(gateway: ProcessStack) -> None:
    with socket.create_connection(("127.0.0.1", gateway.settings.http_port), timeout=10) as sock:
        connection = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
        connection.initiate_connection()
        sock.sendall(connection.data_to_send())
        settings: dict[int, int] = {}
        connection_window = None
        while not settings or connection_window is None:
            data = sock.recv(65536)
            assert data, "Envoy closed the connection"
            for event in connection.receive_data(data):
                if isinstance(event, h2.events.RemoteSettingsChanged):
                    settings = {key: change.new_value for key, change in event.changed_settings.items()}
                elif isinstance(event, h2.events.WindowUpdated) and event.stream_id == 0:
                    connection_window = 65535 + event.delta
            sock.sendall(connection.data_to_send())
    assert settings[h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS] == 100
    assert settings[h2.settings.SettingCodes.INITIAL_WINDOW_SIZE] == 65536
    assert connection_window == 1024 * 1024


async def test_the_overload_manager_watches_memory_and_connections(gateway: ProcessStack) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        stats = (await client.get(f"http://127.0.0.1:{gateway.settings.envoy_admin_port}/stats?format=json")).json()
    values = {stat["name"]: stat.get("value") for stat in stats["stats"] if "name" in stat}
    # Both monitors run (heap pressure is a percentage of IMAGEGW_ENVOY_MAX_HEAP_BYTES, far
    # below the 95 % and 98 % that trigger the actions here).
    for monitor in ("fixed_heap", "global_downstream_max_connections"):
        assert values[f"overload.envoy.resource_monitors.{monitor}.failed_updates"] == 0
        assert 0 <= values[f"overload.envoy.resource_monitors.{monitor}.pressure"] < 95
    assert values["overload.envoy.overload_actions.stop_accepting_requests.active"] == 0
    assert values["overload.envoy.overload_actions.shrink_heap.active"] == 0
