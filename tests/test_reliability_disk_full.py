"""A full disk mid-batch, on real small tmpfs mounts (CI runs as root): first the thumbnail
folder, then the catalog's. The daemon stays up, says so in its log and in
``photoscand_disk_full{location}``, fails and forgets nothing, counts no attempt, and
finishes the batch by itself once space returns, without a restart."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.reliability import (
    assert_complete,
    distinct_copies,
    fill,
    start_and_walk,
    tmpfs,
)
from tests.scrape import free_port, try_scrape, value


def disk_full(port: int, location: str) -> float | None:
    body = try_scrape(port)
    if body is None:
        return None
    return value(body, "photoscand_disk_full", {"location": location})


def statuses(daemon) -> dict[str, int]:
    return dict(daemon.query("SELECT status, count(*) FROM images GROUP BY status"))


@pytest.mark.parametrize("backend", ["pillow", "magick"])
def test_a_full_thumbnail_folder_pauses_phase_2_until_space_returns(
    daemon_factory, tmp_path: Path, backend: str
) -> None:
    port = free_port()
    thumbs = tmp_path / "thumbs"
    with tmpfs(thumbs, "384k"):
        daemon = daemon_factory(
            {
                "thumbnails": {"dir": str(thumbs)},
                "metrics": {"listen": f"127.0.0.1:{port}"},
                "workers": {"backend": backend},
            }
        )
        photos = distinct_copies(daemon.photos, 80)
        start_and_walk(daemon)
        pid = daemon.proc.pid
        wait_for(lambda: disk_full(port, "thumbnails") == 1, timeout=60,
                 message="disk_full{thumbnails} = 1")  # fmt: skip
        assert "thumbnail folder is full" in daemon.log_text()
        counts = statuses(daemon)
        assert 0 < counts.get("done", 0) < len(photos), counts
        # Paused, not failing: nothing failed, no attempt counted, the daemon answers.
        assert "failed" not in counts
        assert daemon.query("SELECT sum(attempts) FROM images")[0][0] == 0
        assert daemon.proc.poll() is None
        subprocess.run(["mount", "-o", "remount,size=8m", str(thumbs)], check=True)
        daemon.wait_settled(len(photos), timeout=90)
        wait_for(lambda: disk_full(port, "thumbnails") == 0, timeout=20,
                 message="disk_full{thumbnails} = 0")  # fmt: skip
        assert daemon.proc.pid == pid and daemon.proc.poll() is None
        assert "thumbnail folder has space again" in daemon.log_text()
        assert daemon.stop() == 0
        end = assert_complete(daemon, photos)
        assert daemon.query("SELECT sum(attempts) FROM images")[0][0] == 0
    print(f"\nthumbnails disk full ({backend}): {end['rows']} photos,"
          f" paused at {counts.get('done')} done, 0 lost, 0 attempts")  # fmt: skip


def test_a_full_catalog_disk_holds_rows_in_memory_until_space_returns(
    daemon_factory, tmp_path: Path
) -> None:
    port = free_port()
    db_dir = tmp_path / "db"
    with tmpfs(db_dir, "16m"):
        daemon = daemon_factory(
            {
                "catalog": {"path": str(db_dir / "photoscand.db")},
                "metrics": {"listen": f"127.0.0.1:{port}"},
            }
        )
        first = distinct_copies(daemon.photos / "first", 20)
        start_and_walk(daemon)
        pid = daemon.proc.pid
        daemon.wait_settled(len(first))
        later = distinct_copies(daemon.root / "staging", 400, start=100)
        shutil.move(str(daemon.root / "staging"), str(daemon.photos / "later"))
        later = [daemon.photos / "later" / p.name for p in later]
        # Mid-batch: rows are being written and photos converted when the disk fills.
        wait_for(lambda: len(daemon.query("SELECT id FROM images")) >= len(first) + 40,
                 message="the batch under way")  # fmt: skip
        filler = fill(db_dir)
        wait_for(lambda: disk_full(port, "catalog") == 1, timeout=60,
                 message="disk_full{catalog} = 1")  # fmt: skip
        assert "catalog disk is full" in daemon.log_text()
        assert daemon.proc.poll() is None
        held = len(daemon.query("SELECT id FROM images"))
        os.unlink(filler)
        daemon.wait_settled(len(first) + len(later), timeout=120)
        wait_for(lambda: disk_full(port, "catalog") == 0, timeout=20,
                 message="disk_full{catalog} = 0")  # fmt: skip
        assert "catalog disk has space again" in daemon.log_text()
        assert daemon.proc.pid == pid and daemon.proc.poll() is None
        assert daemon.stop() == 0
        end = assert_complete(daemon, first + later)
        assert daemon.query("SELECT sum(attempts) FROM images")[0][0] == 0
    print(f"\ncatalog disk full mid-batch: {end['rows']} photos, {held} rows in the catalog"
          " when it filled, 0 lost")  # fmt: skip
