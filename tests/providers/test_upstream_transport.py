"""The upstream client (aiohttp, through ``UpstreamHttp``): the connection cap holds,
connections are kept alive and reused, bodies arrive whole, multipart uploads are sent
with httpx's encoding and their Content-Length, and failures read as they did with httpx.

Against real HTTP/1.1 servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io

import pytest

from server.errors import UpstreamError
from server.providers.http import Failure, Kind, UpstreamHttp, UpstreamResponse, create_http_client
from tests.providers.support import upstream

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"


def classify(response: UpstreamResponse) -> Failure:
    return Failure(Kind.REJECTED, status=response.status)


def deadline(seconds: float = 10) -> float:
    return asyncio.get_running_loop().time() + seconds


async def post(http: UpstreamHttp, url: str) -> int:
    return (await http.send("POST", url, deadline=deadline(), classify=classify, json_body={})).status


class CountingServer:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.connections = 0
        self.in_flight = 0
        self.peak_in_flight = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                await reader.readexactly(2)  # the body: {}
                self.in_flight += 1
                self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
                await asyncio.sleep(self.delay)
                self.in_flight -= 1
                writer.write(ANSWER)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def test_the_connection_cap_holds_and_connections_are_reused() -> None:
    counting = CountingServer(delay=0.2)
    server = await asyncio.start_server(counting.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = create_http_client(max_connections=4)
    http = upstream(client, "openai")
    try:
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        # One after the other: the same connection.
        for _ in range(2):
            assert await post(http, url) == 200
        assert counting.connections == 1
        # 8 at once on 4 connections: two rounds, never more than 4 in flight.
        assert await asyncio.gather(*(post(http, url) for _ in range(8))) == [200] * 8
        assert (counting.connections, counting.peak_in_flight) == (4, 4)
        # The connections are kept alive: the next round opens none.
        assert await asyncio.gather(*(post(http, url) for _ in range(4))) == [200] * 4
        assert counting.connections == 4
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


class ScriptedServer:
    """Reads one request (head and Content-Length body), keeps it, answers ``answer``."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.requests: list[tuple[bytes, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (int(line.split(b":", 1)[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")),
                0,
            )
            self.requests.append((head, await reader.readexactly(length)))
            writer.write(self.answer)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> str:
        self._server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/v1/x"

    async def __aexit__(self, *_: object) -> None:
        self._server.close()
        await self._server.wait_closed()


async def test_a_large_body_arrives_whole_and_a_multipart_upload_keeps_its_length() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB
    scripted = ScriptedServer(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
    client = create_http_client(max_connections=4)
    try:
        async with scripted as url:
            image = io.BytesIO(b"\x89PNG" + b"x" * 100_000)
            answer = await upstream(client, "openai").send(
                "POST", url, deadline=deadline(), classify=classify, headers={"authorization": "Bearer k"},
                files=[("prompt", (None, "a kite")), ("image[]", ("a.png", image, "image/png"))],
            )
        assert answer.status == 200 and answer.body == body
        [(head, sent)] = scripted.requests
        lines = head.lower().split(b"\r\n")
        assert b"content-length: %d" % len(sent) in lines and not any(b"transfer-encoding" in line for line in lines)
        assert b"authorization: bearer k" in lines and b"user-agent: imagegw/0.1" in lines
        assert any(line.startswith(b"content-type: multipart/form-data; boundary=") for line in lines)
        assert b'name="prompt"\r\n\r\na kite\r\n' in sent
        assert b'name="image[]"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG' + b"x" * 100_000 in sent
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        # Closed before any answer: retried, then given up (as httpx's RemoteProtocolError).
        (b"", "The upstream provider is failing (connection closed early on request); gave up after 3 attempts."),
        # Cut short after the head: the upstream did the work, never retried.
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part",
            "The upstream provider returned a malformed answer: a truncated answer (connection closed early after 9 bytes) "
            "from 127.0.0.1.",
        ),
    ],
    ids=["no-answer", "truncated"],
)
async def test_failures_read_as_they_did_with_httpx(answer: bytes, message: str) -> None:
    client = create_http_client(max_connections=4)
    try:
        scripted = ScriptedServer(answer)
        async with scripted as url:
            with pytest.raises(UpstreamError) as caught:
                await post(upstream(client, "openai"), url)
        assert caught.value.message == message
        with pytest.raises(UpstreamError) as caught:
            await post(upstream(client, "openai"), url)  # nobody listens there any more
        assert caught.value.message == "The upstream provider is failing (connection refused or unreachable on request); gave up after 3 attempts."
    finally:
        await client.aclose()
