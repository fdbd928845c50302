"""The daemon's main loop: wires the watcher, the walks, phase 1 and phase 2 together.

One thread (the main one) owns the catalog's only read-write connection, the metadata
process and the worker pool, and waits on all of their pipes and sentinels at once
with ``multiprocessing.connection.wait``. It never decodes, parses or walks itself:
watchdog's threads and the walker thread put what they find on bounded queues and wake
it through a pipe; children do the CPU work. So signals, dispatch and the systemd
watchdog stay responsive, and the metrics endpoint (its own thread) answers while the
workers are saturated.

Hazards: Python runs signal handlers on the main thread between bytecodes; the handlers
here only set flags, and ``signal.set_wakeup_fd`` makes the wait return at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import queue
import signal
import sys
import time
from collections.abc import Callable, Mapping
from multiprocessing.connection import wait
from typing import Any, TextIO

from prometheus_client import generate_latest

from photoscand import config as config_module
from photoscand import log as log_module
from photoscand.catalog import Catalog
from photoscand.children import start_fork_server
from photoscand.config import Config, ConfigError
from photoscand.ingest import Ingest
from photoscand.log import display_path, get_logger
from photoscand.metrics import Metrics, MetricsServer
from photoscand.prefetch import Prefetcher
from photoscand.scanner import (
    RootProblem,
    RootUnavailable,
    Vanished,
    WalkDone,
    Walker,
    WalkItem,
    WalkOutput,
    open_root,
    relative_parts_ignored,
)
from photoscand.supervisor import Supervisor, WorkerSettings
from photoscand.systemd import Notifier
from photoscand.watcher import FsEvent, Watcher

EXIT_OK = 0
EXIT_FAILED_IMAGES = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3

EVENT_QUEUE_SIZE = 10_000
WALK_QUEUE_SIZE = 2_000
# A batch is committed when it holds this many writes, is this old, or the daemon has
# nothing else queued: rows land within milliseconds when files trickle in, and in
# large transactions when a whole card is copied at once.
BATCH_ROWS = 256
BATCH_SECONDS = 0.025
# Work done per loop turn before pipes and signals are looked at again.
DRAIN_PER_TURN = 512


class CatalogLocked(Exception):
    """Another photoscand already runs on this catalog."""


class CatalogLock:
    """An exclusive lock beside the catalog (``<catalog>.lock``): one daemon per catalog."""

    def __init__(self, catalog_path: str) -> None:
        self.path = catalog_path + ".lock"
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = ""
                with contextlib.suppress(OSError, ValueError), open(self.path) as fh:
                    holder = fh.read().strip()
                who = f" (pid {holder})" if holder else ""
                raise CatalogLocked(
                    f"another photoscand{who} is already running on the catalog {catalog_path}"
                ) from exc
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def worker_settings(config: Config) -> WorkerSettings:
    return WorkerSettings(
        sizes=tuple(config.thumbnails.sizes),
        format=config.thumbnails.format,
        quality=config.thumbnails.quality,
        out_dir=config.thumbnails.dir,
        max_pixels=config.workers.max_pixels,
        backend=config.workers.backend,
        memory_limit_mb=config.workers.memory_limit_mb,
    )


def progress_line(counts: dict[str, int]) -> str:
    """The seed design's words: "Phase 1: 1000 images found. Phase 2: converting 150/1000,
    3 failed"."""
    found = sum(counts.values())
    present = found - counts.get("missing", 0)
    line = (
        f"Phase 1: {found} images found. Phase 2: converting {counts.get('done', 0)}/{present},"
        f" {counts.get('failed', 0)} failed"
    )
    if counts.get("missing"):
        line += f", {counts['missing']} missing"
    return line


class Daemon:
    """``photoscand run`` (watching) and ``photoscand scan`` (one batch, then exit).

    Args:
        config: the validated configuration.
        mode: "run" or "scan".
        progress: a stream for scan's progress line (a TTY), or None.
        metrics_file: where to write the final metrics (Prometheus text format, e.g. for
            node_exporter's textfile collector) when the daemon exits.
        overrides: the command-line flags' settings, applied again on each reload (flags
            win over the file and the environment, also after SIGHUP).
    """

    def __init__(
        self,
        config: Config,
        *,
        mode: str = "run",
        progress: TextIO | None = None,
        metrics_file: str | None = None,
        overrides: Mapping[str, tuple[object, str]] | None = None,
    ) -> None:
        self.config = config
        self.overrides = dict(overrides or {})
        self.mode = mode
        self.progress = progress
        self.metrics_file = metrics_file
        self.log = get_logger("daemon")
        self.metrics = Metrics()
        self.notifier = Notifier()
        self.roots = tuple(os.fsencode(p) for p in config.watch.paths)
        self._stop_requests = 0
        self._reload_requested = False
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.events: queue.Queue[FsEvent] = queue.Queue(maxsize=EVENT_QUEUE_SIZE)
        self.walk_output: queue.Queue[WalkOutput] = queue.Queue(maxsize=WALK_QUEUE_SIZE)
        self.catalog: Catalog | None = None
        self.watcher: Watcher | None = None
        self.walker: Walker | None = None
        self.ingest: Ingest | None = None
        self.supervisor: Supervisor | None = None
        self.prefetcher: Prefetcher | None = None
        self.metrics_server: MetricsServer | None = None
        self._lock: CatalogLock | None = None
        self._walks_pending = 0
        self._walked_once = False
        self._next_walk: float | None = None
        self._root_problems: dict[bytes, str] = {}
        # Roots the walk in progress could not read (they stay reported when it ends).
        self._walk_problem_roots: set[bytes] = set()
        self._counts: dict[str, int] = {}
        self._last_refresh = 0.0
        self._ready_sent = False
        self._last_root_check = 0.0
        self._last_progress = 0.0
        self._stop_deadline: float | None = None
        self._started = time.monotonic()
        self._catalog_full_since: float | None = None
        self._catalog_probe_at = 0.0
        self.on_tick: Callable[[Daemon], None] | None = None

    # -- plumbing ------------------------------------------------------------------------

    def wake(self) -> None:
        """Wake the loop (called from other threads)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._wake_w, b"\0")

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # Flags only: the loop does the work (see module doc).
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self._stop_requests += 1

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if self.mode == "run":
            signal.signal(signal.SIGHUP, self._on_signal)

    # -- start ---------------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (run) or until the batch is done (scan); returns the exit code."""
        self._lock = CatalogLock(self.config.catalog.path)
        try:
            return self._run()
        finally:
            if self.metrics_file and self.catalog is not None:
                with contextlib.suppress(Exception):
                    self.catalog.commit()
                    self._refresh(time.monotonic(), force=True)
            self._shutdown_components()
            self._lock.release()
            if self.metrics_file:
                self._write_metrics_file(self.metrics_file)

    def _write_metrics_file(self, path: str) -> None:
        """The final metrics, written atomically (a collector never reads half a file)."""
        temp = f"{path}.{os.getpid()}.tmp"
        try:
            with open(temp, "wb") as fh:
                fh.write(generate_latest(self.metrics.registry))
            os.replace(temp, path)
        except OSError as exc:
            self.log.error("cannot write the metrics file", path=path, error=exc.strerror)

    def _run(self) -> int:
        config = self.config
        self._install_signals()
        ctx = start_fork_server()
        self.catalog = Catalog(config.catalog.path)
        returned = self.catalog.reset_converting()
        if returned:
            self.log.info("conversions interrupted by the last stop go back to pending",
                          count=returned)  # fmt: skip
        self._start_metrics()
        self.supervisor = Supervisor(
            self.catalog,
            ctx,
            count=config.workers.count,
            settings=worker_settings(config),
            timeout=config.workers.timeout_seconds,
            max_attempts=config.workers.max_attempts,
            backoff=config.workers.retry_backoff_seconds,
            metrics=self.metrics,
        )
        self.ingest = Ingest(
            self.catalog,
            self.roots,
            ctx,
            settle_seconds=config.watch.settle_seconds,
            metadata_timeout=config.watch.metadata_timeout_seconds,
            metrics=self.metrics,
            on_row=self.supervisor.wake,
            deferred=config.io.mode == "prefetch",
        )
        ingest = self.ingest
        self.supervisor.parse_metadata = lambda job, shm, done: ingest.parse_loaded(
            job.id, job.path, shm, done
        )
        if self.mode == "run":
            # A one-shot scan ends instead of waiting for a folder to come back; there
            # such images read as missing until a later walk finds them again.
            self.supervisor.root_unavailable = self._unavailable_root
        if config.io.mode == "prefetch":
            self.prefetcher = Prefetcher(
                config.io.prefetch_window_mb << 20, self.wake, self.metrics
            )
            self.prefetcher.start()
            self.supervisor.prefetcher = self.prefetcher
        self.supervisor.start()
        self.ingest.start()
        if self.mode == "run":
            self.watcher = Watcher(
                config.watch.paths,
                self.events,
                polling=config.watch.polling,
                wake=self.wake,
                polling_interval=max(1.0, min(config.watch.settle_seconds, 10.0)),
            )
            for root in self.watcher.start():
                self._report_root(root, self.watcher.unavailable().get(root, "cannot be watched"))
        self.walker = Walker(self.roots, config.catalog.path, self.walk_output, wake=self.wake)
        self.walker.start()
        self._request_walk("start")
        self.metrics.set_watch_mode(
            "none" if self.mode != "run" else "polling" if config.watch.polling else "inotify"
        )
        self._set_walk_interval()
        self._refresh(time.monotonic(), force=True)
        # READY=1 waits for the workers' "ready" (see _housekeeping): catalog, watches and
        # the metrics port are up by now.
        self.log.info(
            "photoscand started",
            mode=self.mode,
            roots=[display_path(r) for r in self.roots],
            workers=config.workers.count,
            backend=config.workers.backend,
            catalog=config.catalog.path,
            polling=config.watch.polling,
        )
        return self._loop()

    def _start_metrics(self) -> None:
        listen = config_module.parse_listen(self.config.metrics.listen)
        if listen is None:
            return
        host, port = listen
        try:
            self.metrics_server = MetricsServer(self.metrics, host, port)
        except OSError as exc:
            message = f"metrics endpoint {self.config.metrics.listen} unavailable: {exc.strerror}"
            if self.mode == "scan":
                self.log.warning(message)
                return
            raise ConfigError(f"metrics.listen: {message}") from exc
        self.log.info("metrics endpoint listening", address=self.config.metrics.listen)

    def _request_walk(self, reason: str, roots: tuple[bytes, ...] | None = None) -> None:
        assert self.walker is not None
        self._walks_pending += 1
        self.walker.request(reason, roots)

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> int:
        assert self.ingest is not None and self.supervisor is not None
        assert self.catalog is not None
        ingest, supervisor = self.ingest, self.supervisor
        while True:
            now = time.monotonic()
            if self._stop_requests:
                code = self._stopping(now)
                if code is not None:
                    return code
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            timeout = self._wait_timeout(now)
            objects = [self._wake_r, *ingest.wait_objects(), *supervisor.wait_objects()]
            ready = wait(objects, timeout)
            if self._wake_r in ready:
                with contextlib.suppress(BlockingIOError, OSError):
                    while os.read(self._wake_r, 4096):
                        pass
            now = time.monotonic()
            ingest.on_ready(ready, now)
            supervisor.on_ready(ready, now)
            if not self._stop_requests:
                self._drain_events(now)
                self._drain_walks(now)
            ingest.tick(now)
            supervisor.tick(now)
            if not self._stop_requests:
                supervisor.dispatch(now)
            self.metrics.workers_idle.set(len(supervisor.idle_slots()))
            self._maybe_commit(now)
            self._housekeeping(now)
            if self.on_tick is not None:
                self.on_tick(self)
            if self.mode == "scan" and not self._stop_requests:
                code = self._scan_finished(now)
                if code is not None:
                    return code

    def _has_queued_input(self) -> bool:
        return not self.events.empty() or not self.walk_output.empty()

    def _wait_timeout(self, now: float) -> float:
        assert self.ingest is not None and self.supervisor is not None and self.catalog is not None
        if self._has_queued_input() and not self._stop_requests:
            return 0.0
        deadlines = [now + 1.0]
        for deadline in (self.ingest.next_deadline(now), self.supervisor.next_deadline(now)):
            if deadline is not None:
                deadlines.append(deadline)
        if self.catalog.in_transaction:
            deadlines.append(now + max(0.0, BATCH_SECONDS - self.catalog.transaction_age(now)))
        if self._next_walk is not None:
            deadlines.append(self._next_walk)
        if self.notifier.watchdog_every is not None:
            deadlines.append(now + self.notifier.watchdog_every / 2)
        if self._stop_deadline is not None:
            deadlines.append(self._stop_deadline)
        if self.progress is not None:
            deadlines.append(now + 0.2)
        return max(0.0, min(deadlines) - now)

    def _drain_events(self, now: float) -> None:
        assert self.ingest is not None and self.catalog is not None
        if self.catalog.backlog_size > 100_000:
            return  # the catalog's disk is full: leave events queued (a walk catches up)
        for _ in range(DRAIN_PER_TURN):
            try:
                event = self.events.get_nowait()
            except queue.Empty:
                return
            self._handle_event(event, now)

    def _handle_event(self, event: FsEvent, now: float) -> None:
        assert self.ingest is not None and self.catalog is not None
        ingest, catalog = self.ingest, self.catalog
        self.metrics.watch_events.labels(event.kind).inc()
        kind = event.kind
        if kind == "created":
            ingest.created(event.path, now)
        elif kind == "closed":
            ingest.complete(event.path, "event", now)
        elif kind == "deleted":
            ingest.forget(event.path)
            catalog.mark_missing(event.path, "the file was deleted or moved out")
        elif kind == "moved" and event.dest is not None:
            ingest.forget(event.path)
            if relative_parts_ignored(event.dest, self.roots):
                # Renamed to a hidden or temporary name: gone from the photos' view.
                catalog.mark_missing(event.path, "renamed to a hidden or temporary name")
                return
            moved = catalog.move(event.path, event.dest)
            if moved is not None:
                self.log.debug("file moved", path=display_path(event.dest),
                               was=display_path(event.path), id=moved)  # fmt: skip
            # Also the atomic temp-then-rename: the temporary name had no row.
            ingest.complete(event.dest, "event", now)
        elif kind == "dir_moved" and event.dest is not None:
            count = catalog.move_tree(event.path, event.dest)
            if count:
                self.log.info("folder moved", path=display_path(event.dest),
                              was=display_path(event.path), images=count)  # fmt: skip
        elif kind == "dir_deleted":
            if event.path.rstrip(b"/") in self.roots:
                self._report_root(event.path, "the watched folder was deleted or moved away")
            else:
                catalog.mark_tree_missing(event.path, "the folder was deleted or moved out")

    def _drain_walks(self, now: float) -> None:
        assert self.ingest is not None and self.catalog is not None
        for _ in range(DRAIN_PER_TURN):
            if self.ingest.depths()["metadata"] > 4 * DRAIN_PER_TURN:
                return  # phase 1 is behind: let the walk wait (it blocks on its queue)
            try:
                item = self.walk_output.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, WalkItem):
                if time.time() - item.stat.mtime_ns / 1e9 < self.config.watch.settle_seconds:
                    # Modified moments ago: maybe still being written, and a walk sees no
                    # close event. It must hold still first, like a file only "created".
                    self.ingest.created(item.stat.path, now, "walk", item.reason)
                else:
                    self.ingest.complete(item.stat.path, "walk", now, walk_reason=item.reason)
            elif isinstance(item, Vanished):
                if not os.path.lexists(item.path):
                    self.catalog.mark_missing(item.path, "the file is gone (found by a walk)")
            elif isinstance(item, RootProblem):
                self._report_root(item.root, item.message)
                self._walk_problem_roots.add(item.root)
            elif isinstance(item, WalkDone):
                self._walk_done(item, now)

    def _walk_done(self, done: WalkDone, now: float) -> None:
        self._walks_pending = max(0, self._walks_pending - 1)
        self._walked_once = True
        self.metrics.last_walk_completed.set(time.time())
        self.metrics.walk_duration.set(done.seconds)
        self.metrics.watched_directories.set(done.directories)
        # A walk that read a root clears its problem; one that reported the root
        # (unreadable, looks unmounted) did not read it, though the folder exists.
        for root in done.roots:
            if (
                root in self._root_problems
                and root not in self._walk_problem_roots
                and os.path.isdir(root)
            ):
                self._root_back(root)
        self._walk_problem_roots.clear()
        self.metrics.roots_unavailable.set(len(self._root_problems))
        self.log.info("walk finished", reason=done.reason, files=done.files,
                      folders=done.directories, changed=done.reported,
                      seconds=round(done.seconds, 3), unreadable=done.errors[:5])  # fmt: skip
        interval = self.config.watch.rescan_interval_seconds
        if self.mode == "run" and interval > 0:
            self._next_walk = now + interval

    def _unavailable_root(self, path: bytes) -> bytes | None:
        """The watched root holding path, when that root is reported unavailable or now
        looks unmounted (the walk's rule: gone, unreadable, or empty with rows under it)."""
        assert self.catalog is not None
        holders = [r for r in self.roots if path.startswith(r.rstrip(b"/") + b"/")]
        if not holders:
            return None
        root = max(holders, key=len)
        if root in self._root_problems:
            return root
        catalog = self.catalog
        try:
            open_root(root, lambda: catalog.count_under(root))
        except RootUnavailable as exc:
            self._report_root(root, str(exc))
            return root
        return None

    def _root_back(self, root: bytes) -> None:
        """A watched folder is readable again: the images postponed under it go ahead."""
        assert self.catalog is not None and self.supervisor is not None
        self._root_problems.pop(root, None)
        self.metrics.roots_unavailable.set(len(self._root_problems))
        if self.catalog.resume_under(root):
            self.supervisor.wake()

    def _report_root(self, root: bytes, message: str) -> None:
        if self._root_problems.get(root) != message:
            self.log.warning("watched folder unavailable", root=display_path(root), problem=message)
        self._root_problems[root] = message
        self.metrics.roots_unavailable.set(len(self._root_problems))

    def _maybe_commit(self, now: float) -> None:
        assert self.catalog is not None and self.ingest is not None
        catalog = self.catalog
        if catalog.stalled:
            self._catalog_stalled(now)
            return
        if not catalog.in_transaction:
            return
        quiet = not self._has_queued_input() and not self.ingest.busy
        if (
            catalog.transaction_size >= BATCH_ROWS
            or catalog.transaction_age(now) >= BATCH_SECONDS
            or quiet
            or self._stop_requests
        ):
            started = time.perf_counter()
            if catalog.commit():
                done = time.monotonic()
                self.metrics.catalog_commits.inc()
                self.metrics.catalog_commit_duration.observe(time.perf_counter() - started)
                for completed_at in self.ingest.pending_delays:
                    self.metrics.ingest_delay.observe(max(0.0, done - completed_at))
                self.ingest.pending_delays.clear()
            else:
                self._catalog_stalled(now)

    def _catalog_stalled(self, now: float) -> None:
        """The catalog's disk is full: hold writes in memory, retry every few seconds."""
        assert self.catalog is not None
        if self._catalog_full_since is None:
            self._catalog_full_since = now
            self._catalog_probe_at = now + 5.0
            self.metrics.disk_full.labels("catalog").set(1)
            self.log.error("catalog disk is full; writes are held in memory until space returns",
                           catalog=self.config.catalog.path,
                           error=self.catalog.stalled_reason)  # fmt: skip
            return
        if now < self._catalog_probe_at:
            return
        self._catalog_probe_at = now + 5.0
        if self.catalog.resume():
            self.log.info("catalog disk has space again; held writes committed")
            self._catalog_full_since = None
            self.metrics.disk_full.labels("catalog").set(0)
            assert self.supervisor is not None
            self.supervisor.wake()

    # -- housekeeping --------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        self._refresh(now)
        if self.watcher is not None and not self._stop_requests:
            self._check_watcher(now)
        if (
            self._next_walk is not None
            and now >= self._next_walk
            and not self._stop_requests
            and self._walks_pending == 0
        ):
            self._next_walk = None
            self._request_walk("periodic")
        if self.progress is not None and now - self._last_progress >= 0.2:
            self._last_progress = now
            self.progress.write("\r" + progress_line(self._counts) + "\x1b[K")
            self.progress.flush()
        if not self._ready_sent and self._workers_up():
            self._ready_sent = True
            self.notifier.ready(self._status_text())
            self.log.info("ready", workers=self.supervisor.count if self.supervisor else 0)
        if self.notifier.ping_due(now) and self._healthy():
            self.notifier.ping(now)

    def _workers_up(self) -> bool:
        """Every worker started and said it is ready (a pool that cannot start is never
        READY: systemd's TimeoutStartSec then fails the start visibly)."""
        supervisor = self.supervisor
        assert supervisor is not None
        return len(supervisor.idle_slots()) + supervisor.busy() >= supervisor.count

    def _set_walk_interval(self) -> None:
        interval = self.config.watch.rescan_interval_seconds if self.mode == "run" else 0
        self.metrics.walk_interval.set(interval)

    def _healthy(self) -> bool:
        """What the systemd watchdog vouches for: observer, walker, pool and this loop."""
        if self.watcher is not None and not self.watcher.alive():
            return False
        if self.walker is not None and not self.walker.is_alive():
            return False
        return self.supervisor is not None and self.supervisor.healthy()

    def _check_watcher(self, now: float) -> None:
        watcher = self.watcher
        assert watcher is not None
        if watcher.walk_wanted.is_set():
            watcher.walk_wanted.clear()
            self.log.warning("filesystem events were lost; walking the roots to catch up",
                             dropped=watcher.dropped, overflows=watcher.overflows)  # fmt: skip
            self._sync_watch_counters()
            if self._walks_pending == 0:
                self._request_walk("overflow")
        if now - self._last_root_check < 2.0:
            return
        self._last_root_check = now
        self._sync_watch_counters()
        if not watcher.observer_alive():
            self.log.error("filesystem observer died; restarting it and walking the roots")
            self.metrics.observer_restarts.inc()
            watcher.restart()
            self._request_walk("restart")
            return
        # A dead emitter (its root was deleted or unmounted) is handled per root.
        back, gone = watcher.check_roots()
        for root in gone:
            self._report_root(root, "the watched folder is missing or unmounted")
        for root in back:
            if root in self._root_problems:
                self.log.info("watched folder is back; walking it", root=display_path(root))
                self._root_back(root)
            self._request_walk("root", (root,))
        count = watcher.watch_count()
        if count is not None:
            self.metrics.watches.set(count)

    def _sync_watch_counters(self) -> None:
        watcher = self.watcher
        assert watcher is not None
        dropped, watcher.dropped = watcher.dropped, 0
        if dropped:
            self.metrics.watch_events_dropped.inc(dropped)
        overflows, watcher.overflows = watcher.overflows, 0
        if overflows:
            self.metrics.watch_overflows.inc(overflows)

    def _refresh(self, now: float, *, force: bool = False) -> None:
        """Gauges and the systemd status line, from the catalog, every couple of seconds."""
        if not force and now - self._last_refresh < 2.0:
            return
        self._last_refresh = now
        assert self.catalog is not None and self.supervisor is not None
        self._counts = self.catalog.counts()
        self.metrics.set_counts(self._counts)
        self.metrics.set_failure_reasons(self.catalog.failure_reasons())
        if self._counts["pending"]:
            # Rows may have been queued by another process (`photoscand retry`).
            self.supervisor.wake()
        oldest = self.catalog.oldest_pending_since()
        self.metrics.oldest_pending_age.set(max(0.0, time.time() - oldest) if oldest else 0.0)
        self.metrics.catalog_wal_bytes.set(self.catalog.wal_bytes())
        if self.ingest is not None:
            for name, depth in self.ingest.depths().items():
                self.metrics.queue_depth.labels(name).set(depth)
        self.metrics.queue_depth.labels("events").set(self.events.qsize())
        self.metrics.queue_depth.labels("walk").set(self.walk_output.qsize())
        self.notifier.status(self._status_text())

    def _status_text(self) -> str:
        text = progress_line(self._counts)
        if self.supervisor is not None and self.supervisor.disk_full_since is not None:
            text += "; paused: thumbnail folder is full"
        if self._catalog_full_since is not None:
            text += "; paused: catalog disk is full"
        if self._root_problems:
            text += f"; {len(self._root_problems)} watched folder(s) unavailable"
        return text

    # -- scan mode -------------------------------------------------------------------------

    def _scan_finished(self, now: float) -> int | None:
        assert self.ingest is not None and self.supervisor is not None and self.catalog is not None
        if not self.supervisor.healthy():
            # Workers die before they can take work (a broken installation, or a memory
            # limit too small to start): waiting would never end.
            self.log.error("workers keep dying at start-up; giving up the scan (see above;"
                           " check workers.memory_limit_mb and the installation)")  # fmt: skip
            return EXIT_USAGE
        if self._walks_pending or not self._walked_once or self._has_queued_input():
            return None
        if not self.ingest.idle or self.catalog.in_transaction or self.catalog.stalled:
            return None
        if self.supervisor.busy() or self.supervisor.idle_slots() == []:
            return None
        if self.supervisor.catalog_has_work_hint():
            return None
        counts = self.catalog.counts_under(self.roots)
        if counts["pending"] or counts["converting"]:
            return None
        self._counts = self.catalog.counts()
        if self.progress is not None:
            self.progress.write("\r" + progress_line(self._counts) + "\x1b[K\n")
        elapsed = now - self._started
        under = counts
        print(
            f"scan finished in {elapsed:.1f}s: {sum(under.values())} images under the watched"
            f" folders: {under['done']} done, {under['failed']} failed, {under['missing']} missing",
            file=sys.stdout,
            flush=True,
        )
        return EXIT_FAILED_IMAGES if under["failed"] else EXIT_OK

    # -- reload ----------------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: apply a valid new config; keep the old one when the new one is invalid."""
        self.notifier.reloading()
        try:
            new = config_module.load_config(self.config.file, overrides=self.overrides)
        except ConfigError as exc:
            self.log.error("reload refused: the new configuration is invalid; keeping the old one",
                           problems=list(exc.problems))  # fmt: skip
            self.notifier.ready(self._status_text())
            return
        old = self.config
        needs_restart = [
            key
            for key, before, after in (
                ("catalog.path", old.catalog.path, new.catalog.path),
                ("metrics.listen", old.metrics.listen, new.metrics.listen),
                ("io.mode", old.io.mode, new.io.mode),
                ("io.prefetch_window_mb", old.io.prefetch_window_mb, new.io.prefetch_window_mb),
                ("watch.polling", old.watch.polling, new.watch.polling),
            )
            if before != after
        ]
        if needs_restart:
            self.log.warning("these settings apply after a restart", keys=needs_restart)
        self.config = new
        log_module.configure(new.logging.level, new.logging.format)
        assert self.supervisor is not None and self.ingest is not None
        self.supervisor.timeout = new.workers.timeout_seconds
        self.supervisor.max_attempts = new.workers.max_attempts
        self.supervisor.backoff = new.workers.retry_backoff_seconds
        self.supervisor.resize(new.workers.count, worker_settings(new))
        self.ingest.settle_seconds = new.watch.settle_seconds
        self.ingest.metadata_timeout = new.watch.metadata_timeout_seconds
        if new.watch.paths != old.watch.paths:
            self._change_roots(new)
        if new.watch.rescan_interval_seconds != old.watch.rescan_interval_seconds:
            interval = new.watch.rescan_interval_seconds
            self._set_walk_interval()
            self._next_walk = time.monotonic() + interval if interval > 0 else None
        self.log.info("configuration reloaded", workers=new.workers.count,
                      roots=list(new.watch.paths))  # fmt: skip
        self.notifier.ready(self._status_text())

    def _change_roots(self, new: Config) -> None:
        assert self.ingest is not None and self.walker is not None
        self.roots = tuple(os.fsencode(p) for p in new.watch.paths)
        self.ingest.roots = self.roots
        if self.watcher is not None:
            self.watcher.stop()
        self.watcher = Watcher(
            new.watch.paths,
            self.events,
            polling=new.watch.polling,
            wake=self.wake,
            polling_interval=max(1.0, min(new.watch.settle_seconds, 10.0)),
        )
        for root in self.watcher.start():
            self._report_root(root, self.watcher.unavailable().get(root, "cannot be watched"))
        self._root_problems = {r: m for r, m in self._root_problems.items() if r in self.roots}
        self.walker.roots = self.roots
        self._request_walk("reload")

    # -- stop ------------------------------------------------------------------------------

    def _stopping(self, now: float) -> int | None:
        """Graceful stop; returns the exit code once it is complete."""
        assert self.supervisor is not None and self.catalog is not None
        supervisor = self.supervisor
        if self._stop_deadline is None:
            self._stop_deadline = now + self.config.workers.stop_timeout_seconds
            self.notifier.stopping("stopping: finishing the images in hand")
            self.log.info("stopping: finishing the images in hand",
                          in_hand=supervisor.busy(),
                          bound=self.config.workers.stop_timeout_seconds)  # fmt: skip
            supervisor.begin_stop()
            if self.prefetcher is not None:
                for job in self.prefetcher.unclaimed():
                    self.catalog.release(job.id)
            if self.watcher is not None:
                self.watcher.stop()
                self.watcher = None
            if self.walker is not None:
                self.walker.stop()
        forced = self._stop_requests > 1
        if supervisor.busy() and not forced and now < self._stop_deadline:
            return None
        held = supervisor.kill_all()
        for job in held:
            self.catalog.release(job.id)
        if held:
            self.log.warning("stopped with images in hand; they go back to pending",
                             count=len(held), forced=forced)  # fmt: skip
        self.catalog.commit()
        if self.progress is not None:
            self.progress.write("\n")
        self.log.info("photoscand stopped", forced=forced)
        return 1 if forced else EXIT_OK

    def _shutdown_components(self) -> None:
        if self.watcher is not None:
            self.watcher.stop()
        if self.walker is not None:
            self.walker.stop()
            self.walker.join(timeout=5)
        if self.supervisor is not None:
            for job in self.supervisor.kill_all():
                if self.catalog is not None:
                    self.catalog.release(job.id)
        if self.prefetcher is not None:
            for job in self.prefetcher.unclaimed():
                if self.catalog is not None:
                    self.catalog.release(job.id)
            self.prefetcher.close()
        if self.ingest is not None:
            self.ingest.stop()
        if self.catalog is not None:
            with contextlib.suppress(Exception):
                self.catalog.close()
        if self.metrics_server is not None:
            self.metrics_server.close()
        with contextlib.suppress(Exception):
            signal.set_wakeup_fd(-1)
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
