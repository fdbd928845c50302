"""Walks of the watched roots: the truth that events only hint at.

The walker runs in its own thread so a walk over a large or slow tree never stalls the
daemon's loop. It compares what it finds with the catalog through its own read-only
connection (WAL lets it read while the daemon writes) and reports only what differs:
new or changed files, and rows whose files are gone. It never follows symlinks (a link
leaving the tree is never read; a loop cannot hang the walk) and keeps a set of
visited folders by (st_dev, st_ino) for bind mounts that loop back.

A root that is missing, unreadable or empty while the catalog holds images under it is
reported, never read as "everything was deleted" (an unmounted disk looks like that).
"""

from __future__ import annotations

import os
import queue
import stat
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from photoscand import formats
from photoscand.catalog import Catalog, CatalogError, FileStat
from photoscand.storable import signed

# Folders never entered: hidden ones (caches, sync tools' state) and Synology's
# thumbnail folders.
SKIPPED_DIRS = frozenset({b"@eaDir", b"#recycle", b"lost+found"})


def is_ignored_name(name: bytes) -> bool:
    """True for file names the daemon never catalogs: temporary and hidden names."""
    return formats.is_temporary_name(name)


def is_skipped_dir(name: bytes) -> bool:
    return name.startswith(b".") or name in SKIPPED_DIRS


def relative_parts_ignored(path: bytes, roots: Sequence[bytes]) -> bool:
    """True when a path lies in a skipped folder or has an ignored name under its root."""
    for root in roots:
        prefix = root.rstrip(b"/") + b"/"
        if path.startswith(prefix):
            parts = path[len(prefix) :].split(b"/")
            return is_ignored_name(parts[-1]) or any(is_skipped_dir(p) for p in parts[:-1])
    return True  # not under any root: never ours


@dataclass(frozen=True, slots=True)
class WalkItem:
    """A file the walk found that the catalog does not hold as it is."""

    stat: FileStat
    reason: str  # why the walk ran: "start", "periodic", "overflow", "root", ...
    at: float  # monotonic time it was found


@dataclass(frozen=True, slots=True)
class Vanished:
    """A row whose file the walk did not find (checked again by the daemon)."""

    image_id: int
    path: bytes


class RootUnavailable(Exception):
    """A watched root must not be read as it is; the message says why."""


def open_root(root: bytes, count_known: Callable[[], int]) -> os.stat_result:
    """The root's stat, when it can be walked.

    Raises RootUnavailable when it cannot be read, is not a folder, or is empty while the
    catalog holds images under it (``count_known``, asked only then): an unmounted disk
    looks like that, and must never be read as "everything was deleted".
    """
    try:
        st = os.stat(root)
        if not stat.S_ISDIR(st.st_mode):
            raise NotADirectoryError(0, "not a folder")
        with os.scandir(root) as it:
            empty = next(it, None) is None
    except OSError as exc:
        raise RootUnavailable(f"cannot read the watched folder: {exc.strerror or exc}") from exc
    if empty and (known := count_known()):
        raise RootUnavailable(
            f"the watched folder is empty but the catalog holds {known} images under it;"
            " it looks unmounted, so nothing is marked missing"
        )
    return st


@dataclass(frozen=True, slots=True)
class RootProblem:
    """A root that cannot be walked, or that looks unmounted."""

    root: bytes
    message: str


@dataclass(frozen=True, slots=True)
class Unmounted:
    """Rows under ``folder`` whose filesystem is not in the tree any more (a volume that was
    mounted inside a watched root, or under the root itself, was unmounted or covered): they
    are not vanished; they wait until it is back."""

    folder: bytes
    message: str


@dataclass(slots=True)
class WalkDone:
    """End of one walk; ``requests`` is how many requests it answered (queued requests are
    walked together)."""

    reason: str
    roots: tuple[bytes, ...]
    requests: int = 1
    files: int = 0
    directories: int = 0
    reported: int = 0
    seconds: float = 0.0
    errors: list[str] = field(default_factory=list)


WalkOutput = WalkItem | Vanished | RootProblem | Unmounted | WalkDone


class WalkSchedule:
    """When the daemon walks: on request (start-up, lost events, a root back, a reload) and
    every ``interval`` seconds after the last walk ended (0: never periodically).

    Args:
        walker: the walk thread the requests go to.
        interval: watch.rescan_interval_seconds (0 in ``scan``).
    """

    def __init__(self, walker: Walker, interval: float) -> None:
        self.walker = walker
        self.interval = interval
        self.pending = 0  # walks requested and not finished
        self.walked_once = False
        self.next_periodic: float | None = None  # monotonic time

    def request(self, reason: str, roots: tuple[bytes, ...] | None = None) -> None:
        self.pending += 1
        self.walker.request(reason, roots)

    def set_interval(self, interval: float, now: float) -> None:
        self.interval = interval
        self.next_periodic = now + interval if interval > 0 else None

    def finished(self, done: WalkDone, now: float) -> None:
        """A walk ended; the next periodic one is due an interval from now."""
        self.pending = max(0, self.pending - done.requests)
        self.walked_once = True
        if self.interval > 0:
            self.next_periodic = now + self.interval

    def tick(self, now: float) -> None:
        """Request the periodic walk when it is due and no other walk is under way."""
        if self.next_periodic is not None and now >= self.next_periodic and not self.pending:
            self.next_periodic = None
            self.request("periodic")


class Walker(threading.Thread):
    """The walk thread. Ask for walks with :meth:`request`; results arrive on ``output``.

    Args:
        roots: absolute root paths (bytes).
        catalog_path: the catalog file, opened read-only here.
        output: the bounded queue the daemon drains (the walk blocks when it is full:
            that is the back-pressure that keeps a huge walk from filling memory).
        wake: called after putting something on ``output``.
    """

    def __init__(
        self,
        roots: Sequence[bytes],
        catalog_path: str,
        output: queue.Queue[WalkOutput],
        *,
        wake: Callable[[], None] = lambda: None,
    ) -> None:
        super().__init__(name="photoscand-walker", daemon=True)
        self.roots = tuple(roots)
        self.catalog_path = catalog_path
        self.output = output
        self._wake = wake
        self._requests: queue.Queue[tuple[str, tuple[bytes, ...]] | None] = queue.Queue()
        self._stop_event = threading.Event()
        self.busy = threading.Event()
        self._catalog: Catalog | None = None

    # -- control (daemon thread) ---------------------------------------------------

    def request(self, reason: str, roots: Sequence[bytes] | None = None) -> None:
        """Queue a walk of some roots (all by default)."""
        self._requests.put((reason, tuple(roots) if roots else self.roots))

    def stop(self) -> None:
        self._stop_event.set()
        self._requests.put(None)

    @property
    def idle(self) -> bool:
        return not self.busy.is_set() and self._requests.empty()

    # -- the thread ----------------------------------------------------------------

    def run(self) -> None:
        while not self._stop_event.is_set():
            request = self._requests.get()
            if request is None:
                break
            self.busy.set()
            try:
                reason, roots = request
                requests = 1
                # Coalesce queued requests: one walk answers them all.
                while True:
                    try:
                        extra = self._requests.get_nowait()
                    except queue.Empty:
                        break
                    if extra is None:
                        self._stop_event.set()
                        break
                    roots = tuple(dict.fromkeys(roots + extra[1]))
                    requests += 1
                if not self._stop_event.is_set():
                    self._walk(reason, roots, requests)
            finally:
                self.busy.clear()
                self._wake()
        if self._catalog is not None:
            self._catalog.close()

    def _put(self, item: WalkOutput) -> bool:
        while not self._stop_event.is_set():
            try:
                self.output.put(item, timeout=0.5)
            except queue.Full:
                continue
            self._wake()
            return True
        return False

    def _open_catalog(self) -> Catalog | None:
        if self._catalog is None:
            try:
                self._catalog = Catalog(self.catalog_path, readonly=True)
            except CatalogError:
                return None
        return self._catalog

    def _walk(self, reason: str, roots: tuple[bytes, ...], requests: int) -> None:
        started = time.monotonic()
        done = WalkDone(reason, roots, requests)
        catalog = self._open_catalog()
        for root in roots:
            if self._stop_event.is_set():
                return
            self._walk_root(root, reason, catalog, done)
        done.seconds = time.monotonic() - started
        self._put(done)

    def _walk_root(self, root: bytes, reason: str, catalog: Catalog | None, done: WalkDone) -> None:
        try:
            st = open_root(root, lambda: catalog.count_under(root) if catalog is not None else 0)
        except RootUnavailable as exc:
            self._put(RootProblem(root, str(exc)))
            return
        tree = _Tree(visited={(st.st_dev, st.st_ino)}, devices={signed(st.st_dev)})
        walked = self._walk_tree(root, reason, catalog, done, tree)
        if walked and catalog is not None and not tree.partial:
            self._report_vanished(root, catalog, tree)

    def _walk_tree(
        self, root: bytes, reason: str, catalog: Catalog | None, done: WalkDone, tree: _Tree
    ) -> bool:
        """Every folder under root, depth first; False when the walk was stopped."""
        stack = [root]
        while stack:
            if self._stop_event.is_set():
                return False
            folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                # An unreadable subfolder: its rows are not marked missing.
                tree.partial = True
                done.errors.append(f"{folder.decode(errors='replace')}: {exc.strerror or exc}")
                continue
            done.directories += 1
            for entry in entries:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if not is_skipped_dir(entry.name):
                            tree.enter(entry, stack)
                        continue
                    if not entry.is_file(follow_symlinks=False) or is_ignored_name(entry.name):
                        continue
                    fst = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if not self._walked_file(entry, fst, reason, catalog, done, tree):
                    return False
        return True

    def _walked_file(
        self,
        entry: os.DirEntry[bytes],
        fst: os.stat_result,
        reason: str,
        catalog: Catalog | None,
        done: WalkDone,
        tree: _Tree,
    ) -> bool:
        """Report one file unless the catalog holds it as it is; False when stopped."""
        path = entry.path
        tree.seen.add(path)
        done.files += 1
        current = FileStat.of(path, fst)
        if catalog is not None:
            row = catalog.lookup(path)
            if (
                row is not None
                and row.status != "missing"
                and (row.size, row.mtime_ns, row.ino, row.dev)
                == (current.size, current.mtime_ns, current.ino, current.dev)
                and not row.metadata_again
            ):
                return True
        if not formats.has_photo_extension(entry.name) and not _has_photo_signature(path):
            return True
        done.reported += 1
        return self._put(WalkItem(current, reason, time.monotonic()))

    def _report_vanished(self, root: bytes, catalog: Catalog, tree: _Tree) -> None:
        """Rows whose files the walk did not find: vanished, unless their filesystem is not
        in the tree any more (then they wait: see Unmounted)."""
        unmounted: dict[int, list[bytes]] = {}
        for image_id, path, status, dev in catalog.rows_under(root):
            if status == "missing" or path in tree.seen:
                continue
            if dev not in tree.devices:
                unmounted.setdefault(dev, []).append(path)
            elif not self._put(Vanished(image_id, path)):
                return
        for dev, paths in unmounted.items():
            folder = _existing_folder(os.path.commonpath([os.path.dirname(p) for p in paths]))
            message = (
                f"the filesystem that held {len(paths)} images here (device"
                f" {os.major(dev % 2**64)}:{os.minor(dev % 2**64)}) is not mounted any more;"
                " they wait for it, and nothing is marked missing"
            )
            if not self._put(Unmounted(folder, message)):
                return


@dataclass(slots=True)
class _Tree:
    """What one walk of a root has seen."""

    visited: set[tuple[int, int]]  # folders, by (st_dev, st_ino): bind mounts looping back
    devices: set[int]  # the filesystems the folders are on (as stored: signed)
    seen: set[bytes] = field(default_factory=set)
    partial: bool = False  # a folder could not be read: nothing is vanished

    def enter(self, entry: os.DirEntry[bytes], stack: list[bytes]) -> None:
        st = entry.stat(follow_symlinks=False)
        key = (st.st_dev, st.st_ino)
        if key not in self.visited:
            self.visited.add(key)
            self.devices.add(signed(st.st_dev))
            stack.append(entry.path)


def _existing_folder(path: bytes) -> bytes:
    """The nearest folder at or above path that exists (a mount point's folder stays when
    its filesystem goes)."""
    while not os.path.isdir(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def _has_photo_signature(path: bytes) -> bool:
    """Read a file's first bytes to see whether it is a photo under another name."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        head = os.read(fd, formats.SNIFF_BYTES)
    except OSError:
        return False
    finally:
        os.close(fd)
    return formats.sniff_format(head) is not None
