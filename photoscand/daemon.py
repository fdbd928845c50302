"""The daemon: its parts wired together, and the one loop that drives them.

``photoscand run`` watches; ``photoscand scan`` walks once, converts, and exits. One thread
(the main one) owns the catalog's only read-write connection, the metadata process and the
worker pool, and waits on all of their pipes and sentinels at once with
``multiprocessing.connection.wait``. It never decodes, parses or walks itself: watchdog's
threads and the walker thread put what they find on bounded queues and wake it through a
pipe; children do the CPU work. So signals, dispatch and the systemd watchdog stay
responsive, and the metrics endpoint (its own thread) answers while the workers are
saturated. docs/architecture.md draws the whole picture.

Hazards: signals only set flags (see :mod:`photoscand.signals`); the loop acts on them. The
parts are built in the constructor and started in :meth:`Daemon.run`, so a daemon that
cannot take the catalog's lock or open the catalog starts no child and no thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import sys
from collections.abc import Callable, Mapping
from multiprocessing.connection import wait
from typing import Any, TextIO

from photoscand import config as config_module
from photoscand import exitcodes
from photoscand import log as log_module
from photoscand.bursts import BurstSummary
from photoscand.catalog import Catalog
from photoscand.children import Child, StartChild, Starter, start_fork_server
from photoscand.clock import Clock, SystemClock
from photoscand.commits import Committer
from photoscand.config import Config, ConfigError
from photoscand.gauges import Gauges
from photoscand.ingest import Ingest
from photoscand.lock import CatalogLock
from photoscand.log import display_path, get_logger
from photoscand.metrics import Metrics, serve_metrics, write_textfile
from photoscand.prefetch import Prefetcher
from photoscand.progress import progress_line
from photoscand.roots import RootAvailability
from photoscand.routing import Router
from photoscand.scanner import Walker, WalkOutput, WalkSchedule
from photoscand.signals import Signals
from photoscand.supervisor import Supervisor, arriving_hold
from photoscand.systemd import Notifier
from photoscand.watcher import FsEvent, Watcher

EVENT_QUEUE_SIZE = 10_000
WALK_QUEUE_SIZE = 2_000
PROGRESS_SECONDS = 0.2  # how often scan's progress line is redrawn on a terminal
# Settings the running daemon cannot change: a reload says they apply after a restart.
RESTART_KEYS = (
    "catalog.path",
    "metrics.listen",
    "io.mode",
    "io.prefetch_window_mb",
    "watch.polling",
)


class Daemon:
    """``photoscand run`` (watching) and ``photoscand scan`` (one batch, then exit).

    The constructor takes the catalog's lock and builds every part; :meth:`run` starts
    them, loops, and stops them.

    Args:
        config: the validated configuration.
        mode: "run" or "scan".
        progress: a stream for scan's progress line (a TTY), or None.
        metrics_file: where to write the final metrics (Prometheus text format, e.g. for
            node_exporter's textfile collector) when the daemon exits.
        overrides: the command-line flags' settings, applied again on each reload (flags
            win over the file and the environment, also after SIGHUP).
        clock: the clocks (tests run the loop's decisions on their own).
        on_turn: called with the daemon after every turn of the loop (tests look at, and
            break, the running daemon there).

    Raises:
        CatalogLocked: another daemon runs on the catalog.
        CatalogError: the catalog cannot be opened.
        ConfigError: the metrics endpoint cannot listen (``run``).
    """

    def __init__(
        self,
        config: Config,
        *,
        mode: str = "run",
        progress: TextIO | None = None,
        metrics_file: str | None = None,
        overrides: Mapping[str, tuple[object, str]] | None = None,
        clock: Clock | None = None,
        on_turn: Callable[[Daemon], None] | None = None,
    ) -> None:
        self.config = config
        self.mode = mode
        self.progress = progress
        self.metrics_file = metrics_file
        self.overrides = dict(overrides or {})
        self.clock = clock or SystemClock()
        self.on_turn = on_turn
        self.log = get_logger("daemon")
        self._stop_deadline: float | None = None
        self._progress_at = 0.0
        self._ready_sent = False
        self._started = self.clock.monotonic()
        self._parts = contextlib.ExitStack()
        try:
            self._build(config)
        except BaseException:
            self._parts.close()
            raise

    def _build(self, config: Config) -> None:
        parts = self._parts
        self.lock = CatalogLock(config.catalog.path)
        parts.callback(self.lock.release)
        self.signals = Signals()
        parts.callback(self.signals.close)
        self.metrics = Metrics()
        self.notifier = Notifier()
        start_child = functools.partial(Child, start_fork_server())
        self.catalog = Catalog(config.catalog.path)
        parts.callback(self.catalog.close)
        roots = tuple(os.fsencode(p) for p in config.watch.paths)
        self.roots = RootAvailability(roots, self.catalog, self.metrics, self.clock)
        self.events: queue.Queue[FsEvent] = queue.Queue(maxsize=EVENT_QUEUE_SIZE)
        self.walk_output: queue.Queue[WalkOutput] = queue.Queue(maxsize=WALK_QUEUE_SIZE)
        prefetch = config.io.mode == "prefetch"
        self.prefetcher = (
            Prefetcher(config.io.prefetch_window_mb << 20, self.signals.wake, self.metrics)
            if prefetch
            else None
        )
        self.ingest = Ingest(
            self.catalog,
            roots,
            start_child,
            config.watch,
            metrics=self.metrics,
            clock=self.clock,
            deferred=prefetch,
        )
        self.supervisor = self._new_supervisor(config, start_child)
        self.committer = Committer(self.catalog, self.ingest, self.metrics)
        self.burst = BurstSummary(self.log)
        self.walker = Walker(roots, config.catalog.path, self.walk_output, wake=self.signals.wake)
        interval = config.watch.rescan_interval_seconds if self.mode == "run" else 0.0
        self.walks = WalkSchedule(self.walker, interval)
        self.router = Router(
            self.ingest, self.catalog, self.roots, self.walks, self.metrics, self.clock
        )
        self.watcher = self._new_watcher(config) if self.mode == "run" else None
        self.gauges = Gauges(
            self.catalog,
            self.ingest,
            self.supervisor,
            self.committer,
            self.roots,
            {"events": self.events, "walk": self.walk_output},
            self.metrics,
            self.notifier,
            self.clock,
        )
        self.metrics_server = serve_metrics(
            self.metrics, config.metrics.listen, required=self.mode == "run"
        )
        if self.metrics_server is not None:
            parts.callback(self.metrics_server.close)

    def _new_supervisor(self, config: Config, start_child: StartChild) -> Supervisor:
        starter = Starter(start_child, self.signals.wake, "photoscand-start")
        return Supervisor(
            self.catalog,
            starter,
            config.workers,
            config.thumbnail_settings(),
            metrics=self.metrics,
            clock=self.clock,
            prefetcher=self.prefetcher,
            read_metadata=lambda job, shared, done: self.ingest.parse_loaded(
                job.id, job.path, shared, done
            ),
            # A one-shot scan ends instead of waiting for a folder to come back; there
            # such images read as missing until a later walk finds them again.
            unavailable_root=self.roots.holder_unavailable if self.mode == "run" else None,
            arriving_hold=self._arriving_hold(config),
        )

    def _arriving_hold(self, config: Config) -> float | None:
        # A one-off scan runs on a tree that is complete: it fails a truncated file at once.
        return arriving_hold(config.watch.settle_seconds) if self.mode == "run" else None

    def _new_watcher(self, config: Config) -> Watcher:
        return Watcher(
            config.watch.paths,
            self.events,
            polling=config.watch.polling,
            wake=self.signals.wake,
            polling_interval=max(1.0, min(config.watch.settle_seconds, 10.0)),
        )

    # -- start and stop --------------------------------------------------------------------

    def run(self) -> int:
        """Run until stopped (run) or until the batch is done (scan); returns the exit code."""
        try:
            self._start()
            return self._loop()
        finally:
            self._shutdown()
            if self.metrics_file:
                self._write_metrics_file(self.metrics_file)

    def _start(self) -> None:
        self.signals.install(reload=self.mode == "run")
        self.catalog.clear_conditions()
        returned = self.catalog.reset_converting()
        if returned:
            self.log.info(
                "conversions interrupted by the last stop go back to pending", count=returned
            )
        if self.prefetcher is not None:
            self.prefetcher.start()
        self.supervisor.start()
        self.ingest.start()
        if self.watcher is not None:
            for root in self.watcher.start():
                self.roots.report(root, self.watcher.unavailable().get(root, "cannot be watched"))
        self.walker.start()
        self.walks.request("start")
        watch_mode = "polling" if self.config.watch.polling else "inotify"
        self.metrics.set_watch_mode(watch_mode if self.watcher is not None else "none")
        self.metrics.walk_interval.set(self.walks.interval)
        self.gauges.refresh(self.clock.monotonic(), force=True)
        # READY=1 waits for the workers' "ready" (see _housekeeping): catalog, watches and
        # the metrics port are up by now.
        self.log.info(
            "photoscand started",
            mode=self.mode,
            roots=[display_path(r) for r in self.roots.roots],
            workers=self.config.workers.count,
            backend=self.config.workers.backend,
            catalog=self.config.catalog.path,
            polling=self.config.watch.polling,
        )

    def _shutdown(self) -> None:
        """Stop every part; what is still in hand goes back to pending."""
        if self.watcher is not None:
            self.watcher.stop()
        self.walker.stop()
        if self.walker.is_alive():
            self.walker.join(timeout=5)
        self._release(self.supervisor.kill_all())
        self.supervisor.close()
        if self.prefetcher is not None:
            self._release(self.prefetcher.unclaimed())
            self.prefetcher.close()
        self.ingest.stop()
        with contextlib.suppress(Exception):
            if self.metrics_file:
                self.catalog.commit()
                self.gauges.refresh(self.clock.monotonic(), force=True)
            self.catalog.clear_conditions()
        self._parts.close()

    def _release(self, jobs: list[Any]) -> None:
        for job in jobs:
            self.catalog.release(job.id)

    def _write_metrics_file(self, path: str) -> None:
        try:
            write_textfile(self.metrics, path)
        except OSError as exc:
            self.log.error("cannot write the metrics file", path=path, error=exc.strerror)

    # -- the loop ------------------------------------------------------------------------

    def _loop(self) -> int:
        ingest, supervisor = self.ingest, self.supervisor
        while True:
            now = self.clock.monotonic()
            if self.signals.stop_requests:
                code = self._stopping(now)
                if code is not None:
                    return code
            if self.signals.take_reload():
                self._reload()
            wake_fd = self.signals.read_fd
            objects = [wake_fd, *ingest.wait_objects(), *supervisor.wait_objects()]
            ready = wait(objects, self._wait_timeout(now))
            if wake_fd in ready:
                self.signals.drain()
            now = self.clock.monotonic()
            ingest.on_ready(ready, now)
            supervisor.on_ready(ready, now)
            if not self.signals.stop_requests:
                self.router.drain_events(self.events, now)
                if self.router.drain_walks(self.walk_output, now):
                    supervisor.wake()
            ingest.tick(now)
            supervisor.tick(now)
            rows = ingest.take_rows_written()
            if rows:
                supervisor.wake()
            if not self.signals.stop_requests:
                supervisor.dispatch(now)
            if self.committer.maybe_commit(now, quiet=self._quiet()):
                supervisor.wake()
            converted, failed = supervisor.take_outcomes()
            self.burst.add(now, cataloged=rows, converted=converted, failed=failed)
            self._housekeeping(now)
            if self.on_turn is not None:
                self.on_turn(self)
            if self.mode == "scan" and not self.signals.stop_requests:
                code = self._scan_finished(now)
                if code is not None:
                    return code

    def _drained(self) -> bool:
        """Nothing queued, settling, parsing, converting or left to claim, all committed."""
        return (
            not self._has_queued_input()
            and self.ingest.idle
            and self.supervisor.idle()
            and not self.catalog.in_transaction
        )

    def _has_queued_input(self) -> bool:
        return not self.events.empty() or not self.walk_output.empty()

    def _quiet(self) -> bool:
        """Nothing queued for phase 1, or stopping: the open batch may be committed now."""
        stopping = bool(self.signals.stop_requests)
        return stopping or not (self._has_queued_input() or self.ingest.busy)

    def _wait_timeout(self, now: float) -> float:
        if self._has_queued_input() and not self.signals.stop_requests:
            return 0.0
        deadlines = [
            now + 1.0,
            self.ingest.next_deadline(now),
            self.supervisor.next_deadline(now),
            self.committer.deadline(now),
            self.walks.next_periodic,
            self._stop_deadline,
        ]
        if self.notifier.watchdog_every is not None:
            deadlines.append(now + self.notifier.watchdog_every / 2)
        if self.progress is not None:
            deadlines.append(now + PROGRESS_SECONDS)
        return max(0.0, min(d for d in deadlines if d is not None) - now)

    # -- housekeeping --------------------------------------------------------------------

    def _housekeeping(self, now: float) -> None:
        self.gauges.refresh(now)
        if self.burst.active and self._drained():
            self.burst.drained(now)
        if not self.signals.stop_requests:
            check = self.watcher.check(now) if self.watcher is not None else None
            if check is not None and self.router.watcher_checked(check):
                self.supervisor.wake()
            self.walks.tick(now)
        if self.progress is not None and now - self._progress_at >= PROGRESS_SECONDS:
            self._progress_at = now
            self.progress.write("\r" + progress_line(self.gauges.counts) + "\x1b[K")
            self.progress.flush()
        # A pool that cannot start is never READY: systemd's TimeoutStartSec then fails
        # the start visibly.
        if not self._ready_sent and self.supervisor.all_ready():
            self._ready_sent = True
            self.notifier.ready(self.gauges.status_text())
            self.log.info("ready", workers=self.supervisor.count)
        if self.notifier.ping_due(now) and self._healthy():
            self.notifier.ping(now)

    def _healthy(self) -> bool:
        """What the systemd watchdog vouches for: observer, walker, pool and this loop."""
        if self.watcher is not None and not self.watcher.alive():
            return False
        return self.walker.is_alive() and self.supervisor.healthy()

    # -- scan mode -------------------------------------------------------------------------

    def _scan_finished(self, now: float) -> int | None:
        """The scan's exit code once nothing under the watched folders is left to do."""
        supervisor = self.supervisor
        if not supervisor.healthy():
            # Workers die before they can take work (a broken installation, or a memory
            # limit too small to start): waiting would never end.
            self.log.error(
                "workers keep dying at start-up; giving up the scan (see above;"
                " check workers.memory_limit_mb and the installation)"
            )
            return exitcodes.USAGE
        waiting = self.walks.pending or not self.walks.walked_once or self.catalog.stalled
        if waiting or not self._drained() or not supervisor.all_ready():
            return None
        under = self.catalog.counts_under(self.roots.roots)
        if under["pending"] or under["converting"]:
            return None
        if self.progress is not None:
            counts = self.catalog.counts()
            self.progress.write("\r" + progress_line(counts) + "\x1b[K\n")
        print(
            f"scan finished in {now - self._started:.1f}s: {sum(under.values())} images under"
            f" the watched folders: {under['done']} done, {under['failed']} failed,"
            f" {under['missing']} missing",
            file=sys.stdout,
            flush=True,
        )
        return exitcodes.FAILED_IMAGES if under["failed"] else exitcodes.OK

    # -- reload ----------------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: apply a valid new config; keep the old one when the new one is invalid."""
        self.notifier.reloading()
        try:
            new = config_module.load_config(self.config.file, overrides=self.overrides)
        except ConfigError as exc:
            self.log.error(
                "reload refused: the new configuration is invalid; keeping the old one",
                problems=list(exc.problems),
            )
            self.notifier.ready(self.gauges.status_text())
            return
        old, self.config = self.config, new
        needs_restart = config_module.changed_keys(old, new, RESTART_KEYS)
        if needs_restart:
            self.log.warning("these settings apply after a restart", keys=needs_restart)
        log_module.configure(new.logging.level, new.logging.format)
        self.supervisor.reconfigure(new.workers, new.thumbnail_settings(), self._arriving_hold(new))
        self.ingest.reconfigure(new.watch)
        if new.watch.paths != old.watch.paths:
            self._change_roots(new)
        if new.watch.rescan_interval_seconds != old.watch.rescan_interval_seconds:
            self.walks.set_interval(new.watch.rescan_interval_seconds, self.clock.monotonic())
            self.metrics.walk_interval.set(self.walks.interval)
        self.log.info(
            "configuration reloaded", workers=new.workers.count, roots=list(new.watch.paths)
        )
        self.notifier.ready(self.gauges.status_text())

    def _change_roots(self, new: Config) -> None:
        roots = tuple(os.fsencode(p) for p in new.watch.paths)
        self.roots.set_roots(roots)
        self.ingest.roots = roots
        self.walker.roots = roots
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = self._new_watcher(new)
            for root in self.watcher.start():
                self.roots.report(root, self.watcher.unavailable().get(root, "cannot be watched"))
        self.walks.request("reload")

    # -- stop ------------------------------------------------------------------------------

    def _stopping(self, now: float) -> int | None:
        """Graceful stop; returns the exit code once it is complete."""
        supervisor = self.supervisor
        if self._stop_deadline is None:
            self._begin_stop(now)
        forced = self.signals.stop_requests > 1
        if supervisor.busy() and not forced and now < self._stop_deadline:
            return None
        held = supervisor.kill_all()
        self._release(held)
        if held:
            self.log.warning(
                "stopped with images in hand; they go back to pending",
                count=len(held),
                forced=forced,
            )
        self.catalog.commit()
        if self.progress is not None:
            self.progress.write("\n")
        self.log.info("photoscand stopped", forced=forced)
        return exitcodes.FAILED_IMAGES if forced else exitcodes.OK

    def _begin_stop(self, now: float) -> None:
        self._stop_deadline = now + self.config.workers.stop_timeout_seconds
        self.notifier.stopping("stopping: finishing the images in hand")
        self.log.info(
            "stopping: finishing the images in hand",
            in_hand=self.supervisor.busy(),
            bound=self.config.workers.stop_timeout_seconds,
        )
        self.supervisor.begin_stop()
        if self.prefetcher is not None:
            self._release(self.prefetcher.unclaimed())
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        self.walker.stop()
