"""The provider registry: which adapter serves a catalog ``provider`` name, and whether it can.

A built-in provider (``openai``, ``google``, ``stability``, ``bfl``) is enabled when its key
is configured (``IMAGEGW_<NAME>_API_KEY`` or the vendor's conventional variable, see
``server.config``); ``local`` needs none and is always enabled. A catalog row that names
a ``base_url`` is an OpenAI-compatible host: its ``provider`` is an operator-chosen name
(``xai`` and ``together`` select those hosts' documented dialects, ``openai`` the OpenAI
rules, any other name plain OpenAI-compatible) and its key is read from the environment
variable ``api_key_env`` (without one: a built-in provider's own key, else no auth). A
provider is enabled only when every catalog row naming it has its key. Vendor modules are
imported only when built.

The composition root builds one adapter, on one pooled client, per distinct
``(provider, base_url, api_key_env)``; ``create_http_client`` is in ``server.providers.http``::

    http = await stack.enter_async_context(create_http_client())
    provider = build_provider(spec.provider, settings=settings, http=http, spec=spec)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    # Type-only: server.catalog imports server.providers.base, so importing it here would be circular.
    import httpx
    from pydantic import SecretStr

    from server.catalog import ModelSpec
    from server.config import Settings
    from server.providers.base import ImageProvider

__all__ = [
    "BUILTIN_PROVIDERS",
    "build_provider",
    "enabled_providers",
    "provider_api_key",
    "provider_key_setting",
]

BUILTIN_PROVIDERS = ("openai", "google", "stability", "bfl")
LOCAL = "local"
KEY_SETTINGS = {
    "openai": "IMAGEGW_OPENAI_API_KEY",
    "google": "IMAGEGW_GOOGLE_API_KEY",
    "stability": "IMAGEGW_STABILITY_API_KEY",
    "bfl": "IMAGEGW_BFL_API_KEY",
}


def _secret(value: SecretStr | None) -> str | None:
    return value.get_secret_value() if value is not None and value.get_secret_value() else None


def provider_key_setting(provider: str, spec: ModelSpec | None = None) -> str:
    """The environment variable that enables ``provider`` (for the start-up log)."""
    if spec is not None and spec.base_url and spec.api_key_env:
        return spec.api_key_env
    if provider in KEY_SETTINGS:
        return KEY_SETTINGS[provider]
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
    match provider:
        case "openai":
            return _secret(settings.openai_api_key)
        case "google":
            return _secret(settings.google_api_key)
        case "stability":
            return _secret(settings.stability_api_key)
        case "bfl":
            return _secret(settings.bfl_api_key)
        case "local":
            return ""
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
    http: httpx.AsyncClient,
    spec: ModelSpec | None = None,
    environ: Mapping[str, str] | None = None,
    on_retry: Callable[[], None] | None = None,
) -> ImageProvider:
    """The adapter for ``provider`` on the injected client; imports its module lazily.
    ``on_retry`` is called for every retried upstream call (a metric counts them).

    ``spec`` is the model's catalog row (needed for OpenAI-compatible hosts: its
    ``base_url`` and ``api_key_env``). ``local`` is not built here (the composition root
    owns the renderer's workers). Raises ValueError for an unknown or unconfigured provider.
    """
    key = provider_api_key(provider, settings, spec, environ=environ)
    if key is None:
        raise ValueError(f"provider {provider!r} is not configured; set {provider_key_setting(provider, spec)}")
    limit = settings.max_upstream_response_bytes
    if spec is not None and spec.base_url:
        from server.providers.openai import OpenAIImageProvider

        return OpenAIImageProvider(
            http,
            api_key=key,
            base_url=spec.base_url,
            dialect=provider if provider in ("openai", "xai", "together") else "compatible",
            name=provider,
            max_response_bytes=limit,
            key_setting=provider_key_setting(provider, spec),
            on_retry=on_retry,
        )
    match provider:
        case "openai":
            from server.providers.openai import OpenAIImageProvider

            return OpenAIImageProvider(http, api_key=key, base_url=settings.openai_base_url, max_response_bytes=limit, on_retry=on_retry)
        case "google":
            from server.providers.google import GoogleImageProvider

            return GoogleImageProvider(http, api_key=key, base_url=settings.google_base_url, max_response_bytes=limit, on_retry=on_retry)
        case "stability":
            from server.providers.stability import StabilityImageProvider

            return StabilityImageProvider(
                http, api_key=key, base_url=settings.stability_base_url, max_response_bytes=limit, on_retry=on_retry
            )
        case "bfl":
            from server.providers.bfl import BflImageProvider

            return BflImageProvider(http, api_key=key, base_url=settings.bfl_base_url, max_response_bytes=limit, on_retry=on_retry)
    raise ValueError(f"unknown provider {provider!r}")
