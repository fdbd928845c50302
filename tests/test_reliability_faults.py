"""Nine faults the first fault campaign did not try, one group of tests per fault, each
with the real daemon (a subprocess on a temporary config, real files, real signals,
loop-mounted ext4 images where a real filesystem boundary is the fault); docs/reliability.md
has a row for each:

1. out-of-range numbers from a file or from ``stat`` (mtime after 2262 or before 1677, a
   BigTIFF whose header declares more than 2^63 pixels a side) crash-loop the daemon;
2. metadata lost for good when a file was unreadable for a moment;
3. a new file on a reused ext4 inode inherits a deleted photo's row;
4. a volume unmounted inside a watched root, or mounted over it, reads as deletion;
5. a photo changed in place without a close event stays ``done`` with its old content;
6. deleting ``<catalog>.lock`` lets a second daemon run on the same catalog;
7. attempts charged to the wrong image while the fork server is stopped;
8. idle connections pin one metrics thread each;
9. an inotify watch limit below the number of folders goes unsaid.

Hazards: points 3 and 4 mount loop ext4 images and point 1 a tmpfs (root only; they skip
otherwise) and unmount them in a ``finally``; point 7 stops the fork server with SIGSTOP
and always continues it; point 9 lowers the inotify watch limit only inside a user
namespace of the daemon's own (``/proc/sys/user/max_inotify_watches``), never the host's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import selectors
import shutil
import signal
import socket
import sqlite3
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from photoscand.catalog import Catalog, FileStat
from photoscand.protocol import PhotoMetadata
from tests.conftest import DaemonProcess, free_port, photoscand, scrape, wait_for
from tests.reliability import (
    BASE_PHOTO,
    SMALL_PHOTO,
    UnprivilegedDaemon,
    chown_tree,
    distinct_copies,
    freeze,
    log_events,
    start_and_walk,
    thaw,
    tmpfs,
    unprivileged,
    workers,
)

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# One year in nanoseconds: how far past SQLite's range the bad clocks below are set.
YEAR_NS = 365 * 86400 * 10**9
EXIT_LOCKED = 3


# -- helpers -----------------------------------------------------------------------------


def record(daemon: DaemonProcess, path: Path | bytes) -> dict[str, Any] | None:
    """Every column of a path's row, or None."""
    key = path if isinstance(path, bytes) else os.fsencode(path)
    try:
        conn = sqlite3.connect(f"file:{daemon.catalog_path}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return None
    conn.row_factory = sqlite3.Row
    try:
        row = conn.execute("SELECT * FROM images WHERE path = ?", (key,)).fetchone()
    except sqlite3.OperationalError:
        return None  # no catalog (or no table) yet
    finally:
        conn.close()
    return dict(row) if row is not None else None


def thumbnails(daemon: DaemonProcess, image_id: int) -> list[str]:
    return [r[0] for r in daemon.query("SELECT path FROM thumbnails WHERE image_id = ?",
                                       (image_id,))]  # fmt: skip


def log_tail(daemon: DaemonProcess, chars: int = 2500) -> str:
    return daemon.log_text()[-chars:]


def alive_until(
    daemon: DaemonProcess,
    predicate: Callable[[], Any],
    timeout: float = 30.0,
    message: str = "condition",
    state: Callable[[], Any] | None = None,
) -> Any:
    """``wait_for`` that gives up as soon as the daemon exits (and says how, with the end of
    its log), and that names the state it saw when the deadline passes."""
    try:
        value = wait_for(lambda: predicate() or daemon.proc.poll() is not None, timeout,
                         message=message)  # fmt: skip
    except AssertionError as exc:
        seen = f"; last state: {state()!r}" if state is not None else ""
        raise AssertionError(f"{exc}{seen}") from None
    code = daemon.proc.poll()
    assert code is None, (
        f"the daemon exited with {code} while waiting for {message}:\n{log_tail(daemon)}"
    )
    return value


def walks(daemon: DaemonProcess) -> int:
    """Walks this run of the daemon has finished (from its metrics)."""
    return daemon.walks_done()


def warnings_mentioning(daemon: DaemonProcess, *needles: str, start: int = 0) -> list[dict]:
    """Warning and error log events whose fields (the timestamp aside) mention a needle."""
    found = []
    for event in log_events(daemon, start):
        if event.get("level") not in ("warning", "error", "critical"):
            continue
        text = event_text(event)
        if any(n.lower() in text.lower() for n in needles):
            found.append(event)
    return found


def event_text(event: dict) -> str:
    return json.dumps({k: v for k, v in event.items() if k != "timestamp"})


def status_text(daemon: DaemonProcess) -> str:
    result = photoscand("status", "--config", str(daemon.config_path), cwd=daemon.root)
    assert result.returncode == 0, result.stderr
    return result.stdout


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def jpeg_with_trailer(source: Path, length: int, tag: bytes) -> bytes:
    """A photo's bytes padded to ``length`` after its end marker (decoders ignore it)."""
    data = source.read_bytes() + b"photoscand-test-" + tag
    assert len(data) <= length, (source, len(data), length)
    return data + b"\0" * (length - len(data))


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])


def thread_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


# -- point 1: numbers out of range ---------------------------------------------------------


def bigtiff(width: int, height: int) -> bytes:
    """A ~220-byte little-endian BigTIFF whose IFD0 declares width x height (LONG8 values,
    so up to 2^64-1), 8-bit grey, one strip of 8 bytes."""
    entries = [
        (256, 16, width), (257, 16, height), (258, 3, 8), (259, 3, 1), (262, 3, 1),
        (273, 16, 0), (277, 3, 1), (278, 16, 1), (279, 16, 8),
    ]  # fmt: skip
    ifd_at = 16
    pixels_at = ifd_at + 8 + 20 * len(entries) + 8
    out = b"II" + struct.pack("<HHHQ", 43, 8, 0, ifd_at) + struct.pack("<Q", len(entries))
    for tag, kind, value in entries:
        if tag == 273:
            value = pixels_at
        packed = struct.pack("<H" if kind == 3 else "<Q", value).ljust(8, b"\0")
        out += struct.pack("<HHQ", tag, kind, 1) + packed
    return out + struct.pack("<Q", 0) + b"\x80" * 8


_INTEGER_COLUMNS = ("size", "mtime_ns", "dev", "ino", "disk_offset", "width", "height",
                    "orientation", "iso", "attempts")  # fmt: skip
_REAL_COLUMNS = ("exposure_time", "f_number", "focal_length", "gps_lat", "gps_lon", "gps_alt")

# (column, value): every numeric column a file or stat fills, with values SQLite cannot
# hold (integers past 64 signed bits; infinities for REAL columns).
_STAT_CASES = [
    ("size", 2**63), ("mtime_ns", 2**63 + YEAR_NS), ("mtime_ns", -(2**63) - YEAR_NS),
    ("dev", 2**64 - 1), ("ino", 2**64 - 1),
]  # fmt: skip
_META_CASES = [
    *[(c, v) for c in ("width", "height", "orientation", "iso", "disk_offset")
      for v in (2**64 - 1, 2**63)],
    *[(c, v) for c in _REAL_COLUMNS for v in (math.inf, -math.inf)],
]  # fmt: skip


def _check_representable(row: dict[str, Any]) -> None:
    for column in _INTEGER_COLUMNS:
        value = row[column]
        assert value is None or (isinstance(value, int) and INT64_MIN <= value <= INT64_MAX), (
            column, value)  # fmt: skip
    for column in _REAL_COLUMNS:
        value = row[column]
        assert value is None or (isinstance(value, float) and math.isfinite(value)), (
            column, value)  # fmt: skip


def _catalog_row(catalog: Catalog, path: bytes) -> dict[str, Any]:
    names = [r[1] for r in catalog.query("PRAGMA table_info(images)")]
    values = catalog.query("SELECT * FROM images WHERE path = ?", (path,))
    assert values, f"no row for {path!r}"
    return dict(zip(names, values[0], strict=True))


@pytest.mark.parametrize(("column", "value"), _STAT_CASES + _META_CASES)
def test_the_catalog_stores_only_representable_numbers(tmp_path: Path, column: str,
                                                       value: float) -> None:  # fmt: skip
    """Catalog level: a row whose file or stat gives a number SQLite cannot hold is still
    written; sizes out of range make the file ``corrupt`` (with the reason), times are
    kept as far as they can be represented (clamped), and nothing is stored that is not a
    64-bit integer or a finite float."""
    catalog = Catalog(str(tmp_path / "catalog.db"))
    try:
        path = b"/photos/out-of-range.jpg"
        identity = {"size": 1000, "mtime_ns": 1_700_000_000 * 10**9, "dev": 2049, "ino": 12}
        meta: dict[str, Any] = {"format": "jpeg", "width": 640, "height": 480, "exif": "{}"}
        if column in identity:
            identity[column] = int(value)
        else:
            meta[column] = value
        catalog.add_image(FileStat(path, **identity), PhotoMetadata(**meta), time.time())
        assert catalog.commit()
        row = _catalog_row(catalog, path)
        _check_representable(row)
        if column == "mtime_ns":
            assert row["mtime_ns"] == (INT64_MAX if value > 0 else INT64_MIN), row["mtime_ns"]
        if column in ("size", "width", "height"):
            problems = f"{row['error'] or ''} {row['metadata_error'] or ''}"
            assert "corrupt" in problems, row
        if column in identity:
            return
        # Prefetch mode fills a row's metadata later, from the bytes the reader brought.
        other = b"/photos/filled-later.jpg"
        image_id = catalog.add_image(
            FileStat(other, 1000, 1, 2049, 13), PhotoMetadata(format="jpeg"), time.time()
        )
        catalog.update_metadata(
            image_id, PhotoMetadata(**{"format": "jpeg", column: value, "exif": "{}"})
        )
        assert catalog.commit()
        later = _catalog_row(catalog, other)
        _check_representable(later)
        if column in ("width", "height"):
            assert "corrupt" in (later["metadata_error"] or ""), later
    finally:
        catalog.close()


@pytest.mark.parametrize("when", ["after_2262", "before_1677"])
def test_a_photo_dated_outside_64_bit_nanoseconds_is_converted_and_the_daemon_stays_up(
    daemon_factory, tmp_path: Path, when: str
) -> None:
    daemon = daemon_factory()
    if when == "after_2262":
        mtime_ns = 2**63 + YEAR_NS  # a camera with a bad clock: 2263
        place: contextlib.AbstractContextManager = contextlib.nullcontext()
    else:
        # ext4 stores nothing before 1901; tmpfs keeps the full 64-bit seconds range.
        if os.geteuid() != 0:
            pytest.skip("a date before 1677 needs a tmpfs (root)")
        mtime_ns = -(2**63) - 50 * YEAR_NS  # an archive tool's idea of 1627
        place = tmpfs(daemon.photos, "16m")
    with place:
        try:
            start_and_walk(daemon)
            # The way copy tools land a file: a hidden temporary name, times set, renamed.
            dated = daemon.photos / "dated.jpg"
            temp = daemon.photos / ".dated.jpg.part"
            shutil.copy(BASE_PHOTO, temp)
            os.utime(temp, ns=(mtime_ns, mtime_ns))
            assert os.stat(temp).st_mtime_ns == mtime_ns, "the filesystem changed the date"
            os.rename(temp, dated)
            row = alive_until(daemon, lambda: (r := record(daemon, dated)) and r["status"] == "done"
                              and r, message="the dated photo converted",
                              state=lambda: record(daemon, dated))  # fmt: skip
            # Kept as far as it can be represented: clamped to SQLite's range.
            assert row["mtime_ns"] == (INT64_MAX if mtime_ns > 0 else INT64_MIN), row
            assert row["width"] == 1024 and row["content_hash"], row
            # The daemon goes on with the next photo.
            after = distinct_copies(daemon.photos, 1, prefix="after")[0]
            alive_until(daemon, lambda: (r := record(daemon, after)) and r["status"] == "done",
                        message="the next photo converted")  # fmt: skip
            assert daemon.stop() == 0, log_tail(daemon)
            # A restart walks the file again: no crash, and no endless "changed" either
            # (the clamped mtime must still match the file).
            start_and_walk(daemon)
            later = distinct_copies(daemon.photos, 1, prefix="later")[0]
            alive_until(daemon, lambda: (r := record(daemon, later)) and r["status"] == "done",
                        message="a photo after the restart converted")  # fmt: skip
            again = record(daemon, dated)
            assert (again["id"], again["status"], again["converted_at"]) == (
                row["id"], "done", row["converted_at"]), again  # fmt: skip
            assert daemon.stop() == 0, log_tail(daemon)
        finally:
            daemon.kill()


@pytest.mark.parametrize("side", ["width", "height"])
def test_a_bigtiff_declaring_more_than_2_63_pixels_fails_as_corrupt_and_the_daemon_goes_on(
    daemon_factory, side: str
) -> None:
    daemon = daemon_factory()
    start_and_walk(daemon)
    huge = bigtiff(2**64 - 1, 1) if side == "width" else bigtiff(1, 2**63)
    assert len(huge) < 256
    bad = daemon.photos / "declares-too-much.tif"
    bad.write_bytes(huge)
    row = alive_until(daemon, lambda: (r := record(daemon, bad))
                      and r["status"] in ("failed", "done") and r,
                      message="the BigTIFF's row in a final state",
                      state=lambda: record(daemon, bad))  # fmt: skip
    assert row["status"] == "failed", row
    assert "corrupt" in f"{row['metadata_error'] or ''} {row['error'] or ''}", row
    _check_representable(row)
    after = distinct_copies(daemon.photos, 1, prefix="after")[0]
    alive_until(daemon, lambda: (r := record(daemon, after)) and r["status"] == "done",
                message="the next photo converted")  # fmt: skip
    assert daemon.stop() == 0, log_tail(daemon)
    # Every restart walks the file again: it must not take the daemon down either.
    start_and_walk(daemon)
    assert record(daemon, bad)["status"] == "failed"
    assert daemon.stop() == 0, log_tail(daemon)


# -- point 2: metadata lost to a moment without read permission --------------------------


@pytest.fixture
def unprivileged_daemons() -> Iterator[Callable[..., UnprivilegedDaemon]]:
    """Daemons where mode bits count, in a fresh tree under /tmp (see
    tests/test_reliability_permissions.py: pytest's base folder is root's, mode 0700)."""
    who = unprivileged()
    base = Path(tempfile.mkdtemp(prefix="photoscand-faults-"))
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


def _write_unreadable(path: Path, data: bytes) -> None:
    """Create, write and close a file with mode 000 (what a copy tool does before it sets
    the permissions a moment later)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.chmod(path, 0)


def _metadata_state(daemon: DaemonProcess, path: Path) -> tuple | None:
    row = record(daemon, path)
    if row is None:
        return None
    return (row["status"], row["width"], row["height"], row["exif"] is not None,
            row["metadata_error"], row["error"], row["attempts"])  # fmt: skip


def test_metadata_is_read_once_a_file_unreadable_on_arrival_becomes_readable(
    unprivileged_daemons,
) -> None:
    daemon = unprivileged_daemons({"workers": {"max_attempts": 5,
                                               "retry_backoff_seconds": 0.5}})  # fmt: skip
    daemon.start()
    daemon.wait_walks(1)
    photo = daemon.photos / "permissions-fixed-later.jpg"
    _write_unreadable(photo, SMALL_PHOTO.read_bytes())
    try:
        first = alive_until(daemon, lambda: (r := record(daemon, photo)) and r,
                            message="a row for the unreadable photo")  # fmt: skip
        assert (first["metadata_error"] or "").startswith("permission"), first
        os.chmod(photo, 0o644)  # the copy tool fixes the permissions (an attribute change)
        seen_done_without_metadata = []

        def done() -> bool:
            state = _metadata_state(daemon, photo)
            if state and state[0] == "done" and state[1] is None:
                seen_done_without_metadata.append(state)
            return bool(state) and state[0] == "done"

        alive_until(daemon, done, message="the photo done",
                    state=lambda: _metadata_state(daemon, photo))  # fmt: skip
        assert not seen_done_without_metadata, (
            f"done with its metadata missing: {seen_done_without_metadata[0]}")  # fmt: skip
        row = record(daemon, photo)
        assert (row["width"], row["height"]) == (100, 68), row
        assert row["metadata_error"] is None and row["exif"] not in (None, "{}"), row
        assert row["make"] == "Canon", row
    finally:
        os.chmod(photo, 0o644)
    assert daemon.stop() == 0


def test_metadata_lost_to_permissions_is_read_again_after_a_restart_and_a_retry(
    unprivileged_daemons,
) -> None:
    daemon = unprivileged_daemons({"workers": {"max_attempts": 1}})
    photo = daemon.photos / "was-unreadable.jpg"
    _write_unreadable(photo, SMALL_PHOTO.read_bytes())
    try:
        daemon.start()
        failed = daemon.wait_row(photo, status="failed")
        assert failed[2].startswith("permission"), failed
        assert (record(daemon, photo)["metadata_error"] or "").startswith("permission")
        assert daemon.stop() == 0
        # Fixed while the daemon was down: size and mtime unchanged, only the mode.
        os.chmod(photo, 0o644)
        daemon.start()
        daemon.wait_walks(1)  # this run's start-up walk
        retried = photoscand("retry", "--all", "--config", str(daemon.config_path),
                             cwd=daemon.root)  # fmt: skip
        assert retried.returncode == 0, retried.stderr
        alive_until(
            daemon,
            lambda: (r := record(daemon, photo)) and r["status"] == "done",
            message="the photo done",
            state=lambda: _metadata_state(daemon, photo),
        )
        row = record(daemon, photo)
        assert (row["width"], row["height"]) == (100, 68), _metadata_state(daemon, photo)
        assert row["metadata_error"] is None and row["make"] == "Canon", row
    finally:
        os.chmod(photo, 0o644)
    assert daemon.stop() == 0


# -- points 3 and 4: loop-mounted ext4 images ----------------------------------------------


def make_ext4(image: Path, size_mb: int = 32) -> Path:
    """An empty ext4 filesystem in a file (root only; skips where it cannot be made)."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting an ext4 image needs root")
    if shutil.which("mkfs.ext4") is None:
        pytest.skip("mkfs.ext4 is not installed")
    with open(image, "wb") as fh:
        fh.truncate(size_mb << 20)
    made = subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip()}")
    return image


def mount_loop(image: Path, mountpoint: Path) -> None:
    mountpoint.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(mountpoint)],
                             capture_output=True, text=True)  # fmt: skip
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount an ext4 image here: {mounted.stderr.strip()}")


def unmount(mountpoint: Path) -> None:
    """Unmount (the loop device goes with it); a busy mount is retried, then detached."""
    for _ in range(50):
        if not os.path.ismount(mountpoint):
            return
        if subprocess.run(["umount", str(mountpoint)], capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mountpoint)], check=False)


@contextlib.contextmanager
def ext4_mounted(image: Path, mountpoint: Path) -> Iterator[Path]:
    mount_loop(image, mountpoint)
    try:
        yield mountpoint
    finally:
        unmount(mountpoint)


def _two_photos_of_one_length() -> tuple[bytes, bytes]:
    """Two different photos (1024x768 and 100x68) with exactly the same number of bytes."""
    old = BASE_PHOTO.read_bytes()
    return old, jpeg_with_trailer(SMALL_PHOTO, len(old), b"re-export")


def _land_with_times(path: Path, data: bytes, mtime_ns: int) -> os.stat_result:
    """Write a file under a hidden temporary name, give it a preserved mtime, rename it in
    (rsync -t, cp -p, a re-export that keeps the original's times)."""
    temp = path.with_name(f".{path.name}.part")
    temp.write_bytes(data)
    os.utime(temp, ns=(mtime_ns, mtime_ns))
    st = os.stat(temp)
    os.rename(temp, path)
    return st


def _check_is_the_new_photo(daemon: DaemonProcess, path: Path, data: bytes,
                            old_row: dict) -> None:  # fmt: skip
    """The file on the reused inode ends ``done`` as itself: its own hash, size in pixels and
    thumbnails (never ``done`` with the deleted photo's, not even for a moment)."""
    row = alive_until(daemon, lambda: (r := record(daemon, path)) and r["status"] == "done"
                      and r, message="the new file converted",
                      state=lambda: record(daemon, path))  # fmt: skip
    seen = {k: row[k] for k in ("id", "content_hash", "width", "height")}
    assert row["content_hash"] != old_row["content_hash"], (
        f"the new file took the deleted photo's row (id {old_row['id']}): {seen}")  # fmt: skip
    assert row["content_hash"] == sha256(data), seen
    assert (row["width"], row["height"]) == (100, 68), seen
    thumbs = thumbnails(daemon, row["id"])
    assert thumbs and all(sha256(data) in t for t in thumbs), thumbs


def test_a_new_file_on_a_deleted_photos_inode_is_a_new_image(daemon_factory,
                                                             tmp_path: Path) -> None:  # fmt: skip
    daemon = daemon_factory()
    image = make_ext4(tmp_path / "photos.ext4")
    old_bytes, new_bytes = _two_photos_of_one_length()
    with ext4_mounted(image, daemon.photos):
        try:
            start_and_walk(daemon)
            old = daemon.photos / "IMG_0001.jpg"
            old.write_bytes(old_bytes)
            old_row = alive_until(daemon, lambda: (r := record(daemon, old))
                                  and r["status"] == "done" and r,
                                  message="the first photo converted")  # fmt: skip
            gone = os.stat(old)
            os.unlink(old)
            alive_until(daemon, lambda: record(daemon, old)["status"] == "missing",
                        message="the deleted photo missing")  # fmt: skip
            new = daemon.photos / "IMG_0002.jpg"
            st = _land_with_times(new, new_bytes, gone.st_mtime_ns)
            if st.st_ino != gone.st_ino:
                pytest.skip("ext4 did not hand the deleted inode to the next file here")
            assert (st.st_size, st.st_mtime_ns) == (gone.st_size, gone.st_mtime_ns)
            _check_is_the_new_photo(daemon, new, new_bytes, old_row)
            left = record(daemon, old)
            assert left is None or left["status"] == "missing", left
            assert daemon.stop() == 0
        finally:
            daemon.kill()


def test_a_new_file_on_a_reused_inode_found_by_a_walk_is_a_new_image(
    daemon_factory, tmp_path: Path
) -> None:
    daemon = daemon_factory()
    image = make_ext4(tmp_path / "photos.ext4")
    old_bytes, new_bytes = _two_photos_of_one_length()
    with ext4_mounted(image, daemon.photos):
        try:
            old = daemon.photos / "IMG_0001.jpg"
            old.write_bytes(old_bytes)
            daemon.start()
            daemon.wait_settled(1)
            old_row = record(daemon, old)
            assert old_row["status"] == "done", old_row
            assert daemon.stop() == 0
            # While the daemon is away: the photo deleted, a re-export lands beside it.
            gone = os.stat(old)
            os.unlink(old)
            new = daemon.photos / "IMG_0001-edit.jpg"
            st = _land_with_times(new, new_bytes, gone.st_mtime_ns)
            if st.st_ino != gone.st_ino:
                pytest.skip("ext4 did not hand the deleted inode to the next file here")
            start_and_walk(daemon)
            _check_is_the_new_photo(daemon, new, new_bytes, old_row)
            left = record(daemon, old)
            assert left is None or left["status"] == "missing", left
            assert daemon.stop() == 0
        finally:
            daemon.kill()


def _unavailable_metric(port: int) -> float:
    """The gauges that report folders that look unmounted or cannot be read."""
    return sum(v for name, v in scrape(port).items()
               if "unavailable" in name or "unmounted" in name)  # fmt: skip


def test_a_volume_unmounted_inside_a_watched_root_waits_and_comes_back(
    daemon_factory, tmp_path: Path
) -> None:
    port = free_port()
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 1},
                             "metrics": {"listen": f"127.0.0.1:{port}"}})  # fmt: skip
    local = distinct_copies(daemon.photos, 2, prefix="local")
    nas = daemon.photos / "nas"
    image = make_ext4(tmp_path / "nas.ext4")
    mount_loop(image, nas)
    try:
        shared = distinct_copies(nas / "2024", 3, prefix="nas")
        daemon.start().wait_ready()
        daemon.wait_settled(5)
        before = {p: record(daemon, p) for p in shared}
        assert {r["status"] for r in before.values()} == {"done"}
        offset = len(daemon.log_text())
        unmount(nas)
        assert not os.path.ismount(nas) and nas.is_dir()
        count = walks(daemon)
        went_missing: set[Path] = set()

        def two_walks_later() -> bool:
            went_missing.update(p for p in shared if record(daemon, p)["status"] == "missing")
            return walks(daemon) >= count + 2

        alive_until(daemon, two_walks_later, message="two walks after the unmount")
        assert not went_missing, f"rows under the unmounted volume went missing: {went_missing}"
        assert warnings_mentioning(daemon, str(nas), start=offset), "the unmount was not logged"
        assert _unavailable_metric(port) >= 1
        assert str(nas) in status_text(daemon)
        for path in local:
            assert record(daemon, path)["status"] == "done"
        # The volume returns: its rows are as they were, not converted again.
        mount_loop(image, nas)
        alive_until(daemon, lambda: _unavailable_metric(port) == 0,
                    message="the volume reported back")  # fmt: skip
        wait_for(lambda: walks(daemon) >= count + 4, message="walks after the remount")
        for path, was in before.items():
            now = record(daemon, path)
            keep = ("id", "status", "content_hash", "converted_at")
            assert {k: now[k] for k in keep} == {k: was[k] for k in keep}, path
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        unmount(nas)


def test_a_filesystem_mounted_over_a_watched_root_is_not_read_as_deletion(
    daemon_factory, tmp_path: Path
) -> None:
    port = free_port()
    daemon = daemon_factory({"watch": {"rescan_interval_seconds": 1},
                             "metrics": {"listen": f"127.0.0.1:{port}"}})  # fmt: skip
    photos = distinct_copies(daemon.photos, 3)
    image = make_ext4(tmp_path / "other.ext4")  # empty but for lost+found: not "empty"
    try:
        daemon.start().wait_ready()
        daemon.wait_settled(3)
        before = {p: record(daemon, p) for p in photos}
        offset = len(daemon.log_text())
        mount_loop(image, daemon.photos)
        count = walks(daemon)
        went_missing: set[Path] = set()

        def two_walks_later() -> bool:
            went_missing.update(p for p in photos if record(daemon, p)["status"] == "missing")
            return walks(daemon) >= count + 2

        alive_until(daemon, two_walks_later, message="two walks after the mount")
        assert not went_missing, f"rows of the covered root went missing: {went_missing}"
        assert warnings_mentioning(daemon, str(daemon.photos), start=offset), "not logged"
        assert _unavailable_metric(port) >= 1
        assert str(daemon.photos) in status_text(daemon)
        unmount(daemon.photos)
        alive_until(daemon, lambda: _unavailable_metric(port) == 0,
                    message="the root reported back")  # fmt: skip
        wait_for(lambda: walks(daemon) >= count + 4, message="walks after the unmount")
        for path, was in before.items():
            now = record(daemon, path)
            keep = ("id", "status", "content_hash", "converted_at")
            assert {k: now[k] for k in keep} == {k: was[k] for k in keep}, path
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        unmount(daemon.photos)


# -- point 5: changed in place without a close --------------------------------------------


@pytest.mark.parametrize("how", ["writer_keeps_it_open", "truncate"])
def test_a_photo_changed_in_place_without_a_close_is_cataloged_again(daemon_factory,
                                                                     how: str) -> None:  # fmt: skip
    daemon = daemon_factory()  # rescan_interval_seconds 0: no walk will catch it
    start_and_walk(daemon)
    photo = daemon.photos / "edited.jpg"
    original = BASE_PHOTO.read_bytes()
    photo.write_bytes(original)
    first = alive_until(daemon, lambda: (r := record(daemon, photo)) and r["status"] == "done"
                        and r, message="the photo converted")  # fmt: skip
    assert first["content_hash"] == sha256(original)

    def state() -> dict | None:
        r = record(daemon, photo)
        return r and {k: r[k] for k in ("status", "size", "content_hash", "error", "width")}

    with contextlib.ExitStack() as stack:
        if how == "writer_keeps_it_open":
            edited = SMALL_PHOTO.read_bytes() + b"photoscand-test-edited"
            fh = stack.enter_context(open(photo, "r+b"))
            fh.write(edited)
            fh.truncate()
            fh.flush()
            alive_until(daemon, lambda: (r := record(daemon, photo)) and r["status"] == "done"
                        and r["content_hash"] == sha256(edited), timeout=10,
                        message="the rewritten photo converted again", state=state)  # fmt: skip
            assert record(daemon, photo)["width"] == 100
        else:
            cut = len(original) // 3
            os.truncate(photo, cut)  # truncate(2): no open, no close
            alive_until(daemon, lambda: (r := record(daemon, photo)) and r["size"] == cut,
                        timeout=10, message="the truncation cataloged", state=state)  # fmt: skip
            end = alive_until(daemon, lambda: (r := record(daemon, photo))
                              and r["status"] in ("done", "failed") and r,
                              message="the cut photo in a final state", state=state)  # fmt: skip
            assert (end["status"], end["content_hash"]) != ("done", sha256(original)), end
    assert daemon.stop() == 0


# -- point 6: the lock file deleted under a running daemon -----------------------------------


def test_deleting_the_lock_file_does_not_let_a_second_daemon_run(daemon_factory) -> None:
    first = daemon_factory()
    first.start().wait_ready()
    lock = Path(str(first.catalog_path) + ".lock")
    assert lock.exists()
    lock.unlink()  # a tmp cleaner, an operator
    second = daemon_factory({"watch": {"paths": [str(first.photos)]},
                             "catalog": {"path": str(first.catalog_path)},
                             "thumbnails": {"dir": first.config["thumbnails"]["dir"]}},
                            name="second")  # fmt: skip
    second.start()
    wait_for(lambda: second.proc.poll() is not None or '"event": "ready"' in second.log_text(),
             timeout=30, message="the second daemon refused or ready")  # fmt: skip
    code = second.proc.poll()
    second.kill()
    assert code == EXIT_LOCKED, (
        f"a second daemon runs on the catalog (exit code {code}):\n{log_tail(second, 800)}"
    )
    assert first.proc.poll() is None, log_tail(first)
    assert first.stop() == 0


# -- point 7: attempts charged to the wrong image -------------------------------------------


def _attempts_and_error(daemon: DaemonProcess, path: Path) -> tuple | None:
    row = record(daemon, path)
    return row and (row["status"], row["attempts"], row["error"])


def test_a_worker_killed_while_idle_under_a_stopped_fork_server_costs_no_attempt(
    daemon_factory,
) -> None:
    daemon = daemon_factory({"workers": {"count": 1, "max_attempts": 5,
                                         "retry_backoff_seconds": 0.2}})  # fmt: skip
    daemon.start().wait_ready()
    worker = wait_for(lambda: workers(daemon), message="the worker")[0]
    server = parent_of(worker)
    assert server != daemon.proc.pid
    freeze([server])
    try:
        os.kill(worker, signal.SIGKILL)  # idle; its death is reported by the stopped server
        photo = distinct_copies(daemon.photos, 1, prefix="innocent")[0]
        alive_until(daemon, lambda: record(daemon, photo), message="a row for the photo")
        time.sleep(2.0)  # the fault lasts a while (the campaign saw 16 s)
    finally:
        thaw([server])
    alive_until(
        daemon,
        lambda: _attempts_and_error(daemon, photo)[0] == "done",
        message="the photo converted",
        state=lambda: _attempts_and_error(daemon, photo),
    )
    charged = [e for e in log_events(daemon) if e.get("event") == "worker died"]
    assert _attempts_and_error(daemon, photo) == ("done", 0, None), (
        f"charged for a death it did not cause: {_attempts_and_error(daemon, photo)}, {charged}"
    )
    assert daemon.stop() == 0


def test_a_stopped_worker_costs_its_image_exactly_one_timeout(daemon_factory) -> None:
    daemon = daemon_factory({"workers": {"count": 2, "timeout_seconds": 2, "max_attempts": 5,
                                         "retry_backoff_seconds": 0.2}})  # fmt: skip
    daemon.start().wait_ready()
    pids = wait_for(lambda: len(workers(daemon)) == 2 and sorted(workers(daemon)),
                    message="two workers")  # fmt: skip
    server = parent_of(pids[0])
    # The first slot's worker (started first) is the one the next image goes to.
    freeze([server, pids[0]])
    try:
        photo = distinct_copies(daemon.photos, 1, prefix="hit")[0]
        alive_until(daemon, lambda: _attempts_and_error(daemon, photo) is not None
                    and _attempts_and_error(daemon, photo)[0] == "converting",
                    message="the photo in hand")  # fmt: skip
        # The fault lasts past the timeout and the 5 s the supervisor waits for the reaper.
        time.sleep(1.0)
        assert _attempts_and_error(daemon, photo)[0] != "done", (
            "set-up: the photo went to the running worker, not the stopped one"
        )
        time.sleep(7.5)
    finally:
        thaw([server, pids[0]])
    alive_until(
        daemon,
        lambda: _attempts_and_error(daemon, photo)[0] == "done",
        message="the photo converted",
        state=lambda: _attempts_and_error(daemon, photo),
    )
    image_id = record(daemon, photo)["id"]
    timeouts = [e for e in log_events(daemon)
                if e.get("event") == "conversion timed out; worker killed"
                and e.get("id") == image_id]  # fmt: skip
    attempts = record(daemon, photo)["attempts"]
    stamps = [e["timestamp"] for e in timeouts]
    assert (attempts, len(timeouts)) == (1, 1), (
        f"one stopped worker cost the photo {attempts} attempts; timeouts at {stamps}"
    )
    assert daemon.stop() == 0


# -- point 8: the metrics endpoint pinned by idle connections --------------------------------


IDLE_CLIENTS = 100
# Threads the daemon may add while serving them (a bounded pool): far fewer than clients.
THREAD_ALLOWANCE = 24


def test_idle_metrics_connections_cannot_pin_threads_or_starve_scrapes(daemon_factory) -> None:
    port = free_port()
    daemon = daemon_factory({"metrics": {"listen": f"127.0.0.1:{port}"}})
    daemon.start().wait_ready()
    pid = daemon.proc.pid
    scrape(port)
    baseline = thread_count(pid)
    idle = _idle_connections(port, IDLE_CLIENTS)
    try:
        peak, accepted = baseline, 0

        def all_taken() -> bool:
            # Until the daemon has accepted (or already closed) every idle connection; the
            # peak thread count on the way is what the clients cost it.
            nonlocal peak, accepted
            peak = max(peak, thread_count(pid))
            accepted = _accepted_connections(pid, port)
            if peak > baseline + THREAD_ALLOWANCE:
                return True  # over the bound already: no need to wait for the rest
            return accepted + sum(_closed_by_peer(s) for s in idle) >= IDLE_CLIENTS

        wait_for(all_taken, timeout=20, message=f"the {IDLE_CLIENTS} idle connections accepted")
        assert peak <= baseline + THREAD_ALLOWANCE, (
            f"{peak} threads once {accepted} of {IDLE_CLIENTS} idle metrics connections were"
            f" accepted (baseline {baseline}): one thread each"
        )
        # Prometheus is not starved by them: one scrape, then 50 at once, answer quickly.
        first = _timed_scrape(port)
        with ThreadPoolExecutor(50) as pool:
            took = list(pool.map(lambda _: _timed_scrape(port), range(50)))
        assert first < 2.0 and max(took) < 5.0, (first, max(took))
        assert thread_count(pid) <= baseline + THREAD_ALLOWANCE
        # Per-connection timeouts: the daemon lets go of clients that send nothing.
        wait_for(lambda: all(_closed_by_peer(s) for s in idle), timeout=20,
                 message="the idle connections closed by the daemon")  # fmt: skip
    finally:
        for sock in idle:
            sock.close()
    assert daemon.stop() == 0


def _idle_connections(port: int, count: int) -> list[socket.socket]:
    """``count`` connections to the metrics port, opened at once; half of them send the
    start of a request and never finish it, the others send nothing."""
    socks = []
    selector = selectors.DefaultSelector()
    for _ in range(count):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        selector.register(sock, selectors.EVENT_WRITE)
        socks.append(sock)
    pending = set(socks)
    deadline = time.monotonic() + 30
    while pending and time.monotonic() < deadline:
        for key, _ in selector.select(1.0):
            selector.unregister(key.fileobj)
            pending.discard(key.fileobj)
    selector.close()
    assert not pending, f"{len(pending)} connections to the metrics port never completed"
    for sock in socks[1::2]:
        sock.send(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    return socks


def _accepted_connections(pid: int, port: int) -> int:
    """Connections to ``port`` that process ``pid`` has accepted and holds open (its socket
    descriptors matched against the kernel's TCP table)."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                inodes.add(link[len("socket:[") : -1])
    count = 0
    for table in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            # 01 established, 08 close-wait (the client gave up, the daemon still holds it)
            if local_port == port and fields[3] in ("01", "08") and fields[9] in inodes:
                count += 1
    return count


def _timed_scrape(port: int) -> float:
    started = time.monotonic()
    scrape(port)
    return time.monotonic() - started


def _closed_by_peer(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        while True:
            data = sock.recv(65536)
            if not data:
                return True  # EOF (an answer such as 408 may have come before it)
    except BlockingIOError:
        return False
    except OSError:
        return True  # reset


# -- point 9: the inotify watch limit ----------------------------------------------------------


class WatchLimitedDaemon(DaemonProcess):
    """The daemon in a user namespace of its own whose inotify watch limit is ``limit``
    (``/proc/sys/user/max_inotify_watches`` is per user namespace, and the kernel counts
    the watches against every level): the host's limit is never touched."""

    def __init__(self, root: Path, limit: int, settings: dict[str, Any] | None = None) -> None:
        super().__init__(root, settings)
        self.limit = limit

    def start(self, command: str = "run", *extra: str) -> WatchLimitedDaemon:
        self.runs += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["unshare", "--user", "--map-root-user", "sh", "-c",
                 f'echo {self.limit} > /proc/sys/user/max_inotify_watches && exec "$@"', "sh",
                 sys.executable, "-m", "photoscand", command, "--config", str(self.config_path),
                 *extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            )  # fmt: skip
        return self


def _watch_limit_in_a_namespace_works() -> str | None:
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(
        ["unshare", "--user", "--map-root-user", "sh", "-c",
         "echo 20 > /proc/sys/user/max_inotify_watches"], capture_output=True, text=True,
    )  # fmt: skip
    if probe.returncode != 0:
        return f"no user namespace with its own inotify limit here: {probe.stderr.strip()}"
    return None


def test_an_inotify_watch_limit_below_the_folder_count_is_logged_once_shown_and_exported(
    tmp_path: Path,
) -> None:
    why = _watch_limit_in_a_namespace_works()
    if why is not None:
        pytest.skip(why)
    port = free_port()
    daemon = WatchLimitedDaemon(tmp_path / "d", 20, {
        "watch": {"rescan_interval_seconds": 1},
        "metrics": {"listen": f"127.0.0.1:{port}"},
    })  # fmt: skip
    for i in range(40):
        distinct_copies(daemon.photos / f"folder{i:02d}", 1, prefix=f"f{i:02d}-")
    known = 41  # the root and its 40 folders
    try:
        daemon.start().wait_ready()
        daemon.wait_settled(40)
        wait_for(lambda: walks(daemon) >= 3, message="three walks")
        # Once, naming the limit to raise (fs.inotify.max_user_watches, or its per-namespace
        # twin user.max_inotify_watches) and the numbers.
        found = warnings_mentioning(daemon, "max_user_watches", "max_inotify_watches")
        assert len(found) == 1, (
            f"{len(found)} warnings name the inotify watch limit; the log said: "
            + "; ".join(event_text(e) for e in warnings_mentioning(daemon, "watch"))
        )
        assert str(known) in event_text(found[0]), found[0]
        status = status_text(daemon)
        assert "watch" in status.lower() and str(known) in status, status
        values = scrape(port)
        assert values["photoscand_watches"] < known, values["photoscand_watches"]
        assert values["photoscand_watched_directories"] == known
        assert daemon.stop() == 0
    finally:
        daemon.kill()
