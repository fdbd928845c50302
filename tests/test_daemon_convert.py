"""End to end, phase 2: the real daemon over the whole corpus. Every file a reference
decoder can read ends ``done`` with upright thumbnails of the configured size; every bad
file ends with a reason or ``done``; the daemon stays up and converts what comes next."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

from photoscand.outcomes import REASONS
from tests.conftest import CORPUS, load_manifest

SIZES = (256, 64)

# Files a reference decoder "reads" that photoscand fails on purpose: the reason word it
# must give, and why (docs/architecture.md, "Image states": truncated data fails as
# truncated even where a decoder paints a grey half; images over max_pixels fail before
# decoding).
_GREY_HALF = "ImageMagick/libvips decode it with a warning and fill the missing part"
EXPECTED_FAILURES: dict[str, tuple[str, str]] = {
    "bad/derived_bomb_jpeg_65500x65500.jpg": ("too_large", "4.3 gigapixels declared"),
    "bad/derived_bomb_png_100000x100000.png": ("too_large", "10 gigapixels declared"),
    "bad/derived_truncated_half_nikon-e950.jpg": ("truncated", _GREY_HALF),
    "bad/libvips_truncated.gif": ("truncated", _GREY_HALF),
    "bad/libvips_truncated.jpg": ("truncated", _GREY_HALF),
    "bad/pillow_truncated_end_chunk.png": ("truncated", _GREY_HALF),
    "bad/pillow_truncated_image.png": ("truncated", _GREY_HALF),
    "bad/pillow_truncated_jpeg.jpg": ("truncated", _GREY_HALF),
    "bad/pillow_broken_data_stream.png": (
        "corrupt",
        "its zlib stream is broken; libvips and ImageMagick stop at the break and keep the rest",
    ),
}


def displayed(row: dict[str, str]) -> tuple[int, int] | None:
    """The picture's size once its EXIF orientation is applied (exiftool's reading)."""
    try:
        width, height = int(row["ImageWidth"]), int(row["ImageHeight"])
    except ValueError:
        return None
    if row["Orientation"] in ("5", "6", "7", "8") and not row["FileType"].startswith("HEI"):
        return height, width
    return width, height


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory):
    """One daemon over a copy of the whole corpus (slow to build, shared by the tests)."""
    from tests.conftest import DaemonProcess

    root = tmp_path_factory.mktemp("corpus-run")
    daemon = DaemonProcess(
        root, {"thumbnails": {"sizes": list(SIZES)}, "workers": {"count": 2, "max_attempts": 2}}
    )
    manifest = load_manifest()
    for row in manifest:
        dst = daemon.photos / row["path"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(CORPUS / row["path"], dst)
    daemon.start().wait_ready(timeout=120)
    try:
        daemon.wait_settled(len(manifest), timeout=400)
        yield daemon, manifest
    finally:
        daemon.kill()


def _rows(daemon) -> dict[str, tuple]:
    result = {}
    for path, image_id, status, error, width, height in daemon.query(
        "SELECT path, id, status, error, width, height FROM images"
    ):
        rel = os.path.relpath(os.fsdecode(bytes(path)), daemon.photos)
        result[rel] = (image_id, status, error, width, height)
    return result


def test_every_decodable_file_is_done_with_thumbnails_of_the_right_size(corpus_run) -> None:
    daemon, manifest = corpus_run
    rows = _rows(daemon)
    problems = []
    for entry in manifest:
        if "yes" not in (entry["im_decodes"], entry["vips_decodes"]):
            continue
        image_id, status, error, _w, _h = rows[entry["path"]]
        if entry["path"] in EXPECTED_FAILURES:
            reason, _why = EXPECTED_FAILURES[entry["path"]]
            assert status == "failed" and error.startswith(reason + ":"), (entry["path"], error)
            continue
        if status != "done":
            problems.append(f"{entry['path']}: {status} {error}")
            continue
        thumbs = daemon.query(
            "SELECT size, path, width, height FROM thumbnails WHERE image_id = ? ORDER BY size",
            (image_id,),
        )
        assert [t[0] for t in thumbs] == sorted(SIZES), entry["path"]
        shown = displayed(entry)
        for size, path, width, height in thumbs:
            with Image.open(path) as im:
                assert im.size == (width, height), path
            if shown is not None and entry["category"] != "raw":
                assert max(width, height) == min(size, max(shown)), (entry["path"], size)
    assert not problems, "\n".join(problems)


def test_thumbnails_stand_upright_in_all_eight_orientations(corpus_run) -> None:
    daemon, manifest = corpus_run
    rows = _rows(daemon)
    checked = 0
    for entry in manifest:
        if entry["Orientation"] not in "12345678" or not entry["Orientation"]:
            continue
        shown = displayed(entry)
        if shown is None or shown[0] == shown[1] or entry["FileType"].startswith("HEI"):
            continue
        image_id, status, *_ = rows[entry["path"]]
        if status != "done":
            continue
        width, height = daemon.query(
            "SELECT width, height FROM thumbnails WHERE image_id = ? AND size = ?",
            (image_id, SIZES[0]),
        )[0]
        assert (width > height) == (shown[0] > shown[1]), (entry["path"], entry["Orientation"])
        checked += 1
    orientations = {e["Orientation"] for e in manifest if e["path"].startswith("orientation/")}
    assert {"1", "2", "3", "4", "5", "6", "7", "8"} <= orientations
    assert checked >= 40


def test_bad_files_fail_with_a_reason_or_are_readable(corpus_run) -> None:
    daemon, manifest = corpus_run
    rows = _rows(daemon)
    for entry in manifest:
        if entry["category"] != "bad":
            continue
        _id, status, error, *_ = rows[entry["path"]]
        assert status in ("done", "failed"), (entry["path"], status)
        if status == "failed":
            reason = error.split(":", 1)[0]
            assert reason in REASONS, (entry["path"], error)
        else:
            # Done only where a reference decoder agrees the file is readable.
            assert "yes" in (entry["im_decodes"], entry["vips_decodes"]) or entry[
                "pillow"
            ].startswith("ok"), (entry["path"], "converted though no decoder reads it")


def test_the_daemon_is_still_up_and_converts_files_dropped_after_the_bad_ones(
    corpus_run,
) -> None:
    daemon, _manifest = corpus_run
    assert daemon.proc.poll() is None
    late = daemon.photos / "late.jpg"
    shutil.copy(CORPUS / "cameras" / "Canon_40D.jpg", late)
    daemon.wait_row(late, status="done", timeout=60)
    assert daemon.stop() == 0


def test_the_same_photo_twice_shares_its_thumbnails(daemon_factory) -> None:
    daemon = daemon_factory()
    source = CORPUS / "cameras" / "Canon_40D.jpg"
    shutil.copy(source, daemon.photos / "a.jpg")
    Path(daemon.photos / "sub").mkdir()
    shutil.copy(source, daemon.photos / "sub" / "copy.jpg")
    daemon.start().wait_ready()
    daemon.wait_settled(2)
    paths = daemon.query("SELECT image_id, path FROM thumbnails ORDER BY image_id, size")
    by_image: dict[int, list[str]] = {}
    for image_id, path in paths:
        by_image.setdefault(image_id, []).append(path)
    first, second = by_image.values()
    assert first == second
    hashes = {r[0] for r in daemon.query("SELECT content_hash FROM images")}
    assert len(hashes) == 1
    assert daemon.stop() == 0
