"""Permission faults, with the daemon running where mode bits count (CI runs as root, which
ignores them: see tests/reliability.py ``unprivileged``). An unreadable photo fails as
``permission`` after max_attempts; an unreadable folder is reported by the walk and its
rows are not taken for deleted; an unreadable root is reported while the other root goes
on; a read-only thumbnail folder fails images with a reason that names it. Each case ends
with a reason, and nothing else stops."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.reliability import (
    SMALL_PHOTO,
    UnprivilegedDaemon,
    chown_tree,
    distinct_copies,
    log_events,
    unprivileged,
)
from tests.scrape import free_port, try_scrape, value


@pytest.fixture
def make_daemon() -> Iterator:
    """Unprivileged daemons in a fresh tree under /tmp (pytest's own base folder is
    root's, mode 0700, which ``nobody`` cannot enter)."""
    who = unprivileged()
    base = Path(tempfile.mkdtemp(prefix="photoscand-perm-"))
    made: list[UnprivilegedDaemon] = []

    def make(settings: dict | None = None) -> UnprivilegedDaemon:
        daemon = UnprivilegedDaemon(base / f"d{len(made)}", who, settings)
        made.append(daemon)
        chown_tree(base, who.uid)
        return daemon

    try:
        yield make
    finally:
        for daemon in made:
            daemon.kill()
        shutil.rmtree(base, ignore_errors=True)


def test_unreadable_photos_and_folders_end_with_a_reason_and_the_rest_goes_on(
    make_daemon,
) -> None:
    daemon = make_daemon({"workers": {"max_attempts": 2, "retry_backoff_seconds": 0.2}})
    fine = distinct_copies(daemon.photos, 5)
    locked_photo = daemon.photos / "locked.jpg"
    shutil.copy(SMALL_PHOTO, locked_photo)
    closed = daemon.photos / "closed"
    hidden = distinct_copies(closed, 3, prefix="h")
    os.chmod(locked_photo, 0)
    os.chmod(closed, 0)
    try:
        daemon.start()
        daemon.wait_walks(1)
        row = daemon.wait_row(locked_photo, status="failed")
        assert row[2].startswith("permission:"), row
        attempts = daemon.query("SELECT attempts FROM images WHERE id = ?", (row[0],))[0][0]
        assert attempts == 2
        for path in fine:
            daemon.wait_row(path, status="done")
        # The folder that cannot be listed is named by the walk, with why.
        walks = [e for e in log_events(daemon) if e.get("event") == "walk finished"]
        assert any("closed" in u and "Permission denied" in u for u in walks[0]["unreadable"])
        for path in hidden:
            assert daemon.row(path) is None
        # Phase 1 and 2 go on after all of it.
        late = distinct_copies(daemon.photos, 1, prefix="late")[0]
        os.chown(late, daemon.who.uid, daemon.who.uid)
        daemon.wait_row(late, status="done")
    finally:
        os.chmod(locked_photo, 0o644)
        os.chmod(closed, 0o755)
    assert daemon.stop() == 0


def test_a_folder_that_becomes_unreadable_is_not_read_as_deleted(make_daemon) -> None:
    daemon = make_daemon()
    inner = daemon.photos / "inner"
    photos = distinct_copies(inner, 4)
    daemon.start()
    daemon.wait_settled(4)
    assert daemon.stop() == 0
    os.chmod(inner, 0)
    try:
        daemon.start()
        daemon.wait_walks(1)  # this run's start-up walk
        statuses = {daemon.row(p)[1] for p in photos}
        assert statuses == {"done"}, statuses
    finally:
        os.chmod(inner, 0o755)
    assert daemon.stop() == 0


def test_an_unreadable_root_is_reported_and_the_other_root_goes_on(make_daemon) -> None:
    port = free_port()
    daemon = make_daemon({"metrics": {"listen": f"127.0.0.1:{port}"}})
    other = daemon.root / "other"
    other.mkdir()
    daemon.rewrite_config(watch={"paths": [str(daemon.photos), str(other)]})
    distinct_copies(daemon.photos, 2)
    os.chmod(daemon.photos, 0)
    try:
        daemon.start()
        wait_for(lambda: "watched folder unavailable" in daemon.log_text()
                 or daemon.proc.poll() is not None, message="the root reported")  # fmt: skip
        assert daemon.proc.poll() is None, daemon.log_text()[-2000:]
        reports = [e for e in log_events(daemon) if e.get("event") == "watched folder unavailable"]
        assert any("ermission denied" in e.get("problem", "") for e in reports), reports
        wait_for(lambda: (b := try_scrape(port)) and value(b, "photoscand_roots_unavailable") == 1,
                 message="roots_unavailable = 1")  # fmt: skip
        arrival = distinct_copies(other, 1, prefix="o")[0]
        os.chown(arrival, daemon.who.uid, daemon.who.uid)
        daemon.wait_row(arrival, status="done")
        assert daemon.query("SELECT count(*) FROM images")[0][0] == 1
    finally:
        os.chmod(daemon.photos, 0o755)
    assert daemon.stop() == 0


def test_a_read_only_thumbnail_folder_fails_images_with_a_reason_that_names_it(
    make_daemon,
) -> None:
    daemon = make_daemon({"workers": {"max_attempts": 2, "retry_backoff_seconds": 0.2}})
    thumbs = Path(daemon.config["thumbnails"]["dir"])
    thumbs.mkdir(parents=True)
    photos = distinct_copies(daemon.photos, 3)
    os.chmod(thumbs, 0o555)
    try:
        daemon.start()
        daemon.wait_settled(3)
        for path in photos:
            row = daemon.row(path)
            assert row[1] == "failed" and row[2].startswith("io_error:"), row
            assert "thumbnail folder" in row[2] and "ermission denied" in row[2], row
        assert daemon.proc.poll() is None
    finally:
        os.chmod(thumbs, 0o755)
    assert daemon.stop() == 0
