"""The upstream client's sharded pools: requests spread over every pool, the total
connection cap holds, and connections are kept alive and reused.

Against a real HTTP/1.1 server on 127.0.0.1 that counts the connections it accepts.
"""

from __future__ import annotations

import asyncio

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


async def test_the_connection_cap_holds_across_pools_and_connections_are_reused() -> None:
    upstream = CountingServer(delay=0.2)
    server = await asyncio.start_server(upstream.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = create_http_client(max_connections=4, shards=2)
    try:
        url = f"http://127.0.0.1:{port}/v1/images/generations"
        # One after the other: one pool would reuse its connection; two pools take turns.
        for _ in range(2):
            assert (await client.post(url, json={})).status_code == 200
        assert upstream.connections == 2
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
