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
"""

from __future__ import annotations

import asyncio
from types import TracebackType

__all__ = ["LARGE_ANSWER_BYTES", "AnswerGate", "AnswerScope"]

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
