"""Live checks are opt-in: they call real providers with real keys, and cost real money.

Selected only with ``--live``, ``-m live`` or ``IMAGEGW_LIVE_TESTS=1``; otherwise every
``live`` test is deselected, so a plain ``pytest`` never reaches the network. When opted
in, each provider's test is skipped (with the variable to set) unless its key is present.

``tests/conftest.py`` clears provider keys at session start (so a developer's keys never
leak into the other tests); the keys are read here, at import during collection, before
that fixture runs, and handed to the tests through the ``live_keys`` fixture only.
"""

from __future__ import annotations

import os

import pytest

# Provider -> the variables that may hold its key (the vendor's name first), and its base URL setting.
KEY_VARIABLES = {
    "openai": ("OPENAI_API_KEY", "IMAGEGW_OPENAI_API_KEY"),
    "google": ("GEMINI_API_KEY", "GOOGLE_API_KEY", "IMAGEGW_GOOGLE_API_KEY"),
    "stability": ("STABILITY_API_KEY", "IMAGEGW_STABILITY_API_KEY"),
    "bfl": ("BFL_API_KEY", "IMAGEGW_BFL_API_KEY"),
}
BASE_URL_VARIABLES = {
    "openai": "IMAGEGW_OPENAI_BASE_URL",
    "google": "IMAGEGW_GOOGLE_BASE_URL",
    "stability": "IMAGEGW_STABILITY_BASE_URL",
    "bfl": "IMAGEGW_BFL_BASE_URL",
}
_ENVIRONMENT = dict(os.environ)  # a copy taken before tests/conftest.py cleans the environment


def _live_requested(config: pytest.Config) -> bool:
    markexpr = (config.getoption("markexpr", default="") or "").replace(" ", "")
    return (
        bool(config.getoption("live", default=False))
        or _ENVIRONMENT.get("IMAGEGW_LIVE_TESTS") == "1"
        or ("live" in markexpr and "notlive" not in markexpr)
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if _live_requested(config):
        return
    live = [item for item in items if item.get_closest_marker("live") is not None]
    if live:
        config.hook.pytest_deselected(items=live)
        items[:] = [item for item in items if item.get_closest_marker("live") is None]


class LiveKeys:
    """The real keys and base URLs found in the environment at start-up."""

    def key(self, provider: str) -> str:
        for name in KEY_VARIABLES[provider]:
            if _ENVIRONMENT.get(name):
                return _ENVIRONMENT[name]
        pytest.skip(f"no {provider} key: set {' or '.join(KEY_VARIABLES[provider])} to run this live check")

    def base_url(self, provider: str) -> str | None:
        return _ENVIRONMENT.get(BASE_URL_VARIABLES[provider]) or None


@pytest.fixture(scope="session")
def live_keys() -> LiveKeys:
    return LiveKeys()
