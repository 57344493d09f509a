"""A generation that takes minutes survives every hop (Envoy route, stream idle, gRPC
deadline, upstream client) with the openai SDK's default timeout."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest

from tests.fakes.openai_fake import DEFAULT_KEY, start_openai_fake
from tests.stack import process_stack

pytestmark = pytest.mark.e2e

UPSTREAM_SECONDS = 240  # the figure: far past Envoy's 15 s default route timeout


async def test_a_240_second_upstream_succeeds_through_envoy(tmp_path: Path) -> None:
    async with start_openai_fake() as fake, process_stack(
        tmp_path / "var", openai_api_key=DEFAULT_KEY, openai_base_url=fake.base_url
    ) as stack:
        account_id, key = await stack.admin.funded_key("1.00")
        # The SDK's defaults: 600 s timeout; no retries so a cut would show as an error.
        async with openai.AsyncOpenAI(api_key=key, base_url=stack.api_base, max_retries=0) as sdk:
            started = time.monotonic()
            result = await sdk.images.generate(
                model="gpt-image-1", prompt=f"[[fake:slow={UPSTREAM_SECONDS}]] a patient painter", size="1024x1024"
            )
            elapsed = time.monotonic() - started
        assert UPSTREAM_SECONDS <= elapsed < UPSTREAM_SECONDS + 30
        assert result.data is not None and len(result.data) == 1 and result.data[0].url is not None
        account = await stack.admin.get(account_id)
        # gpt-image-1, auto quality resolved to medium, 1024x1024: $0.042 (server/catalog.toml).
        assert (account.balance_usd, account.reserved_usd, account.spent_usd) == ("0.958000", "0.000000", "0.042000")
        assert len(fake.generation_requests) == 1  # no retry, no duplicate paid generation
        assert (await stack.admin.reconcile()).ok
