"""How many large upstream answers one server process holds in memory at once.

A 1.5 MB image arrives as about 2 MB of JSON and is held as the body, its parsed base64
text and the decoded bytes until it has been checked: several MB for a moment. 512 such
answers arriving in the same second (a 1 s upstream at concurrency 512) took the server
to 1.4 GB. ``AnswerGate`` lets ``slots`` large answers be read, parsed and decoded at
once; the others wait their turn with their bodies still in the kernel's socket buffers,
where TCP flow control holds the upstream back. So peak memory follows ``slots``, not the
number of requests in flight.

Nothing is refused: a waiting answer is waiting for its upstream a little longer, within
the request's deadline. Answers below ``large_bytes`` (errors, URLs, small images) never
wait. An ``AnswerScope`` holds at most one slot and never waits while holding it (a
download inside the scope reuses its slot), so the gate cannot deadlock.

A slot given back once the images are decoded bounds only that stage. Past it, a decoded
image waits for its settlement, its rendering and its write to Envoy, which on a loaded
event loop take longer than the decoding: at 150 answers/s, 80-200 answers were there at
once and the server's peak was 680-980 MiB at c=512 (bench/README.md, round three). So the
REST answer holds its slot until it is written: ``AnswerGate.request()`` makes one scope
for the whole request, and every answer the request reads inside it (``answer_scope``,
which ``UpstreamHttp.answer()`` calls: its upstream calls, a fan-out's, a download) shares
that one slot. Still one slot per holder, never waited for while held (settling, rendering
and writing need no slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
from collections.abc import AsyncIterator
from types import TracebackType

__all__ = ["LARGE_ANSWER_BYTES", "AnswerGate", "AnswerScope", "answer_scope"]

# The size above which JSON and base64 are already parsed off the event loop
# (server.providers.http.OFFLOAD_BYTES): about one 400x400 PNG.
LARGE_ANSWER_BYTES = 256 * 1024


class AnswerGate:
    """At most ``slots`` large answers between the start of their read and the end of
    their decoding; the rest queue in arrival order. One per process (the composition root
    builds it from ``IMAGEGW_MAX_LARGE_UPSTREAM_ANSWERS``), shared by every provider."""

    def __init__(self, slots: int, *, large_bytes: int = LARGE_ANSWER_BYTES) -> None:
        if slots < 1:
            raise ValueError("an answer gate needs at least one slot")
        self.slots = slots
        self.large_bytes = large_bytes
        self._semaphore = asyncio.Semaphore(slots)
        # Read by the metrics scrape (imagegw_upstream_large_answers) and by tests.
        self.active = 0
        self.waiting = 0
        self.peak = 0  # the most slots held at once since start

    def scope(self) -> AnswerScope:
        return AnswerScope(self)

    @contextlib.asynccontextmanager
    async def request(self) -> AsyncIterator[AnswerScope]:
        """One scope for a whole request (see the module docstring): the answers it reads
        in this block, in this task and the tasks it starts, share its one slot, held
        until the block ends."""
        scope = AnswerScope(self)
        token = _REQUEST.set(scope)
        try:
            async with scope:
                yield scope
        finally:
            _REQUEST.reset(token)

    async def _acquire(self) -> None:
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.active += 1
        self.peak = max(self.peak, self.active)

    def _release(self) -> None:
        self.active -= 1
        self._semaphore.release()


class AnswerScope:
    """One upstream answer's claim on the gate, as an ``async with`` block around reading,
    parsing and decoding it. The slot is taken only when the body turns out large
    (``admit``) and given back when the block ends, or earlier with ``release`` (an error
    answer before a retry). Without a gate every call is a no-op."""

    def __init__(self, gate: AnswerGate | None) -> None:
        self._gate = gate
        self._held = False
        self._closed = False
        # A request's answers (a fan-out's calls) may wait for its slot at the same time:
        # one of them waits, the others then share what it got. Each waiting on its own
        # would take a slot per call, of which the scope gives back one.
        self._admitting = asyncio.Lock()

    @property
    def held(self) -> bool:
        return self._held

    @property
    def large_bytes(self) -> int | None:
        """Bodies of at least this many bytes need a slot; None: nothing does."""
        return None if self._gate is None else self._gate.large_bytes

    async def admit(self) -> None:
        """Waits for a slot unless this scope already holds one."""
        if self._gate is None or self._held or self._closed:
            return
        async with self._admitting:
            if self._held or self._closed:
                return
            await self._gate._acquire()
            if self._closed:
                # The block ended while this waited (its exchange was abandoned): hand it on.
                self._gate._release()
                return
            self._held = True

    def release(self) -> None:
        if self._gate is not None and self._held:
            self._held = False
            self._gate._release()

    async def __aenter__(self) -> AnswerScope:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._closed = True
        self.release()


# The scope of the request being handled (AnswerGate.request), if any.
_REQUEST: contextvars.ContextVar[AnswerScope | None] = contextvars.ContextVar("imagegw_answer_scope", default=None)


class _Shared(AnswerScope):
    """A view of the request's scope for one answer: its slot, which the answer's own
    block does not give back (the request's does)."""

    def __init__(self, request: AnswerScope) -> None:
        super().__init__(request._gate)
        self._request = request

    @property
    def held(self) -> bool:
        return self._request.held

    async def admit(self) -> None:
        await self._request.admit()

    def release(self) -> None:
        self._request.release()  # an error answer's slot, given back before a retry's backoff

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        return None


def answer_scope(gate: AnswerGate | None) -> AnswerScope:
    """The scope for one answer: a share of the request's (``AnswerGate.request``) when
    there is one on this gate, else its own."""
    request = _REQUEST.get()
    if request is not None and gate is not None and request._gate is gate:
        return _Shared(request)
    return AnswerScope(gate)
