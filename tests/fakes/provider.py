"""What every provider fake shares: a real HTTP server on loopback, endpoints as handlers.

A fake is a subclass of ``FakeProvider`` with one method per endpoint, marked
``@endpoint(METHOD, PATH)`` (PATH a regular expression matched against the whole path; its
named groups are passed to the handler as keyword arguments). Adding an endpoint (an edit,
a stream) is one more handler::

    @endpoint("POST", r"/v1/images/edits")
    async def edits(self, request: RecordedRequest) -> FakeResponse: ...

Endpoints are tried in the order they are defined (a catch-all goes last); a request that
matches none gets ``not_found``. Every fake records each request,
picks each one's behaviour with ``scenarios`` (a ``[[fake:NAME]]`` token in the prompt, or
a scripted ``enqueue``), and answers the scenario ``revoked-key`` exactly as it answers a
key it does not know (the provider revoked ours), so tests never swap a running fake's key.

Tests find the requests of one prompt with ``sent(prompt)`` (each fake knows where its wire
format puts the prompt, ``prompt_of``) and read them as ``payload`` (JSON, or the multipart
fields). Each fake runs by hand too: ``python -m tests.fakes.openai_fake --port 9100``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, ClassVar, Self, TypeVar

from tests.fakes.images import ImageCache
from tests.fakes.scenarios import Scenario, ScenarioPicker
from tests.fakes.server import FakeHttpServer, FakeResponse, RecordedRequest

__all__ = ["REVOKED_KEY", "FakeProvider", "endpoint", "serve_main"]

REVOKED_KEY = "revoked-key"
EndpointHandler = Callable[..., Awaitable[FakeResponse]]
H = TypeVar("H", bound=EndpointHandler)


def endpoint(method: str, path: str) -> Callable[[H], H]:
    """Marks a ``FakeProvider`` method as the handler of ``METHOD PATH`` (a regex)."""

    def mark(handler: H) -> H:
        handler.__fake_endpoint__ = (method, re.compile(path))  # type: ignore[attr-defined]
        return handler

    return mark


class FakeProvider:
    """The shared machinery of one fake upstream host (see the module docstring)."""

    default_key: ClassVar[str]
    title: ClassVar[str]  # for the command line: "fake OpenAI", ...

    def __init__(self, *, api_key: str | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key or self.default_key
        self.server = FakeHttpServer(self.handle, host=host, port=port)
        self.scenarios = ScenarioPicker()
        self.images = ImageCache()
        self._endpoints: list[tuple[str, re.Pattern[str], EndpointHandler]] = []
        for klass in reversed(type(self).__mro__):
            for name, member in vars(klass).items():
                marked = getattr(member, "__fake_endpoint__", None)
                if marked is not None:
                    self._endpoints.append((marked[0], marked[1], getattr(self, name)))

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What the adapter's base URL setting takes (the host, unless a fake says otherwise)."""
        return self.server.base_url

    async def start(self) -> None:
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()

    @classmethod
    @asynccontextmanager
    async def running(cls, **options: Any) -> AsyncIterator[Self]:
        """A started fake (options as the constructor), stopped on exit."""
        fake = cls(**options)
        await fake.start()
        try:
            yield fake
        finally:
            await fake.stop()

    def describe(self) -> str:
        return f"{self.title} at {self.base_url}"

    # -- what tests read ----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        return self.server.requests

    def enqueue(self, *scenarios: str | Scenario) -> None:
        self.scenarios.enqueue(*scenarios)

    def prompt_of(self, request: RecordedRequest) -> str | None:
        """The prompt a request carries, where this wire format puts it (JSON ``prompt`` here)."""
        try:
            body = request.json()
        except ValueError:
            return None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        return prompt if isinstance(prompt, str) else None

    def payload(self, request: RecordedRequest) -> Any:
        """The request body as data: its JSON here; multipart fakes give their fields."""
        return request.json()

    def sent(self, prompt: str) -> list[RecordedRequest]:
        """The requests that carried ``prompt``, in arrival order."""
        return [r for r in self.requests if self.prompt_of(r) == prompt]

    # -- dispatch -----------------------------------------------------------------------------

    async def handle(self, request: RecordedRequest) -> FakeResponse:
        for method, pattern, handler in self._endpoints:
            match = pattern.fullmatch(request.path)
            if match is not None and request.method == method:
                return await handler(request, **match.groupdict())
        return self.not_found(request)

    def not_found(self, request: RecordedRequest) -> FakeResponse:
        """The provider's answer to a path it does not serve."""
        return FakeResponse.json_body({"error": f"{request.method} {request.path} not found"}, 404)


def serve_main(cls: type[FakeProvider], port: int, **options: Any) -> None:
    """``python -m tests.fakes.NAME_fake``: serve one fake on a fixed port until Ctrl-C."""
    parser = argparse.ArgumentParser(description=(cls.__doc__ or cls.__name__).splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--key", default=cls.default_key)
    args = parser.parse_args()

    async def run() -> None:
        fake = cls(api_key=args.key, host=args.host, port=args.port, **options)
        await fake.start()
        print(f"{fake.describe()}  key {args.key}", flush=True)  # noqa: T201
        await fake.server.serve_forever()

    asyncio.run(run())
