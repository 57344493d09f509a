"""The answer gate's request scope: every answer a request reads shares the request's one
slot, which is held until the request's block ends (its REST answer written), never just
until the images are decoded; outside a request, each answer has its own slot as before."""

from __future__ import annotations

import asyncio

from server.providers.gate import AnswerGate, answer_scope


async def test_answers_of_a_request_share_its_slot_until_the_request_ends() -> None:
    gate = AnswerGate(1)
    async with gate.request():
        async with answer_scope(gate) as first:
            await first.admit()
            assert (gate.active, first.held) == (1, True)
        # The answer's block ended (its images decoded): the request still holds the slot.
        assert gate.active == 1

        async def sibling() -> bool:  # a fan-out's other call, in its own task
            async with answer_scope(gate) as scope:
                await scope.admit()  # the request's slot: no wait, no second slot
                return scope.held

        assert await asyncio.wait_for(asyncio.gather(sibling(), sibling()), 1) == [True, True]
        assert (gate.active, gate.peak) == (1, 1)
        # Another request waits for the slot until this one's block ends.
        other = asyncio.create_task(_read_one(gate))
        await asyncio.sleep(0.05)
        assert (other.done(), gate.waiting) == (False, 1)
    await asyncio.wait_for(other, 1)
    assert (gate.active, gate.waiting) == (0, 0)


async def _read_one(gate: AnswerGate) -> None:
    async with gate.request(), answer_scope(gate) as scope:
        await scope.admit()


async def test_outside_a_request_an_answer_gives_its_slot_back_when_its_block_ends() -> None:
    gate = AnswerGate(1)
    async with answer_scope(gate) as scope:
        await scope.admit()
        assert gate.active == 1
    assert gate.active == 0
    # A request on another gate does not lend its slot.
    other = AnswerGate(1)
    async with other.request():
        async with answer_scope(gate) as scope:
            await scope.admit()
        assert (gate.active, other.active) == (0, 0)


async def test_answers_of_a_request_that_wait_together_take_one_slot_between_them() -> None:
    """A fan-out's calls whose large answers arrive while the gate is full all wait for
    the request's one slot: the first to get it lends it to the others. Each taking a slot
    of its own would never give the extra ones back (the request holds one slot and
    releases once), and with a one-slot gate the second would wait for ever for the slot
    its own request holds."""
    for slots in (1, 2):
        gate = AnswerGate(slots)
        others = [gate.scope() for _ in range(slots)]
        for other in others:  # other requests' answers fill the gate
            await other.admit()
        async with gate.request():

            siblings = asyncio.gather(_admitted(gate), _admitted(gate), _admitted(gate))
            await asyncio.sleep(0.05)
            assert (siblings.done(), gate.waiting) == (False, 1)  # one wait for the request
            for other in others:
                other.release()
            assert await asyncio.wait_for(siblings, 1) == [True, True, True]
            assert gate.active == 1
        assert (gate.active, gate.waiting) == (0, 0), slots


async def _admitted(gate: AnswerGate) -> bool:
    async with answer_scope(gate) as scope:
        await scope.admit()
        return scope.held
