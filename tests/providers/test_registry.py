"""The provider registry: one entry per provider gives its settings, its key lookup and its adapter."""

from __future__ import annotations

import inspect
import logging

import pytest

from server.catalog import ModelSpec
from server.config import Settings
from server.errors import UpstreamError
from server.providers import PROVIDERS, build_provider, enabled_providers, provider_api_key, provider_key_setting
from server.providers.bfl import BflImageProvider
from server.providers.google import GoogleImageProvider
from server.providers.http import create_http_client
from server.providers.openai import OpenAIImageProvider
from server.providers.stability import StabilityImageProvider
from tests.fakes.openai_fake import OpenAIFake
from tests.providers.support import SPECS

# Every variable the registry reads, as the README's tables name them.
VARIABLES = {
    "openai": (("IMAGEGW_OPENAI_API_KEY", "OPENAI_API_KEY"), "IMAGEGW_OPENAI_BASE_URL", "https://api.openai.com/v1"),
    "google": (("IMAGEGW_GOOGLE_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"), "IMAGEGW_GOOGLE_BASE_URL",
               "https://generativelanguage.googleapis.com"),
    "stability": (("IMAGEGW_STABILITY_API_KEY", "STABILITY_API_KEY"), "IMAGEGW_STABILITY_BASE_URL", "https://api.stability.ai"),
    "bfl": (("IMAGEGW_BFL_API_KEY", "BFL_API_KEY"), "IMAGEGW_BFL_BASE_URL", "https://api.bfl.ai"),
}
ADAPTERS = {"openai": OpenAIImageProvider, "google": GoogleImageProvider, "stability": StabilityImageProvider,
            "bfl": BflImageProvider}


@pytest.fixture(autouse=True)
def no_provider_variables(monkeypatch):
    for keys, base_url, _ in VARIABLES.values():
        for name in (*keys, base_url):
            monkeypatch.delenv(name, raising=False)


def compat_row(**overrides: object) -> ModelSpec:
    row = {
        "id": "flux-schnell", "provider": "together", "upstream_model": "black-forest-labs/FLUX.1-schnell",
        "base_url": "https://api.together.xyz/v1", "api_key_env": "TOGETHER_API_KEY", "sizes": ["1024x1024"],
        "prices": {"*": {"*": 3000}},
    } | overrides
    return ModelSpec.model_validate(row)


def test_the_registry_names_exactly_the_documented_variables():
    assert {name: (e.key_variables, e.base_url_variable, e.default_base_url) for name, e in PROVIDERS.items()} == VARIABLES
    assert {name: entry.load() for name, entry in PROVIDERS.items()} == ADAPTERS


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_every_adapter_takes_what_the_registry_gives(name):
    parameters = inspect.signature(PROVIDERS[name].load()).parameters
    assert list(parameters)[:3] == ["http", "api_key", "base_url"]
    assert all(p.default is not inspect.Parameter.empty for p in list(parameters.values())[3:])


@pytest.mark.parametrize("name", list(PROVIDERS))
def test_each_key_variable_enables_its_provider_the_first_set_winning(name, monkeypatch):
    keys, base_url_variable, default = VARIABLES[name]
    assert Settings().providers[name].api_key is None
    assert Settings().providers[name].base_url == default
    for index, variable in reversed(list(enumerate(keys))):
        monkeypatch.setenv(variable.lower() if index else variable, f"key-{index}")  # case does not matter
        assert provider_api_key(name, Settings()) == f"key-{index}"
    monkeypatch.setenv(base_url_variable, "https://proxy.example/v1")
    assert Settings().providers[name].base_url == "https://proxy.example/v1"


def test_an_empty_key_leaves_the_provider_disabled(monkeypatch):
    monkeypatch.setenv("IMAGEGW_OPENAI_API_KEY", "")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-ignored")  # the first variable that is set wins, even empty
    assert provider_api_key("openai", Settings()) is None


def test_constructor_arguments_override_one_field_and_keep_the_rest(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-env")
    settings = Settings(providers={"openai": {"api_key": "sk-arg"}})
    assert provider_api_key("openai", settings) == "sk-arg"
    assert settings.providers["openai"].base_url == "https://api.openai.com/v1"
    assert provider_api_key("google", settings) == "AIza-env"


def test_only_local_is_enabled_without_keys():
    assert enabled_providers(Settings(), SPECS, environ={}) == {"local"}


def test_a_provider_with_a_key_is_enabled(monkeypatch):
    monkeypatch.setenv("GEMINI_API_KEY", "AIza-from-gemini-var")
    settings = Settings(providers={"openai": {"api_key": "sk-1"}, "stability": {"api_key": "sk-2"},
                                   "bfl": {"api_key": "bfl-3"}})
    assert enabled_providers(settings, SPECS, environ={}) == {"local", "openai", "google", "stability", "bfl"}
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
    assert provider_api_key("openai", Settings(providers={"openai": {"api_key": "sk-own"}}), row) == "sk-own"
    assert provider_api_key("openai", Settings(), row) is None


@pytest.mark.parametrize("provider", list(ADAPTERS))
async def test_build_provider_gives_each_adapter_its_settings(provider):
    settings = Settings(providers={name: {"api_key": f"key-{name}"} for name in PROVIDERS})
    spec = next(s for s in SPECS if s.provider == provider)  # the composition root passes each model's row
    async with create_http_client() as http:
        built = build_provider(provider, settings=settings, http=http, spec=spec)
    assert isinstance(built, ADAPTERS[provider]) and built.name == provider
    upstream = built._http  # type: ignore[attr-defined]
    assert (upstream.provider, upstream.key_setting) == (provider, PROVIDERS[provider].key_setting)
    assert upstream.max_response_bytes == settings.max_upstream_response_bytes
    assert upstream.retry.rate_limit_delay == (60.0 if provider == "stability" else None)


async def test_build_provider_refuses_unconfigured_and_unknown_providers():
    async with create_http_client() as http:
        with pytest.raises(ValueError, match="IMAGEGW_BFL_API_KEY"):
            build_provider("bfl", settings=Settings(), http=http)
        with pytest.raises(ValueError, match="unknown provider 'replicate'"):
            build_provider("replicate", settings=Settings(), http=http)


async def test_a_compatible_host_is_built_with_its_dialect_and_names_its_variable(image_request, deadline, caplog):
    async with OpenAIFake.running(dialect="together") as fake, create_http_client() as http:
        spec = compat_row(base_url=fake.base_url)
        provider = build_provider("together", settings=Settings(), http=http, spec=spec, environ={"TOGETHER_API_KEY": "wrong"})
        assert isinstance(provider, OpenAIImageProvider) and provider.dialect == "together"
        assert provider._http.retry.rate_limit_delay is None
        with caplog.at_level(logging.ERROR), pytest.raises(UpstreamError):
            await provider.generate(image_request("gpt-image-1"), deadline=deadline(5))
        assert "TOGETHER_API_KEY" in caplog.records[-1].getMessage()
