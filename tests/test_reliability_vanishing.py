"""Files that vanish or change under the daemon: deleted or replaced between discovery and
conversion (the workers are frozen with SIGSTOP while the fault is injected), rewritten and
truncated over and over while they are read, and folders renamed while a walk runs. A
vanished file ends ``missing`` (never ``failed``); a changed file ends ``done`` from its
final bytes; after the next walk the catalog equals the filesystem."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import threading
import time
from pathlib import Path

from tests.conftest import wait_for
from tests.reliability import (
    LARGE_PHOTO,
    SMALL_PHOTO,
    catalog_matches_tree,
    distinct_copies,
    freeze,
    start_and_walk,
    thaw,
    workers,
)

SEED = 7


def converting(daemon) -> int:
    return daemon.query("SELECT count(*) FROM images WHERE status = 'converting'")[0][0]


def status_and_hash(daemon, path: Path) -> tuple[str, str | None, str | None]:
    rows = daemon.query(
        "SELECT status, content_hash, error FROM images WHERE path = ?", (os.fsencode(path),)
    )
    assert rows, f"no row for {path}"
    return rows[0]


def test_files_deleted_or_replaced_between_discovery_and_conversion(
    daemon_factory, tmp_path: Path
) -> None:
    daemon = daemon_factory({"workers": {"count": 2}})
    start_and_walk(daemon)
    pids = wait_for(lambda: len(workers(daemon)) == 2 and workers(daemon), message="workers")
    freeze(pids)
    try:
        doomed, replaced = distinct_copies(tmp_path / "in", 2)
        for path in (doomed, replaced):
            os.rename(path, daemon.photos / path.name)
        doomed, replaced = daemon.photos / doomed.name, daemon.photos / replaced.name
        # Both are claimed and sent to the frozen workers: in hand, not yet read.
        wait_for(lambda: converting(daemon) == 2, message="both rows in hand")
        os.unlink(doomed)
        replacement = tmp_path / "replacement.jpg"
        shutil.copy(LARGE_PHOTO, replacement)
        os.replace(replacement, replaced)
    finally:
        thaw(pids)
    wait_for(lambda: status_and_hash(daemon, doomed)[0] == "missing", message="doomed missing")
    error = status_and_hash(daemon, doomed)[2]
    assert error.startswith("vanished:"), error
    new_hash = hashlib.sha256(LARGE_PHOTO.read_bytes()).hexdigest()
    # The result computed from the old bytes (if any) is dropped; the new bytes win.
    wait_for(lambda: status_and_hash(daemon, replaced)[:2] == ("done", new_hash),
             message="the replacement converted")  # fmt: skip
    thumbs = daemon.query("SELECT path FROM thumbnails")
    assert thumbs and all(new_hash in t[0] for t in thumbs), thumbs
    assert "failed" not in {r[1] for r in daemon.rows().values()}
    assert daemon.stop() == 0


def test_a_file_rewritten_and_truncated_while_it_is_read_ends_from_its_final_bytes(
    daemon_factory, tmp_path: Path
) -> None:
    daemon = daemon_factory({"workers": {"count": 2, "retry_backoff_seconds": 0.05,
                                         "max_attempts": 50}})  # fmt: skip
    start_and_walk(daemon)
    full = LARGE_PHOTO.read_bytes()
    target = daemon.photos / "unstable.jpg"
    target.write_bytes(full)
    rng = random.Random(SEED)
    stop = threading.Event()
    cycles = 0

    def churn() -> None:
        # Same inode, shrinking and growing: every cut is a truncated JPEG for a while.
        nonlocal cycles
        with open(target, "r+b") as fh:
            while not stop.is_set():
                fh.truncate(rng.randrange(1, len(full)))
                fh.flush()
                time.sleep(rng.uniform(0, 0.004))
                fh.seek(0)
                fh.write(full)
                fh.flush()
                cycles += 1
                time.sleep(rng.uniform(0, 0.004))

    churner = threading.Thread(target=churn, daemon=True)
    churner.start()
    try:
        wait_for(lambda: daemon.row(target) is not None, message="a row for the file")
        deadline = time.monotonic() + 4.0
        seen: set[str] = set()
        while time.monotonic() < deadline:
            row = daemon.row(target)
            seen.add(row[1] if row else "none")
            time.sleep(0.02)
    finally:
        stop.set()
        churner.join()
    target.write_bytes(full)  # a last close-after-write: the file is whole and still
    wanted = hashlib.sha256(full).hexdigest()
    wait_for(lambda: status_and_hash(daemon, target)[:2] == ("done", wanted), timeout=60,
             message="done from the final bytes")  # fmt: skip
    assert cycles > 50
    assert daemon.stop() == 0
    print(f"\nchurn: {cycles} truncate/rewrite cycles, states seen: {sorted(seen)}")


def test_folders_renamed_during_a_walk_leave_the_catalog_equal_to_the_tree(
    daemon_factory,
) -> None:
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 2}, "workers": {"count": 1}})
    for i in range(150):
        distinct_copies(daemon.photos / f"f{i:03d}", 8, base=SMALL_PHOTO, start=i * 8)
    rng = random.Random(SEED)
    daemon.start()
    renames = 0
    # Rename top-level folders, or move them into another, until the start-up walk ends.
    while daemon.walks_done() < 1:
        top = sorted(p for p in daemon.photos.iterdir() if p.is_dir())
        src = rng.choice(top)
        if rng.random() < 0.3 and len(top) > 1:
            dst = rng.choice([p for p in top if p != src]) / f"moved{renames}"
        else:
            dst = daemon.photos / f"r{renames:04d}"
        os.rename(src, dst)
        renames += 1
        assert daemon.proc.poll() is None
    assert renames > 0
    # Two periodic walks later, the catalog is the tree: no file without a live row, no
    # live row without a file.
    daemon.wait_walks(daemon.walks_done() + 2)
    wait_for(lambda: catalog_matches_tree(daemon) == (set(), set()), timeout=30,
             message="catalog equal to the tree")  # fmt: skip
    rows = daemon.query("SELECT count(*) FROM images WHERE status != 'missing'")[0][0]
    assert rows == 1200
    assert daemon.stop() == 0
    print(f"\nrenamed {renames} folders during the start-up walk; 1200 files, catalog equal")


def test_a_walk_does_not_take_a_file_still_being_written_for_complete(daemon_factory) -> None:
    """Walks cannot see close events: a file they find mid-write must settle first, or its
    row (and a conversion of half a photo) would come from the partial file."""
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 1, "settle_seconds": 1.5}})
    start_and_walk(daemon)
    data = LARGE_PHOTO.read_bytes()
    target = daemon.photos / "slow-copy.jpg"
    walks = daemon.walks_done()
    # A writer that never closes in between (so no close event) and pauses shorter than
    # the settle time, across several periodic walks.
    with open(target, "wb") as fh:
        for i in range(0, len(data), len(data) // 8):
            fh.write(data[i : i + len(data) // 8])
            fh.flush()
            deadline = time.monotonic() + 0.6
            while time.monotonic() < deadline:
                assert daemon.row(target) is None, "a row from a file still being written"
                time.sleep(0.05)
    assert daemon.walks_done() >= walks + 3
    row = daemon.wait_row(target, status="done")
    assert row[3] == len(data)
    assert daemon.stop() == 0
