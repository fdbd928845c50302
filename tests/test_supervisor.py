"""The supervisor's hard cases, with real worker processes in the real daemon: a worker
killed with SIGKILL, a job that hangs, a decompression bomb, a burst that must never run
more conversions than workers.count, and SIGTERM in the middle of a batch."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import threading
import zlib
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import (
    CORPUS,
    descendants,
    free_port,
    named_descendants,
    process_name,
    scrape,
    wait_for,
)
from tests.reliability import log_events

SAMPLES = sorted((CORPUS / "cameras").glob("*.jpg"))


def workers_of(daemon) -> list[int]:
    return named_descendants(daemon.proc.pid, "photoscand-work")


def stop_process(pid: int) -> None:
    os.kill(pid, signal.SIGSTOP)
    wait_for(lambda: _state(pid) in ("T", "t"), timeout=10, message=f"pid {pid} stopped")


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return ""


def converting(daemon) -> list[tuple]:
    return daemon.query("SELECT id, attempts FROM images WHERE status = 'converting'")


def distinct_jpegs(folder: Path, count: int, size: int = 96) -> list[Path]:
    """Small JPEGs with different content (so no two share thumbnails)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        image = Image.new("RGB", (size, size * 3 // 4), ((i * 7) % 256, (i * 13) % 256, i % 256))
        image.putpixel((i % size, 0), (255, 255, 255))
        path = folder / f"burst_{i:04d}.jpg"
        image.save(path, quality=90)
        paths.append(path)
    return paths


def test_a_killed_worker_costs_its_image_one_attempt_and_nothing_else(daemon_factory) -> None:
    daemon = daemon_factory({"workers": {"count": 2, "retry_backoff_seconds": 0.2}})
    daemon.start().wait_ready()
    first = wait_for(lambda: len(workers_of(daemon)) == 2 and workers_of(daemon))
    # Freeze both workers so the jobs they get stay in hand.
    for pid in first:
        stop_process(pid)
    for i, sample in enumerate(SAMPLES[:6]):
        shutil.copy(sample, daemon.photos / f"{i}.jpg")
    wait_for(lambda: len(converting(daemon)) == 2, message="two images in hand")
    victim, survivor = first
    os.kill(victim, signal.SIGKILL)
    # The victim's image is back to pending with one attempt; the other stays in hand.
    wait_for(lambda: daemon.query("SELECT count(*) FROM images WHERE attempts = 1")[0][0] == 1,
             message="one attempt counted")  # fmt: skip
    wait_for(lambda: len(workers_of(daemon)) == 2, message="a replacement worker")
    assert victim not in workers_of(daemon)
    os.kill(survivor, signal.SIGCONT)
    daemon.wait_settled(6)
    rows = daemon.query("SELECT status, attempts FROM images ORDER BY id")
    assert [r[0] for r in rows] == ["done"] * 6
    assert sorted(r[1] for r in rows) == [0, 0, 0, 0, 0, 1]
    assert "worker died" in daemon.log_text()
    assert daemon.stop() == 0


def test_a_hanging_job_is_killed_at_the_timeout_and_fails_after_max_attempts(
    daemon_factory,
) -> None:
    port = free_port()
    daemon = daemon_factory(
        # The back-off gives the freezer time to see the replacement worker idle.
        {"workers": {"count": 1, "timeout_seconds": 1.5, "max_attempts": 2,
                     "retry_backoff_seconds": 1.0},
         "metrics": {"listen": f"127.0.0.1:{port}"}}
    )  # fmt: skip
    daemon.start().wait_ready()

    # A worker that stops answering (SIGSTOP stands in for a decoder stuck in a loop).
    # Each worker is frozen once it is ready and idle (the metrics say so): frozen
    # before it said "ready", it would never be given the image.
    def freeze_workers() -> None:
        seen: set[int] = set()
        while not done.is_set():
            fresh = [pid for pid in workers_of(daemon) if pid not in seen]
            if fresh and scrape(port)["photoscand_workers_idle"] == 1:
                for pid in fresh:
                    seen.add(pid)
                    os.kill(pid, signal.SIGSTOP)
            done.wait(0.02)

    done = threading.Event()
    freezer = threading.Thread(target=freeze_workers, daemon=True)
    freezer.start()
    wait_for(lambda: len(named_descendants(daemon.proc.pid, "photoscand-work")) == 1
             and _state(workers_of(daemon)[0]) in ("T", "t"), message="worker frozen")  # fmt: skip
    try:
        shutil.copy(SAMPLES[0], daemon.photos / "hangs.jpg")
        row = daemon.wait_row(daemon.photos / "hangs.jpg", status="failed", timeout=30)
    finally:
        done.set()
        freezer.join()
    assert row[2].startswith("timeout:")
    assert daemon.query("SELECT attempts FROM images")[0][0] == 2
    # The daemon goes on: the next file is converted by a fresh worker.
    for pid in workers_of(daemon):
        os.kill(pid, signal.SIGCONT)
    shutil.copy(SAMPLES[1], daemon.photos / "after.jpg")
    daemon.wait_row(daemon.photos / "after.jpg", status="done")
    assert daemon.stop() == 0


def _png_bomb(path: Path, width: int, height: int) -> None:
    """A grey PNG of width x height that is a few hundred KB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x80" * width
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
                     + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))  # fmt: skip


def test_bombs_fail_one_image_and_the_memory_limit_holds(daemon_factory) -> None:
    daemon = daemon_factory(
        {"workers": {"count": 1, "max_pixels": 400_000_000, "memory_limit_mb": 128}}
    )
    # Declared far beyond max_pixels: refused before decoding.
    shutil.copy(CORPUS / "bad" / "derived_bomb_png_100000x100000.png", daemon.photos / "a.png")
    # Under max_pixels but needs ~300 MB decoded: the worker's memory limit stops it.
    _png_bomb(daemon.photos / "b.png", 20_000, 15_000)
    shutil.copy(SAMPLES[0], daemon.photos / "fine.jpg")
    daemon.start().wait_ready()
    daemon.wait_settled(3, timeout=120)
    rows = {Path(os.fsdecode(p)).name: r for p, r in daemon.rows().items()}
    assert rows["a.png"][1] == "failed" and rows["a.png"][2].startswith("too_large")
    assert rows["b.png"][1] == "failed" and rows["b.png"][2].startswith("too_large"), rows["b.png"]
    assert rows["fine.jpg"][1] == "done"
    assert daemon.stop() == 0


@pytest.mark.parametrize("backend", ["pillow", "magick"])
def test_a_burst_of_500_files_never_runs_more_than_two_conversions(
    daemon_factory, tmp_path: Path, backend: str
) -> None:
    daemon = daemon_factory({"workers": {"count": 2, "backend": backend}})
    daemon.start().wait_ready()
    staged = distinct_jpegs(tmp_path / "staging", 500)
    samples: list[int] = []
    crowd: list[list[tuple[int, str]]] = []
    stop = threading.Event()

    def count_conversions() -> None:
        while not stop.is_set():
            tree = [(p, process_name(p), parent_of(p)) for p in descendants(daemon.proc.pid)]
            names = dict((p, name) for p, name, _ in tree)
            # A worker's fork keeps the worker's name until it execs ImageMagick: only
            # processes whose parent is not a worker are workers.
            workers = [
                p
                for p, name, ppid in tree
                if name == "photoscand-work" and names.get(ppid) != "photoscand-work"
            ]
            tools = [p for p, name, _ in tree if name in ("convert", "magick")]
            samples.append(max(len(workers), len(tools)))
            if samples[-1] > 2:
                crowd.append(tree)
            stop.wait(0.01)

    counter = threading.Thread(target=count_conversions, daemon=True)
    counter.start()
    try:
        for path in staged:  # as fast as the filesystem allows
            os.rename(path, daemon.photos / path.name)
        daemon.wait_settled(500, timeout=240)
    finally:
        stop.set()
        counter.join()
    statuses = {r[1] for r in daemon.rows().values()}
    assert statuses == {"done"}
    assert len(samples) > 50
    assert max(samples) <= 2, f"more than 2 conversions at once: {crowd[:3]}"
    assert daemon.stop() == 0


def parent_of(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[1])
    except OSError:
        return 0


def test_sigterm_mid_batch_then_restart_converts_every_image_exactly_once(
    daemon_factory, tmp_path: Path
) -> None:
    daemon = daemon_factory({"workers": {"count": 2}})
    staged = distinct_jpegs(tmp_path / "staging", 120, size=640)
    for path in staged:
        os.rename(path, daemon.photos / path.name)
    daemon.start().wait_ready()
    wait_for(lambda: daemon.query("SELECT count(*) FROM images WHERE status = 'done'")[0][0] > 10,
             message="part of the batch converted")  # fmt: skip
    assert daemon.stop(signal.SIGTERM) == 0
    statuses = {r[0] for r in daemon.query("SELECT status FROM images")}
    assert "converting" not in statuses
    done_before = daemon.query("SELECT count(*) FROM images WHERE status = 'done'")[0][0]
    assert 0 < done_before < 120
    daemon.start().wait_ready()
    daemon.wait_settled(120)
    assert daemon.stop() == 0
    rows = daemon.query("SELECT status, attempts FROM images")
    assert len(rows) == 120 and all(r == ("done", 0) for r in rows)
    # Each image was converted once over both runs (the log has one line per conversion).
    converted = [e for e in log_events(daemon) if e.get("event") == "converted"]
    assert len(converted) == 120
