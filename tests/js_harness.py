"""Runs scenarios of the official ``openai`` JavaScript SDK against a running stack.

A scenario is a small ES module (``tests/js/scenarios/*.mjs``, or inline source) whose
default export receives a context (``client()``, ``input``, ``attempt()``, ...; see
``tests/js/run.mjs``) and returns JSON. ``run_js`` starts Node on it and returns what it
returned, so a test asserts on plain data::

    outcome = await run_js(gateway, key, "scenarios/errors.mjs", input={"model": "local-1"})
    outcome = await run_js(gateway, key, source="export default async ({client}) => ...")

The SDK is pinned by ``tests/js/package-lock.json`` and installed by ``make test``
(``npm ci``); this module only checks that it is there.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.stack import ProcessStack

__all__ = ["JS_DIR", "run_js"]

JS_DIR = Path(__file__).resolve().parent / "js"


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not installed: the JavaScript SDK tests need Node.js 18 or later", pytrace=False)
    if not (JS_DIR / "node_modules" / "openai").is_dir():
        pytest.fail("the openai npm package is missing: run `make js-deps` (npm ci in tests/js)", pytrace=False)
    return node


async def run_js(
    stack: ProcessStack,
    api_key: str,
    file: str | None = None,
    *,
    source: str | None = None,
    input: Any = None,
    time_limit: float = 120,
) -> dict[str, Any]:
    """Runs one scenario (a file under tests/js, or inline ``source``) and returns its
    outcome: ``{"ok": True, "result": ...}`` or ``{"ok": False, "error": {...}}``."""
    assert (file is None) != (source is None), "give a scenario file or its source"
    request: dict[str, Any] = {"baseURL": stack.api_base, "apiKey": api_key, "input": input}
    request.update({"file": file} if file is not None else {"source": source})
    process = await asyncio.create_subprocess_exec(
        _node(),
        str(JS_DIR / "run.mjs"),
        cwd=JS_DIR,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(time_limit):
            stdout, stderr = await process.communicate(json.dumps(request).encode())
    except TimeoutError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0 or not stdout.strip():
        raise AssertionError(f"node exited with {process.returncode}: {stderr.decode(errors='replace')}")
    outcome: dict[str, Any] = json.loads(stdout.decode().splitlines()[-1])
    return outcome
