"""Phase 1 on the daemon's side: decide which files are complete, parse them, write rows.

Files arrive as candidates from events (closed-after-write, moved in, created and then
settled) and from walks. A candidate the catalog already holds unchanged costs one
indexed lookup. Anything else goes to the metadata process, a separate child that the
daemon can kill: exifread can loop or eat memory on a hostile file, and it must take
neither the daemon nor the rest of the batch with it. Several requests are kept in
flight so the parser never waits for the daemon; answers come back in order, so when
the parser stops answering, the file at the head of the line is the one it hangs on.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from photoscand import formats, outcomes
from photoscand.catalog import Catalog, FileStat, Known
from photoscand.children import Child, ChildStartError, StartChild, describe_exit, restart_delay
from photoscand.clock import Clock
from photoscand.config import WatchConfig
from photoscand.log import display_path, get_logger, one_file
from photoscand.metadata import physical_offset
from photoscand.metrics import Metrics
from photoscand.protocol import (
    MetadataAnswer,
    MetadataRequest,
    NotAPhoto,
    Parsed,
    PhotoMetadata,
    SharedBytes,
    Unreadable,
)
from photoscand.scanner import relative_parts_ignored
from photoscand.worker import metadata_main

# Requests kept in flight to the metadata process: enough to hide the pipe's round
# trip, few enough that a timeout or crash re-sends little.
IN_FLIGHT = 32


@dataclass(slots=True)
class _Candidate:
    path: bytes
    source: str  # "event" or "walk"
    walk_reason: str  # for walks: why it ran ("start", "periodic", ...)
    completed_at: float  # monotonic time the file was known complete
    known_id: int | None = None  # the row this file refreshes, if any
    # The row is unchanged but its metadata failed for a reason that may be gone: read it
    # again, and leave the row as it is when it fails again.
    recheck: bool = False
    # A vanished row with this file's inode, size and mtime: a move, if the content agrees.
    moved_from: Known | None = None
    again: bool = False  # offered again while in flight: re-check after the answer
    suspected: bool = False  # the parser died or hung on it once already
    # Filling in an existing row's metadata (prefetch mode, from the bytes it read):
    image_id: int | None = None
    shared: SharedBytes | None = None
    on_done: Callable[[], None] | None = None


@dataclass(slots=True)
class _Settling:
    size: int
    mtime_ns: int
    changed_at: float
    source: str = "event"
    walk_reason: str = ""


class Ingest:
    """Phase 1: candidates in, catalog rows out.

    Args:
        catalog: the daemon's read-write catalog (this runs on its writer thread).
        roots: the watched roots (bytes), to ignore paths outside them.
        start_child: starts the metadata process.
        watch: the ``watch`` settings: how long a created-but-not-closed file must hold
            still, and how long one file may take in the metadata process.
        metrics: where counts and durations go.
        clock: the monotonic clock that parser timeouts are measured on.
        deferred: prefetch mode: rows are written from a stat alone (see parse_loaded).
    """

    def __init__(
        self,
        catalog: Catalog,
        roots: Sequence[bytes],
        start_child: StartChild,
        watch: WatchConfig,
        *,
        metrics: Metrics,
        clock: Clock,
        deferred: bool = False,
    ) -> None:
        self.catalog = catalog
        self.roots = tuple(roots)
        self.start_child = start_child
        self.settle_seconds = watch.settle_seconds
        self.metadata_timeout = watch.metadata_timeout_seconds
        self.metrics = metrics
        self.clock = clock
        self.log = get_logger("ingest")
        self._settling: dict[bytes, _Settling] = {}
        # When the settling files are looked at next: at the earliest moment one of them can
        # have held still for settle_seconds (so a complete file waits exactly that long),
        # and at least every settle_poll_seconds, to see the others still changing.
        self._settle_check_at = 0.0
        self._ready: deque[_Candidate] = deque()  # complete, waiting for the parser
        # New files queued for or at the parser, by path: a file offered again meanwhile
        # (by events and by every walk that overlaps) is re-checked once after the answer,
        # never parsed and written twice.
        self._in_flight: dict[bytes, _Candidate] = {}
        # Every request at the parser, in the order it answers: (seq, candidate, sent_at).
        self._line: deque[tuple[int, _Candidate, float]] = deque()
        # Prefetch mode: rows are written from a stat (no read: the disk head must not
        # leave the reader's sequential stream); their metadata comes from the bytes the
        # reader brings, see parse_loaded().
        self.deferred = deferred
        self._seq = 0
        self._child: Child | None = None
        self._child_failures = 0
        self._restart_after = 0.0
        self._last_answer = clock.monotonic()
        self._delays: list[float] = []  # completion times of the rows in the open batch
        self._rows_written = 0  # since the loop last asked (take_rows_written)

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._spawn()

    def _spawn(self) -> None:
        try:
            self._child = self.start_child(metadata_main, (), "photoscand-metadata")
        except ChildStartError as exc:
            self._child = None
            self._child_failures += 1
            self._restart_after = self.clock.monotonic() + restart_delay(0.25, self._child_failures)
            self.log.error("metadata parser could not be started; trying again", error=str(exc))
            return
        self._last_answer = self.clock.monotonic()

    def stop(self) -> None:
        child, self._child = self._child, None
        if child is not None:
            child.close(graceful=True)

    def reconfigure(self, watch: WatchConfig) -> None:
        """Apply a reloaded config (the roots change through :attr:`roots`)."""
        self.settle_seconds = watch.settle_seconds
        self.metadata_timeout = watch.metadata_timeout_seconds

    def wait_objects(self) -> list[Any]:
        if self._child is None:
            return []
        return [self._child.conn, self._child.sentinel]

    @property
    def idle(self) -> bool:
        """Nothing settling, waiting or being parsed."""
        return not self._settling and not self._ready and not self._line

    @property
    def busy(self) -> bool:
        return bool(self._ready or self._line)

    def depths(self) -> dict[str, int]:
        return {"settle": len(self._settling), "metadata": len(self._ready) + len(self._line)}

    def take_rows_written(self) -> int:
        """Rows added or refreshed since the last call (phase 2 may have new work)."""
        count, self._rows_written = self._rows_written, 0
        return count

    def committed(self, now: float) -> None:
        """The open batch was committed at ``now``: how long each of its files waited."""
        for completed_at in self._delays:
            self.metrics.ingest_delay.observe(max(0.0, now - completed_at))
        self._delays.clear()

    def next_deadline(self, now: float) -> float | None:
        """When the loop must wake for phase 1 (settle checks, parser timeout)."""
        deadlines = []
        if self._settling:
            deadlines.append(self._settle_check_at)
        if self._line:
            deadlines.append(self._line[0][2] + self.metadata_timeout)
        if self._child is None and (self._ready or self._line):
            deadlines.append(self._restart_after)
        return min(deadlines) if deadlines else None

    # -- candidates ------------------------------------------------------------------

    def created(
        self, path: bytes, now: float, source: str = "event", walk_reason: str = ""
    ) -> None:
        """A file appeared without a close event yet (or a walk found it freshly modified):
        it must settle first."""
        if relative_parts_ignored(path, self.roots):
            return
        if path in self._settling:
            return
        try:
            st = os.lstat(path)
        except OSError:
            return
        if not stat.S_ISREG(st.st_mode):
            return
        if not self._settling:
            self._settle_check_at = now + self._settle_poll_seconds()
        self._settling[path] = _Settling(st.st_size, st.st_mtime_ns, now, source, walk_reason)
        self._settle_check_at = min(self._settle_check_at, now + self.settle_seconds)

    def complete(self, path: bytes, source: str, now: float, walk_reason: str = "") -> None:
        """A file is complete (closed after writing, moved in, walked, settled)."""
        if relative_parts_ignored(path, self.roots):
            return
        self._settling.pop(path, None)
        in_flight = self._in_flight.get(path)
        if in_flight is not None:
            in_flight.again = True
            return
        candidate = _Candidate(path, source, walk_reason, now)
        if self._check(candidate):
            if self.deferred and not (candidate.recheck or candidate.moved_from):
                self._row_from_stat(candidate)
            else:
                self._ready.append(candidate)
                self._in_flight[path] = candidate

    def parse_loaded(
        self,
        image_id: int,
        path: bytes,
        shared: SharedBytes | None,
        on_done: Callable[[], None] | None = None,
    ) -> None:
        """Read an existing row's metadata: from the prefetcher's bytes (``shared``), or
        from the file when ``shared`` is None. ``on_done`` runs once the parser is done
        with the bytes (answered, timed out or died)."""
        candidate = _Candidate(
            path,
            "prefetch",
            "",
            self.clock.monotonic(),
            image_id=image_id,
            shared=shared,
            on_done=on_done,
        )
        self._ready.appendleft(candidate)

    def _row_from_stat(self, candidate: _Candidate) -> None:
        """Prefetch mode: the row from the file's identity and where it lies on disk."""
        path = candidate.path
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if formats.has_photo_extension(path):
                reason = outcomes.PERMISSION if exc.errno == errno.EACCES else outcomes.IO_ERROR
                self._row_without_metadata(candidate, outcomes.format_error(reason, str(exc)))
            return
        try:
            st = os.fstat(fd)
            fmt = formats.format_from_extension(path)
            if fmt is None:
                # No photo extension: only a signature makes it a photo (one small read).
                fmt = formats.detect_format(path, os.pread(fd, formats.SNIFF_BYTES, 0))
            offset = physical_offset(fd)
        except OSError:
            return
        finally:
            os.close(fd)
        if fmt is None:
            self.metrics.files_ignored.inc()
            return
        # exif None: the metadata is still to be read, from the bytes the reader brings.
        metadata = PhotoMetadata(format=fmt, exif=None, disk_offset=offset)
        self._write_row(candidate, FileStat.of(path, st), metadata)

    def forget(self, path: bytes) -> None:
        """A file was deleted before it settled."""
        self._settling.pop(path, None)

    def modified(self, path: bytes, now: float) -> None:
        """A cataloged file was written or its attributes changed without a close event
        (truncate(2), a writer that keeps it open, chmod): it settles, then phase 1 looks at
        it again. A new file being written needs nothing: its close or settle follows."""
        if path in self._settling or path in self._in_flight:
            return
        known = self.catalog.lookup(path)
        if known is not None and known.status != "missing":
            self.created(path, now)

    def _check(self, candidate: _Candidate) -> bool:
        """True when the candidate needs parsing; handles the cheap cases itself."""
        path = candidate.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            if self.catalog.mark_missing(path, "the file was deleted"):
                self.log.debug("file vanished", path=display_path(path))
            return False
        except OSError as exc:
            self.log.debug("cannot stat", path=display_path(path), error=exc.strerror)
            return False
        if not stat.S_ISREG(st.st_mode):
            return False  # symlinks are never followed; folders and devices are not photos
        current = FileStat.of(path, st)
        known = self.catalog.lookup(path)
        if known is None:
            # A new path: a file moved while we were not watching keeps its row, once its
            # content has confirmed it (see _answer).
            candidate.moved_from = self._moved_from(current, st.st_nlink)
            return True
        if (known.size, known.mtime_ns, known.ino) != (current.size, current.mtime_ns, current.ino):
            candidate.known_id = known.id
            return True
        if known.status == "missing":
            self.catalog.restore(known.id, current)
            self._row_written(candidate, "restored")
            return False
        if known.dev != current.dev:
            # The same file on a filesystem mounted again under another device number:
            # the row follows, so that an unmount is told from a deletion next time.
            self.catalog.set_device(known.id, current.dev)
        if known.metadata_again:
            candidate.known_id = known.id
            candidate.recheck = True
            return True
        return False

    def _moved_from(self, current: FileStat, links: int) -> Known | None:
        """The row this new path's file had under an old path, if any.

        With one link, no other path names this inode, so any row that had it is stale.
        With hard links, the other links' rows are not moves: only a row whose path is
        gone is, and there can be one only when the inode has as many rows as links. That
        is counted first, from the index alone, because a tree of many links per photo
        (snapshot backups) would otherwise read every link's row for every new link.
        """
        identity = (current.dev, current.ino, current.size, current.mtime_ns)
        if links == 1:
            first = self.catalog.same_inode(*identity, limit=1)
            return first[0] if first else None
        if self.catalog.count_links(current.dev, current.ino) < links:
            return None  # this path is another link, not a move
        rows = self.catalog.same_inode(*identity, limit=links + 1)
        if rows and rows[0].status == "missing":
            return rows[0]
        for old in rows:
            if not os.path.lexists(old.path):
                return old
        return None

    def tick(self, now: float) -> None:
        """Settle checks, parser timeouts and restarts, and feeding the parser."""
        if self._settling and now >= self._settle_check_at:
            self._check_settling(now)
        self._check_parser(now)
        self._feed()

    def _check_settling(self, now: float) -> None:
        earliest = math.inf
        for path, entry in list(self._settling.items()):
            try:
                st = os.lstat(path)
            except OSError:
                del self._settling[path]
                continue
            if (st.st_size, st.st_mtime_ns) != (entry.size, entry.mtime_ns):
                entry.size, entry.mtime_ns, entry.changed_at = st.st_size, st.st_mtime_ns, now
            elif now >= entry.changed_at + self.settle_seconds:
                del self._settling[path]
                self.complete(path, entry.source, now, entry.walk_reason)
                continue
            earliest = min(earliest, entry.changed_at + self.settle_seconds)
        self._settle_check_at = min(earliest, now + self._settle_poll_seconds())

    def _settle_poll_seconds(self) -> float:
        return min(0.25, self.settle_seconds / 4)

    def _feed(self) -> None:
        child = self._child
        if child is None:
            return
        while self._ready and len(self._line) < IN_FLIGHT:
            candidate = self._ready.popleft()
            fresh = candidate.image_id is None
            if fresh and self._in_flight.get(candidate.path, candidate) is not candidate:
                self._in_flight[candidate.path].again = True
                continue
            self._seq += 1
            try:
                child.conn.send(MetadataRequest(self._seq, candidate.path, candidate.shared))
            except OSError:
                self._ready.appendleft(candidate)
                return  # the sentinel will report the death
            now = self.clock.monotonic()
            if not self._line:
                self._last_answer = now
            self._line.append((self._seq, candidate, now))
            if fresh:
                self._in_flight[candidate.path] = candidate

    # -- the metadata process ----------------------------------------------------------

    def on_ready(self, ready: Sequence[Any], now: float) -> None:
        child = self._child
        if child is None:
            return
        if child.conn in ready:
            self._read_answers(child)
        if child.sentinel in ready and self._child is child:
            self._parser_died(child, now)

    def _read_answers(self, child: Child) -> None:
        while True:
            try:
                if not child.conn.poll():
                    return
                answer: MetadataAnswer = child.conn.recv()
            except (EOFError, OSError):
                return
            if not self._line or self._line[0][0] != answer.seq:
                continue  # an answer for a request given up on (timeout)
            _, candidate, _sent_at = self._line.popleft()
            self._last_answer = self.clock.monotonic()
            self._child_failures = 0
            self.metrics.metadata_duration.observe(answer.seconds)
            if answer.output:
                path = display_path(candidate.path)
                self.log.info("decoder output", path=path, output=answer.output)
            self._unlist(candidate)
            with one_file(self.log, candidate.path, "cataloging"):
                self._answer(candidate, answer.outcome)
            self._feed()

    def _unlist(self, candidate: _Candidate) -> None:
        if candidate.image_id is None:
            self._in_flight.pop(candidate.path, None)
        elif candidate.on_done is not None:
            candidate.on_done()

    def _answer(self, candidate: _Candidate, outcome: Parsed | NotAPhoto | Unreadable) -> None:
        path = candidate.path
        if candidate.image_id is not None:
            self._answer_existing(candidate.image_id, outcome)
        elif isinstance(outcome, Parsed):
            self._parsed(candidate, outcome)
        elif candidate.recheck:
            # Read again and still unreadable: the row stays as it was (no attempt reset).
            self.log.debug("metadata still unreadable", path=display_path(path))
        elif isinstance(outcome, NotAPhoto):
            self.metrics.files_ignored.inc()
        elif outcome.errno_name == "ENOENT":
            self.catalog.mark_missing(path, "the file was deleted")
        elif formats.has_photo_extension(path):
            reason = outcomes.PERMISSION if outcome.errno_name == "EACCES" else outcomes.IO_ERROR
            self._row_without_metadata(candidate, outcomes.format_error(reason, outcome.message))
        else:
            self.log.debug("cannot read", path=display_path(path), error=outcome.message)
        if candidate.again:
            self.complete(path, candidate.source, self.clock.monotonic(), candidate.walk_reason)

    def _parsed(self, candidate: _Candidate, outcome: Parsed) -> None:
        assert outcome.identity is not None  # read from the file, not from memory
        metadata, identity = outcome.metadata, outcome.identity
        if metadata.metadata_error:
            self.metrics.metadata_problems.labels("unreadable_exif").inc()
        st = FileStat.stored(
            candidate.path, identity.size, identity.mtime_ns, identity.dev, identity.ino
        )
        old = candidate.moved_from
        if old is not None and old.fingerprint and old.fingerprint == metadata.fingerprint:
            self.catalog.move_to(old.id, st)
            self.log.info(
                "file moved", path=display_path(st.path), was=display_path(old.path), id=old.id
            )
            self._row_written(candidate, "moved")
            return
        self._write_row(candidate, st, metadata)

    def _answer_existing(self, image_id: int, outcome: Parsed | NotAPhoto | Unreadable) -> None:
        if isinstance(outcome, Parsed):
            if outcome.metadata.metadata_error:
                self.metrics.metadata_problems.labels("unreadable_exif").inc()
            self.catalog.update_metadata(image_id, outcome.metadata)
        elif isinstance(outcome, NotAPhoto):
            error = outcomes.format_error(outcomes.CORRUPT, outcome.why)
            self.catalog.set_metadata_error(image_id, error)
        else:
            reason = outcomes.PERMISSION if outcome.errno_name == "EACCES" else outcomes.IO_ERROR
            self.catalog.set_metadata_error(
                image_id, outcomes.format_error(reason, outcome.message)
            )

    def _row_without_metadata(self, candidate: _Candidate, problem: str) -> None:
        """A photo whose metadata could not be read still gets its row (it stays pending)."""
        try:
            st = os.lstat(candidate.path)
        except OSError:
            return
        head = b""
        with contextlib.suppress(OSError):
            fd = os.open(candidate.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
            try:
                head = os.read(fd, formats.SNIFF_BYTES)
            finally:
                os.close(fd)
        metadata = PhotoMetadata(
            format=formats.detect_format(candidate.path, head), exif=None, metadata_error=problem
        )
        self._write_row(candidate, FileStat.of(candidate.path, st), metadata)

    def _write_row(self, candidate: _Candidate, st: FileStat, metadata: PhotoMetadata) -> None:
        known = candidate.known_id is not None
        self.catalog.add_image(st, metadata, self.clock.wall(), known=known)
        self._row_written(candidate, "changed" if known else "new")
        if metadata.metadata_error:
            # A truncated file may still be arriving: phase 2 decides whether that fails it.
            arriving = outcomes.split_error(metadata.metadata_error)[0] == outcomes.TRUNCATED
            (self.log.debug if arriving else self.log.warning)(
                "metadata unreadable", path=display_path(st.path), problem=metadata.metadata_error
            )

    def _row_written(self, candidate: _Candidate, action: str) -> None:
        self._delays.append(candidate.completed_at)
        self._rows_written += 1
        if action in ("new", "changed"):
            self.metrics.files_discovered.labels(candidate.source).inc()
            # Walks of folders just (re)added find files no event could have announced.
            if candidate.source == "walk" and candidate.walk_reason not in (
                "start",
                "root",
                "reload",
            ):
                self.metrics.walk_unannounced_files.inc()
        self.log.debug("ingested", path=display_path(candidate.path), action=action)

    def _check_parser(self, now: float) -> None:
        child = self._child
        if child is None:
            if (self._ready or self._in_flight) and now >= self._restart_after:
                self._spawn()
            return
        if self._line and now - max(self._line[0][2], self._last_answer) > self.metadata_timeout:
            path = self._line[0][1].path
            self.log.warning(
                "metadata parse timed out; parser restarted",
                path=display_path(path),
                timeout=self.metadata_timeout,
            )
            self.metrics.metadata_problems.labels("timeout").inc()
            self._give_up_head(
                child, f"timeout: metadata parse took longer than {self.metadata_timeout:g}s"
            )

    def _parser_died(self, child: Child, now: float) -> None:
        code = child.exitcode()
        self.metrics.metadata_problems.labels("crashed").inc()
        if self._line:
            path = self._line[0][1].path
            self.log.warning("metadata parser died", path=display_path(path), exitcode=code)
            self._give_up_head(child, f"crashed: the metadata parser died ({describe_exit(code)})")
        else:
            self.log.warning("metadata parser died while idle", exitcode=code)
            self._discard(child)

    def _give_up_head(self, child: Child, problem: str) -> None:
        """Kill the parser and re-send what it held. The file it was stuck on gets one more
        try at the head of the line; when it takes the parser down again, it is recorded
        with the problem."""
        _seq, candidate, _ = self._line.popleft()
        self._discard(child)
        # Everything else that was in flight goes back to the front of the line (still
        # registered in _in_flight, so nothing queues a second copy meanwhile).
        rest = [c for _, c, _ in self._line]
        self._line.clear()
        if not candidate.suspected:
            # The parser may have died of something else (killed by hand, the OOM killer,
            # a stall under load): an innocent file must not lose its metadata for it.
            candidate.suspected = True
            self._ready.extendleft(reversed([candidate, *rest]))
            return
        self._unlist(candidate)
        if candidate.image_id is not None:
            self.catalog.set_metadata_error(candidate.image_id, problem)
        elif not candidate.recheck:
            self._row_without_metadata(candidate, problem)
        self._ready.extendleft(reversed(rest))

    def _discard(self, child: Child) -> None:
        child.close(graceful=False)
        self._child = None
        self._child_failures += 1
        # A parser that keeps dying at start-up must not spin the CPU.
        delay = 0.0 if self._child_failures <= 1 else restart_delay(0.5, self._child_failures)
        self._restart_after = self.clock.monotonic() + delay
