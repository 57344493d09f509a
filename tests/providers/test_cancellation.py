"""A call cancelled more than once still closes its upstream connection.

It happens in production: a fan-out call's own deadline and its parent's (the generation's
``asyncio.timeout_at`` at the same instant, whose TaskGroup then cancels the child again)
both cancel the same task. httpcore closes an abandoned connection in a cleanup that a
second cancellation interrupts, leaving the connection open and counted in the pool for
good (httpcore #1093, #658); enough of them exhaust the pool. Found end to end through
Envoy (tests/e2e/test_provider_google_e2e.py, the 504 Gemini test).
"""

from __future__ import annotations

import asyncio

import pytest

from server.providers.openai import OpenAIImageProvider
from tests.providers.support import FAST_RETRY

pytestmark = pytest.mark.timeout(30)


async def wait_until(predicate, timeout: float = 2.0) -> bool:
    for _ in range(int(timeout / 0.01)):
        if predicate():
            return True
        await asyncio.sleep(0.01)
    return predicate()


@pytest.mark.parametrize("iterations_between", [0, 1, 2, 3, 4])
async def test_a_second_cancellation_during_cleanup_still_closes_the_connection(
    openai_fake, http, image_request, deadline, iterations_between
):
    provider = OpenAIImageProvider(http, api_key=openai_fake.api_key, base_url=openai_fake.base_url, retry=FAST_RETRY)
    request = image_request("gpt-image-1", prompt="fox [[fake:slow=8]]")
    task = asyncio.create_task(provider.generate(request, deadline=deadline(20)))
    assert await wait_until(lambda: len(openai_fake.generation_requests) == 1)
    await asyncio.sleep(0.05)  # the request is waiting for the answer's head
    task.cancel()
    for _ in range(iterations_between):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_until(lambda: len(openai_fake.server.disconnects) == 1), "the upstream connection was left open"

