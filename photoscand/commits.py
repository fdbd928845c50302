"""When phase 1's open transaction is committed, and what a full catalog disk does to it.

Writes join one open transaction. It is committed when it holds BATCH_ROWS writes, when it
is BATCH_SECONDS old, or when the daemon has nothing else queued: rows land within
milliseconds when files trickle in, and in large transactions when a whole card is copied
at once. When the catalog's disk is full the catalog holds the writes in memory; they are
tried again every few seconds, and nothing is lost.
"""

from __future__ import annotations

import time

from photoscand.catalog import Catalog
from photoscand.ingest import Ingest
from photoscand.log import get_logger
from photoscand.metrics import Metrics

BATCH_ROWS = 256
BATCH_SECONDS = 0.025
FULL_DISK_PROBE_SECONDS = 5.0


class Committer:
    """Commits the catalog's open batch at the right moments.

    Args:
        catalog: the daemon's catalog.
        ingest: phase 1, told when its rows are committed (for the delay histogram).
        metrics: commit counts and durations, and the disk-full gauge.
    """

    def __init__(self, catalog: Catalog, ingest: Ingest, metrics: Metrics) -> None:
        self.catalog = catalog
        self.ingest = ingest
        self.metrics = metrics
        self.log = get_logger("catalog")
        self.full_since: float | None = None
        self._probe_at = 0.0

    def deadline(self, now: float) -> float | None:
        """When the loop must wake to commit the open batch, or to probe a full disk."""
        if self.full_since is not None:
            return self._probe_at
        if self.catalog.in_transaction:
            return now + max(0.0, BATCH_SECONDS - self.catalog.transaction_age(now))
        return None

    def maybe_commit(self, now: float, *, quiet: bool) -> bool:
        """Commit when the batch is full or old, or the daemon is ``quiet`` (nothing
        queued). Returns True when writes held on a full disk were just committed."""
        catalog = self.catalog
        if catalog.stalled:
            return self._stalled(now)
        if not catalog.in_transaction:
            return False
        if (
            catalog.transaction_size >= BATCH_ROWS
            or catalog.transaction_age(now) >= BATCH_SECONDS
            or quiet
        ):
            self.commit(now)
        return False

    def commit(self, now: float) -> None:
        started = time.perf_counter()
        if self.catalog.commit():
            self.metrics.catalog_commits.inc()
            self.metrics.catalog_commit_duration.observe(time.perf_counter() - started)
            self.ingest.committed(now + time.perf_counter() - started)
        else:
            self._stalled(now)

    def _stalled(self, now: float) -> bool:
        """The catalog's disk is full: hold writes in memory, try again every few seconds."""
        if self.full_since is None:
            self.full_since = now
            self._probe_at = now + FULL_DISK_PROBE_SECONDS
            self.metrics.disk_full.labels("catalog").set(1)
            self.log.error(
                "catalog disk is full; writes are held in memory until space returns",
                catalog=self.catalog.path,
                error=self.catalog.stalled_reason,
            )
            return False
        if now < self._probe_at:
            return False
        self._probe_at = now + FULL_DISK_PROBE_SECONDS
        if not self.catalog.resume():
            return False
        self.log.info("catalog disk has space again; held writes committed")
        self.full_since = None
        self.metrics.disk_full.labels("catalog").set(0)
        return True
