"""Phase 2 on the daemon's side: a fixed pool of worker processes, one job at a time each.

``workers.count`` single-threaded workers, each with its own pipe, waited on together with
each process's sentinel. The supervisor claims pending rows, hands one job to each idle
worker, and records every result; workers never open the catalog. ``ProcessPoolExecutor``
and ``multiprocessing.Pool`` are not used on purpose: one dead worker breaks the whole
executor, and neither can kill a single task that hangs.

Hazards: a worker that overstays ``timeout_seconds`` is SIGKILLed and replaced; one that
dies is replaced at once; in both cases only the image it held counts an attempt. At most
``workers.count`` conversions run at any moment, because a job is only ever sent to an idle
worker of the fixed pool. Children are started through ``start_child`` and time is read
from ``clock``, so the decisions here run in tests on fake children and a fake clock.

Signal contract (the daemon's loop turns signals into calls here):

=============  ==============================================================
SIGTERM/INT    :meth:`begin_stop`: stop claiming; the daemon waits up to
               stop_timeout_seconds for the images in hand, then
               :meth:`kill_all` and their rows go back to pending
2nd signal     :meth:`kill_all` at once
SIGHUP         :meth:`resize` to the new workers.count; new settings apply
               to workers started afterwards
=============  ==============================================================
"""

from __future__ import annotations

import functools
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from photoscand import outcomes
from photoscand.catalog import Catalog, Job
from photoscand.children import (
    Child,
    ChildStartError,
    Starter,
    describe_exit,
    restart_delay,
)
from photoscand.clock import Clock
from photoscand.config import WorkersConfig
from photoscand.log import display_path, get_logger, one_file
from photoscand.metrics import Metrics
from photoscand.prefetch import Prefetcher
from photoscand.protocol import (
    ConversionJob,
    ConversionResult,
    Converted,
    SharedBytes,
    SweepDone,
    ThumbnailSettings,
    WorkerReady,
)
from photoscand.worker import conversion_main, sweep_main

# How long to wait for a disk that was full before trying one image again.
DISK_FULL_PROBE_SECONDS = 5.0
# How long images under an unavailable watched folder wait before they are tried again.
UNAVAILABLE_ROOT_RETRY_SECONDS = 60.0
# The start-up sweep of stale temporary thumbnails; past this the workers start anyway.
SWEEP_TIMEOUT_SECONDS = 60.0
# How often killed workers are looked at until their exit is reported.
REAP_POLL_SECONDS = 0.5
# A worker that dies this many times in a row before it is ready means workers cannot live.
EARLY_DEATHS_UNHEALTHY = 5

# Prefetch mode reads a row's metadata from the bytes the reader brought:
# (job, where the bytes are, called once the parser is done with them).
ReadMetadata = Callable[[Job, SharedBytes | None, Callable[[], None] | None], None]


# A truncated file is presumed still being written until it has held still this long (or
# ten times watch.settle_seconds, when that is longer).
ARRIVING_MIN_SECONDS = 30.0


def arriving_hold(settle_seconds: float) -> float:
    """How long a truncated file must hold still before it fails as truncated."""
    return max(ARRIVING_MIN_SECONDS, 10 * settle_seconds)


@dataclass(slots=True)
class _Slot:
    index: int
    child: Child | None = None
    ready: bool = False
    job: Job | None = None
    job_started: float = 0.0
    idle_since: float = 0.0
    restart_after: float = 0.0
    starting: int = 0  # the token of the start under way (0: none)
    early_deaths: int = 0  # consecutive deaths before "ready": back off restarts
    retire: bool = False  # the pool shrank: stop this worker once it is idle
    restart_on_idle: bool = False  # settings changed: replace this worker once it is idle
    waiting_for_input: bool = False  # idle while work was queued (counts as waiting)


class Supervisor:
    """The worker pool and the dispatch of phase 2.

    Args:
        catalog: the daemon's read-write catalog.
        starter: starts the workers without holding the loop (see children.Starter); its
            ``start_child`` starts the one-off sweep at start-up.
        workers: the ``workers`` settings (count, timeout, attempts, back-off).
        settings: what each worker converts to.
        metrics: where outcomes go.
        clock: monotonic time for timeouts and restarts, wall time for the catalog.
        prefetcher: io.mode prefetch: the sequential reader that brings each claimed job's
            bytes (claims then follow disk order).
        read_metadata: prefetch mode: reads a row's deferred metadata from those bytes.
        unavailable_root: given an image's path, its watched root when that root is
            unavailable (missing, unreadable or emptied); None in ``scan``.
        arriving_hold: how long a truncated file must have held still before it fails (it
            is presumed still being written until then); None in ``scan``, which fails it
            at once.
    """

    def __init__(
        self,
        catalog: Catalog,
        starter: Starter,
        workers: WorkersConfig,
        settings: ThumbnailSettings,
        *,
        metrics: Metrics,
        clock: Clock,
        prefetcher: Prefetcher | None = None,
        read_metadata: ReadMetadata | None = None,
        unavailable_root: Callable[[bytes], bytes | None] | None = None,
        arriving_hold: float | None = None,
    ) -> None:
        self.catalog = catalog
        self.starter = starter
        self._start_tokens = 0
        self.settings = settings
        self.timeout = workers.timeout_seconds
        self.max_attempts = workers.max_attempts
        self.backoff = workers.retry_backoff_seconds
        self.metrics = metrics
        self.clock = clock
        self.prefetcher = prefetcher
        self.read_metadata = read_metadata
        self.unavailable_root = unavailable_root
        self.arriving_hold = arriving_hold
        self.log = get_logger("supervisor")
        self._slots: list[_Slot] = [_Slot(i) for i in range(workers.count)]
        # Killed workers whose exit the fork server has not reported yet (reaped later, so
        # that a stopped or slow fork server never blocks the loop).
        self._reaping: list[Child] = []
        # Claimed rows whose metadata phase 1 reads first (it failed for a reason that may be
        # gone): phase 2 must not mark them done with their metadata missing.
        self._awaiting_metadata: dict[int, Job] = {}
        self._metadata_read: deque[int] = deque()
        self._work_maybe_pending = True
        self._next_retry_at: float | None = None  # wall time of the earliest back-off's end
        self.stopping = False
        self._done_count = self._failed_count = 0  # since the loop last asked
        self.disk_full_since: float | None = None
        self._disk_probe_at = 0.0

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._sweep_temp_files()
        now = self.clock.monotonic()
        for slot in self._slots:
            self._spawn(slot, now)

    def _sweep_temp_files(self) -> None:
        """Remove what workers killed with the last run left mid-write. Only before any
        worker starts: a live worker's temporary file looks the same."""
        folder = self.settings.out_dir
        try:
            child = self.starter.start_child(sweep_main, (folder,), "photoscand-sweep")
        except ChildStartError as exc:
            self.log.warning("sweep of stale temporary thumbnails failed", error=str(exc))
            return
        try:
            if not child.conn.poll(SWEEP_TIMEOUT_SECONDS):
                self.log.warning("sweep of stale temporary thumbnails timed out", folder=folder)
                return
            done: SweepDone = child.conn.recv()
            if done.removed:
                self.log.info(
                    "removed temporary thumbnails left by the last run",
                    count=done.removed,
                    folder=folder,
                )
        except (EOFError, OSError) as exc:
            self.log.warning("sweep of stale temporary thumbnails failed", error=str(exc))
        finally:
            child.close(graceful=False)

    def _spawn(self, slot: _Slot, now: float) -> None:
        """Ask for a new worker in the slot; it is taken in by _take_started."""
        self._start_tokens += 1
        slot.starting = self._start_tokens
        slot.child = None
        name = f"photoscand-worker-{slot.index}"
        self.starter.request(
            (slot.index, slot.starting, self.settings), conversion_main, (self.settings,), name
        )
        self._update_gauges()

    def _take_started(self, now: float) -> None:
        """The workers that were started since the last turn go to their slots; one nobody
        waits for any more (the pool shrank, or it is stopping) is stopped."""
        for (index, token, settings), result in self.starter.finished():
            slot = self._slots[index] if index < len(self._slots) else None
            if slot is None or slot.starting != token or self.stopping:
                if isinstance(result, Child):
                    self._discard(result)
                continue
            slot.starting = 0
            if isinstance(result, ChildStartError):
                slot.early_deaths += 1
                slot.restart_after = now + restart_delay(0.25, slot.early_deaths)
                self.log.error("worker could not be started; trying again", error=str(result))
                continue
            slot.child = result
            slot.ready = False
            slot.job = None
            slot.idle_since = now
            # Settings reloaded while it started: it is replaced once it is idle.
            slot.restart_on_idle = settings != self.settings
        self._update_gauges()

    @property
    def count(self) -> int:
        return len(self._slots)

    def reconfigure(
        self, workers: WorkersConfig, settings: ThumbnailSettings, arriving_hold: float | None
    ) -> None:
        """Apply a reloaded config: limits at once, new settings for new workers, and a new
        pool size. Idle workers are replaced at once so new sizes apply to the next images;
        busy ones finish their image first."""
        self.timeout = workers.timeout_seconds
        self.max_attempts = workers.max_attempts
        self.backoff = workers.retry_backoff_seconds
        self.arriving_hold = arriving_hold
        count = workers.count
        changed = settings != self.settings
        self.settings = settings
        now = self.clock.monotonic()
        while len(self._slots) < count:
            slot = _Slot(len(self._slots))
            self._slots.append(slot)
            self._spawn(slot, now)
        for slot in self._slots:
            slot.retire = slot.index >= count
        if changed:
            for slot in self._slots[:count]:
                if slot.job is None and slot.child is not None:
                    self._replace(slot, now, "reload")
                else:
                    slot.restart_on_idle = True
        self._trim()

    def _replace(self, slot: _Slot, now: float, reason: str) -> None:
        assert slot.child is not None
        slot.child.close(graceful=True)
        self.metrics.worker_restarts.labels(reason).inc()
        self._spawn(slot, now)

    def _trim(self) -> None:
        while self._slots and self._slots[-1].retire and self._slots[-1].job is None:
            slot = self._slots.pop()
            if slot.child is not None:
                slot.child.close(graceful=True)
        self._update_gauges()

    def wait_objects(self) -> list[Any]:
        objects: list[Any] = []
        for slot in self._slots:
            if slot.child is not None:
                objects.append(slot.child.conn)
                objects.append(slot.child.sentinel)
        return objects

    def busy(self) -> int:
        return sum(1 for s in self._slots if s.job is not None)

    def all_ready(self) -> bool:
        """Every worker started and said it is ready."""
        return len(self.idle_slots()) + self.busy() >= self.count

    def healthy(self) -> bool:
        """True unless workers keep dying before they can take work."""
        return not any(s.early_deaths >= EARLY_DEATHS_UNHEALTHY for s in self._slots)

    def wake(self) -> None:
        """New pending rows may exist (a row was added, released or retried)."""
        self._work_maybe_pending = True

    def take_outcomes(self) -> tuple[int, int]:
        """Images converted and failed for good since the last call."""
        outcomes_ = (self._done_count, self._failed_count)
        self._done_count = self._failed_count = 0
        return outcomes_

    def idle(self) -> bool:
        """Nothing in hand and nothing known to claim."""
        return not (self.busy() or self._awaiting_metadata or self._work_maybe_pending)

    def has_work_hint(self) -> bool:
        """Pending rows may exist that were not looked for yet."""
        return self._work_maybe_pending

    def next_deadline(self, now: float) -> float | None:
        deadlines = []
        for slot in self._slots:
            if slot.job is not None:
                deadlines.append(slot.job_started + self.timeout)
            if slot.child is None and not slot.starting:
                deadlines.append(slot.restart_after)
        if self._next_retry_at is not None:
            deadlines.append(self._next_retry_at - self.clock.wall() + now)
        if self.disk_full_since is not None:
            deadlines.append(self._disk_probe_at)
        if self._reaping:
            deadlines.append(now + REAP_POLL_SECONDS)
        return min(deadlines) if deadlines else None

    # -- results and deaths -------------------------------------------------------------

    def on_ready(self, ready: Sequence[Any], now: float) -> None:
        self._take_started(now)
        for slot in list(self._slots):
            child = slot.child
            if child is None:
                continue
            if child.conn in ready:
                self._read(slot, child, now)
            if slot.child is child and child.sentinel in ready:
                self._died(slot, child, now)
        self._trim()

    def _read(self, slot: _Slot, child: Child, now: float) -> None:
        while True:
            try:
                if not child.conn.poll():
                    return
                message: WorkerReady | ConversionResult = child.conn.recv()
            except (EOFError, OSError):
                # Its end of the pipe closed: the worker is dead, whether or not the fork
                # server (which reports exits) has said so yet.
                self._died(slot, child, now)
                return
            if isinstance(message, WorkerReady):
                slot.ready = True
                slot.early_deaths = 0
                slot.idle_since = now
                continue
            job = slot.job
            if job is not None and message.image_id == job.id:
                with one_file(self.log, job.path, "recording a conversion"):
                    self._finish(slot, job, message, now)

    def _finish(self, slot: _Slot, job: Job, result: ConversionResult, now: float) -> None:
        slot.job = None
        slot.idle_since = now
        # Idle from now on while work is queued = waiting for input (the reader, or
        # the catalog); idle with nothing to do is not waiting.
        slot.waiting_for_input = self._work_maybe_pending or (
            self.prefetcher is not None and self.prefetcher.queued() > 0
        )
        self.metrics.worker_busy_seconds.inc(now - slot.job_started)
        self.metrics.conversion_duration.observe(result.seconds)
        if result.output:
            self.log.info(
                "decoder output", path=display_path(job.path), id=job.id, output=result.output
            )
        if isinstance(result, Converted):
            self._converted(job, result, now)
        else:
            self._failed(job, result.reason, result.message, now)
        self._released(job)
        if slot.restart_on_idle and slot.child is not None:
            slot.restart_on_idle = False
            self._replace(slot, now, "reload")
        self._update_gauges()

    def _converted(self, job: Job, result: Converted, now: float) -> None:
        self.metrics.observe_stages(result.timings)
        self.catalog.record_done(job.id, result.content_hash, result.thumbnails, self.clock.wall())
        self.metrics.conversions.labels("done").inc()
        self._done_count += 1
        self.log.debug(
            "converted", path=display_path(job.path), id=job.id, seconds=round(result.seconds, 3)
        )
        if self.disk_full_since is not None:
            self._disk_space_back()

    def _failed(self, job: Job, reason: str, message: str, now: float) -> None:
        if reason == outcomes.DISK_FULL:
            self._disk_full(job, message, now)
            return
        if reason == outcomes.VANISHED and self._postponed(job):
            return
        if reason == outcomes.TRUNCATED and self._still_arriving(job):
            return
        self.metrics.conversion_failures.labels(reason).inc()
        if reason == outcomes.VANISHED:
            self.catalog.record_vanished(job.id, message)
            self.metrics.conversions.labels("vanished").inc()
            self.log.info("file vanished before conversion", path=display_path(job.path))
            return
        transient = reason in outcomes.TRANSIENT
        self.catalog.record_failure(
            job.id,
            outcomes.format_error(reason, message),
            transient=transient,
            max_attempts=self.max_attempts,
            backoff=self.backoff,
            now=self.clock.wall(),
        )
        attempts = job.attempts + 1
        fields = {"path": display_path(job.path), "id": job.id, "reason": reason}
        if not transient or attempts >= self.max_attempts:
            self.metrics.conversions.labels("failed").inc()
            self._failed_count += 1
            self.log.warning("conversion failed", **fields, message=message, attempts=attempts)
            return
        self.metrics.conversions.labels("retried").inc()
        # The catalog holds the back-off deadline: the next claim finds when it ends.
        self.wake()
        self.log.warning(
            "conversion failed; will retry", **fields, message=message, attempts=attempts
        )

    def _disk_full(self, job: Job, message: str, now: float) -> None:
        """ENOSPC on the thumbnail folder is nobody's fault: no attempt counted; phase 2
        pauses, probing with one image at a time, until space returns."""
        self.catalog.release(job.id)
        self.metrics.conversions.labels("released").inc()
        self.metrics.conversion_failures.labels(outcomes.DISK_FULL).inc()
        if self.disk_full_since is None:
            self.disk_full_since = now
            self.metrics.disk_full.labels("thumbnails").set(1)
            self.log.error(
                "thumbnail folder is full; conversions paused until space returns",
                folder=self.settings.out_dir,
                message=message,
            )
        self._disk_probe_at = now + DISK_FULL_PROBE_SECONDS
        self.wake()

    def _still_arriving(self, job: Job) -> bool:
        """A truncated file that has not held still for ``arriving_hold`` seconds is presumed
        still being written (a slow card, a share that pauses): no attempt, no warning; it
        waits until it has held still that long, or is read again when it changes."""
        if self.arriving_hold is None:
            return False
        try:
            mtime = os.lstat(job.path).st_mtime
        except OSError:
            return False
        ready_at = mtime + self.arriving_hold
        if self.clock.wall() >= ready_at:
            return False
        self.catalog.postpone(job.id, ready_at)
        self.metrics.conversions.labels("released").inc()
        self.log.debug("truncated, presumed still arriving", path=display_path(job.path))
        self.wake()
        return True

    def _postponed(self, job: Job) -> bool:
        """A vanished file whose whole watched folder is gone (an unmounted disk) is not a
        deletion, and not a failure: the rows under it wait, with no attempt counted."""
        if self.unavailable_root is None:
            return False
        root = self.unavailable_root(job.path)
        if root is None:
            return False
        retry_at = self.clock.wall() + UNAVAILABLE_ROOT_RETRY_SECONDS
        self.catalog.postpone_under(job.id, root, retry_at)
        self.metrics.conversions.labels("released").inc()
        return True

    def _discard(self, child: Child) -> None:
        """Kill a worker now and reap it when its exit is reported."""
        if not child.kill_now():
            self._reaping.append(child)

    def _released(self, job: Job) -> None:
        """A worker is done with a job (finished, failed, died or was killed)."""
        if self.prefetcher is not None:
            self.prefetcher.done_with(job.id)

    def _died(self, slot: _Slot, child: Child, now: float) -> None:
        code = child.exitcode()
        self._discard(child)
        slot.child = None
        job, slot.job = slot.job, None
        if job is not None and self.stopping:
            # Killed along with the daemon (a signal to the whole process group):
            # not the image's fault.
            self.catalog.release(job.id)
            self._released(job)
        elif job is not None:
            self.metrics.worker_restarts.labels("crashed").inc()
            self.log.warning("worker died", path=display_path(job.path), id=job.id, exitcode=code)
            self._failed(job, outcomes.CRASHED, f"worker died ({describe_exit(code)})", now)
            self._released(job)
        elif not slot.ready:
            slot.early_deaths += 1
            self.log.error(
                "worker died while starting", exitcode=code, consecutive=slot.early_deaths
            )
        else:
            self.metrics.worker_restarts.labels("crashed").inc()
            self.log.warning("idle worker died", exitcode=code)
        if not self.stopping:
            delay = 0.0 if slot.early_deaths <= 1 else restart_delay(0.5, slot.early_deaths)
            slot.restart_after = now + delay
            if delay == 0.0:
                self._spawn(slot, now)
        self._update_gauges()

    # -- timeouts, restarts and dispatch ---------------------------------------------

    def tick(self, now: float) -> None:
        self._take_started(now)
        self._reaping = [child for child in self._reaping if not child.reaped()]
        for slot in self._slots:
            if slot.job is not None and now - slot.job_started > self.timeout:
                self._timed_out(slot, now)
            if (
                slot.child is None
                and not slot.starting
                and not self.stopping
                and now >= slot.restart_after
            ):
                self._spawn(slot, now)
        if self._next_retry_at is not None and self.clock.wall() >= self._next_retry_at:
            self._next_retry_at = None
            self._work_maybe_pending = True

    def _timed_out(self, slot: _Slot, now: float) -> None:
        job, slot.job = slot.job, None
        assert job is not None
        if slot.child is not None:
            self._discard(slot.child)
        slot.child = None
        self.metrics.worker_restarts.labels("timeout").inc()
        self.log.warning(
            "conversion timed out; worker killed",
            path=display_path(job.path),
            id=job.id,
            timeout=self.timeout,
        )
        self._failed(job, outcomes.TIMEOUT, f"conversion took longer than {self.timeout:g}s", now)
        self._released(job)
        if not self.stopping:
            self._spawn(slot, now)
        self._update_gauges()

    def idle_slots(self) -> list[_Slot]:
        return [
            s
            for s in self._slots
            if s.child is not None and s.ready and s.job is None and not s.retire
        ]

    def dispatch(self, now: float) -> int:
        """Claim pending rows for idle workers and send them. Returns how many."""
        if self.stopping or self.catalog.stalled:
            return 0
        if self.prefetcher is not None:
            return self._dispatch_prefetched(now, self.prefetcher)
        idle = self._idle_for_dispatch(now)
        sent = 0
        while idle and self._metadata_read:
            job = self._awaiting_metadata.pop(self._metadata_read.popleft())
            self.send(idle.pop(0), self.catalog.refreshed(job), None, now)
            sent += 1
        if not idle or not self._work_maybe_pending:
            return sent
        for job in self._claim(len(idle), disk_order=False):
            if job.needs_metadata and self.read_metadata is not None:
                self._awaiting_metadata[job.id] = job
                self.read_metadata(job, None, functools.partial(self._metadata_done, job.id))
            else:
                self.send(idle.pop(0), job, None, now)
                sent += 1
        return sent

    def _metadata_done(self, image_id: int) -> None:
        """Phase 1 has read (or failed to read) a claimed row's metadata: it may go to a
        worker now."""
        if image_id in self._awaiting_metadata:
            self._metadata_read.append(image_id)

    def _idle_for_dispatch(self, now: float) -> list[_Slot]:
        """The idle workers to give work now: all of them, or while the thumbnail disk is
        full, one every few seconds (a probe) when nothing else is in hand."""
        idle = self.idle_slots()
        if self.disk_full_since is None:
            return idle
        if now < self._disk_probe_at or self.busy():
            return []
        self._disk_probe_at = now + DISK_FULL_PROBE_SECONDS
        return idle[:1]

    def _claim(self, limit: int, *, disk_order: bool) -> list[Job]:
        held = {s.job.id for s in self._slots if s.job is not None} | set(self._awaiting_metadata)
        if self.prefetcher is not None:
            held |= self.prefetcher.held_ids()
        jobs = self.catalog.claim(limit, self.clock.wall(), disk_order=disk_order, exclude=held)
        if len(jobs) < limit:
            self._work_maybe_pending = False
            self._next_retry_at = self.catalog.next_retry_at()
        return jobs

    def _dispatch_prefetched(self, now: float, prefetcher: Prefetcher) -> int:
        """Prefetch mode: keep the reader ahead (claims in disk order), and hand each
        image whose bytes are in memory to an idle worker."""
        want = prefetcher.wants(self.count)
        if want and self._work_maybe_pending and self.disk_full_since is None:
            jobs = self._claim(want, disk_order=True)
            if jobs:
                prefetcher.submit(jobs)
        idle = self._idle_for_dispatch(now)
        sent = 0
        while (loaded := prefetcher.take_ready()) is not None:
            job = loaded.job
            if loaded.reason is not None:
                self._failed(job, loaded.reason, loaded.message, now)
                prefetcher.drop(loaded)
                continue
            if not idle:
                prefetcher.put_back(loaded)
                break
            slot = idle.pop(0)
            if job.needs_metadata and self.read_metadata is not None:
                prefetcher.use(loaded)
                self.read_metadata(job, loaded.shared, lambda i=job.id: prefetcher.done_with(i))
            prefetcher.use(loaded)
            self.send(slot, job, loaded.shared, now)
            sent += 1
        return sent

    def send(self, slot: _Slot, job: Job, shared: SharedBytes | None, now: float) -> None:
        """Hand one job to an idle worker."""
        child = slot.child
        assert child is not None and slot.job is None
        message = ConversionJob(
            job.id, job.path, job.format, job.orientation, reuse=not job.reconvert, shared=shared
        )
        try:
            child.conn.send(message)
        except OSError:
            # Found dead as the job was handed over: not the job's fault. It goes back to
            # pending and the worker is replaced.
            self.catalog.release(job.id)
            self._released(job)
            self.wake()
            self._died(slot, child, now)
            return
        slot.job = job
        # The timeout runs from now, not from the turn's start: the loop may have waited in
        # between (a fork server slow to start a worker).
        slot.job_started = self.clock.monotonic()
        if slot.idle_since and slot.waiting_for_input:
            self.metrics.worker_wait_seconds.inc(max(0.0, now - slot.idle_since))
        self._update_gauges()

    def _disk_space_back(self) -> None:
        self.log.info("thumbnail folder has space again; conversions resumed")
        self.disk_full_since = None
        self.metrics.disk_full.labels("thumbnails").set(0)
        self.wake()

    def _update_gauges(self) -> None:
        # A worker being started counts: the gauge is the pool in effect.
        alive = sum(1 for s in self._slots if s.child is not None or s.starting)
        self.metrics.workers.set(alive)
        self.metrics.workers_busy.set(self.busy())
        self.metrics.workers_idle.set(len(self.idle_slots()))

    # -- stopping ------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """Stop claiming; images in hand may finish."""
        self.stopping = True

    def kill_all(self) -> list[Job]:
        """Kill every worker now; returns the jobs they held (to go back to pending)."""
        held = list(self._awaiting_metadata.values())
        self._awaiting_metadata.clear()
        self._metadata_read.clear()
        for slot in self._slots:
            slot.starting = 0  # a worker still starting is stopped when it comes
            if slot.job is not None:
                held.append(slot.job)
                slot.job = None
            if slot.child is not None:
                slot.child.close(graceful=False)
                slot.child = None
        self._update_gauges()
        return held

    def close(self) -> None:
        """At the end: no worker left running, none still starting, none unreaped."""
        for child in self.starter.close():
            self._discard(child)
        for child in self._reaping:
            child.reaped()
