"""The gauges that come from the catalog, and systemd's status line, refreshed together.

Counting the catalog's rows is a query, so it runs every REFRESH_SECONDS, not on every turn
of the loop; the status line sent to systemd says the same as the gauges.
"""

from __future__ import annotations

import queue
from typing import Any

from photoscand.catalog import Catalog
from photoscand.clock import Clock
from photoscand.commits import Committer
from photoscand.ingest import Ingest
from photoscand.metrics import Metrics
from photoscand.progress import progress_line
from photoscand.roots import RootAvailability
from photoscand.supervisor import Supervisor
from photoscand.systemd import Notifier

REFRESH_SECONDS = 2.0


class Gauges:
    """Refreshes the catalog's gauges and the status line.

    Args:
        catalog, ingest, supervisor, committer, roots: the parts whose state is shown.
        queues: the loop's input queues by name (their depths are exported).
        metrics: where the gauges are.
        notifier: systemd's STATUS.
        clock: wall time for the oldest waiting image's age.
    """

    def __init__(
        self,
        catalog: Catalog,
        ingest: Ingest,
        supervisor: Supervisor,
        committer: Committer,
        roots: RootAvailability,
        queues: dict[str, queue.Queue[Any]],
        metrics: Metrics,
        notifier: Notifier,
        clock: Clock,
    ) -> None:
        self.catalog = catalog
        self.ingest = ingest
        self.supervisor = supervisor
        self.committer = committer
        self.roots = roots
        self.queues = queues
        self.metrics = metrics
        self.notifier = notifier
        self.clock = clock
        self.counts: dict[str, int] = {}
        self._refreshed_at: float | None = None

    def refresh(self, now: float, *, force: bool = False) -> None:
        """Every REFRESH_SECONDS (or now, with ``force``): counts, failures, ages, depths."""
        last = self._refreshed_at
        if not force and last is not None and now - last < REFRESH_SECONDS:
            return
        self._refreshed_at = now
        catalog, metrics = self.catalog, self.metrics
        self.counts = catalog.counts()
        metrics.set_counts(self.counts)
        metrics.set_failure_reasons(catalog.failure_reasons())
        if self.counts["pending"]:
            # Rows may have been queued by another process (`photoscand retry`).
            self.supervisor.wake()
        oldest = catalog.oldest_pending_since()
        metrics.oldest_pending_age.set(max(0.0, self.clock.wall() - oldest) if oldest else 0.0)
        metrics.catalog_wal_bytes.set(catalog.wal_bytes())
        for name, depth in self.ingest.depths().items():
            metrics.queue_depth.labels(name).set(depth)
        for name, waiting in self.queues.items():
            metrics.queue_depth.labels(name).set(waiting.qsize())
        self.notifier.status(self.status_text())

    def status_text(self) -> str:
        """The progress line, and what pauses work or is unavailable."""
        text = progress_line(self.counts)
        if self.supervisor.disk_full_since is not None:
            text += "; paused: thumbnail folder is full"
        if self.committer.full_since is not None:
            text += "; paused: catalog disk is full"
        if self.roots.unavailable:
            text += f"; {self.roots.unavailable} watched folder(s) unavailable"
        return text
