"""CPU work on large buffers runs off the event loop; small work stays on it.

Parsing, serialising or encoding a few hundred kilobytes takes long enough (a
millisecond and more) to stall every other request on the loop, while handing a tiny
job to a thread costs more than doing it. One threshold decides, for every such job in
the server: JSON and base64 of upstream answers, stored idempotent answers, and the REST
answers the server renders.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

__all__ = ["OFFLOAD_BYTES", "run_sized"]

# Decoding JSON or base64 of this size takes long enough to stall other requests.
OFFLOAD_BYTES = 256 * 1024

T = TypeVar("T")


async def run_sized(size: int, function: Callable[..., T], *args: object) -> T:
    """``function(*args)``, in a worker thread when ``size`` (bytes of input or output)
    is above ``OFFLOAD_BYTES``."""
    if size > OFFLOAD_BYTES:
        return await asyncio.to_thread(function, *args)
    return function(*args)
