"""Where filesystem events and walk findings go: phase 1 candidates, moves, missing rows.

The watcher's events and the walker's findings arrive on two bounded queues; the loop drains
a bounded number of each per turn through here. An event is a hint (it may be stale by the
time it is read, so every decision is made again from a fresh ``lstat`` in phase 1); a walk
is the truth, but a walk that found a root it must not read reports it instead of marking
the rows under it missing. The watcher's own state (events lost, roots gone or back) turns
into walks here too. What the loop itself must do is returned: whether rows that waited under
a root that came back may be claimed now.
"""

from __future__ import annotations

import os
import queue

from photoscand.catalog import Catalog
from photoscand.clock import Clock
from photoscand.ingest import Ingest
from photoscand.log import display_path, get_logger, one_file
from photoscand.metrics import Metrics
from photoscand.roots import RootAvailability
from photoscand.scanner import (
    RootProblem,
    Unmounted,
    Vanished,
    WalkDone,
    WalkItem,
    WalkOutput,
    WalkSchedule,
    relative_parts_ignored,
)
from photoscand.watcher import FsEvent, WatchCheck, Watcher

# The kind of condition the watch limit is in the catalog (see Catalog.set_conditions).
WATCH_LIMIT = "watch_limit"
# Work done per loop turn before pipes and signals are looked at again.
DRAIN_PER_TURN = 512
# A catalog whose disk is full holds its writes in memory; past this many, events stay
# queued (and are dropped when the queue is full: a walk catches up).
BACKLOG_LIMIT = 100_000


class Router:
    """Drains the event and walk queues into phase 1 and the catalog.

    Args:
        ingest: phase 1 (candidates to settle and parse).
        catalog: the daemon's catalog (moves and missing rows are written directly).
        roots: the watched roots and their availability.
        walks: where walks are asked for.
        metrics: event and walk figures.
        clock: wall time, to tell a file modified moments ago.
    """

    def __init__(
        self,
        ingest: Ingest,
        catalog: Catalog,
        roots: RootAvailability,
        walks: WalkSchedule,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.ingest = ingest
        self.catalog = catalog
        self.roots = roots
        self.walks = walks
        self.metrics = metrics
        self.clock = clock
        self.log = get_logger("routing")
        self._folders_known = 0  # folders the last walk found under the roots
        self._watch_limit_told = False

    def drain_events(self, events: queue.Queue[FsEvent], now: float) -> None:
        if self.catalog.backlog_size > BACKLOG_LIMIT:
            return
        for _ in range(DRAIN_PER_TURN):
            try:
                event = events.get_nowait()
            except queue.Empty:
                return
            self.metrics.watch_events.labels(event.kind).inc()
            with one_file(self.log, event.path, f"a {event.kind} event"):
                self._route_event(event, now)

    def _route_event(self, event: FsEvent, now: float) -> None:
        ingest, catalog = self.ingest, self.catalog
        kind = event.kind
        if kind == "created":
            ingest.created(event.path, now)
        elif kind == "closed":
            ingest.complete(event.path, "event", now)
        elif kind == "modified":
            ingest.modified(event.path, now)
        elif kind == "deleted":
            ingest.forget(event.path)
            catalog.mark_missing(event.path, "the file was deleted or moved out")
        elif kind == "moved" and event.dest is not None:
            self._moved(event.path, event.dest, now)
        elif kind == "dir_moved" and event.dest is not None:
            count = catalog.move_tree(event.path, event.dest)
            if count:
                self.log.info(
                    "folder moved",
                    path=display_path(event.dest),
                    was=display_path(event.path),
                    images=count,
                )
        elif kind == "dir_deleted":
            if event.path.rstrip(b"/") in self.roots.roots:
                self.roots.report(event.path, "the watched folder was deleted or moved away")
            elif os.path.lexists(event.path):
                # Still there: a filesystem unmounted from it, not a deletion. The walk
                # tells which rows wait for it.
                self.walks.request("root", self.roots.holding(event.path))
            else:
                catalog.mark_tree_missing(event.path, "the folder was deleted or moved out")

    def _moved(self, src: bytes, dest: bytes, now: float) -> None:
        self.ingest.forget(src)
        if relative_parts_ignored(dest, self.roots.roots):
            # Renamed to a hidden or temporary name: gone from the photos' view.
            self.catalog.mark_missing(src, "renamed to a hidden or temporary name")
            return
        moved = self.catalog.move(src, dest)
        if moved is not None:
            self.log.debug("file moved", path=display_path(dest), was=display_path(src), id=moved)
        # Also the atomic temp-then-rename: the temporary name had no row.
        self.ingest.complete(dest, "event", now)

    def drain_walks(self, output: queue.Queue[WalkOutput], now: float) -> bool:
        """Findings of the walks, up to a turn's worth. True when a walk that ended found
        roots back whose waiting rows may be claimed now."""
        resumed = False
        wall = self.clock.wall()
        for _ in range(DRAIN_PER_TURN):
            if self.ingest.depths()["metadata"] > 4 * DRAIN_PER_TURN:
                break  # phase 1 is behind: let the walk wait (it blocks on its queue)
            try:
                item = output.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, WalkItem):
                with one_file(self.log, item.stat.path, "a file found by a walk"):
                    self._walked_file(item, now, wall)
            elif isinstance(item, Vanished):
                if not os.path.lexists(item.path):
                    self.catalog.mark_missing(item.path, "the file is gone (found by a walk)")
            elif isinstance(item, RootProblem):
                self.roots.unread_by_walk(item.root, item.message)
            elif isinstance(item, Unmounted):
                self.roots.unread_by_walk(item.folder, item.message)
            else:
                resumed |= self._walk_done(item, now)
        return resumed

    def _walk_done(self, done: WalkDone, now: float) -> bool:
        self.walks.finished(done, now)
        if set(done.roots) >= set(self.roots.roots):
            self._folders_known = done.directories
        self.metrics.walks.labels(done.reason).inc()
        self.metrics.last_walk_completed.set(self.clock.wall())
        self.metrics.walk_duration.set(done.seconds)
        self.metrics.watched_directories.set(done.directories)
        self.log.info(
            "walk finished",
            reason=done.reason,
            files=done.files,
            folders=done.directories,
            changed=done.reported,
            seconds=round(done.seconds, 3),
            unreadable=done.errors[:5],
        )
        return self.roots.walk_finished(done.roots)

    def watcher_checked(self, check: WatchCheck) -> bool:
        """Act on a look at the watcher. True when a root came back whose waiting rows may
        be claimed now."""
        self.metrics.watch_events_dropped.inc(check.dropped)
        self.metrics.watch_overflows.inc(check.overflows)
        if check.events_lost:
            self.log.warning(
                "filesystem events were lost; walking the roots to catch up",
                dropped=check.dropped,
                overflows=check.overflows,
            )
            if not self.walks.pending:
                self.walks.request("overflow")
        if check.observer_restarted:
            self.log.error("filesystem observer died; restarted it, walking the roots")
            self.metrics.observer_restarts.inc()
            self.walks.request("restart")
        for root in check.gone:
            self.roots.report(root, "the watched folder is missing or unmounted")
        resumed = False
        for root in check.back:
            resumed |= self.roots.is_reported(root) and self.roots.back(root)
            self.walks.request("root", (root,))
        if check.watches is not None:
            self.metrics.watches.set(check.watches)
        self._watch_limit(check)
        return resumed

    def _watch_limit(self, check: WatchCheck) -> None:
        """Say once, with the numbers, that the watch limit leaves folders unwatched (and
        once that it no longer does), as the log, a gauge and a condition for ``status``."""
        limited = check.watch_limited
        if limited == self._watch_limit_told or (limited and not self._folders_known):
            return  # unchanged, or no walk yet has counted the folders
        self._watch_limit_told = limited
        self.metrics.watch_limit_reached.set(1 if limited else 0)
        if not limited:
            self.log.info("every watched folder is watched again")
            self.catalog.set_conditions(WATCH_LIMIT, {}, self.clock.wall())
            return
        limit = Watcher.watch_limit()
        interval = self.walks.interval
        message = (
            f"inotify watch limit reached: {limit} watches allowed (fs.inotify.max_user_watches,"
            f" or user.max_inotify_watches in a container), {check.watches or 0} watched, and"
            f" the watched folders hold {self._folders_known} folders; files in unwatched"
            f" folders are found only by the walks (every {interval:g} s): raise the limit or"
            " shorten watch.rescan_interval_seconds"
        )
        self.log.warning(message, limit=limit, watched=check.watches, folders=self._folders_known)
        self.catalog.set_conditions(WATCH_LIMIT, {"": message}, self.clock.wall())

    def _walked_file(self, item: WalkItem, now: float, wall: float) -> None:
        path = item.stat.path
        if wall - item.stat.mtime_ns / 1e9 < self.ingest.settle_seconds:
            # Modified moments ago: maybe still being written, and a walk sees no close
            # event. It must hold still first, like a file only "created".
            self.ingest.created(path, now, "walk", item.reason)
        else:
            self.ingest.complete(path, "walk", now, walk_reason=item.reason)
