"""The provider registry: every built-in upstream provider is one entry of ``PROVIDERS``.

An entry holds all the gateway needs to know about a provider besides its adapter module:
its name, the vendor's conventional key variables, its default base URL, where its adapter
class lives, and how long its rate limits last when it does not say. Everything else is
derived from the entry:

* its settings (``server.config.Settings.providers``): the key from ``IMAGEGW_<NAME>_API_KEY``,
  then the vendor's variables (first set wins), and ``IMAGEGW_<NAME>_BASE_URL``;
* whether it is enabled: when its key is set (``local`` needs none and always is);
* its adapter, on one pooled client wrapped in ``UpstreamHttp`` (bounded reads, retries
  within the deadline, the key variable named when the provider refuses our credentials).
  Adapter modules are imported only when built.

A catalog row that names a ``base_url`` is an OpenAI-compatible host: its ``provider`` is an
operator-chosen name (``xai`` and ``together`` select those hosts' documented dialects,
``openai`` the OpenAI rules, any other name plain OpenAI-compatible) and its key is read
from the environment variable ``api_key_env`` (without one: a built-in provider's own key,
else no auth). A provider is enabled only when every catalog row naming it has its key.

The composition root builds one adapter, on one pooled client, per distinct
``(provider, base_url, api_key_env)``; ``create_http_client`` is in ``server.providers.http``::

    http = await stack.enter_async_context(create_http_client())
    provider = build_provider(spec.provider, settings=settings, http=http, spec=spec)
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, cast

if TYPE_CHECKING:
    # Type-only: server.catalog imports server.providers.base, and server.config imports
    # this module, so importing either here would be circular.
    from server.catalog import ModelSpec
    from server.config import Settings
    from server.providers.base import AdapterFactory, ImageProvider
    from server.providers.gate import AnswerGate
    from server.providers.http import UpstreamClient

__all__ = [
    "LOCAL",
    "PROVIDERS",
    "ProviderEntry",
    "build_provider",
    "enabled_providers",
    "provider_api_key",
    "provider_key_setting",
]

LOCAL = "local"
# Dialects of the OpenAI adapter that a compatible host's provider name selects.
COMPATIBLE_DIALECTS = ("openai", "xai", "together")


@dataclass(frozen=True, slots=True)
class ProviderEntry:
    """One built-in provider: everything but its wire format (which is its adapter's)."""

    name: str
    # "module:Class", imported when first built. The class is an ``AdapterFactory``:
    # ``Class(http: UpstreamHttp, *, api_key: str, base_url: str)``.
    adapter: str
    default_base_url: str
    # The variables the vendor's own SDK reads, accepted after IMAGEGW_<NAME>_API_KEY.
    vendor_key_variables: tuple[str, ...] = ()
    # Seconds to wait after a 429 that names no wait; None: exponential backoff.
    rate_limit_delay: float | None = None

    @property
    def key_variables(self) -> tuple[str, ...]:
        """Every variable that may hold the key, in the order they are tried."""
        return (f"IMAGEGW_{self.name.upper()}_API_KEY", *self.vendor_key_variables)

    @property
    def key_setting(self) -> str:
        """The variable the operator is told to set (or fix)."""
        return self.key_variables[0]

    @property
    def base_url_variable(self) -> str:
        return f"IMAGEGW_{self.name.upper()}_BASE_URL"

    def load(self) -> AdapterFactory:
        """The adapter class, importing its module."""
        module, _, name = self.adapter.partition(":")
        return cast("AdapterFactory", getattr(importlib.import_module(module), name))


PROVIDERS: Mapping[str, ProviderEntry] = {
    entry.name: entry
    for entry in (
        # The base URL includes the version, as the OpenAI SDK takes it.
        ProviderEntry(
            "openai", "server.providers.openai:OpenAIImageProvider", "https://api.openai.com/v1", ("OPENAI_API_KEY",)
        ),
        # The host, as google-genai takes it; the adapter adds /v1beta.
        ProviderEntry(
            "google",
            "server.providers.google:GoogleImageProvider",
            "https://generativelanguage.googleapis.com",
            ("GEMINI_API_KEY", "GOOGLE_API_KEY"),
        ),
        # A 429 carries no Retry-After: Stability times the key out for 60 s.
        ProviderEntry(
            "stability",
            "server.providers.stability:StabilityImageProvider",
            "https://api.stability.ai",
            ("STABILITY_API_KEY",),
            rate_limit_delay=60.0,
        ),
        ProviderEntry("bfl", "server.providers.bfl:BflImageProvider", "https://api.bfl.ai", ("BFL_API_KEY",)),
    )
}


def provider_key_setting(provider: str, spec: ModelSpec | None = None) -> str:
    """The environment variable that enables ``provider`` (for the start-up log)."""
    if spec is not None and spec.base_url and spec.api_key_env:
        return spec.api_key_env
    if provider in PROVIDERS:
        return PROVIDERS[provider].key_setting
    return "(no key needed)" if spec is not None and spec.base_url else "(unknown provider)"


def provider_api_key(
    provider: str,
    settings: Settings,
    spec: ModelSpec | None = None,
    *,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The key ``provider`` authenticates with; None when it is not configured (disabled).

    ``""`` means enabled without a key (``local``, or a compatible host with neither an
    ``api_key_env`` nor a built-in key). ``environ`` defaults to the process environment.
    """
    if spec is not None and spec.base_url and spec.api_key_env is not None:
        return (os.environ if environ is None else environ).get(spec.api_key_env) or None
    if provider == LOCAL:
        return ""
    if provider in PROVIDERS:
        key = settings.providers[provider].api_key
        return key.get_secret_value() if key is not None and key.get_secret_value() else None
    if spec is not None and spec.base_url:
        return ""  # an operator's host that needs no key
    return None


def enabled_providers(
    settings: Settings,
    specs: Iterable[ModelSpec],
    *,
    environ: Mapping[str, str] | None = None,
) -> set[str]:
    """Provider names this server can call: ``local`` plus each one whose every row has a key."""
    rows = list(specs)
    enabled = {LOCAL}
    for provider in {spec.provider for spec in rows}:
        mine = [spec for spec in rows if spec.provider == provider]
        if all(provider_api_key(provider, settings, spec, environ=environ) is not None for spec in mine):
            enabled.add(provider)
    return enabled


def build_provider(
    provider: str,
    *,
    settings: Settings,
    http: UpstreamClient,
    spec: ModelSpec | None = None,
    environ: Mapping[str, str] | None = None,
    on_retry: Callable[[], None] | None = None,
    gate: AnswerGate | None = None,
) -> ImageProvider:
    """The adapter for ``provider`` on the injected client; imports its module lazily.
    ``on_retry`` is called for every retried upstream call (a metric counts them);
    ``gate`` bounds the large answers in memory (one per process, shared by all).

    ``spec`` is the model's catalog row (needed for OpenAI-compatible hosts: its
    ``base_url`` and ``api_key_env``). ``local`` is not built here (the composition root
    owns the renderer's workers). Raises ValueError for an unknown or unconfigured provider.
    """
    from server.providers.http import RetryPolicy, UpstreamHttp

    entry = PROVIDERS.get(provider)
    compatible = spec is not None and bool(spec.base_url)
    if entry is None and not compatible:
        raise ValueError(f"unknown provider {provider!r}")
    key = provider_api_key(provider, settings, spec, environ=environ)
    if key is None:
        raise ValueError(f"provider {provider!r} is not configured; set {provider_key_setting(provider, spec)}")
    upstream = UpstreamHttp(
        http,
        provider=provider,
        max_response_bytes=settings.max_upstream_response_bytes,
        # A compatible host speaks OpenAI's protocol, whatever built-in name it borrows.
        retry=RetryPolicy(rate_limit_delay=None if compatible or entry is None else entry.rate_limit_delay),
        key_setting=provider_key_setting(provider, spec),
        on_retry=on_retry,
        gate=gate,
        fan_out_width=settings.tuning.fan_out_width,
    )
    if compatible:
        assert spec is not None and spec.base_url is not None
        from server.providers.openai import OpenAIImageProvider

        dialect = provider if provider in COMPATIBLE_DIALECTS else "compatible"
        return OpenAIImageProvider(upstream, api_key=key, base_url=spec.base_url, dialect=dialect)
    assert entry is not None
    return entry.load()(upstream, api_key=key, base_url=settings.providers[provider].base_url)
