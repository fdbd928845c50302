"""One info line when a burst of work drains, instead of one per file.

A card copied in, a folder moved in: the daemon catalogs, converts and fails a batch of files
and then has nothing left to do. At the default level it says so once, with the counts and
how long the burst took; the per-file lines stay at debug.
"""

from __future__ import annotations

from typing import Any


class BurstSummary:
    """Counts the work of one burst, from its first row or result until the daemon is idle.

    Args:
        log: where the summary goes (at info).
    """

    def __init__(self, log: Any) -> None:
        self.log = log
        self._started: float | None = None
        self._cataloged = self._converted = self._failed = 0

    @property
    def active(self) -> bool:
        return self._started is not None

    def add(self, now: float, *, cataloged: int = 0, converted: int = 0, failed: int = 0) -> None:
        if not (cataloged or converted or failed):
            return
        if self._started is None:
            self._started = now
        self._cataloged += cataloged
        self._converted += converted
        self._failed += failed

    def drained(self, now: float) -> None:
        """The daemon has nothing left to do: say what the burst did, and start over."""
        if self._started is None:
            return
        seconds = round(now - self._started, 1)
        self.log.info(
            f"work drained: {self._cataloged} cataloged, {self._converted} converted,"
            f" {self._failed} failed in {seconds:g} s",
            cataloged=self._cataloged,
            converted=self._converted,
            failed=self._failed,
            seconds=seconds,
        )
        self._started = None
        self._cataloged = self._converted = self._failed = 0
