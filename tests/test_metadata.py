"""Tests for photoscand.metadata against the corpus (exiftool's MANIFEST.csv as ground truth),
hostile files run in child processes with a timeout, and the guards on synthetic EXIF."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import re
import shutil
import struct
import subprocess
import sys
import time
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest

from photoscand.metadata import physical_offset, read_metadata
from photoscand.outcomes import REASONS, split_error
from photoscand.protocol import PhotoMetadata

REPO = Path(__file__).resolve().parents[1]
PER_FILE_TIMEOUT = 10.0  # seconds; the daemon's metadata_timeout_seconds default

# -- running the parser in a child process -----------------------------------------------
#
# A hostile file may make a parser loop; the test must report it, not hang with it. The child
# parses one job at a time; a job that outlives the timeout gets its child killed and reported.


def _child(conn: Connection) -> None:
    from photoscand.metadata import read_metadata

    while True:
        job = conn.recv()
        if job is None:
            return
        path, in_memory = job
        start = time.monotonic()
        try:
            if in_memory:
                with open(path, "rb") as fh:
                    data = fh.read()
                result: tuple[str, Any] = ("ok", read_metadata(path, data))
            else:
                result = ("ok", read_metadata(path))
        except OSError as exc:
            result = ("oserror", exc)
        except BaseException as exc:
            result = ("exception", f"{type(exc).__name__}: {exc}")
        conn.send((*result, time.monotonic() - start))


def run_isolated(
    jobs: list[tuple[bytes, bool]], timeout: float = PER_FILE_TIMEOUT
) -> dict[tuple[bytes, bool], tuple[str, Any, float]]:
    """(kind, value, seconds) per (path, in_memory) job; kind is ok, oserror, exception,
    timeout or crashed."""
    ctx = multiprocessing.get_context("spawn")  # the test process has threads: no fork
    results: dict[tuple[bytes, bool], tuple[str, Any, float]] = {}
    pending = list(jobs)
    while pending:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_child, args=(child,), daemon=True)
        proc.start()
        child.close()
        try:
            while pending:
                job = pending.pop(0)
                parent.send(job)
                if not parent.poll(timeout):
                    results[job] = ("timeout", None, timeout)
                    break
                try:
                    results[job] = parent.recv()
                except EOFError:
                    proc.join(5)
                    results[job] = ("crashed", proc.exitcode, 0.0)
                    break
            else:
                parent.send(None)
        finally:
            proc.join(2)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            parent.close()
    return results


@pytest.fixture(scope="session")
def readings(corpus_dir: Path, manifest: list[dict[str, str]]) -> dict[str, tuple[str, Any, float]]:
    """read_metadata's outcome for every corpus file, from the file, in a child process."""
    jobs = [(bytes(corpus_dir / row["path"]), False) for row in manifest]
    results = run_isolated(jobs)
    return {row["path"]: results[job] for row, job in zip(manifest, jobs, strict=True)}


def reading(readings: dict[str, tuple[str, Any, float]], path: str) -> PhotoMetadata:
    kind, value, _ = readings[path]
    assert kind == "ok" and isinstance(value, PhotoMetadata), (path, kind, value)
    return value


# -- agreement with exiftool -------------------------------------------------------------

# Where we differ from exiftool on purpose, file by file, and why. Any other difference fails,
# and so does an entry here that has started to agree (so that the list stays true).
EXPECTED_DISAGREEMENTS: dict[str, dict[str, str]] = {
    "size": {
        "heic/iphone_13_pro_max.HEIC": "irot 270 applied: the decoder delivers 3024x4032; "
        "exiftool reports the ispe before rotation",
        "heic/rainbow-451x461.heic": "clap crop applied: the decoder delivers 451x461",
        "bad/libheif_clusterfuzz-testcase-minimized-file-fuzzer-5752063708495872.heic": "irot "
        "applied: pillow-heif delivers 240x320",
        "bad/libheif_github_50.heic": "irot applied to a fuzzed ispe (15273920x3024)",
        "bad/pillow_zero_width.gif": "a zero width is no size: null, with a metadata error",
        "bad/exiv2_issue_1833_poc.jpg": "fuzzed JPEG: after the stray bytes we resynchronise "
        "on an earlier SOF-like marker than exiftool",
    },
    "orientation": {
        "heic/iphone_13_pro_max.HEIC": "HEIF: irot is authoritative and already applied by the "
        "decoder, so the orientation to apply is 1 (EXIF says 6)",
        "bad/libheif_clusterfuzz-testcase-minimized-file-fuzzer-5752063708495872.heic": "HEIF: "
        "as above",
        "bad/exiv2_issue_1881_coverage.jpg": "EXIF Orientation 36865 is not 1..8",
        "bad/exiv2_crash-23eba73bb01cb01caa96a389eb12955c34b98a37.jpg": "an Exiv2 .exv metadata "
        "file named .jpg: not a JPEG, not parsed",
    },
    "taken_at": {
        "cameras/Reconyx_HC500_Hyperfire.jpg": "the date is only in Reconyx's maker data",
        "cameras/exif-org_olympus-d320l.jpg": "the date is only in Olympus's APP12 PictureInfo",
        "bad/exiv2_crash-23eba73bb01cb01caa96a389eb12955c34b98a37.jpg": "an .exv file, see above",
    },
    "make": {
        "bad/exiv2_crash-23eba73bb01cb01caa96a389eb12955c34b98a37.jpg": "an .exv file, see above",
        "bad/exiv2_issue_1881_coverage.jpg": "non-ASCII byte in Make: exiftool prints '?', we "
        "keep the character",
        "bad/exiv2_issue_839_poc.rw2": "fuzzed RW2: exiftool reads a Make from a broken IFD "
        "that we reject",
    },
    "model": {
        "bad/exiv2_crash-23eba73bb01cb01caa96a389eb12955c34b98a37.jpg": "an .exv file, see above",
    },
    "gps": {
        "gps/exif_gps.jpg": "GPSLatitude 4294967295 degrees is no latitude, and there is no "
        "longitude: both null",
    },
}

_FIELDS = ("size", "orientation", "taken_at", "make", "model", "gps")


def _exiftool_value(row: dict[str, str], field: str) -> Any:
    if field == "size":
        return (row["ImageWidth"], row["ImageHeight"]) if row["ImageWidth"] else None
    if field == "gps":
        return (row["GPSLatitude"], row["GPSLongitude"]) if row["GPSLatitude"] else None
    column = {
        "orientation": "Orientation",
        "taken_at": "DateTimeOriginal",
        "make": "Make",
        "model": "Model",
    }[field]
    return row[column] or None


def _agrees(md: PhotoMetadata, field: str, expected: Any) -> bool:
    if field == "size":
        return (str(md.width), str(md.height)) == expected
    if field == "orientation":
        return str(md.orientation) == expected
    if field in ("make", "model"):
        # exiftool trims trailing spaces; we trim both ends.
        return (getattr(md, field) or "").strip() == expected.strip()
    if field == "taken_at":
        if md.taken_at is None:
            return False
        date, time_, zone = expected[:10], expected[11:19], expected[19:]
        if md.taken_at[:19] != f"{date.replace(':', '-')}T{time_}":
            return False
        return not zone or md.taken_at[19:] == zone  # the offset, when exiftool has one
    if field == "gps":
        lat, lon = expected
        if md.gps_lat is None or md.gps_lon is None:
            return False
        if not lon:
            return False
        return abs(md.gps_lat - float(lat)) <= 1e-5 and abs(md.gps_lon - float(lon)) <= 1e-5
    raise AssertionError(field)


def agreement(
    readings: dict[str, tuple[str, Any, float]], manifest: list[dict[str, str]], field: str
) -> tuple[Counter[str], Counter[str], dict[str, str]]:
    """Per category: rows where exiftool has a value, rows where we agree; and the others."""
    having: Counter[str] = Counter()
    agreeing: Counter[str] = Counter()
    others: dict[str, str] = {}
    for row in manifest:
        expected = _exiftool_value(row, field)
        if expected is None:
            continue
        having[row["category"]] += 1
        md = reading(readings, row["path"])
        if _agrees(md, field, expected):
            agreeing[row["category"]] += 1
        else:
            mine = {
                "size": (md.width, md.height),
                "gps": (md.gps_lat, md.gps_lon),
            }.get(field, getattr(md, field, None))
            others[row["path"]] = f"exiftool {expected!r}, we {mine!r}"
    return having, agreeing, others


@pytest.mark.parametrize("field", _FIELDS)
def test_agrees_with_exiftool(
    readings: dict[str, tuple[str, Any, float]], manifest: list[dict[str, str]], field: str
) -> None:
    having, agreeing, others = agreement(readings, manifest, field)
    print(f"\n{field}: " + ", ".join(f"{c} {agreeing[c]}/{n}" for c, n in sorted(having.items())))
    expected = EXPECTED_DISAGREEMENTS[field]
    unexplained = {path: why for path, why in others.items() if path not in expected}
    assert not unexplained, f"{field} differs from exiftool: {unexplained}"
    agreeing_now = [path for path in expected if path not in others]
    assert not agreeing_now, f"{field}: these now agree, drop them from the list: {agreeing_now}"
    assert sum(having.values()) > 10


def test_every_photo_category_is_covered(
    readings: dict[str, tuple[str, Any, float]], manifest: list[dict[str, str]]
) -> None:
    # Sizes of all the containers the brief names are compared, not only JPEG.
    _, agreeing, _ = agreement(readings, manifest, "size")
    for category in ("cameras", "png", "tiff", "webp", "gif", "heic", "raw", "orientation"):
        assert agreeing[category] > 0, category
    assert agreeing["raw"] >= 8  # every raw/ file whose size exiftool knows


def test_heif_sizes_are_what_pillow_heif_delivers(
    corpus_dir: Path, readings: dict[str, tuple[str, Any, float]]
) -> None:
    pillow_heif = pytest.importorskip("pillow_heif")
    from PIL import Image

    pillow_heif.register_heif_opener()
    compared = 0
    for path in sorted(corpus_dir.glob("**/*")):
        if path.suffix.lower() not in (".heic", ".heif", ".hif", ".avif") or not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                size = im.size
        except Exception:
            continue  # pillow-heif cannot open it either
        md = reading(readings, str(path.relative_to(corpus_dir)))
        assert (md.width, md.height) == size, path
        compared += 1
    assert compared >= 15


# -- outcomes for every file -------------------------------------------------------------


def test_every_corpus_file_parses_without_error_or_hang(
    readings: dict[str, tuple[str, Any, float]],
) -> None:
    kinds = Counter(kind for kind, _, _ in readings.values())
    trouble = {p: r[:2] for p, r in readings.items() if r[0] not in ("ok", "oserror")}
    assert not trouble, f"exceptions, timeouts or crashes: {trouble}"
    assert kinds["ok"] == len(readings)  # the corpus is readable: no OSError either
    slow = {p: round(s, 2) for p, (_, _, s) in readings.items() if s > 1.0}
    assert not slow, f"parsing took over a second: {slow}"


@pytest.mark.parametrize("folder", ["bad", "unicode"])
def test_hostile_files_from_memory_end_in_metadata(
    corpus_dir: Path, manifest: list[dict[str, str]], folder: str
) -> None:
    # The prefetch path: the same hostile bytes, handed over in memory.
    jobs = [(bytes(corpus_dir / r["path"]), True) for r in manifest if r["category"] == folder]
    results = run_isolated(jobs)
    trouble = {job[0]: result[:2] for job, result in results.items() if result[0] != "ok"}
    assert not trouble, trouble
    for (path, _), (_, md, _) in results.items():
        assert isinstance(md, PhotoMetadata), path
        assert md.disk_offset is None


def test_memory_and_file_give_the_same_metadata(
    corpus_dir: Path, manifest: list[dict[str, str]], readings: dict[str, tuple[str, Any, float]]
) -> None:
    jobs = [(bytes(corpus_dir / r["path"]), True) for r in manifest]
    results = run_isolated(jobs)
    for row, job in zip(manifest, jobs, strict=True):
        from_file = reading(readings, row["path"])
        kind, from_memory, _ = results[job]
        assert kind == "ok", (row["path"], from_memory)
        from_file_fields = {**_as_dict(from_file), "disk_offset": None}
        assert _as_dict(from_memory) == from_file_fields, row["path"]


def _as_dict(md: PhotoMetadata) -> dict[str, Any]:
    return {name: getattr(md, name) for name in PhotoMetadata.__slots__}


def test_errors_are_reason_colon_message(readings: dict[str, tuple[str, Any, float]]) -> None:
    with_error = 0
    for path, (_, md, _) in readings.items():
        if md.metadata_error is None:
            continue
        with_error += 1
        reason, message = split_error(md.metadata_error)
        assert reason in REASONS, (path, md.metadata_error)
        assert message, path
        problem = md.metadata_error
        assert "\n" not in problem and problem.isascii(), (path, problem)
        assert len(md.metadata_error) < 500
    assert with_error >= 30  # the bad/ folder is not silently accepted
    # A clean camera JPEG has no metadata error.
    assert readings["cameras/Canon_40D.jpg"][1].metadata_error is None


def test_columns_have_their_types_and_ranges(readings: dict[str, tuple[str, Any, float]]) -> None:
    iso_8601 = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d)?$")
    for path, (_, md, _) in readings.items():
        assert md.format is not None and md.format == md.format.lower(), path
        assert md.orientation is None or 1 <= md.orientation <= 8, path
        assert md.taken_at is None or iso_8601.match(md.taken_at), (path, md.taken_at)
        assert (md.gps_lat is None) == (md.gps_lon is None), path
        if md.gps_lat is not None:
            assert -90 <= md.gps_lat <= 90 and -180 <= md.gps_lon <= 180, path
        for name in ("exposure_time", "f_number", "focal_length", "gps_alt"):
            value = getattr(md, name)
            assert value is None or (isinstance(value, float) and math.isfinite(value)), path
        assert md.width is None or (isinstance(md.width, int) and md.width > 0), path
        exif = json.loads(md.exif)
        assert isinstance(exif, dict) and all(isinstance(v, str) for v in exif.values()), path
        assert md.exif.isascii() and len(md.exif) < 70_000, path
        assert all(len(v) <= 301 for v in exif.values()), path
        # Binary blobs are not text: no thumbnails or MakerNotes.
        assert not {"JPEGThumbnail", "TIFFThumbnail", "EXIF MakerNote"} & exif.keys(), path
    # ICC profiles and PrintIM blocks are dropped too.
    assert "Image InterColorProfile" not in reading(readings, "tiff/hopper.iccprofile.tif").exif
    assert "Image PrintIM" not in reading(readings, "cameras/Panasonic_DMC-FZ30.jpg").exif


def test_capture_fields_of_a_phone_photo(readings: dict[str, tuple[str, Any, float]]) -> None:
    md = reading(readings, "heic/IMG_5195.HEIC")
    assert md.format == "heif"
    assert (md.width, md.height) == (2566, 3313)
    assert md.taken_at == "2021-04-11T15:47:53-05:00"  # OffsetTimeOriginal appended
    assert (md.make, md.model) == ("Apple", "iPhone 11 Pro Max")
    assert md.lens == "iPhone 11 Pro Max back triple camera 4.25mm f/1.8"
    assert md.iso == 32
    assert md.f_number == pytest.approx(1.8)
    assert md.exposure_time == pytest.approx(1 / 391, rel=1e-3)
    assert md.focal_length == pytest.approx(4.25)
    assert md.gps_alt == pytest.approx(260.56, abs=0.01)
    exif = json.loads(md.exif)
    assert exif["EXIF DateTimeOriginal"] == "2021:04:11 15:47:53"


def test_gps_south_and_west_are_negative(readings: dict[str, tuple[str, Any, float]]) -> None:
    kodak = reading(readings, "gps/Kodak_CX7530.jpg")
    assert kodak.gps_lat is not None and kodak.gps_lat < 0
    furnace = reading(readings, "gps/FurnaceCreekInn.jpg")
    assert furnace.gps_lon is not None and furnace.gps_lon < 0


def test_xmp_stands_in_for_missing_exif(readings: dict[str, tuple[str, Any, float]]) -> None:
    md = reading(readings, "gps/exiv2-bug540.jpg")  # XMP only: Lightroom-style export
    assert (md.make, md.model) == ("FUJIFILM", "FinePixS1Pro")
    assert md.taken_at == "2002-07-13T15:58:28Z"
    assert md.gps_lat == pytest.approx(54.98966667, abs=1e-5)
    assert reading(readings, "orientation/xmp_tags_orientation.png").orientation == 3


def test_png_exif_in_chunk_and_in_imagemagick_text_profile(
    readings: dict[str, tuple[str, Any, float]],
) -> None:
    assert reading(readings, "orientation/exif_imagemagick_orientation.png").orientation == 3
    reagan = reading(readings, "png/ReaganSmallPng.png")  # zTXt, zlib-compressed hex
    assert reagan.make == "NIKON CORPORATION"
    assert reagan.taken_at == "2004-06-21T23:37:53"
    assert reading(readings, "png/1343_exif.png").exif != "{}"


def test_raw_sizes(readings: dict[str, tuple[str, Any, float]]) -> None:
    sizes = {
        "raw/Nikon.nef": (3040, 2014),  # the full-size SubIFD, not IFD0's preview
        "raw/IMG_1361.dng": (4032, 3024),
        "raw/CanonRaw.cr2": (3456, 2304),
        "raw/Canon-R6-pruned.CR3": (3408, 2272),
        "raw/Panasonic.rw2": (3648, 2736),  # sensor borders
        "raw/FujiFilm.raf": (4256, 1424),  # stored height first
        "raw/exiv2-canon-powershot-s40.crw": (2272, 1704),
    }
    for path, size in sizes.items():
        md = reading(readings, path)
        assert (md.width, md.height) == size, path
    crw = reading(readings, "raw/exiv2-canon-powershot-s40.crw")
    assert crw.taken_at == "2005-04-23T17:54:36" and crw.make == "Canon"


# -- which files are photos --------------------------------------------------------------


def test_non_photos_are_none(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("just text\n")
    (tmp_path / "noise.bin").write_bytes(os.urandom(4096))
    (tmp_path / "empty").write_bytes(b"")
    for name in ("notes.txt", "noise.bin", "empty"):
        assert read_metadata(bytes(tmp_path / name)) is None
        assert read_metadata(bytes(tmp_path / name), (tmp_path / name).read_bytes()) is None


def test_a_jpeg_named_png_is_a_jpeg(corpus_dir: Path, tmp_path: Path) -> None:
    target = tmp_path / "holiday.png"
    shutil.copyfile(corpus_dir / "cameras/Canon_40D.jpg", target)
    md = read_metadata(bytes(target))
    assert md is not None
    assert md.format == "jpeg" and (md.width, md.height) == (100, 68)
    assert md.make == "Canon" and md.metadata_error is None


def test_garbage_with_a_photo_extension_is_a_row_with_an_error(tmp_path: Path) -> None:
    for name, fmt in (("a.jpg", "jpeg"), ("b.NEF", "nef"), ("c.heic", "heif"), ("d.png", "png")):
        path = tmp_path / name
        path.write_bytes(b"this is not an image " * 20)
        md = read_metadata(bytes(path))
        assert md is not None and md.format == fmt, name
        problem = md.metadata_error
        assert problem is not None and problem.startswith("corrupt:"), problem
        assert md.width is None and md.exif == "{}"
    empty = tmp_path / "e.jpg"
    empty.write_bytes(b"")
    md = read_metadata(bytes(empty))
    assert md is not None and (md.metadata_error or "").startswith("truncated:")


def test_hostile_names(corpus_dir: Path, tmp_path: Path) -> None:
    source = corpus_dir / "cameras/Canon_40D.jpg"
    expected = read_metadata(bytes(source))
    assert expected is not None
    for name in (
        b"bad\xffname.jpg",
        b"line\nbreak.jpg",
        b"-leading dash.jpg",
        b"x" * 251 + b".jpg",
    ):
        path = os.path.join(bytes(tmp_path), name)
        shutil.copyfile(bytes(source), path)
        md = read_metadata(path)
        assert md is not None
        assert {**_as_dict(md), "disk_offset": None} == {**_as_dict(expected), "disk_offset": None}


# -- what raises -------------------------------------------------------------------------


def test_cannot_open_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_metadata(bytes(tmp_path / "gone.jpg"))
    (tmp_path / "folder.jpg").mkdir()
    with pytest.raises(IsADirectoryError):
        read_metadata(bytes(tmp_path / "folder.jpg"))
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(OSError):  # not a regular file, and the open must not block
        read_metadata(bytes(fifo))


def test_unreadable_file_raises_permission_error(corpus_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "secret.jpg"
    shutil.copyfile(corpus_dir / "cameras/Canon_40D.jpg", path)
    path.chmod(0)
    code = (
        "import sys\n"
        "from photoscand.metadata import read_metadata\n"
        "try:\n"
        "    read_metadata(sys.argv[1].encode())\n"
        "except PermissionError:\n"
        "    sys.exit(0)\n"
        "sys.exit(1)\n"
    )
    command = [sys.executable, "-c", code, str(path)]
    if os.geteuid() == 0:
        # Root reads anything: drop the capabilities that bypass file permissions.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root without setpriv")
        command = [setpriv, "--bounding-set", "-dac_override,-dac_read_search", *command]
    done = subprocess.run(command, cwd=REPO, timeout=60, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()


# -- guards on synthetic EXIF ------------------------------------------------------------


def ifd(entries: list[tuple[int, int, int, bytes]], next_ifd: int = 0) -> bytes:
    """A little-endian IFD: (tag, type, count, 4-byte value field) entries."""
    out = struct.pack("<H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack("<HHI", tag, kind, count) + value.ljust(4, b"\x00")
    return out + struct.pack("<I", next_ifd)


def u32(value: int) -> bytes:
    return struct.pack("<I", value)


def jpeg_with_exif(tiff: bytes, width: int = 64, height: int = 48) -> bytes:
    app1 = b"Exif\x00\x00" + tiff
    sof = b"\x08" + struct.pack(">HH", height, width) + b"\x01\x01\x11\x00"
    return (
        b"\xff\xd8"
        + b"\xff\xe1"
        + struct.pack(">H", len(app1) + 2)
        + app1
        + b"\xff\xc0"
        + struct.pack(">H", len(sof) + 2)
        + sof
        + b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"
        + b"\x00" * 16
        + b"\xff\xd9"
    )


ASCII, SHORT, LONG, RATIONAL, UNDEFINED = 2, 3, 4, 5, 7
MAKE = (0x010F, ASCII, 4, b"Ace\x00")

HOSTILE_EXIF = {
    # IFD0's next-IFD pointer names IFD0 again (exifread issue #161's shape).
    "ifd_chain_loop": b"II*\x00" + u32(8) + ifd([MAKE], next_ifd=8),
    # IFD0 -> IFD1 -> IFD0.
    "ifd_chain_cycle": b"II*\x00" + u32(8) + ifd([MAKE], next_ifd=26) + ifd([MAKE], next_ifd=8),
    # The Exif IFD pointer points back at IFD0, whose pointer points at it again.
    "subifd_self": b"II*\x00" + u32(8) + ifd([MAKE, (0x8769, LONG, 1, u32(8))]),
    # The Exif and GPS pointers name the same IFD, whose Interoperability pointer is IFD0.
    "subifd_cross": b"II*\x00"
    + u32(8)
    + ifd([MAKE, (0x8769, LONG, 1, u32(50)), (0x8825, LONG, 1, u32(50))])
    + ifd([(0xA005, LONG, 1, u32(8))]),
    # 65535 entries claimed in a few bytes.
    "huge_entry_count": b"II*\x00" + u32(8) + b"\xff\xff" + ifd([MAKE])[2:],
    # A MakerNote claiming 4 billion bytes (exifread issue #182's shape).
    "huge_makernote": b"II*\x00"
    + u32(8)
    + ifd([MAKE, (0x8769, LONG, 1, u32(38))])
    + ifd([(0x927C, UNDEFINED, 0xFFFFFFF0, u32(0))]),
    # An ASCII tag claiming 4 GiB and a SHORT array with a huge count.
    "huge_counts": b"II*\x00"
    + u32(8)
    + ifd([(0x010F, ASCII, 0xFFFFFFFF, u32(8)), (0x0102, SHORT, 0xFFFFFFFF, u32(8))]),
    # Offsets far past the data, and negative-looking ones.
    "wild_offsets": b"II*\x00"
    + u32(8)
    + ifd([(0x0110, ASCII, 40, u32(0xFFFFFF00)), (0x8825, LONG, 1, u32(0xFFFFFFF0))]),
    # GPS rationals with zero denominators.
    "gps_zero_denominators": b"II*\x00"
    + u32(8)
    + ifd([(0x8825, LONG, 1, u32(26))])
    + ifd(
        [
            (0x0001, ASCII, 2, b"N\x00"),
            (0x0002, RATIONAL, 3, u32(80)),
            (0x0003, ASCII, 2, b"E\x00"),
            (0x0004, RATIONAL, 3, u32(80)),
        ]
    )
    + bytes(24),
    # No TIFF header at all.
    "no_tiff_header": b"garbage garbage garbage",
}


@pytest.fixture(scope="module")
def hostile_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, Any, float]]:
    folder = tmp_path_factory.mktemp("hostile")
    jobs = {}
    for name, tiff in HOSTILE_EXIF.items():
        (folder / f"{name}.jpg").write_bytes(jpeg_with_exif(tiff))
        jobs[name] = (bytes(folder / f"{name}.jpg"), False)
        (folder / f"{name}.tif").write_bytes(tiff + bytes(64))
        jobs[name + ".tif"] = (bytes(folder / f"{name}.tif"), False)
    results = run_isolated(list(jobs.values()))
    return {name: results[job] for name, job in jobs.items()}


@pytest.mark.parametrize("name", sorted(HOSTILE_EXIF))
def test_hostile_exif_is_bounded(hostile_results: dict[str, Any], name: str) -> None:
    for key in (name, name + ".tif"):
        kind, md, seconds = hostile_results[key]
        assert kind == "ok", (key, md)
        assert seconds < 1.0, (key, seconds)
        assert isinstance(md, PhotoMetadata)
    md = hostile_results[name][1]
    assert (md.width, md.height) == (64, 48)  # the header's size survives broken EXIF
    assert md.gps_lat is None and md.gps_lon is None


def test_hostile_exif_is_reported(hostile_results: dict[str, Any]) -> None:
    # (An IFD whose next pointer names itself is exifread's end of chain: no problem.)
    for name in ("ifd_chain_cycle", "subifd_self", "subifd_cross", "huge_entry_count"):
        md = hostile_results[name][1]
        problem = md.metadata_error
        assert problem is not None and problem.startswith("corrupt:"), (name, problem)
        assert md.make == "Ace", name  # what was read before the problem is kept
    assert "TIFF header" in hostile_results["no_tiff_header"][1].metadata_error


def test_pointer_with_a_wrong_type_is_still_followed(tmp_path: Path) -> None:
    # GPSInfo written as ASCII: exiftool follows it anyway, and so do we.
    tiff = (
        b"II*\x00"
        + u32(8)
        + ifd([(0x8825, ASCII, 4, u32(26))])
        + ifd(
            [
                (0x0001, ASCII, 2, b"S\x00"),
                (0x0002, RATIONAL, 3, u32(80)),
                (0x0003, ASCII, 2, b"W\x00"),
                (0x0004, RATIONAL, 3, u32(104)),
            ]
        )
    )
    tiff = tiff.ljust(80, b"\x00")
    tiff += struct.pack("<6I", 33, 1, 52, 1, 3000, 100)  # 33 deg 52' 30"
    tiff += struct.pack("<6I", 151, 1, 12, 1, 0, 1)  # 151 deg 12'
    path = tmp_path / "sydney.jpg"
    path.write_bytes(jpeg_with_exif(tiff))
    md = read_metadata(bytes(path))
    assert md is not None
    assert md.gps_lat == pytest.approx(-(33 + 52 / 60 + 30 / 3600))
    assert md.gps_lon == pytest.approx(-(151 + 12 / 60))


def test_truncated_at_every_length_stays_data(corpus_dir: Path, tmp_path: Path) -> None:
    # exif-py PR #261's test: a valid file cut at every length. Run in a child so that a
    # loop would be reported as a timeout, not hang the suite.
    jobs = []
    for name in (
        "cameras/Canon_40D.jpg",
        "png/1343_exif.png",
        "webp/flower.webp",
        "tiff/exiv2_Reagan.tiff",
        "heic/Stonehenge.heic",
        "raw/CanonRaw.cr2",
        "raw/exiv2-canon-powershot-s40.crw",
    ):
        data = (corpus_dir / name).read_bytes()
        lengths = sorted(set(range(0, min(len(data), 600))) | set(range(600, len(data), 97)))
        for length in lengths:
            path = tmp_path / f"{Path(name).stem}-{length}{Path(name).suffix}"
            path.write_bytes(data[:length])
            jobs.append((bytes(path), False))
    results = run_isolated(jobs, timeout=30)
    trouble = {job[0]: result[:2] for job, result in results.items() if result[0] != "ok"}
    assert not trouble, trouble
    assert all(isinstance(result[1], PhotoMetadata) for result in results.values())


# -- FIEMAP --------------------------------------------------------------------------------


def _filesystem_type(path: Path) -> str:
    best, kind = "", ""
    with open("/proc/self/mounts") as fh:
        for line in fh:
            fields = line.split()
            mount = fields[1].replace("\\040", " ")
            if str(path).startswith(mount) and len(mount) > len(best):
                best, kind = mount, fields[2]
    return kind


def test_physical_offset_on_a_local_filesystem(tmp_path: Path) -> None:
    if _filesystem_type(tmp_path) not in ("ext4", "xfs", "btrfs", "ext3", "f2fs"):
        pytest.skip(f"tmp_path is on {_filesystem_type(tmp_path)}, which may lack FIEMAP")
    offsets = []
    for i in range(2):
        path = tmp_path / f"p{i}.jpg"
        with open(path, "wb") as fh:
            fh.write(os.urandom(256 * 1024))
            fh.flush()
            os.fsync(fh.fileno())  # delayed allocation: only written data has a place
        fd = os.open(path, os.O_RDONLY)
        try:
            offsets.append(physical_offset(fd))
        finally:
            os.close(fd)
    assert all(isinstance(o, int) and o > 0 for o in offsets), offsets
    assert offsets[0] != offsets[1]


def test_physical_offset_is_none_where_there_is_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    fd = os.open(empty, os.O_RDONLY)
    try:
        assert physical_offset(fd) is None
    finally:
        os.close(fd)
    assert physical_offset(-1) is None  # a bad descriptor is no offset, not an exception
    fd = os.memfd_create("photo")  # memory, like tmpfs: no FIEMAP
    try:
        os.write(fd, b"x" * 4096)
        assert physical_offset(fd) is None
    finally:
        os.close(fd)


def test_read_metadata_fills_disk_offset_from_the_file(corpus_dir: Path, tmp_path: Path) -> None:
    if _filesystem_type(tmp_path) != "ext4":
        pytest.skip("needs ext4 for a known FIEMAP answer")
    path = tmp_path / "p.jpg"
    with open(path, "wb") as fh:
        fh.write((corpus_dir / "cameras/Canon_40D.jpg").read_bytes())
        os.fsync(fh.fileno())
    md = read_metadata(bytes(path))
    assert md is not None and isinstance(md.disk_offset, int)
    md = read_metadata(bytes(path), path.read_bytes())
    assert md is not None and md.disk_offset is None


# -- speed -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_costs_about_what_bare_exifread_costs(corpus_dir: Path) -> None:
    # Phase 1's budget: read_metadata may cost at most ~1.1x a bare exifread loop on camera
    # JPEGs, IPC and SQLite coming on top. Interleaved runs, median.
    import exifread

    files = sorted(p for p in (corpus_dir / "cameras").glob("*.jpg") if p.stat().st_size > 20_000)
    names = [bytes(p) for p in files]

    def bare() -> None:
        for p in files:
            with open(p, "rb") as fh:
                exifread.process_file(fh, details=False)

    def ours() -> None:
        for name in names:
            read_metadata(name)

    times: dict[str, list[float]] = {"bare": [], "ours": []}
    for rep in range(15):
        for label, fn in (("bare", bare), ("ours", ours))[:: 1 if rep % 2 else -1]:
            start = time.perf_counter()
            fn()
            times[label].append(time.perf_counter() - start)
    ratio = sorted(times["ours"])[7] / sorted(times["bare"])[7]
    assert ratio <= 1.1, ratio


def test_exif_json_matches_exifread_tag_for_tag(
    corpus_dir: Path, manifest: list[dict[str, str]], readings: dict[str, tuple[str, Any, float]]
) -> None:
    # Our IFD reader reuses exifread's internals with its own guards and integer unpacking; an
    # exifread upgrade that changes them shows up here. Where exifread's own process_file
    # works, every tag it reads is ours too with the same text, save binary blobs (dropped on
    # purpose) and what it reads beyond a segment's end or past a lying entry count.
    import exifread

    compared = 0
    for row in manifest:
        if row["category"] == "bad" or not row["exifread"].startswith("ok:"):
            continue
        if row["FileType"] == "BTF":
            continue  # exifread misreads BigTIFF's 8-byte entries as classic ones
        with open(corpus_dir / row["path"], "rb") as fh:
            theirs = exifread.process_file(fh, details=False, extract_thumbnail=False)
        ours = json.loads(reading(readings, row["path"]).exif)
        for name, tag in theirs.items():
            text = str(tag)
            if name in ours:
                assert ours[name] == text[:300] + ("…" if len(text) > 300 else ""), name
            else:
                dropped = tag.field_length > 64 and tag.field_type in (1, 7)
                beyond = row["path"] == "cameras/exiv2-bug443.jpg"  # 5233-entry Interop IFD
                assert dropped or beyond, (row["path"], name, text[:60])
            compared += 1
    assert compared > 5000
