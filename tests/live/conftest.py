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

from server.providers import PROVIDERS

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
    """The provider variables (keys and base URLs, as the registry names them) found in the
    environment at start-up."""

    def environment(self, provider: str) -> dict[str, str]:
        """``provider``'s variables that are set; skips the test when none holds a key."""
        entry = PROVIDERS[provider]
        if not any(_ENVIRONMENT.get(name) for name in entry.key_variables):
            pytest.skip(f"no {provider} key: set {' or '.join(entry.key_variables)} to run this live check")
        names = (*entry.key_variables, entry.base_url_variable)
        return {name: _ENVIRONMENT[name] for name in names if name in _ENVIRONMENT}


@pytest.fixture(scope="session")
def live_keys() -> LiveKeys:
    return LiveKeys()
