"""Phase 2 on the daemon's side: a fixed pool of worker processes, one job at a time each.

Model B from the design notes: ``workers.count`` single-threaded workers, each with its
own pipe, waited on together with each process's sentinel. The supervisor claims
pending rows, hands one job to each idle worker, and records every result; workers
never open the catalog. ``ProcessPoolExecutor`` and ``multiprocessing.Pool`` are not
used on purpose: one dead worker breaks the whole executor, and neither can kill a
single task that hangs.

Hazards: workers are started with ``forkserver`` (the daemon has threads; forking it
could copy a held lock). A worker that overstays ``timeout_seconds`` is SIGKILLed and
replaced; one that dies is replaced at once; in both cases only the image it held
counts an attempt. At most ``workers.count`` conversions run at any moment, because a
job is only ever sent to an idle worker of the fixed pool.

Signal contract (the daemon's loop turns signals into calls here):

=============  ==============================================================
SIGTERM/INT    stop claiming; wait up to stop_timeout_seconds for the images
               in hand; kill what is left; return those rows to pending
2nd signal     kill every worker now; return their rows to pending
SIGHUP         resize the pool to the new workers.count; new settings apply
               to workers started afterwards
=============  ==============================================================
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from typing import Any

from photoscand import outcomes
from photoscand.catalog import Catalog, Job
from photoscand.children import Child, ChildStartError, describe_exit, restart_delay
from photoscand.log import display_path, get_logger
from photoscand.metrics import Metrics
from photoscand.prefetch import Prefetcher
from photoscand.worker import conversion_main, sweep_main

# How long to wait for a disk that was full before trying one image again.
DISK_FULL_PROBE_SECONDS = 5.0
# How long images under an unavailable watched folder wait before they are tried again.
UNAVAILABLE_ROOT_RETRY_SECONDS = 60.0
# The start-up sweep of stale temporary thumbnails; past this the workers start anyway.
SWEEP_TIMEOUT_SECONDS = 60.0


@dataclass(slots=True)
class _Slot:
    index: int
    child: Child | None = None
    ready: bool = False
    job: Job | None = None
    job_started: float = 0.0
    idle_since: float = 0.0
    restart_after: float = 0.0
    early_deaths: int = 0  # consecutive deaths before "ready": back off restarts
    retire: bool = False  # the pool shrank: stop this worker once it is idle
    restart_on_idle: bool = False  # settings changed: replace this worker once it is idle
    waiting_for_input: bool = False  # idle while work was queued (counts as waiting)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """What a worker needs to know, as plain data."""

    sizes: tuple[int, ...]
    format: str
    quality: int
    out_dir: str
    max_pixels: int
    backend: str
    memory_limit_mb: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "sizes": list(self.sizes),
            "format": self.format,
            "quality": self.quality,
            "out_dir": self.out_dir,
            "max_pixels": self.max_pixels,
            "backend": self.backend,
            "memory_limit_mb": self.memory_limit_mb,
            # Phase 2 is background work: phase 1 (a row the moment a file lands)
            # should win the CPU when both want it.
            "nice": 5,
        }


class Supervisor:
    """The worker pool and the dispatch of phase 2.

    Args:
        catalog: the daemon's read-write catalog.
        ctx: the multiprocessing context (forkserver).
        count: workers.count.
        settings: what each worker converts to.
        timeout: workers.timeout_seconds.
        max_attempts: workers.max_attempts.
        backoff: workers.retry_backoff_seconds.
        metrics: where outcomes go.
        source: optional hook that turns claimed jobs into job messages (prefetch
            mode supplies the bytes); by default workers read the file themselves.
    """

    def __init__(
        self,
        catalog: Catalog,
        ctx: BaseContext,
        *,
        count: int,
        settings: WorkerSettings,
        timeout: float,
        max_attempts: int,
        backoff: float,
        metrics: Metrics,
    ) -> None:
        self.catalog = catalog
        self.ctx = ctx
        self.settings = settings
        self.timeout = timeout
        self.max_attempts = max_attempts
        self.backoff = backoff
        self.metrics = metrics
        self.log = get_logger("supervisor")
        self._slots: list[_Slot] = [_Slot(i) for i in range(count)]
        self._work_maybe_pending = True
        self._next_retry_at: float | None = None
        self.stopping = False
        self.disk_full_since: float | None = None
        self._disk_probe_at = 0.0
        self.done_since_start = 0
        self.failed_since_start = 0
        # Given an image's path, its watched root when that root is unavailable (missing,
        # unreadable or emptied); set by the daemon.
        self.root_unavailable: Callable[[bytes], bytes | None] | None = None
        # Prefetch mode: the sequential reader that brings each claimed job's bytes.
        self.prefetcher: Prefetcher | None = None
        # Rows whose metadata is still to be read (prefetch mode defers it to the bytes
        # the reader brings): called with (job, shared-memory place or None, on_done).
        self.parse_metadata: Callable[[Job, Any, Callable[[], None] | None], None] | None = None

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._sweep_temp_files()
        now = time.monotonic()
        for slot in self._slots:
            self._spawn(slot, now)

    def _sweep_temp_files(self) -> None:
        """Remove what workers killed with the last run left mid-write. Only before any
        worker starts: a live worker's temporary file looks the same."""
        try:
            child = Child(self.ctx, sweep_main, (self.settings.out_dir,), name="photoscand-sweep")
        except ChildStartError as exc:
            self.log.warning("sweep of stale temporary thumbnails failed", error=str(exc))
            return
        try:
            if child.conn.poll(SWEEP_TIMEOUT_SECONDS):
                removed = child.conn.recv()
                if removed:
                    self.log.info("removed temporary thumbnails left by the last run",
                                  count=removed, folder=self.settings.out_dir)  # fmt: skip
            else:
                self.log.warning("sweep of stale temporary thumbnails timed out",
                                 folder=self.settings.out_dir)  # fmt: skip
        except (EOFError, OSError) as exc:
            self.log.warning("sweep of stale temporary thumbnails failed", error=str(exc))
        finally:
            child.close(graceful=False)

    def _spawn(self, slot: _Slot, now: float) -> None:
        try:
            slot.child = Child(
                self.ctx,
                conversion_main,
                (self.settings.as_dict(),),
                name=f"photoscand-worker-{slot.index}",
            )
        except ChildStartError as exc:
            slot.child = None
            slot.early_deaths += 1
            slot.restart_after = now + restart_delay(0.25, slot.early_deaths)
            self.log.error("worker could not be started; trying again", error=str(exc))
            self._update_gauges()
            return
        slot.ready = False
        slot.job = None
        slot.idle_since = now
        self._update_gauges()

    @property
    def count(self) -> int:
        return len(self._slots)

    def resize(self, count: int, settings: WorkerSettings) -> None:
        """Apply a reloaded config: new settings for new workers, and a new pool size.

        Idle workers are replaced at once so new sizes apply to the next images;
        busy ones finish their image first.
        """
        changed = settings != self.settings
        self.settings = settings
        now = time.monotonic()
        while len(self._slots) < count:
            slot = _Slot(len(self._slots))
            self._slots.append(slot)
            self._spawn(slot, now)
        for slot in self._slots:
            slot.retire = slot.index >= count
        if changed:
            for slot in self._slots[:count]:
                if slot.job is None and slot.child is not None:
                    slot.child.close(graceful=True)
                    self.metrics.worker_restarts.labels("reload").inc()
                    self._spawn(slot, now)
                else:
                    slot.restart_on_idle = True
        self._trim()

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

    def in_hand(self) -> list[Job]:
        return [s.job for s in self._slots if s.job is not None]

    def worker_pids(self) -> list[int]:
        return [s.child.pid for s in self._slots if s.child is not None]

    def healthy(self) -> bool:
        """True unless workers keep dying before they can take work."""
        return not any(s.early_deaths >= 5 for s in self._slots)

    def wake(self) -> None:
        """New pending rows may exist (a row was added, released or retried)."""
        self._work_maybe_pending = True

    def next_deadline(self, now: float) -> float | None:
        deadlines = []
        for slot in self._slots:
            if slot.job is not None:
                deadlines.append(slot.job_started + self.timeout)
            if slot.child is None:
                deadlines.append(slot.restart_after)
        if self._next_retry_at is not None:
            deadlines.append(self._next_retry_at - time.time() + now)
        if self.disk_full_since is not None:
            deadlines.append(self._disk_probe_at)
        return min(deadlines) if deadlines else None

    # -- results and deaths -------------------------------------------------------------

    def on_ready(self, ready: Sequence[Any], now: float) -> None:
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
                message = child.conn.recv()
            except (EOFError, OSError):
                return
            if "ready" in message:
                slot.ready = True
                slot.early_deaths = 0
                slot.idle_since = now
                continue
            job = slot.job
            if job is None or message.get("id") != job.id:
                continue
            self._finish(slot, job, message, now)

    def _finish(self, slot: _Slot, job: Job, result: dict[str, Any], now: float) -> None:
        slot.job = None
        slot.idle_since = now
        # Idle from now on while work is queued = waiting for input (the reader, or
        # the catalog); idle with nothing to do is not waiting.
        slot.waiting_for_input = self._work_maybe_pending or (
            self.prefetcher is not None and self.prefetcher.queued() > 0
        )
        elapsed = now - slot.job_started
        self.metrics.worker_busy_seconds.inc(elapsed)
        self.metrics.conversion_duration.observe(result.get("seconds", elapsed))
        self.metrics.observe_stages(result.get("timings", {}))
        wall = time.time()
        if result.get("ok"):
            self.catalog.record_done(job.id, result["content_hash"], result["thumbnails"], wall)
            self.metrics.conversions.labels("done").inc()
            self.done_since_start += 1
            self.log.debug("converted", path=display_path(job.path), id=job.id,
                           seconds=round(elapsed, 3))  # fmt: skip
            if self.disk_full_since is not None:
                self._disk_space_back()
        else:
            self._failed(job, result["reason"], result.get("message", ""), now)
        self._released(job, bool(result.get("ok")))
        if slot.restart_on_idle and slot.child is not None:
            slot.restart_on_idle = False
            slot.child.close(graceful=True)
            self.metrics.worker_restarts.labels("reload").inc()
            self._spawn(slot, now)
        self._update_gauges()

    def _failed(self, job: Job, reason: str, message: str, now: float) -> None:
        wall = time.time()
        if reason == outcomes.DISK_FULL:
            # Nobody's fault: no attempt counted; phase 2 pauses until space returns.
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
            return
        if reason == outcomes.VANISHED and self.root_unavailable is not None:
            root = self.root_unavailable(job.path)
            if root is not None:
                # Its whole folder is gone (an unmounted disk): not a deletion, and not a
                # failure. The rows under it wait, with no attempt counted.
                self.catalog.postpone_under(job.id, root, wall + UNAVAILABLE_ROOT_RETRY_SECONDS)
                self.metrics.conversions.labels("released").inc()
                return
        self.metrics.conversion_failures.labels(reason).inc()
        if reason == outcomes.VANISHED:
            self.catalog.record_vanished(job.id, message)
            self.metrics.conversions.labels("vanished").inc()
            self.log.info("file vanished before conversion", path=display_path(job.path))
            return
        transient = reason in outcomes.TRANSIENT
        error = outcomes.format_error(reason, message)
        self.catalog.record_failure(
            job.id,
            error,
            transient=transient,
            max_attempts=self.max_attempts,
            backoff=self.backoff,
            now=wall,
        )
        final = not transient or job.attempts + 1 >= self.max_attempts
        if final:
            self.metrics.conversions.labels("failed").inc()
            self.failed_since_start += 1
            self.log.warning("conversion failed", path=display_path(job.path), id=job.id,
                             reason=reason, message=message, attempts=job.attempts + 1)  # fmt: skip
        else:
            self.metrics.conversions.labels("retried").inc()
            retry_at = wall + self.backoff * (2**job.attempts)
            if self._next_retry_at is None or retry_at < self._next_retry_at:
                self._next_retry_at = retry_at
            self.log.warning("conversion failed; will retry", path=display_path(job.path),
                             id=job.id, reason=reason, message=message,
                             attempts=job.attempts + 1)  # fmt: skip

    def _released(self, job: Job, ok: bool) -> None:
        """A worker is done with a job (finished, failed, died or was killed)."""
        if self.prefetcher is not None:
            self.prefetcher.done_with(job.id)

    def _died(self, slot: _Slot, child: Child, now: float) -> None:
        code = child.exitcode()
        child.close(graceful=False)
        slot.child = None
        job = slot.job
        if job is not None and self.stopping:
            # Killed along with the daemon (a signal to the whole process group):
            # not the image's fault.
            slot.job = None
            self.catalog.release(job.id)
            self._released(job, False)
        elif job is not None:
            slot.job = None
            self.metrics.worker_restarts.labels("crashed").inc()
            self.log.warning("worker died", path=display_path(job.path), id=job.id,
                             exitcode=code)  # fmt: skip
            self._failed(job, outcomes.CRASHED, f"worker died ({describe_exit(code)})", now)
            self._released(job, False)
        elif not slot.ready:
            slot.early_deaths += 1
            self.log.error("worker died while starting", exitcode=code,
                           consecutive=slot.early_deaths)  # fmt: skip
        else:
            self.metrics.worker_restarts.labels("crashed").inc()
            self.log.warning("idle worker died", exitcode=code)
        if self.stopping:
            self._update_gauges()
            return
        delay = 0.0 if slot.early_deaths <= 1 else restart_delay(0.5, slot.early_deaths)
        slot.restart_after = now + delay
        if delay == 0.0:
            self._spawn(slot, now)
        self._update_gauges()

    # -- timeouts, restarts and dispatch ---------------------------------------------

    def tick(self, now: float) -> None:
        for slot in self._slots:
            if slot.job is not None and now - slot.job_started > self.timeout:
                self._timed_out(slot, now)
            if slot.child is None and not self.stopping and now >= slot.restart_after:
                self._spawn(slot, now)
        if self._next_retry_at is not None and time.time() >= self._next_retry_at:
            self._next_retry_at = None
            self._work_maybe_pending = True

    def _timed_out(self, slot: _Slot, now: float) -> None:
        job = slot.job
        child = slot.child
        assert job is not None
        slot.job = None
        if child is not None:
            child.close(graceful=False)
        slot.child = None
        self.metrics.worker_restarts.labels("timeout").inc()
        self.log.warning("conversion timed out; worker killed", path=display_path(job.path),
                         id=job.id, timeout=self.timeout)  # fmt: skip
        self._failed(job, outcomes.TIMEOUT, f"conversion took longer than {self.timeout:g}s", now)
        self._released(job, False)
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
        idle = self.idle_slots()
        if not idle or not self._work_maybe_pending:
            return 0
        limit = len(idle)
        if self.disk_full_since is not None:
            # Probe with one image at a time until the disk has room again.
            if now < self._disk_probe_at or self.busy():
                return 0
            limit = 1
            self._disk_probe_at = now + DISK_FULL_PROBE_SECONDS
        jobs = self._claim(limit, disk_order=False)
        for slot, job in zip(idle, jobs, strict=False):
            if job.needs_metadata and self.parse_metadata is not None:
                self.parse_metadata(job, None, None)
            self.send(slot, job, {}, now)
        return len(jobs)

    def _claim(self, limit: int, *, disk_order: bool) -> list[Job]:
        held = {job.id for job in self.in_hand()}
        if self.prefetcher is not None:
            held |= self.prefetcher.held_ids()
        jobs = self.catalog.claim(limit, time.time(), disk_order=disk_order, exclude=held)
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
        idle = self.idle_slots()
        if self.disk_full_since is not None:
            if now < self._disk_probe_at or self.busy():
                idle = []
            else:
                idle = idle[:1]
                self._disk_probe_at = now + DISK_FULL_PROBE_SECONDS
        sent = 0
        while True:
            loaded = prefetcher.take_ready()
            if loaded is None:
                break
            job = loaded.job
            if loaded.reason is not None:
                self._failed(job, loaded.reason, loaded.message, now)
                prefetcher.drop(loaded)
                continue
            if not idle:
                prefetcher.put_back(loaded)
                break
            slot = idle.pop(0)
            if job.needs_metadata and self.parse_metadata is not None:
                prefetcher.use(loaded)
                self.parse_metadata(job, loaded.shm, lambda i=job.id: prefetcher.done_with(i))
            prefetcher.use(loaded)
            self.send(slot, job, {"shm": loaded.shm}, now)
            sent += 1
        return sent

    def send(self, slot: _Slot, job: Job, extra: dict[str, Any], now: float) -> None:
        """Hand one job to an idle worker."""
        assert slot.child is not None and slot.job is None
        message = {"id": job.id, "path": job.path, "format": job.format,
                   "orientation": job.orientation, "reuse": not job.reconvert,
                   **extra}  # fmt: skip
        slot.job = job
        slot.job_started = now
        if slot.idle_since and slot.waiting_for_input:
            self.metrics.worker_wait_seconds.inc(max(0.0, now - slot.idle_since))
        # If the worker died, its sentinel reports it and the job counts a crash.
        with contextlib.suppress(OSError):
            slot.child.conn.send(message)
        self._update_gauges()

    def catalog_has_work_hint(self) -> bool:
        return self._work_maybe_pending

    def _disk_space_back(self) -> None:
        self.log.info("thumbnail folder has space again; conversions resumed")
        self.disk_full_since = None
        self.metrics.disk_full.labels("thumbnails").set(0)
        self.wake()

    def _update_gauges(self) -> None:
        self.metrics.workers.set(sum(1 for s in self._slots if s.child is not None))
        self.metrics.workers_busy.set(self.busy())

    # -- stopping ------------------------------------------------------------------------

    def begin_stop(self) -> None:
        """Stop claiming; images in hand may finish."""
        self.stopping = True

    def kill_all(self) -> list[Job]:
        """Kill every worker now; returns the jobs they held (to go back to pending)."""
        held = []
        for slot in self._slots:
            if slot.job is not None:
                held.append(slot.job)
                slot.job = None
            if slot.child is not None:
                slot.child.close(graceful=False)
                slot.child = None
        self._update_gauges()
        return held

    def close(self) -> None:
        """Stop idle workers politely (after :meth:`begin_stop` and the wait)."""
        for slot in self._slots:
            if slot.child is not None:
                slot.child.close(graceful=slot.job is None)
                slot.child = None
        self._update_gauges()
