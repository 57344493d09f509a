"""A lean fake of OpenAI's ``POST /v1/images/generations`` for load tests.

The test fakes (``tests/fakes``) are faithful but built for correctness (h11, request
recording, scenarios); under 512 concurrent 1.5 MB answers they would measure
themselves. This one speaks the same wire format (a GPT image answer: ``data[].b64_json``
plus ``usage``, ``size``, ``quality``, ...) with as little work per request as Python
allows: raw non-blocking sockets, a few byte searches to frame HTTP/1.1 keep-alive
requests, and answers built once at start-up and sent with ``sock_sendall`` (a
memoryview, no copy).

``GET /bench/stats`` answers ``{"responses": N}``: the 200 answers sent so far by all
workers (the bench reads it at the start and end of a measured window).

What to answer is read from the prompt, so that one process serves every row (direct,
through plain Envoy, through imagegw, which passes the prompt on): a token
``bench:<image>:<delay_ms>`` picks the image (``tiny`` or ``large``, see bench.images)
and how long to wait before answering. Without a token: tiny, no delay.

    python -m bench.upstream --port 9200 [--workers 2]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import mmap
import os
import re
import signal
import socket
import struct
import sys

from bench.images import IMAGES, image_bytes

__all__ = ["PATH", "build_answers", "main", "prompt_token"]

PATH = b"/v1/images/generations"
TOKEN_RE = re.compile(rb"bench:([a-z]+):(\d+)")
LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*(\d+)", re.IGNORECASE)
MAX_HEAD = 64 * 1024
MAX_BODY = 16 * 1024 * 1024


def prompt_token(image: str, delay_s: float) -> str:
    """The prompt token that selects ``image`` and ``delay_s`` seconds of upstream latency."""
    return f"bench:{image}:{round(delay_s * 1000)}"


def _http(status: str, body: bytes, extra: str = "") -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"x-request-id: req_bench\r\nopenai-processing-ms: 1000\r\n{extra}\r\n"
    )
    return head.encode() + body


def build_answers() -> dict[bytes, bytes]:
    """Complete HTTP responses (head and body) by image name."""
    answers = {}
    for name in IMAGES:
        payload = {
            "created": 1767225600,
            "background": "opaque",
            "data": [{"b64_json": base64.b64encode(image_bytes(name)).decode()}],
            "output_format": "png",
            "quality": "medium",
            "size": "1024x1024",
            "usage": {
                "input_tokens": 9,
                "input_tokens_details": {"image_tokens": 0, "text_tokens": 9},
                "output_tokens": 1056,
                "output_tokens_details": {"image_tokens": 1056, "text_tokens": 0},
                "total_tokens": 1065,
            },
        }
        answers[name.encode()] = _http("200 OK", json.dumps(payload, separators=(",", ":")).encode())
    return answers


def _error(status: str, message: str, code: str | None) -> bytes:
    body = {
        "error": {
            "message": message,
            "type": "invalid_request_error",
            "param": None,
            "code": code,
        }
    }
    return _http(status, json.dumps(body).encode(), "connection: close\r\n")


UNAUTHORIZED = _error("401 Unauthorized", "You didn't provide an API key.", None)
NOT_FOUND = _error("404 Not Found", "Invalid URL.", None)
BAD_REQUEST = _error("400 Bad Request", "Unsupported request framing.", "invalid_request")


class Counters:
    """One 8-byte slot per worker in memory shared across fork(); each worker writes only
    its own slot, so no lock is needed; readers sum them."""

    def __init__(self, workers: int) -> None:
        self.workers = workers
        self.memory = mmap.mmap(-1, 8 * workers)
        self.slot = 0

    def add(self, n: int = 1) -> None:
        offset = 8 * self.slot
        struct.pack_into(
            "<Q",
            self.memory,
            offset,
            struct.unpack_from("<Q", self.memory, offset)[0] + n,
        )

    def total(self) -> int:
        return sum(struct.unpack_from("<Q", self.memory, 8 * i)[0] for i in range(self.workers))


class Upstream:
    def __init__(self, sock: socket.socket, counters: Counters) -> None:
        self.sock = sock
        self.counters = counters
        self.answers = build_answers()
        self.ok = set(self.answers.values())
        self.connections: set[asyncio.Task[None]] = set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self.sock)
            conn.setblocking(False)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            task = loop.create_task(self._connection(conn))
            self.connections.add(task)
            task.add_done_callback(self.connections.discard)

    def _answer(self, head: bytes, body: bytes) -> tuple[bytes, float, bool]:
        """(response, delay in seconds, keep the connection)."""
        line_end = head.find(b"\r\n")
        request_line = head[:line_end] if line_end >= 0 else head
        parts = request_line.split(b" ")
        if len(parts) == 3 and parts[0] == b"GET" and parts[1] == b"/bench/stats":
            body = json.dumps({"responses": self.counters.total()}).encode()
            return _http("200 OK", body), 0.0, True
        if len(parts) != 3 or parts[0] != b"POST" or not parts[1].split(b"?")[0].endswith(PATH):
            return NOT_FOUND, 0.0, False
        if b"\r\nauthorization: bearer " not in head.lower():
            return UNAUTHORIZED, 0.0, False
        match = TOKEN_RE.search(body)
        if match is None:
            return self.answers[b"tiny"], 0.0, True
        answer = self.answers.get(match.group(1))
        if answer is None:
            return NOT_FOUND, 0.0, False
        return answer, int(match.group(2)) / 1000, True

    async def _connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        buf = b""
        try:
            while True:
                end = buf.find(b"\r\n\r\n")
                while end < 0:
                    if len(buf) > MAX_HEAD:
                        return
                    chunk = await loop.sock_recv(conn, 65536)
                    if not chunk:
                        return
                    buf += chunk
                    end = buf.find(b"\r\n\r\n")
                head, buf = buf[: end + 2], buf[end + 4 :]
                if b"\r\ntransfer-encoding:" in head.lower():
                    await loop.sock_sendall(conn, BAD_REQUEST)
                    return
                match = LENGTH_RE.search(head)
                length = int(match.group(1)) if match else 0
                if length > MAX_BODY:
                    return
                while len(buf) < length:
                    chunk = await loop.sock_recv(conn, max(65536, length - len(buf)))
                    if not chunk:
                        return
                    buf += chunk
                body, buf = buf[:length], buf[length:]
                response, delay, keep = self._answer(head, body)
                if delay > 0:
                    await asyncio.sleep(delay)
                await loop.sock_sendall(conn, response)
                if response in self.ok:
                    self.counters.add()
                if not keep or b"\r\nconnection: close" in head.lower():
                    return
        except (ConnectionError, OSError):
            return
        finally:
            conn.close()


def _listen(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.listen(4096)
    sock.setblocking(False)
    return sock


def _run_worker(host: str, port: int, counters: Counters) -> None:
    async def main() -> None:
        upstream = Upstream(_listen(host, port), counters)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        server = loop.create_task(upstream.serve())
        await stop.wait()
        server.cancel()
        for task in list(upstream.connections):
            task.cancel()

    asyncio.run(main())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes sharing the port (SO_REUSEPORT)",
    )
    args = parser.parse_args(argv)
    build_answers()  # fail before forking if Pillow cannot make the images
    counters = Counters(args.workers)
    children = []
    for slot in range(1, args.workers):
        pid = os.fork()
        if pid == 0:
            counters.slot = slot
            _run_worker(args.host, args.port, counters)
            os._exit(0)
        children.append(pid)
    try:
        print(
            f"bench upstream on http://{args.host}:{args.port}/v1 ({args.workers} worker(s))",
            flush=True,
        )
        _run_worker(args.host, args.port, counters)
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except ProcessLookupError:
                pass
    sys.exit(0)


if __name__ == "__main__":
    main()
