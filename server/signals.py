"""Stopping a supervising process (``imagegw dev``, ``imagegw serve`` with workers) on
SIGTERM or SIGINT: the handler only records the request; the supervisor's loop notices it
and stops its children in the right order."""

from __future__ import annotations

import signal
from types import FrameType

__all__ = ["StopSignals"]


class StopSignals:
    """Installs SIGTERM and SIGINT handlers (call from the main thread); ``requested`` turns
    True when either arrives."""

    def __init__(self) -> None:
        self.requested = False
        signal.signal(signal.SIGTERM, self._request)
        signal.signal(signal.SIGINT, self._request)

    def _request(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
