"""Event storms: thousands of photos created as fast as Python can write them, in folders
made on the way (mkdir, then write: the watch on a new folder comes too late for its first
files), with the kernel's default event queue; and storms that overflow it. After the next
walk the catalog equals the filesystem, exactly. The default suite creates 3,000 files, and
overflows the queue without changing the machine: the daemon is stopped (SIGSTOP) while more
events than the kernel queues for one reader arrive, so the overflow is certain and touches
nobody else. The slow variants create 20,000 files, one of them with the machine's queue
lowered to 64 events (root only; restored at once). Small photos: a burst tests the pipeline,
not the decoders."""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import DaemonProcess, wait_for
from tests.reliability import (
    SMALL_PHOTO,
    catalog_matches_tree,
    log_events,
    start_and_walk,
    sysctl,
)
from tests.scrape import free_port, try_scrape, value

QUEUE_SYSCTL = "fs.inotify.max_queued_events"


def storm(root: Path, count: int, per_folder: int = 60) -> float:
    """Create ``count`` distinct small photos under nested new folders; returns seconds."""
    data = SMALL_PHOTO.read_bytes()
    started = time.perf_counter()
    for i in range(count):
        if i % per_folder == 0:
            folder = root / f"s{i // 1000:02d}" / f"f{i // per_folder:04d}" / "deeper"
            folder.mkdir(parents=True)
        with open(folder / f"burst{i:06d}.jpg", "wb") as fh:
            fh.write(data + b"storm-%08d" % i)
    return time.perf_counter() - started


def run_storm(
    daemon_factory,
    count: int,
    *,
    start: Callable[[DaemonProcess], object] = start_and_walk,
    make_storm: Callable[[DaemonProcess, int], float] | None = None,
    overflows: bool = False,
) -> dict:
    """A storm of ``count`` files: the daemon started by ``start``, the files written by
    ``make_storm`` (in new nested folders by default); ``overflows``: the event queue must
    have overflowed."""
    port = free_port()
    daemon = daemon_factory(
        {
            "watch": {"rescan_interval_seconds": 5},
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "workers": {"count": 1},
        }
    )
    start(daemon)
    created = (make_storm or storm_in_new_folders)(daemon, count)
    after_storm = time.monotonic()
    daemon.wait_walks(daemon.walks_done() + 1, timeout=120)
    wait_for(lambda: catalog_matches_tree(daemon) == (set(), set()), timeout=300,
             interval=0.5, message="catalog equal to the tree")  # fmt: skip
    complete = time.monotonic() - after_storm
    rows = daemon.query("SELECT count(*) FROM images WHERE status != 'missing'")[0][0]
    assert rows == count
    assert daemon.query("SELECT count(*) FROM images")[0][0] == count
    body = try_scrape(port)
    assert body is not None
    overflow_count = value(body, "photoscand_watch_overflows_total")
    dropped = value(body, "photoscand_watch_events_dropped_total")
    walk_found = value(body, "photoscand_walk_unannounced_files_total")
    if overflows:
        assert overflow_count > 0, "the event queue did not overflow"
        assert "filesystem events were lost" in daemon.log_text()
    assert daemon.proc.poll() is None
    assert daemon.stop() == 0
    # Each file was new once: a file offered again (by events and by every overlapping
    # walk) while it waits for the parser must not be parsed and written again, which
    # would also reset a converted row to pending.
    new = Counter(e["path"] for e in log_events(daemon) if e.get("action") == "new")
    assert len(new) == count and set(new.values()) == {1}, new.most_common(3)
    return {
        "files": count,
        "create_seconds": round(created, 2),
        "catalog_equal_after_seconds": round(complete, 2),
        "overflows": overflow_count,
        "events_dropped": dropped,
        "found_by_walks": walk_found,
    }


def storm_in_new_folders(daemon: DaemonProcess, count: int) -> float:
    return storm(daemon.photos, count)


def storm_while_stopped(daemon: DaemonProcess, count: int) -> float:
    """The storm while the daemon is stopped: every new file makes three events (created,
    modified, closed) in folders watched before, more than the kernel queues for a reader
    that does not read, so the queue overflows whatever the machine's load."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if 3 * count <= limit + 1000:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: {count} files cannot overflow it")
    per_folder = 60
    for i in range(0, count, per_folder):
        (daemon.photos / f"f{i // per_folder:04d}").mkdir()
    # The new folders are watched once the daemon has seen them (a walk after their events).
    daemon.wait_walks(daemon.walks_done() + 1, timeout=60)
    data = SMALL_PHOTO.read_bytes()
    started = time.perf_counter()
    os.kill(daemon.proc.pid, signal.SIGSTOP)
    try:
        for i in range(count):
            folder = daemon.photos / f"f{i // per_folder:04d}"
            (folder / f"burst{i:06d}.jpg").write_bytes(data + b"storm-%08d" % i)
    finally:
        os.kill(daemon.proc.pid, signal.SIGCONT)
    return time.perf_counter() - started


def test_a_storm_of_3000_files(daemon_factory) -> None:
    print(f"\nstorm: {run_storm(daemon_factory, 3000)}")


def test_a_storm_that_overflows_the_event_queue_of_a_stopped_daemon(daemon_factory) -> None:
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    count = limit // 3 + 1000  # 6,461 files with the kernel's default limit
    figures = run_storm(daemon_factory, count, make_storm=storm_while_stopped, overflows=True)
    print(f"\nstorm with overflow: {figures}")


@pytest.mark.slow
def test_a_storm_of_20000_files(daemon_factory) -> None:
    print(f"\nstorm: {run_storm(daemon_factory, 20_000)}")


@pytest.mark.slow
def test_a_storm_of_20000_files_that_overflows_a_lowered_machine_queue(daemon_factory) -> None:
    if os.geteuid() != 0:
        pytest.skip("lowering fs.inotify.max_queued_events needs root")

    def start_with_a_short_queue(daemon: DaemonProcess) -> None:
        # The limit is read when an inotify instance is made: lowered only while the daemon
        # starts, so other inotify users on the machine are not affected for long.
        with sysctl(QUEUE_SYSCTL, "64"):
            start_and_walk(daemon)

    figures = run_storm(daemon_factory, 20_000, start=start_with_a_short_queue, overflows=True)
    print(f"\nstorm with overflow: {figures}")
