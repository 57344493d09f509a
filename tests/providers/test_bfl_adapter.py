"""BflImageProvider where the matrix (tests/e2e/test_provider_matrix.py) cannot look: which
hosts may receive our key, and the size rule for every catalog size."""

from __future__ import annotations

import httpx
import pytest

from server.providers.bfl import BflImageProvider
from tests.providers.support import upstream


@pytest.mark.parametrize(("size", "sent"), [("1024x1024", (1024, 1024)), ("1792x1024", (1440, 832)), ("1024x1792", (832, 1440))])
async def test_sizes_become_multiples_of_32_within_limits(size, sent, http, image_request):
    provider = BflImageProvider(upstream(http, "bfl"), api_key="k", base_url="https://api.bfl.ai")
    body = await provider.submit_body(image_request("flux-pro-1.1", size=size))
    assert (body["width"], body["height"]) == sent


async def test_sibling_hosts_under_the_provider_domain_are_trusted(http):
    provider = BflImageProvider(upstream(http, "bfl"), api_key="k", base_url="https://api.bfl.ai")
    assert provider._trusted(httpx.URL("https://api.us1.bfl.ai/v1/get_result?id=1"))
    assert provider._trusted(httpx.URL("https://api.bfl.ai/v1/get_result?id=1"))
    assert not provider._trusted(httpx.URL("http://api.us1.bfl.ai/v1/get_result?id=1"))
    assert not provider._trusted(httpx.URL("https://bfl.ai.evil.example/v1/get_result?id=1"))
    assert not provider._trusted(httpx.URL("https://collector.example.net/v1/get_result?id=1"))
