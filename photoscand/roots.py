"""Which watched folders are unavailable now, and why.

A watched folder that is missing, unreadable, or empty while the catalog holds images under
it looks like an unmounted disk, and must never be read as "every photo was deleted"; so
must a folder inside it whose filesystem went away (a NAS share under ``photos/nas``, a USB
disk), and a root with another filesystem mounted over it. The watcher, the walks and phase
2 each find such folders; this is where they are recorded, so that one list feeds the log,
the ``photoscand_roots_unavailable`` gauge, systemd's status line and ``photoscand status``
(through the catalog's ``conditions``), and so that the images under a folder that comes
back go ahead at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from photoscand.catalog import Catalog
from photoscand.clock import Clock
from photoscand.log import display_path, get_logger
from photoscand.metrics import Metrics
from photoscand.scanner import RootUnavailable, open_root

# The kind of condition these are in the catalog (see Catalog.set_conditions).
CONDITION = "unavailable"


def _under(path: bytes, folder: bytes) -> bool:
    return path == folder or path.startswith(folder.rstrip(b"/") + b"/")


class RootAvailability:
    """The watched roots, and the folders at or under them that cannot be read now.

    Args:
        roots: the watched roots (absolute, bytes).
        catalog: the daemon's catalog (rows under a folder wait, and resume, there; the
            list is kept there for ``photoscand status``).
        metrics: the gauge of unavailable folders.
        clock: wall time, for when each condition began.
    """

    def __init__(
        self, roots: Sequence[bytes], catalog: Catalog, metrics: Metrics, clock: Clock
    ) -> None:
        self.roots = tuple(roots)
        self.catalog = catalog
        self.metrics = metrics
        self.clock = clock
        self.log = get_logger("roots")
        self._problems: dict[bytes, str] = {}
        # Folders the walk in progress could not read: a walk that ends does not clear them.
        self._unread_by_walk: set[bytes] = set()
        self._published: dict[str, str] | None = None

    @property
    def unavailable(self) -> int:
        return len(self._problems)

    def set_roots(self, roots: Sequence[bytes]) -> None:
        """A reload changed watch.paths: problems of folders no longer watched are dropped."""
        self.roots = tuple(roots)
        self._problems = {
            f: m for f, m in self._problems.items() if any(_under(f, r) for r in self.roots)
        }
        self._changed()

    def holding(self, path: bytes) -> tuple[bytes, ...]:
        """The watched roots that hold a path."""
        return tuple(r for r in self.roots if _under(path, r))

    def report(self, folder: bytes, message: str) -> None:
        """A folder cannot be read (logged when the problem is new or different)."""
        if self._problems.get(folder) != message:
            self.log.warning(
                "watched folder unavailable", root=display_path(folder), problem=message
            )
        self._problems[folder] = message
        self._changed()

    def unread_by_walk(self, folder: bytes, message: str) -> None:
        """The walk in progress found a folder it must not read, or whose filesystem is
        gone."""
        self.report(folder, message)
        self._unread_by_walk.add(folder)

    def walk_finished(self, walked: Sequence[bytes]) -> bool:
        """A walk read these roots: the folders under them that it found nothing wrong with
        are available again. Returns True when rows that waited under them may be claimed
        now."""
        resumed = False
        for folder in list(self._problems):
            if (
                any(_under(folder, root) for root in walked)
                and folder not in self._unread_by_walk
                and os.path.isdir(folder)
            ):
                resumed |= self.back(folder)
        self._unread_by_walk.clear()
        return resumed

    def back(self, folder: bytes) -> bool:
        """A folder is readable again; True when images postponed under it were released
        (phase 2 may go on with them)."""
        if self._problems.pop(folder, None) is not None:
            self.log.info("watched folder is back", root=display_path(folder))
            self._changed()
        return self.catalog.resume_under(folder) > 0

    def is_reported(self, folder: bytes) -> bool:
        return folder in self._problems

    def holder_unavailable(self, path: bytes) -> bytes | None:
        """The unavailable folder holding ``path``: one reported so, or its watched root when
        that now looks unmounted (the walk's rule: gone, unreadable, or empty with rows under
        it)."""
        reported = [f for f in self._problems if _under(path, f)]
        if reported:
            return max(reported, key=len)
        holders = self.holding(path)
        if not holders:
            return None
        root = max(holders, key=len)
        try:
            open_root(root, lambda: self.catalog.count_under(root))
        except RootUnavailable as exc:
            self.report(root, str(exc))
            return root
        return None

    def _changed(self) -> None:
        self.metrics.roots_unavailable.set(len(self._problems))
        shown = {display_path(f): m for f, m in self._problems.items()}
        if shown != self._published:
            self._published = shown
            self.catalog.set_conditions(CONDITION, shown, self.clock.wall())
