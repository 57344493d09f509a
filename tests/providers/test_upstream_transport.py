"""The upstream client's transport (aiohttp under httpx): the connection cap holds,
connections are kept alive and reused, bodies arrive whole, multipart uploads are sent
with their Content-Length, and failures are httpx's errors as httpcore raised them.

Against real HTTP/1.1 servers on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import io

import httpx
import pytest

from server.providers.http import create_http_client

ANSWER = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}"


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
    upstream = CountingServer(delay=0.2)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = create_http_client(max_connections=4)
    try:
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        # One after the other: the same connection.
        for _ in range(2):
            assert (await client.post(url, json={})).status_code == 200
        assert upstream.connections == 1
        # 8 at once on 4 connections: two rounds, never more than 4 in flight.
        answers = await asyncio.gather(*(client.post(url, json={}) for _ in range(8)))
        assert [a.status_code for a in answers] == [200] * 8
        assert (upstream.connections, upstream.peak_in_flight) == (4, 4)
        # Every pool keeps its connections alive: the next round opens none.
        again = await asyncio.gather(*(client.post(url, json={}) for _ in range(4)))
        assert [a.status_code for a in again] == [200] * 4
        assert upstream.connections == 4
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


class ScriptedServer:
    """Reads one request (head and Content-Length body), keeps it, answers ``answer``."""

    def __init__(self, answer: bytes, *, close: bool = False) -> None:
        self.answer = answer
        self.close = close
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
            answer = await client.post(url, data={"prompt": "a kite"}, files=[("image[]", ("a.png", image, "image/png"))])
        assert answer.status_code == 200 and answer.content == body
        [(head, sent)] = scripted.requests
        lines = head.lower().split(b"\r\n")
        assert b"content-length: %d" % len(sent) in lines and not any(b"transfer-encoding" in line for line in lines)
        assert b'name="prompt"\r\n\r\na kite\r\n' in sent
        assert b'name="image[]"; filename="a.png"\r\nContent-Type: image/png\r\n\r\n\x89PNG' + b"x" * 100_000 in sent
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"", httpx.RemoteProtocolError),  # closed before any answer
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nonly part", httpx.RemoteProtocolError),  # cut short
    ],
    ids=["no-answer", "truncated"],
)
async def test_failures_are_the_errors_httpcore_raised(answer: bytes, error: type[Exception]) -> None:
    client = create_http_client(max_connections=4)
    try:
        async with ScriptedServer(answer) as url:
            with pytest.raises(error):
                async with client.stream("POST", url, json={}) as response:
                    await response.aread()
        with pytest.raises(httpx.ConnectError):
            await client.post(url, json={})  # nobody listens there any more
    finally:
        await client.aclose()
