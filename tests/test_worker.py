"""The conversion worker as a real child process: its memory limit next to the prefetch window."""

from __future__ import annotations

import mmap
import multiprocessing
import os
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path

import pytest
from PIL import Image

from photoscand.children import Child
from photoscand.protocol import (
    ConversionFailed,
    ConversionJob,
    ConversionResult,
    Converted,
    SharedBytes,
    ThumbnailSettings,
    WorkerReady,
)
from photoscand.worker import conversion_main
from tests.conftest import CORPUS

SAMPLE = CORPUS / "cameras" / "Canon_40D.jpg"
LIMIT_MB = 64
WINDOW = 160 << 20  # larger than the worker's whole memory limit


class Window:
    """A memory file like the prefetcher's, holding photos at known offsets."""

    def __init__(self, size: int) -> None:
        self.fd = os.memfd_create("test-window", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"
        self.used = 0

    def put(self, data: bytes) -> SharedBytes:
        offset = self.used
        self.map[offset : offset + len(data)] = data
        self.used += len(data)
        return SharedBytes(self.path, offset, len(data), True)

    def close(self) -> None:
        self.map.close()
        os.close(self.fd)


@pytest.fixture
def worker(tmp_path: Path) -> Iterator[Connection]:
    """A worker limited to LIMIT_MB, started the way the supervisor starts it."""
    settings = ThumbnailSettings(
        sizes=(256,),
        format="jpeg",
        quality=80,
        out_dir=str(tmp_path / "thumbs"),
        max_pixels=400_000_000,
        memory_limit_mb=LIMIT_MB,
    )
    ctx = multiprocessing.get_context("forkserver")
    child = Child(ctx, conversion_main, (settings,), name="test-worker")
    assert child.conn.poll(60), "the worker did not start"
    assert isinstance(child.conn.recv(), WorkerReady)
    yield child.conn
    child.close(graceful=True)


def convert(conn: Connection, job: ConversionJob) -> ConversionResult:
    conn.send(job)
    assert conn.poll(120), "no answer from the worker"
    return conn.recv()


def test_a_prefetch_window_larger_than_the_memory_limit_leaves_the_decode_budget_whole(
    worker: Connection, tmp_path: Path
) -> None:
    window = Window(WINDOW)
    try:
        photo = window.put(SAMPLE.read_bytes())
        result = convert(worker, ConversionJob(1, b"/nonexistent", "jpeg", None, shared=photo))
        assert isinstance(result, Converted), result
        assert len(result.thumbnails) == 1

        # The limit still bounds decoding: 12,000 x 9,000 RGB pixels need ~400 MB.
        bomb = tmp_path / "bomb.png"
        Image.new("RGB", (12_000, 9_000), (40, 90, 160)).save(bomb, compress_level=1)
        photo = window.put(bomb.read_bytes())
        result = convert(worker, ConversionJob(2, b"/nonexistent", "png", None, shared=photo))
        assert isinstance(result, ConversionFailed), result
        assert result.reason == "too_large", result
    finally:
        window.close()
