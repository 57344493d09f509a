"""Live checks: one small generation per provider through the real adapter and the real API.

Opt-in (``pytest --live``, ``pytest -m live`` or ``IMAGEGW_LIVE_TESTS=1``; see conftest.py),
each skipped unless its provider's key is in the environment: ``OPENAI_API_KEY``,
``GEMINI_API_KEY``, ``STABILITY_API_KEY``, ``BFL_API_KEY`` (or the ``IMAGEGW_*_API_KEY``
names; ``IMAGEGW_*_BASE_URL`` points one at a proxy). Each call uses the adapter exactly as
the server builds it (the registry and the settings read from those variables, the shipped
catalog resolving the request, one pooled client, production retry policy) and costs one image at the model's lowest price: about $0.011 (gpt-image-1,
low), $0.039 (gemini-2.5-flash-image), $0.03 (stable-image-core), $0.04 (flux-pro-1.1).
They prove the wire formats the fakes imitate are still the real ones.
"""

from __future__ import annotations

import asyncio
import io
from typing import Any

import pytest
from PIL import Image

from server.catalog import ModelCatalog, RawImageRequest, load_catalog
from server.providers import build_provider
from server.providers.http import create_http_client
from tests.stack import settings_from

pytestmark = [pytest.mark.live, pytest.mark.timeout(400)]

SPECS = load_catalog()
CATALOG = ModelCatalog(SPECS, enabled_providers={spec.provider for spec in SPECS}, default_model="local-1")


@pytest.mark.parametrize(
    ("provider", "model", "params"),
    [
        ("openai", "gpt-image-1", {"quality": "low", "size": "1024x1024"}),
        ("google", "gemini-2.5-flash-image", {"size": "1024x1024"}),
        ("stability", "stable-image-core", {"size": "1024x1024"}),
        ("bfl", "flux-pro-1.1", {"size": "1024x1024", "output_format": "jpeg"}),
    ],
)
async def test_one_real_image(live_keys: Any, provider: str, model: str, params: dict[str, Any]) -> None:
    settings = settings_from(live_keys.environment(provider))  # read as the server reads them
    quote = CATALOG.resolve(RawImageRequest(prompt="a small red apple on a white table, studio photo", model=model, **params))
    async with create_http_client() as http:
        adapter = build_provider(provider, settings=settings, http=http, spec=quote.spec)
        deadline = asyncio.get_running_loop().time() + quote.spec.timeout_seconds
        result = await adapter.generate(quote.request, deadline=deadline)
        await adapter.aclose()
    assert len(result.images) == 1
    image = result.images[0]
    with Image.open(io.BytesIO(image.data)) as decoded:
        decoded.load()
        assert decoded.format.lower() == image.format
        width, height = decoded.size
    assert width >= 256 and height >= 256
    assert 0.9 <= width / height <= 1.1  # 1024x1024 asked: a square, whatever the provider's pixel count
    if provider == "openai":
        assert (width, height) == (1024, 1024)
        assert result.usage.output_tokens > 0  # GPT image models report token usage
