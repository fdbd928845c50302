"""Prefetch mode (io.mode: prefetch): the window allocator, the claim order, and the real
daemon feeding its workers from memory under a burst, a crash, a hang and a file that
changes after it was read."""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

from PIL import Image

from photoscand.catalog import Catalog, FileStat
from photoscand.metadata import physical_offset
from photoscand.prefetch import Arena
from photoscand.protocol import PhotoMetadata
from tests.conftest import CORPUS, free_port, named_descendants, scrape, wait_for

SAMPLE = CORPUS / "cameras" / "Canon_40D.jpg"


def test_the_arena_never_exceeds_its_window_and_reuses_freed_space() -> None:
    arena = Arena(1000)
    rng = random.Random(7)
    live: dict[int, int] = {}
    allocated = 0
    for _ in range(5000):
        if live and (rng.random() < 0.5 or len(live) > 8):
            offset = rng.choice(list(live))
            arena.free(offset)
            del live[offset]
        else:
            length = rng.randint(1, 400)
            offset = arena.allocate(length)
            if offset is not None:
                assert offset >= 0 and offset + length <= 1000
                # No overlap with any live block.
                for other, other_length in live.items():
                    assert offset + length <= other or other + other_length <= offset
                live[offset] = length
                allocated += 1
        assert arena.used == sum(live.values()) <= 1000
    assert allocated > 1000
    for offset in list(live):
        arena.free(offset)
    assert arena.used == 0
    assert arena.allocate(1000) == 0  # empty again: the whole window is one region
    assert arena.allocate(1) is None
    assert arena.allocate(1001) is None
    arena.close()


def test_arena_memory_is_visible_to_another_process_through_proc(tmp_path: Path) -> None:
    import subprocess
    import sys

    arena = Arena(4096)
    offset = arena.allocate(5)
    arena.view(offset, 5)[:] = b"hello"
    path = arena.memory.path
    code = (
        "import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY);"
        " m = mmap.mmap(fd, 0, prot=mmap.PROT_READ); sys.stdout.write(m[:5].decode())"
    )
    out = subprocess.run([sys.executable, "-c", code, path], capture_output=True, check=True)
    assert out.stdout == b"hello"
    arena.close()


def test_claims_follow_the_disk_order(tmp_path: Path) -> None:
    catalog = Catalog(str(tmp_path / "c.db"))
    now = time.time()
    # Two devices; on each, physical offsets where known, inode numbers otherwise.
    rows = [
        (b"/a/1.jpg", 9, 500, 30),
        (b"/a/2.jpg", 9, 100, 31),
        (b"/a/3.jpg", 9, 300, 10),
        (b"/b/4.jpg", 5, None, 8),
        (b"/b/5.jpg", 5, None, 2),
    ]
    for path, dev, offset, ino in rows:
        catalog.add_image(FileStat(path, 10, 1, dev, ino), PhotoMetadata(disk_offset=offset), now)
    jobs = catalog.claim(10, now, disk_order=True)
    assert [j.path for j in jobs] == [b"/b/5.jpg", b"/b/4.jpg", b"/a/2.jpg", b"/a/3.jpg",
                                      b"/a/1.jpg"]  # fmt: skip
    catalog.close()


def test_physical_offsets_are_read_where_the_filesystem_has_them(tmp_path: Path) -> None:
    first = tmp_path / "first.jpg"
    first.write_bytes(os.urandom(200_000))
    os.sync()
    fd = os.open(first, os.O_RDONLY)
    try:
        offset = physical_offset(fd)
    finally:
        os.close(fd)
    # ext4/xfs/btrfs answer FIEMAP; tmpfs and FUSE do not (the claim order then falls
    # back to inode numbers).
    assert offset is None or offset >= 0


def _prefetch_daemon(daemon_factory, **workers):
    port = free_port()
    daemon = daemon_factory(
        {
            "io": {"mode": "prefetch", "prefetch_window_mb": 8},
            "workers": {"count": 2, **workers},
            "metrics": {"listen": f"127.0.0.1:{port}"},
        }
    )
    return daemon, port


def _noise_jpegs(folder: Path, count: int, size: tuple[int, int] = (1200, 900)) -> list[Path]:
    """JPEGs of about 0.5 MB each (noise does not compress), distinct content."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.frombytes("RGB", size, random.Random(i).randbytes(size[0] * size[1] * 3))
        path = folder / f"noise_{i:03d}.jpg"
        image.save(path, quality=85)
        paths.append(path)
    return paths


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_the_window_bound_holds_under_a_burst(daemon_factory, tmp_path: Path) -> None:
    daemon, port = _prefetch_daemon(daemon_factory)
    staged = _noise_jpegs(tmp_path / "staging", 60)
    daemon.start().wait_ready()
    baseline = _rss(daemon.proc.pid)
    peak_window = 0.0
    peak_rss = baseline
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak_window, peak_rss
        while not stop.is_set():
            metrics = scrape(port)
            peak_window = max(peak_window, metrics["photoscand_prefetch_window_bytes"])
            peak_rss = max(peak_rss, _rss(daemon.proc.pid))
            stop.wait(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        for path in staged:
            os.rename(path, daemon.photos / path.name)
        daemon.wait_settled(60)
    finally:
        stop.set()
        sampler.join()
    metrics = scrape(port)
    limit = 8 << 20
    assert metrics["photoscand_prefetch_window_limit_bytes"] == limit
    assert 0 < peak_window <= limit
    assert metrics["photoscand_prefetch_window_bytes"] == 0  # everything released
    assert metrics["photoscand_prefetch_bytes_read_total"] >= sum(
        (daemon.photos / p.name).stat().st_size for p in staged
    )
    # The daemon's memory grows by the window at most (plus interpreter noise), not by
    # the 30 MB of photos that went through it.
    assert peak_rss - baseline < limit + (12 << 20), (baseline, peak_rss)
    statuses = {r[1] for r in daemon.rows().values()}
    assert statuses == {"done"}
    # Phase 1 in prefetch mode: the EXIF came from the bytes the reader brought.
    assert daemon.query("SELECT count(*) FROM images WHERE exif IS NULL") == [(0,)]
    assert daemon.stop() == 0


def test_a_worker_crash_and_a_hang_release_their_share_of_the_window(daemon_factory) -> None:
    daemon, port = _prefetch_daemon(daemon_factory, timeout_seconds=1.5,
                                    retry_backoff_seconds=0.1)  # fmt: skip
    daemon.start().wait_ready()
    first = wait_for(lambda: len(named_descendants(daemon.proc.pid, "photoscand-work")) == 2
                     and named_descendants(daemon.proc.pid, "photoscand-work"))  # fmt: skip
    for pid in first:
        os.kill(pid, signal.SIGSTOP)
    for i in range(4):
        # Distinct content per file, written whole (a change after the read would be
        # a new version of the file, with its attempts starting over).
        (daemon.photos / f"{i}.jpg").write_bytes(SAMPLE.read_bytes() + bytes([i]) * 16)
    # Rows the reader claimed are "converting" too: wait until both workers hold a job.
    wait_for(lambda: scrape(port)["photoscand_workers_busy"] == 2, message="jobs in hand")
    assert scrape(port)["photoscand_prefetch_window_bytes"] > 0
    os.kill(first[0], signal.SIGKILL)  # a crash; the other one hangs until the timeout
    daemon.wait_settled(4, timeout=60)
    rows = daemon.query("SELECT status, attempts FROM images")
    assert {r[0] for r in rows} == {"done"}
    assert sum(r[1] for r in rows) == 2  # one attempt for the crash, one for the hang
    wait_for(lambda: scrape(port)["photoscand_prefetch_window_bytes"] == 0, message="released")
    assert daemon.stop() == 0


def test_a_file_replaced_after_its_bytes_were_read_is_converted_from_a_consistent_snapshot(
    daemon_factory, tmp_path: Path
) -> None:
    daemon, port = _prefetch_daemon(daemon_factory)
    daemon.start().wait_ready()
    workers = wait_for(lambda: len(named_descendants(daemon.proc.pid, "photoscand-work")) == 2
                       and named_descendants(daemon.proc.pid, "photoscand-work"))  # fmt: skip
    for pid in workers:
        os.kill(pid, signal.SIGSTOP)
    target = daemon.photos / "photo.jpg"
    shutil.copy(SAMPLE, target)
    wait_for(lambda: scrape(port)["photoscand_prefetch_bytes_read_total"] > 0,
             message="the reader took the old bytes")  # fmt: skip
    # Replace the photo (atomic rename of another picture) while a worker holds the old.
    replacement = tmp_path / "new.jpg"
    shutil.copy(CORPUS / "cameras" / "Nikon_D70.jpg", replacement)
    os.rename(replacement, target)
    for pid in workers:
        os.kill(pid, signal.SIGCONT)
    new_hash = hashlib.sha256(target.read_bytes()).hexdigest()

    def converted_new() -> bool:
        rows = daemon.query("SELECT status, content_hash, size FROM images")
        return len(rows) == 1 and rows[0][0] == "done" and rows[0][2] == target.stat().st_size

    wait_for(converted_new, timeout=60, message="the new bytes converted")
    (content_hash,) = daemon.query("SELECT content_hash FROM images")[0]
    # The stale result (old bytes) was dropped; the row names the new bytes (the content
    # hash is SHA-256), and its thumbnails come whole from them.
    assert content_hash == new_hash
    thumbs = daemon.query("SELECT path FROM thumbnails")
    assert thumbs and all(content_hash in path for (path,) in thumbs)
    for (path,) in thumbs:
        with Image.open(path) as im:
            im.load()
    assert daemon.stop() == 0
