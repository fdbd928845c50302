"""Event storms: thousands of photos created as fast as Python can write them, in folders
made on the way (mkdir, then write: the watch on a new folder comes too late for its first
files), once with the kernel's default event queue and once with a queue of 64 events so
inotify overflows. After the next walk the catalog equals the filesystem, exactly. The
default suite creates 3,000 files; the slow variants create 20,000 (small photos: a burst
tests the pipeline, not the decoders)."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import pytest

from tests.conftest import wait_for
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


def run_storm(daemon_factory, count: int, queue_limit: int | None) -> dict:
    port = free_port()
    daemon = daemon_factory(
        {
            "watch": {"rescan_interval_seconds": 5},
            "metrics": {"listen": f"127.0.0.1:{port}"},
            "workers": {"count": 1},
        }
    )
    if queue_limit is None:
        start_and_walk(daemon)
    else:
        # The limit is read when an inotify instance is made: lowered only while the daemon
        # starts, so other inotify users on the machine are not affected for long.
        with sysctl(QUEUE_SYSCTL, str(queue_limit)):
            start_and_walk(daemon)
    created = storm(daemon.photos, count)
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
    overflows = value(body, "photoscand_watch_overflows_total")
    dropped = value(body, "photoscand_watch_events_dropped_total")
    walk_found = value(body, "photoscand_walk_unannounced_files_total")
    if queue_limit is not None:
        assert overflows > 0, "the lowered queue did not overflow"
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
        "overflows": overflows,
        "events_dropped": dropped,
        "found_by_walks": walk_found,
    }


def test_a_storm_of_3000_files(daemon_factory) -> None:
    print(f"\nstorm: {run_storm(daemon_factory, 3000, None)}")


def test_a_storm_of_3000_files_that_overflows_the_event_queue(daemon_factory) -> None:
    print(f"\nstorm with overflow: {run_storm(daemon_factory, 3000, 64)}")


@pytest.mark.slow
def test_a_storm_of_20000_files(daemon_factory) -> None:
    print(f"\nstorm: {run_storm(daemon_factory, 20_000, None)}")


@pytest.mark.slow
def test_a_storm_of_20000_files_that_overflows_the_event_queue(daemon_factory) -> None:
    print(f"\nstorm with overflow: {run_storm(daemon_factory, 20_000, 64)}")
