"""Which watched roots are unavailable now, and why.

A watched folder that is missing, unreadable, or empty while the catalog holds images under
it looks like an unmounted disk, and must never be read as "every photo was deleted". The
watcher, the walks and phase 2 each find such roots; this is where they are recorded, so
that one list feeds the log, the ``photoscand_roots_unavailable`` gauge and systemd's
status line, and so that the images under a root that comes back go ahead at once.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from photoscand.catalog import Catalog
from photoscand.log import display_path, get_logger
from photoscand.metrics import Metrics
from photoscand.scanner import RootUnavailable, open_root


class RootAvailability:
    """The watched roots and the problems of those that cannot be read now.

    Args:
        roots: the watched roots (absolute, bytes).
        catalog: the daemon's catalog (rows under a root wait, and resume, there).
        metrics: the gauge of unavailable roots.
    """

    def __init__(self, roots: Sequence[bytes], catalog: Catalog, metrics: Metrics) -> None:
        self.roots = tuple(roots)
        self.catalog = catalog
        self.metrics = metrics
        self.log = get_logger("roots")
        self._problems: dict[bytes, str] = {}
        # Roots the walk in progress could not read: a walk that ends does not clear them.
        self._unread_by_walk: set[bytes] = set()

    @property
    def unavailable(self) -> int:
        return len(self._problems)

    def set_roots(self, roots: Sequence[bytes]) -> None:
        """A reload changed watch.paths: problems of roots no longer watched are dropped."""
        self.roots = tuple(roots)
        self._problems = {r: m for r, m in self._problems.items() if r in self.roots}
        self._gauge()

    def report(self, root: bytes, message: str) -> None:
        """A root cannot be read (logged when the problem is new or different)."""
        if self._problems.get(root) != message:
            self.log.warning("watched folder unavailable", root=display_path(root), problem=message)
        self._problems[root] = message
        self._gauge()

    def unread_by_walk(self, root: bytes, message: str) -> None:
        """The walk in progress found a root it must not read."""
        self.report(root, message)
        self._unread_by_walk.add(root)

    def walk_finished(self, walked: Sequence[bytes]) -> bool:
        """A walk read these roots: those it could read are available again. Returns True
        when rows that waited under them may be claimed now."""
        resumed = False
        for root in walked:
            if root in self._problems and root not in self._unread_by_walk and os.path.isdir(root):
                resumed |= self.back(root)
        self._unread_by_walk.clear()
        self._gauge()
        return resumed

    def back(self, root: bytes) -> bool:
        """A watched folder is readable again; True when images postponed under it were
        released (phase 2 may go on with them)."""
        if self._problems.pop(root, None) is not None:
            self.log.info("watched folder is back", root=display_path(root))
        self._gauge()
        return self.catalog.resume_under(root) > 0

    def is_reported(self, root: bytes) -> bool:
        return root in self._problems

    def holder_unavailable(self, path: bytes) -> bytes | None:
        """The watched root holding ``path`` when that root is unavailable: reported so, or
        now looking unmounted (the walk's rule: gone, unreadable, or empty with rows
        under it)."""
        holders = [r for r in self.roots if path.startswith(r.rstrip(b"/") + b"/")]
        if not holders:
            return None
        root = max(holders, key=len)
        if root in self._problems:
            return root
        try:
            open_root(root, lambda: self.catalog.count_under(root))
        except RootUnavailable as exc:
            self.report(root, str(exc))
            return root
        return None

    def _gauge(self) -> None:
        self.metrics.roots_unavailable.set(len(self._problems))
