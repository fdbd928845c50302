"""The supervisor's decisions on a fake clock with fake children: timeouts, deaths, retries and
their back-off, restarts that back off, resizing on reload, the thumbnail disk filling up,
and stopping. The catalog is real (SQLite under tmp_path); the workers are stand-ins that
answer when the test says so. test_supervisor.py does the same things with real processes."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from photoscand import outcomes
from photoscand.catalog import Catalog, FileStat
from photoscand.config import WorkersConfig
from photoscand.metrics import Metrics
from photoscand.protocol import (
    ConversionFailed,
    ConversionJob,
    Converted,
    PhotoMetadata,
    SweepDone,
    ThumbnailFile,
    ThumbnailSettings,
    WorkerReady,
)
from photoscand.supervisor import DISK_FULL_PROBE_SECONDS, Supervisor
from photoscand.worker import conversion_main, sweep_main
from tests.fakes import FakeChild, FakeChildren, FakeClock, ImmediateStarter

WORKERS = WorkersConfig(
    count=2,
    backend="pillow",
    timeout_seconds=30.0,
    max_attempts=3,
    retry_backoff_seconds=10.0,
    stop_timeout_seconds=5.0,
    max_pixels=100_000_000,
    memory_limit_mb=512,
)


def settings(tmp_path: Path, **changes: object) -> ThumbnailSettings:
    base = ThumbnailSettings((256,), "jpeg", 80, str(tmp_path / "thumbs"), 100_000_000)
    return dataclasses.replace(base, **changes)


class Pool:
    """A supervisor over fake workers, and the means to drive it."""

    def __init__(
        self, tmp_path: Path, workers: WorkersConfig = WORKERS, arriving_hold: float | None = None
    ) -> None:
        self.clock = FakeClock()
        self.catalog = Catalog(str(tmp_path / "catalog.db"))
        self.metrics = Metrics()
        self.children = FakeChildren(on_start=self._answer_sweep)
        self.tmp_path = tmp_path
        self.supervisor = Supervisor(
            self.catalog,
            ImmediateStarter(self.children),
            workers,
            settings(tmp_path),
            metrics=self.metrics,
            clock=self.clock,
            arriving_hold=arriving_hold,
        )

    @staticmethod
    def _answer_sweep(child: FakeChild) -> None:
        if child.target is sweep_main:
            child.conn.inbox.append(SweepDone(0))

    def start(self) -> None:
        self.supervisor.start()
        self.turn()  # the started workers are taken in
        for worker in self.workers():
            self.ready(worker)

    def workers(self) -> list[FakeChild]:
        """The live workers, oldest first."""
        return [c for c in self.children.named("photoscand-worker") if c.alive()]

    def add(self, count: int) -> list[int]:
        now = self.clock.wall()
        ids = []
        for i in range(count):
            stat = FileStat(f"/photos/{len(ids)}-{now}-{i}.jpg".encode(), 100, 1, 1, 1000 + i)
            ids.append(self.catalog.add_image(stat, PhotoMetadata(format="jpeg"), now))
        self.supervisor.wake()
        return ids

    def add_file(self, path: Path) -> int:
        """A row for a real file (the supervisor looks at it when it comes back truncated)."""
        stat = FileStat.of(os.fsencode(path), path.stat())
        image_id = self.catalog.add_image(stat, PhotoMetadata(format="jpeg"), self.clock.wall())
        self.supervisor.wake()
        return image_id

    def jobs_sent(self) -> int:
        return sum(len(w.jobs()) for w in self.workers())

    def turn(self, *ready: object) -> None:
        """One turn of the daemon's loop for phase 2."""
        now = self.clock.monotonic()
        self.supervisor.on_ready(list(ready), now)
        self.supervisor.tick(now)
        self.supervisor.dispatch(now)

    def ready(self, worker: FakeChild) -> None:
        worker.conn.inbox.append(WorkerReady(worker.pid))
        self.turn(worker.conn)

    def job_of(self, worker: FakeChild) -> ConversionJob | None:
        jobs = worker.jobs()
        return jobs[-1] if jobs else None

    def done(self, worker: FakeChild) -> None:
        job = self.job_of(worker)
        assert job is not None
        thumb = ThumbnailFile(256, f"/thumbs/{job.image_id}.jpg", 256, 192)
        worker.conn.inbox.append(Converted(job.image_id, "ab" * 32, (thumb,), 0.1))
        self.turn(worker.conn)

    def fail(self, worker: FakeChild, reason: str, message: str = "it broke") -> None:
        job = self.job_of(worker)
        assert job is not None
        worker.conn.inbox.append(ConversionFailed(job.image_id, reason, message, 0.1))
        self.turn(worker.conn)

    def die(self, worker: FakeChild) -> None:
        worker.die()
        self.turn(worker.sentinel)

    def row(self, image_id: int) -> tuple:
        return self.catalog.query(
            "SELECT status, attempts, error, retry_at FROM images WHERE id = ?", (image_id,)
        )[0]

    def restarts(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "photoscand_worker_restarts_total", {"reason": reason}
        )
        return value or 0.0


@pytest.fixture
def pool(tmp_path: Path) -> Iterator[Pool]:
    made = Pool(tmp_path)
    yield made
    made.catalog.close()


def test_each_idle_worker_gets_one_job_and_no_more_run_than_workers(pool: Pool) -> None:
    pool.start()
    ids = pool.add(5)
    pool.turn()
    first, second = pool.workers()
    assert [pool.job_of(first).image_id, pool.job_of(second).image_id] == ids[:2]
    assert pool.supervisor.busy() == 2
    pool.turn()  # nothing idle: nothing more is claimed
    assert len(first.jobs()) == len(second.jobs()) == 1
    pool.done(first)
    assert pool.row(ids[0])[0] == "done"
    assert pool.job_of(first).image_id == ids[2]  # the freed worker takes the next one
    assert pool.catalog.counts()["converting"] == 2


def test_a_job_past_its_timeout_kills_the_worker_and_costs_one_attempt(pool: Pool) -> None:
    pool.start()
    (image,) = pool.add(1)
    pool.turn()
    stuck = pool.workers()[0]
    pool.clock.advance(WORKERS.timeout_seconds)
    pool.turn()
    assert stuck.alive(), "killed at the limit, not only past it"
    pool.clock.advance(0.01)
    pool.turn()
    assert stuck.closed == "killed"
    status, attempts, error, retry_at = pool.row(image)
    assert (status, attempts) == ("pending", 1)
    assert error.startswith("timeout:")
    assert retry_at == pytest.approx(pool.clock.wall() + WORKERS.retry_backoff_seconds)
    assert pool.restarts("timeout") == 1
    # The slot has a new worker at once; it takes work once it says it is ready.
    replacement = pool.workers()[-1]
    assert replacement is not stuck and len(pool.workers()) == 2
    assert pool.supervisor.next_deadline(pool.clock.now) is not None


def test_a_busy_worker_that_dies_costs_its_image_one_crashed_attempt(pool: Pool) -> None:
    pool.start()
    victim_image, other_image = pool.add(2)
    pool.turn()
    victim, _ = pool.workers()
    pool.die(victim)
    assert pool.row(victim_image)[:2] == ("pending", 1)
    assert pool.row(victim_image)[2].startswith("crashed: worker died (killed by SIGKILL")
    assert pool.row(other_image)[:2] == ("converting", 0)  # the other image is untouched
    assert pool.restarts("crashed") == 1
    assert len(pool.children.named("photoscand-worker")) == 3  # replaced at once


def test_an_idle_worker_that_dies_costs_no_image_anything(pool: Pool) -> None:
    pool.start()
    (image,) = pool.add(1)
    pool.turn()
    _, idle = pool.workers()
    pool.die(idle)
    assert pool.row(image)[:2] == ("converting", 0)
    assert pool.restarts("crashed") == 1
    assert pool.supervisor.healthy()


def test_a_transient_failure_waits_out_its_back_off_then_is_claimed_again(pool: Pool) -> None:
    pool.start()
    (image,) = pool.add(1)
    pool.turn()
    worker = pool.workers()[0]
    pool.fail(worker, outcomes.IO_ERROR)
    assert pool.row(image)[:2] == ("pending", 1)
    pool.clock.advance(WORKERS.retry_backoff_seconds - 1)
    pool.turn()
    assert len(worker.jobs()) == 1, "claimed again before its back-off ended"
    # The loop is told when to wake for it.
    deadline = pool.supervisor.next_deadline(pool.clock.now)
    assert deadline == pytest.approx(pool.clock.now + 1)
    pool.clock.advance(1)
    pool.turn()
    assert [j.image_id for j in worker.jobs()] == [image, image]
    # The second failure doubles the back-off.
    pool.fail(worker, outcomes.IO_ERROR)
    status, attempts, _error, retry_at = pool.row(image)
    assert (status, attempts) == ("pending", 2)
    assert retry_at == pytest.approx(pool.clock.wall() + 2 * WORKERS.retry_backoff_seconds)
    # The third is the last attempt: failed for good.
    pool.clock.advance(2 * WORKERS.retry_backoff_seconds)
    pool.turn()
    pool.fail(worker, outcomes.IO_ERROR, "the disk said EIO")
    assert pool.row(image)[:3] == ("failed", 3, "io_error: the disk said EIO")


def test_a_permanent_failure_fails_at_once(pool: Pool) -> None:
    pool.start()
    (image,) = pool.add(1)
    pool.turn()
    pool.fail(pool.workers()[0], outcomes.CORRUPT, "not a JPEG")
    assert pool.row(image)[:3] == ("failed", 1, "corrupt: not a JPEG")


def test_a_worker_that_keeps_dying_before_it_is_ready_is_restarted_with_back_off(
    pool: Pool,
) -> None:
    pool.supervisor.start()  # the workers never say they are ready
    first = pool.workers()[0]
    pool.die(first)
    assert len(pool.children.named("photoscand-worker")) == 3, "the first death restarts at once"
    delays = []
    for _ in range(4):
        newest = pool.children.named("photoscand-worker-0")[-1]
        pool.die(newest)
        started = len(pool.children.started)
        deadline = pool.supervisor.next_deadline(pool.clock.now)
        assert deadline is not None
        delays.append(round(deadline - pool.clock.now, 3))
        pool.clock.advance(deadline - pool.clock.now - 0.001)
        pool.turn()
        assert len(pool.children.started) == started, "restarted before its delay"
        pool.clock.advance(0.001)
        pool.turn()
        assert len(pool.children.started) == started + 1
    assert delays == [2.0, 4.0, 8.0, 16.0]  # doubling (children.restart_delay)
    assert not pool.supervisor.healthy()  # five deaths in a row before ready


def test_a_worker_that_cannot_be_started_is_tried_again_later(pool: Pool) -> None:
    pool.children.failures = 2  # the sweep, then the first worker
    pool.supervisor.start()
    pool.turn()
    assert len(pool.workers()) == 1
    deadline = pool.supervisor.next_deadline(pool.clock.now)
    assert deadline == pytest.approx(pool.clock.now + 0.5)
    pool.clock.advance(0.5)
    pool.turn()
    assert len(pool.workers()) == 2


def test_resize_grows_at_once_and_shrinks_as_workers_become_idle(
    pool: Pool, tmp_path: Path
) -> None:
    pool.start()
    ids = pool.add(2)
    pool.turn()
    pool.supervisor.reconfigure(dataclasses.replace(WORKERS, count=3), settings(tmp_path), None)
    assert len(pool.workers()) == 3
    busy = pool.workers()[:2]
    pool.supervisor.reconfigure(dataclasses.replace(WORKERS, count=1), settings(tmp_path), None)
    # The idle new worker goes at once; the busy one beyond the new size finishes first.
    assert pool.supervisor.count == 2
    assert busy[1].alive()
    pool.done(busy[1])
    assert busy[1].closed == "graceful"
    assert pool.supervisor.count == 1
    assert pool.row(ids[1])[0] == "done"


def test_new_settings_replace_idle_workers_now_and_busy_ones_after_their_image(
    pool: Pool, tmp_path: Path
) -> None:
    pool.start()
    pool.add(1)
    pool.turn()
    busy, idle = pool.workers()
    new = settings(tmp_path, sizes=(128, 512))
    pool.supervisor.reconfigure(WORKERS, new, None)
    assert idle.closed == "graceful" and busy.alive()
    assert pool.children.started[-1].args == (new,)
    pool.done(busy)
    assert busy.closed == "graceful"
    assert pool.restarts("reload") == 2
    assert all(w.args == (new,) for w in pool.workers())
    assert all(w.target is conversion_main for w in pool.workers())


def test_reload_applies_new_limits_to_the_next_decision(pool: Pool, tmp_path: Path) -> None:
    pool.start()
    (image,) = pool.add(1)
    pool.turn()
    pool.supervisor.reconfigure(
        dataclasses.replace(WORKERS, timeout_seconds=5.0, max_attempts=1), settings(tmp_path), None
    )
    pool.clock.advance(5.01)
    pool.turn()
    assert pool.row(image)[:2] == ("failed", 1)


def test_a_full_thumbnail_disk_pauses_phase_2_and_probes_one_image_at_a_time(
    pool: Pool,
) -> None:
    pool.start()
    ids = pool.add(4)
    pool.turn()
    first, second = pool.workers()
    pool.fail(first, outcomes.DISK_FULL, "no space left")
    assert pool.row(ids[0])[:2] == ("pending", 0), "a full disk is nobody's fault"
    assert pool.supervisor.disk_full_since is not None
    pool.fail(second, outcomes.DISK_FULL, "no space left")
    pool.turn()
    assert pool.supervisor.busy() == 0, "no new work while the disk is full"
    pool.clock.advance(DISK_FULL_PROBE_SECONDS)
    pool.turn()
    assert pool.supervisor.busy() == 1, "one image probes the disk"
    assert [len(w.jobs()) for w in pool.workers()] == [2, 1]
    pool.done(first)
    assert pool.supervisor.disk_full_since is None
    pool.turn()
    assert pool.supervisor.busy() == 2, "both workers busy again once space returned"


def test_stop_claims_nothing_more_and_hands_back_what_is_in_hand(pool: Pool) -> None:
    pool.start()
    ids = pool.add(3)
    pool.turn()
    first, second = pool.workers()
    pool.supervisor.begin_stop()
    pool.done(first)
    assert pool.supervisor.busy() == 1, "a freed worker takes nothing new while stopping"
    # A worker killed with the daemon's process group is not the image's fault.
    pool.die(second)
    assert pool.row(ids[1])[:2] == ("pending", 0)
    assert len(pool.children.named("photoscand-worker")) == 2, "no restarts while stopping"
    assert pool.supervisor.kill_all() == []
    assert all(not w.alive() for w in pool.workers())


def test_kill_all_returns_every_job_in_hand(pool: Pool) -> None:
    pool.start()
    ids = pool.add(2)
    pool.turn()
    held = pool.supervisor.kill_all()
    assert sorted(job.id for job in held) == ids
    assert all(w.closed == "killed" for w in pool.children.named("photoscand-worker"))


def test_a_stale_result_for_an_image_no_longer_in_hand_is_ignored(pool: Pool) -> None:
    pool.start()
    (image,) = pool.add(1)
    pool.turn()
    worker = pool.workers()[0]
    thumb = ThumbnailFile(256, "/t.jpg", 1, 1)
    worker.conn.inbox.append(Converted(image + 1000, "cd" * 32, (thumb,), 0.1))
    pool.turn(worker.conn)
    assert pool.row(image)[0] == "converting"
    assert pool.supervisor.busy() == 1


def test_phase_1_is_not_touched_by_phase_2_decisions(pool: Pool, tmp_path: Path) -> None:
    """The metadata parser and the sweep are started through the same seam: the sweep ran
    once, before any worker, and no other kind of child was started."""
    pool.start()
    names = [c.name for c in pool.children.started]
    assert names[0] == "photoscand-sweep"
    assert all(n.startswith("photoscand-worker-") for n in names[1:])
    assert os.fspath(tmp_path / "thumbs") in pool.children.started[0].args


def test_a_worker_whose_pipe_closes_while_idle_is_replaced_without_waiting_for_its_exit(
    pool: Pool,
) -> None:
    """The fork server reports exits; while it is stopped, a dead worker's closed pipe is
    what tells: the worker is replaced at once, and the next image is not charged for it."""
    pool.start()
    dead = pool.workers()[0]
    dead.unreported = True  # the fork server says nothing yet
    dead.conn.eof = True
    pool.turn(dead.conn)
    assert dead.closed == "killed"
    assert len(pool.children.named("photoscand-worker")) == 3
    (image,) = pool.add(1)
    pool.ready(pool.children.started[-1])
    pool.turn()
    pool.done(next(w for w in pool.workers() if w.jobs()))
    assert pool.row(image)[:3] == ("done", 0, None)
    # It is reaped once its exit is reported, and the loop is told to look until then.
    assert pool.supervisor.next_deadline(pool.clock.now) is not None
    dead.unreported = False
    pool.turn()
    assert pool.supervisor._reaping == []


def test_a_job_handed_to_a_worker_found_dead_costs_nothing(pool: Pool) -> None:
    pool.start()
    first, _ = pool.workers()
    first.conn.broken = True  # dead, and nothing said so yet
    (image,) = pool.add(1)
    pool.turn()
    assert pool.row(image)[:2] == ("pending", 0)
    assert first.closed == "killed"
    pool.turn()
    holder = next(w for w in pool.workers() if w.jobs())
    pool.done(holder)
    assert pool.row(image)[:3] == ("done", 0, None)


def test_the_timeout_runs_from_when_the_job_was_handed_over(pool: Pool) -> None:
    """A turn whose start is stale (the loop waited in between) must not shorten the next
    job's time: one fault costs exactly one attempt."""
    pool.start()
    (image,) = pool.add(1)
    stale = pool.clock.now
    pool.clock.advance(20.0)  # the loop was held up after it read the clock
    pool.supervisor.dispatch(stale)
    pool.clock.advance(WORKERS.timeout_seconds - 1)
    pool.supervisor.tick(pool.clock.now)
    assert pool.row(image)[:2] == ("converting", 0), "timed out early"
    pool.clock.advance(1.01)
    pool.supervisor.tick(pool.clock.now)
    assert pool.row(image)[:2] == ("pending", 1)


def test_a_row_whose_metadata_failed_for_a_passing_reason_is_read_again_before_it_converts(
    tmp_path: Path,
) -> None:
    """Phase 2 never marks such a row done with its metadata missing: phase 1 reads it first,
    and only then does a worker get it, with what phase 1 found."""
    pool = Pool(tmp_path)
    asked: list[tuple[int, object]] = []

    def read_metadata(job, shared, done) -> None:
        asked.append((job.id, done))

    pool.supervisor.read_metadata = read_metadata
    pool.start()
    stat = FileStat(b"/photos/locked.jpg", 100, 1, 1, 77)
    problem = PhotoMetadata(format="jpeg", exif=None, metadata_error="permission: denied")
    image = pool.catalog.add_image(stat, problem, pool.clock.wall())
    pool.supervisor.wake()
    pool.turn()
    assert [i for i, _ in asked] == [image]
    assert all(not w.jobs() for w in pool.workers()), "converted before its metadata was read"
    # Phase 1 reads it now (what Ingest does with the answer), then says it is done.
    pool.catalog.update_metadata(image, PhotoMetadata(format="jpeg", orientation=6))
    asked[0][1]()
    pool.turn()
    (job,) = [j for w in pool.workers() for j in w.jobs()]
    assert (job.image_id, job.orientation) == (image, 6)
    pool.catalog.close()


def test_a_truncated_file_still_being_written_waits_and_fails_once_it_holds_still(
    tmp_path: Path,
) -> None:
    made = Pool(tmp_path, dataclasses.replace(WORKERS, count=1), arriving_hold=30.0)
    try:
        made.start()
        (worker,) = made.workers()
        photo = tmp_path / "arriving.jpg"
        photo.write_bytes(b"\xff\xd8\xff\xe0")
        written = made.clock.wall() - 5.0
        os.utime(photo, (written, written))
        image = made.add_file(photo)
        made.turn()
        made.fail(worker, outcomes.TRUNCATED, "premature end of data")
        # Written 5 s ago: presumed still arriving, no attempt counted, back at mtime + 30 s.
        assert made.row(image) == ("pending", 0, None, pytest.approx(written + 30.0))
        sent = made.jobs_sent()
        made.clock.advance(24.0)
        made.turn()
        assert made.jobs_sent() == sent
        made.clock.advance(1.5)
        made.turn()
        assert made.jobs_sent() == sent + 1
        made.fail(worker, outcomes.TRUNCATED, "premature end of data")
        assert made.row(image)[:3] == ("failed", 1, "truncated: premature end of data")
    finally:
        made.catalog.close()


def test_without_an_arriving_hold_a_truncated_file_fails_at_once(
    pool: Pool, tmp_path: Path
) -> None:
    pool.start()
    photo = tmp_path / "cut.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0")
    image = pool.add_file(photo)
    pool.turn()
    (worker,) = [w for w in pool.workers() if w.jobs()]
    pool.fail(worker, outcomes.TRUNCATED, "premature end of data")
    assert pool.row(image)[:2] == ("failed", 1)
