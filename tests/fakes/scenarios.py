"""How a test (or a person with curl) picks a fake's behaviour for one request.

A token anywhere in the prompt: ``[[fake:NAME]]``, ``[[fake:NAME=ARG]]`` (a number, e.g.
a scaled-down delay in seconds or milliseconds), and optionally a count: ``[[fake:503x2]]``
fails the first two requests carrying that prompt, then answers normally;
``[[fake:429-then-ok]]`` is ``[[fake:429x1]]``. A scripted queue
(``fake.enqueue("503", "ok")``) wins over the prompt: each generation request takes the
next entry, whatever its prompt, until the queue is empty. Each fake documents its names.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, replace

from tests.fakes.server import FakeResponse

__all__ = ["OK", "Scenario", "ScenarioPicker", "parse_scenario", "transport_variant"]

TOKEN_RE = re.compile(r"\[\[fake:(?P<name>[a-z0-9-]+?)(?:=(?P<arg>[0-9.]+))?(?:x(?P<times>\d+)|(?P<then>-then-ok))?\]\]")


@dataclass(frozen=True, slots=True)
class Scenario:
    """A named behaviour with an optional numeric argument."""

    name: str
    arg: float | None = None

    def arg_or(self, default: float) -> float:
        return default if self.arg is None else self.arg


OK = Scenario("ok")


def parse_scenario(text: str) -> tuple[Scenario, int | None] | None:
    """The first token in ``text`` and its count (None = every time), or None."""
    match = TOKEN_RE.search(text)
    if match is None:
        return None
    arg = float(match.group("arg")) if match.group("arg") else None
    times = 1 if match.group("then") else (int(match.group("times")) if match.group("times") else None)
    return Scenario(match.group("name"), arg), times


class ScenarioPicker:
    """The scripted queue first, then the prompt's token, else ``ok``."""

    def __init__(self) -> None:
        self._queue: deque[Scenario] = deque()
        self._seen: dict[str, int] = {}

    def enqueue(self, *items: str | Scenario) -> None:
        for item in items:
            if isinstance(item, Scenario):
                self._queue.append(item)
                continue
            parsed = parse_scenario(f"[[fake:{item}]]")
            if parsed is None:
                raise ValueError(f"not a scenario: {item!r}")
            self._queue.append(parsed[0])

    def pick(self, prompt: object) -> Scenario:
        if self._queue:
            return self._queue.popleft()
        if not isinstance(prompt, str):
            return OK
        parsed = parse_scenario(prompt)
        if parsed is None:
            return OK
        scenario, times = parsed
        if times is None:
            return scenario
        seen = self._seen.get(prompt, 0) + 1
        self._seen[prompt] = seen
        return scenario if seen <= times else OK


# Scenarios every fake answers the same way, applied to the answer it would have sent.
CLOUDFLARE_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n</body>\r\n</html>\r\n"
)
GATEWAY_504 = "<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body></html>"


def transport_variant(scenario: Scenario, ok: FakeResponse) -> FakeResponse | None:
    """The generic timing and malformed-body scenarios, or None for a provider-specific one.

    ``slow=S`` waits S seconds before the head; ``drip=S`` sends the body in four chunks S
    seconds apart; ``reset`` closes without answering; ``truncated`` declares the full
    ``Content-Length`` and sends half; ``html-502``/``html-504`` are gateway error pages;
    ``html-200`` is a 200 ``text/html`` page; ``invalid-json`` is a 200 JSON body cut short.
    """
    match scenario.name:
        case "slow":
            return replace(ok, delay=scenario.arg_or(5.0))
        case "drip":
            return replace(ok, drip=scenario.arg_or(0.5), chunk_size=max(1, len(ok.body) // 4 + 1))
        case "reset":
            return FakeResponse(reset=True)
        case "truncated":
            return replace(ok, truncate_to=len(ok.body) // 2)
        case "html-502":
            return FakeResponse.text(CLOUDFLARE_502, 502)
        case "html-504":
            return FakeResponse.text(GATEWAY_504, 504)
        case "html-200":
            return FakeResponse.text("<!DOCTYPE html><html><body><h1>Welcome</h1></body></html>", 200)
        case "invalid-json":
            return FakeResponse(body=ok.body[: max(1, len(ok.body) // 2)])
    return None
