"""End to end, phase 1: the real ``photoscand run`` as a subprocess, files dropped the ways
people drop them, then SIGTERM and restart."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

from tests.conftest import CORPUS, photoscand, wait_for

SAMPLES = sorted((CORPUS / "cameras").glob("*.jpg"))[:6]


def test_files_dropped_every_way_get_one_row_each(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory({"watch": {"settle_seconds": 1.0}})
    daemon.start().wait_ready()
    photos = daemon.photos

    # Plain copy: closed after writing.
    shutil.copy(SAMPLES[0], photos / "copied.jpg")
    copied = daemon.wait_row(photos / "copied.jpg")

    # Atomic temp-then-rename, as rsync and most sync tools do.
    temp = photos / ".incoming.jpg.tmp"
    shutil.copy(SAMPLES[1], temp)
    os.rename(temp, photos / "atomic.jpg")
    daemon.wait_row(photos / "atomic.jpg")

    # A whole folder moved in from outside the watched tree.
    outside = tmp_path / "card" / "DCIM"
    (outside / "100CANON").mkdir(parents=True)
    for i, sample in enumerate(SAMPLES[2:5]):
        shutil.copy(sample, outside / "100CANON" / f"IMG_{i}.jpg")
    os.rename(outside, photos / "DCIM")
    for i in range(3):
        daemon.wait_row(photos / "DCIM" / "100CANON" / f"IMG_{i}.jpg")

    # Renamed after it was cataloged: the same row.
    os.rename(photos / "copied.jpg", photos / "renamed.jpg")
    renamed = daemon.wait_row(photos / "renamed.jpg")
    assert renamed[0] == copied[0]
    wait_for(lambda: daemon.row(photos / "copied.jpg") is None, message="old path gone")

    # A folder renamed inside the tree: its rows follow.
    before = daemon.row(photos / "DCIM" / "100CANON" / "IMG_0.jpg")[0]
    os.rename(photos / "DCIM", photos / "2026-trip")
    moved = daemon.wait_row(photos / "2026-trip" / "100CANON" / "IMG_0.jpg")
    assert moved[0] == before

    # Renamed to a hidden name (a sync tool hiding a file it will replace): gone.
    shutil.copy(SAMPLES[0], photos / "hidden-soon.jpg")
    daemon.wait_row(photos / "hidden-soon.jpg")
    os.rename(photos / "hidden-soon.jpg", photos / ".hidden-soon.jpg")
    daemon.wait_row(photos / "hidden-soon.jpg", status="missing")
    assert daemon.row(photos / ".hidden-soon.jpg") is None
    os.unlink(photos / ".hidden-soon.jpg")

    # No row was made for the temporary name, and none twice.
    paths = [p for p, r in daemon.rows().items() if r[1] != "missing"]
    assert not any(b".incoming" in p for p in paths)
    assert len(paths) == 5

    assert daemon.stop() == 0
    ids = {p: r[0] for p, r in daemon.rows().items()}

    # Files added while the daemon was stopped appear after the restart.
    shutil.copy(SAMPLES[5], photos / "while-stopped.jpg")
    daemon.start().wait_ready()
    daemon.wait_row(photos / "while-stopped.jpg")
    after = daemon.rows()
    assert len(after) == 7  # six photos and the one hidden away (missing)
    for path, image_id in ids.items():
        assert after[path][0] == image_id, "a row changed identity across the restart"
    assert daemon.stop() == 0


def test_a_slow_writer_gets_no_row_until_the_file_is_complete(daemon_factory) -> None:
    daemon = daemon_factory({"watch": {"settle_seconds": 1.0}})
    daemon.start().wait_ready()
    target = daemon.photos / "slow.jpg"
    data = SAMPLES[0].read_bytes()
    chunks = [data[i : i + len(data) // 8 + 1] for i in range(0, len(data), len(data) // 8 + 1)]
    with open(target, "wb") as fh:
        for chunk in chunks:
            fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
            # Slower than a whole settle period in total, each pause shorter than one.
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                assert daemon.row(target) is None, "a row appeared before the file was complete"
                time.sleep(0.05)
    row = daemon.wait_row(target)
    assert row[3] == len(data)
    assert daemon.stop() == 0


def test_a_file_moved_in_then_deleted_before_it_settles_gets_no_row(
    daemon_factory, tmp_path: Path
) -> None:
    daemon = daemon_factory({"watch": {"settle_seconds": 2.0}})
    daemon.start().wait_ready()
    outside = tmp_path / "outside.jpg"
    shutil.copy(SAMPLES[0], outside)
    os.rename(outside, daemon.photos / "brief.jpg")  # only "created": it must settle first
    os.unlink(daemon.photos / "brief.jpg")
    shutil.copy(SAMPLES[1], daemon.photos / "marker.jpg")
    daemon.wait_row(daemon.photos / "marker.jpg")
    # Past the settle time, the deleted file still has no row.
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline:
        assert daemon.row(daemon.photos / "brief.jpg") is None
        time.sleep(0.1)
    assert daemon.stop() == 0


def test_deleted_files_become_missing_and_an_empty_root_is_not_read_as_deletion(
    daemon_factory,
) -> None:
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 1}})
    for i, sample in enumerate(SAMPLES[:3]):
        shutil.copy(sample, daemon.photos / f"{i}.jpg")
    daemon.start().wait_ready()
    for i in range(3):
        daemon.wait_row(daemon.photos / f"{i}.jpg")
    os.unlink(daemon.photos / "0.jpg")
    daemon.wait_row(daemon.photos / "0.jpg", status="missing")
    assert daemon.row(daemon.photos / "0.jpg")[2].startswith("vanished")
    assert daemon.stop() == 0

    # While stopped, the root's contents disappear (an unmounted disk looks like this).
    for i in (1, 2):
        os.rename(daemon.photos / f"{i}.jpg", daemon.root / f"{i}.jpg")
    daemon.start().wait_ready()
    wait_for(lambda: "looks unmounted" in daemon.log_text(), message="unmounted report")
    statuses = {r[1] for p, r in daemon.rows().items() if not p.endswith(b"0.jpg")}
    assert "missing" not in statuses
    assert daemon.stop() == 0


def test_images_queued_under_an_emptied_root_wait_for_it_instead_of_going_missing(
    daemon_factory,
) -> None:
    """Pending images whose folder looks unmounted are postponed, not read as deleted, and
    convert once the folder is back."""
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 1}})
    names = [f"{i}.jpg" for i in range(3)]
    for name, sample in zip(names, SAMPLES, strict=False):
        shutil.copy(sample, daemon.photos / name)
    daemon.start().wait_ready()
    for name in names:
        daemon.wait_row(daemon.photos / name, status="done")
    assert daemon.stop() == 0
    retried = photoscand("retry", "--all", "--config", str(daemon.config_path), cwd=daemon.root)
    assert retried.returncode == 0, retried.stderr
    assert {r[1] for r in daemon.rows().values()} == {"pending"}

    # The disk goes away while the daemon is down; the queued images are tried at start-up.
    for name in names:
        os.rename(daemon.photos / name, daemon.root / name)
    daemon.start().wait_ready()

    def postponed() -> bool:
        rows = daemon.query("SELECT status, retry_at FROM images")
        return len(rows) == 3 and all(s == "pending" and r is not None for s, r in rows)

    wait_for(postponed, message="every queued image postponed")
    assert "looks unmounted" in daemon.log_text()

    for name in names:
        os.rename(daemon.root / name, daemon.photos / name)
    for name in names:
        daemon.wait_row(daemon.photos / name, status="done")
    assert daemon.stop() == 0


def test_sigint_and_sigterm_stop_cleanly_and_the_lock_holds(daemon_factory) -> None:
    daemon = daemon_factory()
    daemon.start().wait_ready()
    second = daemon_factory(name="second")
    second.config_path.write_text(daemon.config_path.read_text())
    second.start()
    assert second.proc.wait(timeout=30) == 3
    assert "already running" in second.log_text()
    started = time.monotonic()
    assert daemon.stop(signal.SIGINT) == 0
    assert time.monotonic() - started < 10


def test_every_corpus_file_in_bad_and_unicode_gets_a_row_or_a_reason(
    daemon_factory, manifest
) -> None:
    """None of the hostile files stalls or crashes the daemon; photo-looking ones get rows."""
    daemon = daemon_factory({"workers": {"count": 1}, "watch": {"metadata_timeout_seconds": 5}})
    chosen = [r for r in manifest if r["category"] in ("bad", "unicode")]
    for row in chosen:
        src = CORPUS / row["path"]
        dst = daemon.photos / row["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, dst)
    daemon.start().wait_ready(timeout=120)

    def all_in() -> bool:
        return len(daemon.rows()) >= len(chosen)

    wait_for(all_in, timeout=120, message="a row for every bad/unicode file")
    rows = daemon.rows()
    for row in chosen:
        path = os.fsencode(str(daemon.photos / row["path"]))
        assert path in rows, f"no row for {row['path']}"
    # The daemon is still alive and still ingests.
    shutil.copy(SAMPLES[0], daemon.photos / "after-the-bad-ones.jpg")
    daemon.wait_row(daemon.photos / "after-the-bad-ones.jpg")
    assert daemon.stop() == 0


def test_polling_observer_sees_new_moved_and_deleted_files(daemon_factory) -> None:
    """watch.polling (NFS/SMB): no inotify, the tree is polled; files still settle first."""
    daemon = daemon_factory({"watch": {"polling": True, "settle_seconds": 1.0}})
    daemon.start().wait_ready()
    assert '"polling": true' in daemon.log_text()
    shutil.copy(SAMPLES[0], daemon.photos / "new.jpg")
    first = daemon.wait_row(daemon.photos / "new.jpg")
    os.rename(daemon.photos / "new.jpg", daemon.photos / "renamed.jpg")
    assert daemon.wait_row(daemon.photos / "renamed.jpg")[0] == first[0]
    os.unlink(daemon.photos / "renamed.jpg")
    daemon.wait_row(daemon.photos / "renamed.jpg", status="missing")
    assert daemon.stop() == 0


def test_the_periodic_walk_catches_a_change_no_event_announced(daemon_factory) -> None:
    """Truncating a file in place raises only a modify event, which is not watched (it
    is noise for every copy in progress): the next periodic walk finds the change."""
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 1}})
    daemon.start().wait_ready()
    target = daemon.photos / "photo.jpg"
    shutil.copy(SAMPLES[0], target)
    daemon.wait_row(target, status="done")
    os.truncate(target, target.stat().st_size // 2)
    wait_for(lambda: daemon.row(target)[3] == target.stat().st_size, timeout=30,
             message="the walk saw the new size")  # fmt: skip
    row = daemon.wait_row(target, status="failed")
    assert row[2].startswith("truncated")
    assert daemon.stop() == 0


def test_moves_while_stopped_keep_their_rows_and_hard_links_are_rows_of_their_own(
    daemon_factory,
) -> None:
    daemon = daemon_factory()
    photos = daemon.photos
    shutil.copy(SAMPLES[0], photos / "single.jpg")
    shutil.copy(SAMPLES[1], photos / "linked.jpg")
    os.link(photos / "linked.jpg", photos / "link-2.jpg")
    daemon.start().wait_ready()
    for name in ("single.jpg", "linked.jpg", "link-2.jpg"):
        daemon.wait_row(photos / name)
    ids = {p: r[0] for p, r in daemon.rows().items()}
    assert len(set(ids.values())) == 3  # hard links are two rows
    assert daemon.stop() == 0
    (photos / "2026").mkdir()
    os.rename(photos / "single.jpg", photos / "2026" / "single.jpg")
    os.rename(photos / "link-2.jpg", photos / "2026" / "link-2.jpg")
    daemon.start().wait_ready()
    moved = daemon.wait_row(photos / "2026" / "single.jpg")
    moved_link = daemon.wait_row(photos / "2026" / "link-2.jpg")
    assert moved[0] == ids[os.fsencode(str(photos / "single.jpg"))]
    assert moved_link[0] == ids[os.fsencode(str(photos / "link-2.jpg"))]
    assert daemon.row(photos / "linked.jpg")[0] == ids[os.fsencode(str(photos / "linked.jpg"))]
    assert len(daemon.rows()) == 3
    assert daemon.stop() == 0
