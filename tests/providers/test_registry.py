"""The provider registry: which providers are enabled, with which key, built as which adapter."""

from __future__ import annotations

import logging

import httpx
import pytest

from server.catalog import ModelSpec
from server.config import Settings
from server.providers import build_provider, enabled_providers, provider_api_key, provider_key_setting
from server.providers.bfl import BflImageProvider
from server.providers.google import GoogleImageProvider
from server.providers.openai import OpenAIImageProvider
from server.providers.stability import StabilityImageProvider
from tests.fakes.openai_fake import start_openai_fake
from tests.providers.support import SPECS

PROVIDER_VARIABLES = (
    "IMAGEGW_OPENAI_API_KEY", "OPENAI_API_KEY", "IMAGEGW_GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY",
    "IMAGEGW_STABILITY_API_KEY", "STABILITY_API_KEY", "IMAGEGW_BFL_API_KEY", "BFL_API_KEY",
)


@pytest.fixture(autouse=True)
def no_provider_keys(monkeypatch):
    for name in PROVIDER_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def compat_row(**overrides: object) -> ModelSpec:
    row = {
        "id": "flux-schnell", "provider": "together", "upstream_model": "black-forest-labs/FLUX.1-schnell",
        "base_url": "https://api.together.xyz/v1", "api_key_env": "TOGETHER_API_KEY", "sizes": ["1024x1024"],
        "prices": {"*": {"*": 3000}},
    } | overrides
    return ModelSpec.model_validate(row)


def test_only_local_is_enabled_without_keys():
    assert enabled_providers(Settings(), SPECS, environ={}) == {"local"}


def test_a_provider_with_a_key_is_enabled_and_conventional_names_work(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-from-gemini-var")
    settings = Settings(openai_api_key="sk-1", stability_api_key="sk-2", bfl_api_key="bfl-3")
    assert enabled_providers(settings, SPECS, environ={}) == {"local", "openai", "google", "stability", "bfl"}
    assert provider_api_key("google", settings) == "AIza-from-gemini-var"
    assert provider_api_key("openai", settings) == "sk-1"
    assert provider_api_key("nobody", settings) is None


def test_compatible_hosts_take_their_key_from_their_own_variable():
    rows = [*SPECS, compat_row()]
    assert "together" not in enabled_providers(Settings(), rows, environ={})
    assert "together" in enabled_providers(Settings(), rows, environ={"TOGETHER_API_KEY": "tg-1"})
    assert provider_api_key("together", Settings(), compat_row(), environ={"TOGETHER_API_KEY": "tg-1"}) == "tg-1"
    assert provider_api_key("relay", Settings(), compat_row(provider="relay", api_key_env=None), environ={}) == ""
    assert provider_key_setting("together", compat_row()) == "TOGETHER_API_KEY"
    assert provider_key_setting("stability") == "IMAGEGW_STABILITY_API_KEY"


def test_a_provider_is_enabled_only_when_every_row_has_its_key():
    rows = [*SPECS, compat_row(), compat_row(id="other", base_url="https://elsewhere/v1", api_key_env="OTHER_KEY")]
    assert "together" not in enabled_providers(Settings(), rows, environ={"TOGETHER_API_KEY": "tg-1"})
    environ = {"TOGETHER_API_KEY": "tg-1", "OTHER_KEY": "o-2"}
    assert "together" in enabled_providers(Settings(), rows, environ=environ)


def test_a_built_in_name_with_a_base_url_falls_back_to_its_own_key():
    row = compat_row(provider="openai", api_key_env=None, base_url="https://proxy.example/v1")
    assert provider_api_key("openai", Settings(openai_api_key="sk-own"), row) == "sk-own"
    assert provider_api_key("openai", Settings(), row) is None


@pytest.mark.parametrize(
    ("provider", "kind"),
    [("openai", OpenAIImageProvider), ("google", GoogleImageProvider), ("stability", StabilityImageProvider), ("bfl", BflImageProvider)],
)
async def test_build_provider_gives_each_adapter(provider, kind):
    settings = Settings(openai_api_key="a", google_api_key="b", stability_api_key="c", bfl_api_key="d")
    spec = next(s for s in SPECS if s.provider == provider)  # the composition root passes each model's row
    async with httpx.AsyncClient() as http:
        assert isinstance(build_provider(provider, settings=settings, http=http), kind)
        built = build_provider(provider, settings=settings, http=http, spec=spec)
    assert isinstance(built, kind) and built.name == provider


async def test_build_provider_refuses_unconfigured_and_unknown_providers():
    async with httpx.AsyncClient() as http:
        with pytest.raises(ValueError, match="IMAGEGW_BFL_API_KEY"):
            build_provider("bfl", settings=Settings(), http=http)
        with pytest.raises(ValueError):
            build_provider("replicate", settings=Settings(), http=http)


async def test_a_built_openai_provider_talks_to_the_configured_base_url(image_request, deadline):
    async with start_openai_fake() as fake, httpx.AsyncClient() as http:
        settings = Settings(openai_api_key=fake.api_key, openai_base_url=fake.base_url)
        provider = build_provider("openai", settings=settings, http=http)
        result = await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))
        assert len(result.images) == 1


async def test_a_compatible_host_is_built_with_its_dialect(image_request, deadline, caplog):
    async with start_openai_fake(dialect="together") as fake, httpx.AsyncClient() as http:
        spec = compat_row(base_url=fake.base_url)
        provider = build_provider("together", settings=Settings(), http=http, spec=spec, environ={"TOGETHER_API_KEY": "wrong"})
        assert isinstance(provider, OpenAIImageProvider) and provider.dialect == "together"
        with caplog.at_level(logging.ERROR), pytest.raises(Exception):
            await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))
        assert "TOGETHER_API_KEY" in caplog.records[-1].getMessage()
