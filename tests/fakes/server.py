"""A tiny real HTTP/1.1 server on loopback for the provider fakes.

Built on ``h11`` (already installed with httpx) and ``asyncio`` streams rather than a web
framework because the fakes must misbehave precisely: lie in ``Content-Length`` and close
mid-body, drip a body slowly, drop the connection without answering, and notice the
moment a client disconnects (to prove cancellation closes the upstream request).

Each fake supplies one async handler ``RecordedRequest -> FakeResponse``; the server
records every request, and every request whose client went away before the answer was
complete, in arrival order, and tests wait for either with ``wait_for`` (an event, never a
polling sleep).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import email.utils
import json
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import h11

__all__ = ["FakeHttpServer", "FakeResponse", "Handler", "MultipartPart", "RecordedRequest", "SignedBlobs"]


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    target: str
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes
    received_at: float  # time.monotonic()

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(parse_qsl(urlsplit(self.target).query))

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";")[0].strip().lower()

    def json(self) -> Any:
        return json.loads(self.body)

    def multipart(self) -> list[MultipartPart] | None:
        """The ``multipart/form-data`` parts in order, or None when the body is not multipart."""
        if self.content_type != "multipart/form-data":
            return None
        # The stdlib MIME parser reads form-data once the content type is its header.
        head = f"Content-Type: {self.headers['content-type']}\r\nMIME-Version: 1.0\r\n\r\n".encode()
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + self.body)
        if not message.is_multipart():
            return None
        parts = []
        for part in message.iter_parts():
            name = part.get_param("name", header="content-disposition")
            payload = part.get_payload(decode=True)
            filename = part.get_filename()
            parts.append(
                MultipartPart(
                    name=str(name),
                    filename=filename,
                    data=payload if isinstance(payload, bytes) else b"",
                    content_type=part.get_content_type() if filename is not None else None,
                )
            )
        return parts


@dataclass(frozen=True, slots=True)
class MultipartPart:
    """One form-data part: a field when ``filename`` is None, else a file."""

    name: str
    filename: str | None
    data: bytes
    content_type: str | None = None  # a file's, as its part declared it


@dataclass(frozen=True, slots=True)
class FakeResponse:
    """What to send back, and how badly."""

    status: int = 200
    body: bytes = b""
    content_type: str | None = "application/json"
    headers: tuple[tuple[str, str], ...] = ()
    delay: float = 0.0  # seconds before the head is sent
    drip: float = 0.0  # seconds between body chunks
    chunk_size: int = 4096
    truncate_to: int | None = None  # declare the full Content-Length, send this many bytes, close
    reset: bool = False  # close the connection without any answer
    # A streamed body (chunked, each chunk flushed as it comes, e.g. Server-Sent Events);
    # a None chunk closes the connection there, mid-stream.
    stream: AsyncIterator[bytes | None] | None = None
    hold: asyncio.Event | None = None  # after the head and the first body chunk, wait until it is set

    @classmethod
    def json_body(
        cls, payload: Any, status: int = 200, headers: tuple[tuple[str, str], ...] = (), **options: Any
    ) -> FakeResponse:
        return cls(status=status, body=json.dumps(payload).encode(), headers=headers, **options)

    @classmethod
    def text(cls, body: str, status: int, content_type: str = "text/html; charset=utf-8", **options: Any) -> FakeResponse:
        return cls(status=status, body=body.encode(), content_type=content_type, **options)


Handler = Callable[[RecordedRequest], Awaitable[FakeResponse]]


@dataclass(slots=True)
class _Blob:
    data: bytes
    content_type: str
    expires_at: float
    tag: str | None  # what the blob was made for (a prompt), so tests find its downloads
    fetches: list[RecordedRequest] = field(default_factory=list)


@dataclass(slots=True)
class SignedBlobs:
    """Expiring image links like Azure blob SAS URLs: 200 until ``se``, then 403 XML."""

    prefix: str = "/blob"
    blobs: dict[str, _Blob] = field(default_factory=dict)
    downloads: list[str] = field(default_factory=list)

    def put(
        self, base_url: str, data: bytes, content_type: str, *, ttl: float, suffix: str = "png", tag: str | None = None
    ) -> str:
        blob_id = secrets.token_hex(8)
        self.blobs[blob_id] = _Blob(data, content_type, time.monotonic() + ttl, tag)
        expiry = email.utils.formatdate(time.time() + ttl, usegmt=True)
        return (
            f"{base_url}{self.prefix}/private/img-{blob_id}.{suffix}"
            f"?se={expiry.replace(' ', '%20').replace(',', '%2C')}&sp=r&sv=2024-08-04&sr=b&sig={secrets.token_hex(16)}"
        )

    def fetches(self, tag: str) -> list[RecordedRequest]:
        """The downloads of the blobs made for ``tag``, in arrival order."""
        return [fetch for blob in self.blobs.values() if blob.tag == tag for fetch in blob.fetches]

    def serve(self, request: RecordedRequest) -> FakeResponse | None:
        if request.method != "GET" or not request.path.startswith(self.prefix + "/"):
            return None
        blob_id = request.path.rsplit("/", 1)[-1].removeprefix("img-").split(".")[0]
        self.downloads.append(blob_id)
        blob = self.blobs.get(blob_id)
        if blob is not None:
            blob.fetches.append(request)
        if blob is None:
            return FakeResponse.text(
                '<?xml version="1.0" encoding="utf-8"?><Error><Code>BlobNotFound</Code>'
                "<Message>The specified blob does not exist.</Message></Error>",
                404,
                content_type="application/xml",
            )
        if time.monotonic() >= blob.expires_at:
            return FakeResponse.text(
                '<?xml version="1.0" encoding="utf-8"?><Error><Code>AuthenticationFailed</Code>'
                "<Message>Server failed to authenticate the request. Make sure the value of Authorization "
                "header is formed correctly including the signature.</Message>"
                "<AuthenticationErrorDetail>Signed expiry time has passed.</AuthenticationErrorDetail></Error>",
                403,
                content_type="application/xml",
            )
        return FakeResponse(body=blob.data, content_type=blob.content_type)


class FakeHttpServer:
    """Serves ``handler`` on ``host:port`` (port 0 picks a free one) until stopped."""

    def __init__(self, handler: Handler, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self._host = host
        self._port = port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[RecordedRequest] = []
        # Notified whenever a request or a disconnect is recorded.
        self._recorded = asyncio.Condition()
        # Answers paused on their ``hold`` event right now.
        self.holding = 0

    @property
    def port(self) -> int:
        assert self._server is not None, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://{self._host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._on_connection, self._host, self._port)

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        if connections:
            await asyncio.wait(connections, timeout=2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._server.wait_closed(), 1.0)
        self._server = None

    async def serve_forever(self) -> None:
        assert self._server is not None, "server not started"
        await self._server.serve_forever()

    async def wait_for(self, predicate: Callable[[], bool], within: float = 5.0) -> None:
        """Returns once ``predicate()`` (over ``requests`` and ``disconnects``) holds;
        checked again each time one is recorded. TimeoutError after ``within`` seconds."""
        async with asyncio.timeout(within), self._recorded:
            await self._recorded.wait_for(predicate)

    async def _record(self, into: list[RecordedRequest], request: RecordedRequest) -> None:
        async with self._recorded:
            into.append(request)
            self._recorded.notify_all()

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        conn = h11.Connection(h11.SERVER)
        try:
            while True:
                request = await self._read_request(conn, reader)
                if request is None:
                    return
                await self._record(self.requests, request)
                keep_alive = await self._answer(conn, reader, writer, request)
                if not keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    return
                conn.start_next_cycle()
        except (ConnectionError, h11.ProtocolError, asyncio.IncompleteReadError):
            return
        except asyncio.CancelledError:
            # Only stop() cancels these; ending normally keeps asyncio's stream callback quiet.
            return
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _read_request(self, conn: h11.Connection, reader: asyncio.StreamReader) -> RecordedRequest | None:
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return RecordedRequest(
                    method=head.method.decode(),
                    target=head.target.decode(),
                    headers={name.decode().lower(): value.decode() for name, value in head.headers},
                    body=bytes(body),
                    received_at=time.monotonic(),
                )
            elif isinstance(event, h11.ConnectionClosed):
                return None

    async def _answer(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: RecordedRequest
    ) -> bool:
        work = asyncio.create_task(self._respond(conn, writer, request))
        watch = asyncio.create_task(reader.read(65536))
        try:
            while True:
                done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
                if work in done:
                    return work.result()
                data = watch.result()
                if not data:
                    # EOF before the answer was complete: the client gave up (cancelled, timed out).
                    work.cancel()
                    await asyncio.wait({work})  # not `await work`: that would hide our own cancellation
                    await self._record(self.disconnects, request)
                    return False
                conn.receive_data(data)  # a pipelined request; h11 keeps it for the next cycle
                watch = asyncio.create_task(reader.read(65536))
        finally:
            watch.cancel()
            await asyncio.wait({watch})

    async def _respond(self, conn: h11.Connection, writer: asyncio.StreamWriter, request: RecordedRequest) -> bool:
        response = await self._handler(request)
        if response.delay:
            await asyncio.sleep(response.delay)
        if response.reset:
            return False
        headers = [
            ("date", email.utils.formatdate(usegmt=True)),
            ("server", "imagegw-fake"),
        ]
        if response.stream is None:
            headers.append(("content-length", str(len(response.body))))
        if response.content_type is not None:
            headers.append(("content-type", response.content_type))
        headers.extend(response.headers)
        try:
            reason = HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        writer.write(conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)))
        await writer.drain()
        if response.stream is not None:
            async for piece in response.stream:
                if piece is None:
                    return False  # cut: close without ending the chunked body
                writer.write(conn.send(h11.Data(data=piece)))
                await writer.drain()
            writer.write(conn.send(h11.EndOfMessage()))
            await writer.drain()
            return True
        body = response.body if response.truncate_to is None else response.body[: response.truncate_to]
        for start in range(0, len(body), response.chunk_size):
            chunk = body[start : start + response.chunk_size]
            if response.truncate_to is None:
                writer.write(conn.send(h11.Data(data=chunk)))
            else:
                writer.write(chunk)  # raw: h11 would refuse to end a message short of its length
            await writer.drain()
            if response.hold is not None and start == 0:
                self.holding += 1
                try:
                    await response.hold.wait()
                finally:
                    self.holding -= 1
            if response.drip:
                await asyncio.sleep(response.drip)
        if response.truncate_to is not None:
            return False
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        return True
