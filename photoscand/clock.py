"""The daemon's two clocks, behind one seam so that decision logic can run on a fake one.

``monotonic`` measures intervals (timeouts, settle times, back-off of restarts) and never
jumps; ``wall`` is the unix time that the catalog stores (back-off deadlines, ``queued_at``),
because those must mean the same thing after a restart.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def monotonic(self) -> float: ...

    def wall(self) -> float: ...


class SystemClock:
    """The real clocks."""

    @staticmethod
    def monotonic() -> float:
        return time.monotonic()

    @staticmethod
    def wall() -> float:
        return time.time()
