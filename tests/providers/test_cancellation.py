"""A call cancelled more than once still closes its upstream connection.

It happens in production: a fan-out call's own deadline and its parent's (the generation's
``asyncio.timeout_at`` at the same instant, whose TaskGroup then cancels the child again)
both cancel the same task. httpcore closes an abandoned connection in a cleanup that a
second cancellation interrupts, leaving the connection open and counted in the pool for
good (httpcore #1093, #658); enough of them exhaust the pool. Found end to end through
Envoy (the 504 Gemini test, now a row of tests/e2e/test_provider_matrix.py).
"""

from __future__ import annotations

import asyncio

import pytest

from server.providers.openai import OpenAIImageProvider
from tests.providers.support import upstream

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("iterations_between", [0, 1, 2, 3, 4])
async def test_a_second_cancellation_during_cleanup_still_closes_the_connection(
    openai_fake, http, image_request, deadline, iterations_between
):
    provider = OpenAIImageProvider(upstream(http, "openai"), api_key=openai_fake.api_key, base_url=openai_fake.base_url)
    request = image_request("gpt-image-1", prompt="fox [[fake:slow=8]]")
    task = asyncio.create_task(provider.generate(request, deadline=deadline(20)))
    # Received whole by the fake: the call is waiting for the answer's head (8 s away).
    await openai_fake.server.wait_for(lambda: len(openai_fake.generation_requests) == 1)
    task.cancel()
    for _ in range(iterations_between):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The upstream connection is closed (TimeoutError if it was left open).
    await openai_fake.server.wait_for(lambda: len(openai_fake.server.disconnects) == 1, within=2.0)

