"""Filesystem events from watchdog, turned into hints on a bounded queue.

Events are hints, walks are the truth: the kernel drops events when its queue
overflows, watches on new subfolders can fail silently, and network filesystems send
nothing. So this module only reports what it saw and when it may have missed
something; the scanner's walks make the catalog right.

Hazards: an exception in a watchdog handler kills the observer thread for good, so the
handler only enqueues, inside a catch-all, and never blocks (a full queue drops the
event and asks for a walk). The observer and its per-root emitters are checked for
liveness by the daemon's loop and restarted when they die.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from watchdog.events import (
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

# What the daemon acts on. Opened and closed-without-write events are left out: they are
# noise (our own reads produce them) and narrow the inotify mask. Modified (a write, or an
# attribute change: chmod, utime) is kept for files changed in place without a close
# (truncate(2), a writer that keeps the file open) and for permissions fixed after a copy;
# a burst of writes to one file is reported once (see Watcher._put).
EVENT_FILTER = [
    FileCreatedEvent,
    FileClosedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

_EVENT_KINDS: dict[type, str] = {
    FileCreatedEvent: "created",
    FileClosedEvent: "closed",
    FileModifiedEvent: "modified",
    FileMovedEvent: "moved",
    FileDeletedEvent: "deleted",
    DirMovedEvent: "dir_moved",
    DirDeletedEvent: "dir_deleted",
}


@dataclass(frozen=True, slots=True)
class FsEvent:
    """One filesystem event: ``kind`` is created, closed, modified, moved, deleted,
    dir_moved or dir_deleted; ``dest`` is set for moves; ``at`` is the monotonic time it
    arrived."""

    kind: str
    path: bytes
    dest: bytes | None
    at: float


def _as_bytes(path: bytes | str) -> bytes:
    return path if isinstance(path, bytes) else os.fsencode(path)


class _Handler(FileSystemEventHandler):
    """Puts events on the queue. Must never raise and never block (see module doc)."""

    def __init__(self, watcher: Watcher) -> None:
        self._watcher = watcher

    def on_any_event(self, event: FileSystemEvent) -> None:
        # An exception here would kill watchdog's thread for good (see module doc); an
        # event that cannot be put is lost like a dropped one, and the walks catch up.
        with contextlib.suppress(Exception):
            kind = _EVENT_KINDS.get(type(event))
            if kind is None:
                return
            dest = _as_bytes(event.dest_path) if event.dest_path else None
            self._watcher._put(FsEvent(kind, _as_bytes(event.src_path), dest, time.monotonic()))


class _OverflowLog(logging.Handler):
    """watchdog reports kernel queue overflows only as a log warning; catch it."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__(level=logging.WARNING)
        self._on_overflow = on_overflow

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if "overflow" in record.getMessage().lower():
                self._on_overflow()


@dataclass(frozen=True, slots=True)
class WatchCheck:
    """What the daemon's loop must do after a look at the watcher."""

    events_lost: bool  # the queue or the kernel dropped events: walk to catch up
    observer_restarted: bool  # the observer thread died and was replaced: walk
    back: tuple[bytes, ...] = ()  # roots watched again (walk them)
    gone: tuple[bytes, ...] = ()  # roots that went away (report them)
    dropped: int = 0  # events dropped on the full queue since the last check
    overflows: int = 0  # kernel queue overflows since the last check
    watches: int | None = None  # inotify watches held now (None: not inotify, or not looked)
    watch_limited: bool = False  # a root is not watched: the inotify watch limit is reached


# How often the observer and the roots are looked at (events lost are handled at once).
CHECK_INTERVAL_SECONDS = 2.0


@dataclass(slots=True)
class _Root:
    path: bytes
    watch: ObservedWatch | None = None
    identity: tuple[int, int] | None = None  # (st_dev, st_ino) when scheduled
    available: bool = True
    problem: str = ""


class Watcher:
    """Watches every root recursively and reports events on ``events``.

    Args:
        roots: absolute folder paths.
        events: the bounded queue the daemon drains.
        polling: use the polling observer (NFS/SMB, where inotify sees nothing).
        wake: called after each enqueued event, to wake the daemon's loop.
        polling_interval: seconds between polls of the whole tree (polling only).
    """

    def __init__(
        self,
        roots: Sequence[str],
        events: queue.Queue[FsEvent],
        *,
        polling: bool = False,
        wake: Callable[[], None] = lambda: None,
        polling_interval: float = 2.0,
    ) -> None:
        self.events = events
        self.polling = polling
        self.polling_interval = polling_interval
        self._wake = wake
        self._roots = [_Root(_as_bytes(os.path.abspath(r))) for r in roots]
        self._observer: BaseObserver | None = None
        self.dropped = 0  # events lost because the queue was full (read by the daemon)
        self.overflows = 0  # kernel queue overflows (read by the daemon)
        self.walk_wanted = threading.Event()  # set when events may have been lost
        self._checked_at = -math.inf
        self._last_modified: bytes | None = None
        # Roots that exist but could not be watched: the inotify watch limit was reached.
        self.watch_limited: set[bytes] = set()
        self._overflow_log = _OverflowLog(self._overflowed)
        logging.getLogger("watchdog").addHandler(self._overflow_log)

    # -- handler side (watchdog's thread) -------------------------------------------

    def _put(self, event: FsEvent) -> None:
        # A copy writes a file in many chunks, each a modify event: one per burst is enough
        # (the file settles before it is read). Per emitter thread, one path at a time.
        if event.kind == "modified" and event.path == self._last_modified:
            return
        self._last_modified = event.path if event.kind == "modified" else None
        try:
            self.events.put_nowait(event)
        except queue.Full:
            self.dropped += 1
            self.walk_wanted.set()
        self._wake()

    def _overflowed(self) -> None:
        self.overflows += 1
        self.walk_wanted.set()
        self._wake()

    # -- daemon side -------------------------------------------------------------------

    def start(self) -> list[bytes]:
        """Start the observer; returns the roots that could not be watched."""
        self._observer = self._new_observer()
        self._observer.start()
        return [root.path for root in self._roots if not self._schedule(root)]

    def _new_observer(self) -> BaseObserver:
        if self.polling:
            return PollingObserver(timeout=self.polling_interval)
        from watchdog.observers.inotify import InotifyObserver

        # Explicitly inotify: watchdog's generic Observer silently falls back to
        # polling when inotify is unavailable, which must be a visible decision.
        return InotifyObserver()

    def _schedule(self, root: _Root) -> bool:
        assert self._observer is not None
        try:
            st = os.stat(root.path)
            if not os.path.isdir(root.path):
                raise NotADirectoryError(f"{os.fsdecode(root.path)} is not a folder")
            root.watch = self._observer.schedule(
                _Handler(self),
                root.path,
                recursive=True,
                event_filter=EVENT_FILTER,
            )
        except OSError as exc:
            root.watch = None
            if exc.errno == errno.ENOSPC:
                # The folder is fine, the walks read it; only its events are missing.
                self.watch_limited.add(root.path)
                return True
            root.available = False
            root.problem = exc.strerror or str(exc)
            return False
        self.watch_limited.discard(root.path)
        root.identity = (st.st_dev, st.st_ino)
        root.available = True
        root.problem = ""
        return True

    def stop(self) -> None:
        observer, self._observer = self._observer, None
        if observer is not None:
            with contextlib.suppress(Exception):
                observer.stop()
                observer.join(timeout=5)
        logging.getLogger("watchdog").removeHandler(self._overflow_log)

    def check(self, now: float) -> WatchCheck | None:
        """Look at the watcher: at once when events were lost, and every
        CHECK_INTERVAL_SECONDS for a dead observer (replaced here), roots that went away or
        came back, and the count of watches. None when there is nothing to look at yet."""
        lost = self.walk_wanted.is_set()
        self.walk_wanted.clear()
        due = now - self._checked_at >= CHECK_INTERVAL_SECONDS
        if not (lost or due):
            return None
        # Incremented by watchdog's thread; a count lost to this race is only a count.
        dropped, self.dropped = self.dropped, 0
        overflows, self.overflows = self.overflows, 0
        if not due:
            return WatchCheck(lost, False, dropped=dropped, overflows=overflows)
        self._checked_at = now
        if not self.observer_alive():
            self.restart()
            return WatchCheck(lost, True, dropped=dropped, overflows=overflows)
        back, gone = self.check_roots()
        return WatchCheck(
            lost,
            False,
            tuple(back),
            tuple(gone),
            dropped,
            overflows,
            self.watch_count(),
            bool(self.watch_limited),
        )

    def observer_alive(self) -> bool:
        """True while the observer's own thread runs (emitters are checked per root)."""
        return self._observer is not None and self._observer.is_alive()

    def alive(self) -> bool:
        """True when the observer thread and every available root's emitter run."""
        observer = self._observer
        if observer is None or not observer.is_alive():
            return False
        emitters = {e.watch: e for e in list(observer.emitters)}
        for root in self._roots:
            if root.available and root.watch is not None:
                emitter = emitters.get(root.watch)
                if emitter is None or not emitter.is_alive():
                    return False
        return True

    def restart(self) -> None:
        """Replace a dead observer (the daemon walks afterwards to catch up)."""
        old, self._observer = self._observer, None
        if old is not None:
            with contextlib.suppress(Exception):
                old.stop()
        for root in self._roots:
            root.watch = None
        self._observer = self._new_observer()
        self._observer.start()
        for root in self._roots:
            self._schedule(root)

    def check_roots(self) -> tuple[list[bytes], list[bytes]]:
        """Re-check every root. Returns (roots that came back, roots that went away).

        A root that disappears (deleted, unmounted) loses its watch; when it is back
        (or a different folder was mounted on it), it is watched again and the daemon
        walks it.
        """
        back: list[bytes] = []
        gone: list[bytes] = []
        observer = self._observer
        if observer is None:
            return back, gone
        emitters = {e.watch: e for e in list(observer.emitters)}
        for root in self._roots:
            try:
                st = os.stat(root.path)
                identity: tuple[int, int] | None = (st.st_dev, st.st_ino)
                exists = os.path.isdir(root.path)
            except OSError:
                identity, exists = None, False
            emitter = emitters.get(root.watch) if root.watch is not None else None
            healthy = emitter is not None and emitter.is_alive() and identity == root.identity
            if exists and not healthy:
                if root.watch is not None:
                    with contextlib.suppress(Exception):
                        observer.unschedule(root.watch)
                    root.watch = None
                if self._schedule(root) and root.path not in self.watch_limited:
                    back.append(root.path)
            elif not exists and root.available:
                root.available = False
                root.problem = "missing or unmounted"
                if root.watch is not None:
                    with contextlib.suppress(Exception):
                        observer.unschedule(root.watch)
                    root.watch = None
                gone.append(root.path)
        return back, gone

    def unavailable(self) -> dict[bytes, str]:
        """Roots that cannot be watched now, with why."""
        return {r.path: r.problem for r in self._roots if not r.available}

    @staticmethod
    def watch_limit() -> int | None:
        """How many inotify watches this user may hold: the lower of the system's limit and
        the user namespace's (None when neither can be read)."""
        limits = []
        for name in ("/proc/sys/fs/inotify/max_user_watches", "/proc/sys/user/max_inotify_watches"):
            with contextlib.suppress(OSError, ValueError), open(name) as fh:
                limits.append(int(fh.read()))
        return min(limits) if limits else None

    @staticmethod
    def watch_count() -> int | None:
        """inotify watches this process holds (None when not using inotify)."""
        total = 0
        found = False
        try:
            fds = os.listdir("/proc/self/fd")
        except OSError:
            return None
        for fd in fds:
            try:
                if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:inotify":
                    continue
                with open(f"/proc/self/fdinfo/{fd}", "rb") as fh:
                    total += sum(1 for line in fh if line.startswith(b"inotify wd:"))
                found = True
            except OSError:
                continue
        return total if found else None
