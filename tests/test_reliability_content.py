"""Hostile content through the real daemon: every file of the corpus's ``bad/``, every JPEG,
PNG, TIFF and HEIF of the corpus cut at a seeded length, and synthetic pixel and EXIF bombs
(huge entry counts, IFD cycles, a MakerNote claiming gigabytes). Each ends ``done`` or
``failed`` with a reason word, within the batch's deadline, while the memory of the daemon
and of every child stays bounded; the daemon then converts the next photo."""

from __future__ import annotations

import io
import os
import random
import shutil
import struct
import threading
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from photoscand.outcomes import REASONS
from tests.conftest import CORPUS, descendants, load_manifest, process_name
from tests.reliability import SMALL_PHOTO

SEED = 99
TRUNCATED_TYPES = ("JPEG", "PNG", "TIFF", "HEIF", "HEIC", "MPO")
MEMORY_LIMIT_MB = 384


def _plain_jpeg() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 140, 200)).save(out, "JPEG", quality=80)
    return out.getvalue()


def _ifd(
    entries: list[tuple[int, int, int, int]], next_ifd: int, count: int | None = None
) -> bytes:
    """A little-endian TIFF IFD; ``count`` may lie about the number of entries."""
    body = struct.pack("<H", len(entries) if count is None else count)
    for tag, kind, n, value in entries:
        body += struct.pack("<HHII", tag, kind, n, value)
    return body + struct.pack("<I", next_ifd)


def _with_exif(tiff: bytes) -> bytes:
    jpeg = _plain_jpeg()
    segment = b"Exif\x00\x00" + tiff
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(segment) + 2) + segment + jpeg[2:]


# width, height, 8 bits, no compression, grey, one strip at 200 of 100,000 rows and 16 bytes.
_TIFF_BOMB_TAGS = [
    (0x0100, 4, 1, 100_000), (0x0101, 4, 1, 100_000), (0x0102, 3, 1, 8), (0x0103, 3, 1, 1),
    (0x0106, 3, 1, 1), (0x0111, 4, 1, 200), (0x0115, 3, 1, 1), (0x0116, 4, 1, 100_000),
    (0x0117, 4, 1, 16),
]  # fmt: skip


def exif_bombs() -> dict[str, bytes]:
    header = b"II*\x00" + struct.pack("<I", 8)
    return {
        # IFD0 claims 65,535 entries and holds two.
        "exif_huge_count.jpg": _with_exif(
            header + _ifd([(0x010F, 2, 4, 0x41414141), (0x0110, 2, 4, 0x42424242)], 0, 0xFFFF)
        ),
        # IFD0's Exif pointer and its next-IFD offset both point back at IFD0.
        "exif_ifd_cycle.jpg": _with_exif(header + _ifd([(0x8769, 4, 1, 8)], 8)),
        # A MakerNote that claims two gigabytes (exifread issue #182).
        "exif_makernote_2gb.jpg": _with_exif(
            header
            + _ifd([(0x8769, 4, 1, 26)], 0)
            + _ifd([(0x927C, 7, 0x7FFFFFF0, 44)], 0)
            + b"Nikon\x00\x02\x10\x00\x00"
        ),
        # A hundred ASCII tags of 256 MB each.
        "exif_many_large_tags.jpg": _with_exif(
            header + _ifd([(0x9000 + i, 2, 0x10000000, 8) for i in range(100)], 0)
        ),
        # A TIFF of 100,000 x 100,000 pixels in a few bytes.
        "tiff_pixel_bomb.tif": header + _ifd(_TIFF_BOMB_TAGS, 0) + b"\0" * 100,
    }


def truncated_copies(folder: Path, rng: random.Random, cuts_per_file: int) -> dict[Path, Path]:
    """Copies of corpus photos cut at seeded lengths: copy -> original."""
    made = {}
    for row in load_manifest():
        if row["category"] == "bad" or row["FileType"] not in TRUNCATED_TYPES:
            continue
        data = (CORPUS / row["path"]).read_bytes()
        if len(data) < 8:
            continue
        stem = row["path"].replace("/", "_")
        for _ in range(cuts_per_file):
            cut = rng.randrange(1, len(data))
            path = folder / f"cut{cut}_{stem}"
            path.write_bytes(data[:cut])
            made[path] = CORPUS / row["path"]
    return made


class MemoryWatch(threading.Thread):
    """Peak resident memory of the daemon and of each of its children, by process name."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peaks: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            for pid in [self.pid, *descendants(self.pid)]:
                name = "daemon" if pid == self.pid else process_name(pid)
                rss = _rss_kb(pid)
                if rss:
                    self.peaks[name] = max(self.peaks.get(name, 0), rss)
            self.stop.wait(0.05)


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_hostile_batch(daemon_factory, tmp_path: Path, cuts_per_file: int) -> dict:
    daemon = daemon_factory(
        {
            "workers": {"count": 2, "timeout_seconds": 20, "max_attempts": 1,
                        "memory_limit_mb": MEMORY_LIMIT_MB},
            "watch": {"metadata_timeout_seconds": 5},
        }
    )  # fmt: skip
    bad = daemon.photos / "bad"
    shutil.copytree(CORPUS / "bad", bad)
    bombs = daemon.photos / "bombs"
    bombs.mkdir()
    for name, data in exif_bombs().items():
        (bombs / name).write_bytes(data)
    (daemon.photos / "cut").mkdir()
    cut = truncated_copies(daemon.photos / "cut", random.Random(SEED), cuts_per_file)
    daemon.start()
    watch = MemoryWatch(daemon.proc.pid)
    watch.start()
    try:
        daemon.wait_ready(timeout=120)
        expected = len(os.listdir(bad)) + len(os.listdir(bombs)) + len(cut)
        # Every file has a photo extension, so every file gets a row.
        daemon.wait_settled(expected, timeout=600)
        shutil.copy(SMALL_PHOTO, daemon.photos / "after.jpg")
        daemon.wait_row(daemon.photos / "after.jpg", status="done", timeout=60)
    finally:
        watch.stop.set()
        watch.join()
    rows = daemon.query("SELECT path, status, error FROM images")
    grey = grey_halves(daemon, cut)
    assert daemon.stop() == 0
    outcomes = {}
    for path, status, error in rows:
        assert status in ("done", "failed"), (bytes(path), status, error)
        if status == "failed":
            reason = error.split(":", 1)[0]
            assert reason in REASONS, (bytes(path), error)
            outcomes[reason] = outcomes.get(reason, 0) + 1
        else:
            outcomes["done"] = outcomes.get("done", 0) + 1
    by_name = {os.path.basename(bytes(p)).decode(errors="replace"): (s, e) for p, s, e in rows}
    for name in exif_bombs():
        assert name in by_name, f"no row for {name}"
    assert by_name["tiff_pixel_bomb.tif"][1].startswith("too_large"), by_name["tiff_pixel_bomb.tif"]
    # Memory: the daemon stays small, no child outgrows its limit by more than its code.
    assert watch.peaks["daemon"] < 400 * 1024, watch.peaks
    children = {n: kb for n, kb in watch.peaks.items() if n != "daemon"}
    assert max(children.values()) < (MEMORY_LIMIT_MB + 256) * 1024, watch.peaks
    # A cut file may only be done when its picture is the whole picture (the cut fell in
    # trailing metadata, or after the first frame of an MPO): no grey halves.
    assert not grey, grey
    return {"rows": len(rows), "truncated": len(cut), "outcomes": outcomes, "peaks": watch.peaks}


def grey_halves(daemon, cut: dict[Path, Path]) -> list[str]:
    """Cut copies that ended done with a picture that differs from the whole file's."""
    from photoscand import converters

    wrong = []
    for path, original in cut.items():
        rows = daemon.query(
            "SELECT t.path FROM thumbnails t JOIN images i ON i.id = t.image_id"
            " WHERE i.path = ? AND i.status = 'done' AND t.size = 64",
            (os.fsencode(path),),
        )
        if not rows:
            continue
        # The daemon's own sizes: the 64 px thumbnail is derived from the 256 px one, and
        # its rounding must match.
        spec = converters.ThumbnailSettings(sizes=tuple(daemon.config["thumbnails"]["sizes"]),
                                        format="jpeg", quality=80,
                                        out_dir=str(daemon.root / "reference"),
                                        max_pixels=100_000_000)  # fmt: skip
        whole = converters.convert(original.read_bytes(), spec, reuse_existing=False)
        reference = next(t.path for t in whole.thumbnails if t.size == 64)
        with Image.open(rows[0][0]) as got, Image.open(reference) as want:
            if got.size != want.size:
                wrong.append(f"{path.name}: {got.size} instead of {want.size}")
                continue
            diff = ImageChops.difference(got.convert("RGB"), want.convert("RGB")).convert("L")
            off = sum(diff.histogram()[48:]) / (got.size[0] * got.size[1])
            if off > 0.02:
                wrong.append(f"{path.name}: {off:.0%} of the pixels differ from the whole file's")
    return wrong


def test_bad_files_truncations_and_bombs_end_with_a_reason_in_bounded_memory(
    daemon_factory, tmp_path: Path
) -> None:
    figures = run_hostile_batch(daemon_factory, tmp_path, cuts_per_file=1)
    print(f"\nhostile content: {figures}")


@pytest.mark.slow
def test_every_corpus_photo_cut_at_six_lengths(daemon_factory, tmp_path: Path) -> None:
    figures = run_hostile_batch(daemon_factory, tmp_path, cuts_per_file=6)
    print(f"\nhostile content (6 cuts per file): {figures}")
