"""The converters on the real corpus: every decodable photo, orientation, colour, hostile files
(in a forked, memory-limited child with a deadline), the ImageMagick backend's safety, and
atomic thumbnail writes (a real tmpfs for the full-disk case)."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from photoscand import formats, outcomes
from photoscand.converters import (
    BACKENDS,
    HASH_ALGORITHM,
    Conversion,
    ConversionError,
    ThumbnailSettings,
    available_formats,
    convert,
    detect_format,
    magick,
    output,
    thumbnail_path,
)
from tests.conftest import CORPUS, REPO, load_manifest, wait_for

MANIFEST = load_manifest()
ROWS = {row["path"]: row for row in MANIFEST}
SIZES = (256, 1440)

# Non-bad files that ImageMagick or libvips decode: the pillow backend must convert them all.
DECODABLE = [
    row["path"]
    for row in MANIFEST
    if row["category"] != "bad" and "yes" in (row["im_decodes"], row["vips_decodes"])
]
# Files no decoder of ours (nor ImageMagick, nor libvips) can read, and why. Each must fail
# with the reason given here, never crash.
NOT_DECODABLE = {
    "heic/lightning_mini.heif": (outcomes.UNSUPPORTED, "an ISO media file (brand mif3)"),
    "raw/Canon-R6-pruned.CR3": (outcomes.UNSUPPORTED, "pruned sample: no sensor data, no preview"),
    "raw/CanonRaw.cr2": (outcomes.UNSUPPORTED, "metadata-only sample LibRaw cannot open"),
    "raw/Nikon.nef": (outcomes.UNSUPPORTED, "pruned sample: sensor data cut, no preview"),
    "raw/exiv2-canon-powershot-s40.crw": (outcomes.UNSUPPORTED, "no sensor data, no preview"),
    "raw/sony_alpha_a7iii_raw_image.ARW": (outcomes.UNSUPPORTED, "header-only sample"),
}
# RAW files that ImageMagick and libvips cannot read here (no RAW delegate) but LibRaw can.
RAW_WITH_PIXELS = {"raw/FujiFilm.raf", "raw/IMG_1361.dng", "raw/Panasonic.rw2"}
# bad/ files that ImageMagick and libvips both "decode", but only by filling the missing end
# with grey: photoscand fails them as truncated (docs/architecture.md, "Image states").
TRUNCATED_BUT_SHOWN = {
    "bad/derived_truncated_half_nikon-e950.jpg",
    "bad/libvips_truncated.jpg",
    "bad/pillow_truncated_jpeg.jpg",
}
# bad/ files whose outcome is certain.
BAD_EXPECTED = {
    "bad/derived_bomb_jpeg_65500x65500.jpg": outcomes.TOO_LARGE,
    "bad/derived_bomb_png_100000x100000.png": outcomes.TOO_LARGE,
    "bad/pillow_decompression_bomb.gif": outcomes.TOO_LARGE,
    "bad/libvips_17000x17000.avif": outcomes.TOO_LARGE,
    "bad/derived_truncated_half_nikon-e950.jpg": outcomes.TRUNCATED,
    "bad/derived_truncated_half_spring_1440x960.heic": outcomes.TRUNCATED,
    "bad/derived_truncated_inside_exif_Canon_40D.jpg": outcomes.TRUNCATED,
    "bad/libvips_truncated.jpg": outcomes.TRUNCATED,
    "bad/libvips_truncated.gif": outcomes.TRUNCATED,
    "bad/pillow_truncated_jpeg.jpg": outcomes.TRUNCATED,
    "bad/pillow_truncated_image.png": outcomes.TRUNCATED,
    "bad/derived_zero_bytes.jpg": outcomes.TRUNCATED,
    "bad/exiv2_issue_2160_poc.jpg": outcomes.UNSUPPORTED,  # JPEG 2000 named .jpg
    "bad/exiv2_issue_ghsa_hrw9_ggg3_3r4r_poc.jpg": outcomes.UNSUPPORTED,  # MP4 named .jpg
    "bad/filetype_fixture.nef": outcomes.UNSUPPORTED,
    "bad/filetype_fixture.orf": outcomes.UNSUPPORTED,
    "bad/filetype_fixture.raf": outcomes.UNSUPPORTED,
    "bad/filetype_fixture.rw2": outcomes.UNSUPPORTED,
}
IMAGE_REASONS = {outcomes.CORRUPT, outcomes.TRUNCATED, outcomes.UNSUPPORTED, outcomes.TOO_LARGE}


def spec_for(out: Path, sizes=SIZES, fmt: str = "jpeg", quality: int = 80, max_pixels=10**8):
    return ThumbnailSettings(tuple(sizes), fmt, quality, str(out), max_pixels)


def hint_for(rel: str, data: bytes) -> str | None:
    return formats.detect_format(rel, data[: formats.SNIFF_BYTES])


def orientation_of(rel: str) -> int | None:
    value = ROWS[rel]["Orientation"]
    return int(value) if value else None


def convert_file(rel: str, spec: ThumbnailSettings, backend: str = "pillow") -> Conversion:
    data = (CORPUS / rel).read_bytes()
    return convert(
        data,
        dataclasses.replace(spec, backend=backend),
        format_hint=hint_for(rel, data),
        orientation=orientation_of(rel),
    )


def longest_source_edge(rel: str) -> int:
    row = ROWS[rel]
    return max(int(row["ImageWidth"]), int(row["ImageHeight"]))


def pixels(path: str | Path, size: tuple[int, int] | None = None, mode: str = "RGB") -> np.ndarray:
    with Image.open(path) as im:
        im = im.convert(mode)
        if size is not None:
            im = im.resize(size, Image.Resampling.BOX)
        return np.asarray(im, dtype=np.float64)


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    return float((a @ b) / np.sqrt((a @ a) * (b @ b)))


def imagemagick_png(*args: str) -> Image.Image:
    """Decode with ImageMagick (the reference): args are input and options; PNG on stdout."""
    exe = magick.program()
    if exe is None:
        pytest.skip("ImageMagick is not installed")
    done = subprocess.run([exe, *args, "png:-"], capture_output=True, timeout=60, check=True)
    im = Image.open(io.BytesIO(done.stdout))
    im.load()
    return im


def no_temp_files(folder: Path) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.name.endswith(output.TEMP_SUFFIX)]


# --------------------------------------------------------------------------- the corpus


@pytest.mark.parametrize("rel", DECODABLE)
def test_every_decodable_photo_converts(rel: str, tmp_path: Path) -> None:
    conversion = convert_file(rel, spec_for(tmp_path))
    source_edge = longest_source_edge(rel)
    if rel.startswith("raw/"):
        # RAW: the embedded preview may be all the pixels there are (never enlarged).
        source_edge = max(max(t.width, t.height) for t in conversion.thumbnails)
    assert [t.size for t in conversion.thumbnails] == list(SIZES)
    # exiftool's HEIF sizes round an odd clean-aperture crop up (452x462 for libheif's
    # 451x461 in rainbow-451x461.heic): one pixel of slack there.
    slack = 1 if ROWS[rel]["FileType"] in ("HEIC", "HEIF", "AVIF") else 0
    for thumb in conversion.thumbnails:
        expected = min(thumb.size, source_edge)
        assert abs(max(thumb.width, thumb.height) - expected) <= slack, thumb
        with Image.open(thumb.path) as im:
            assert im.format == "JPEG"
            assert im.size == (thumb.width, thumb.height)
            assert im.mode in ("RGB", "L")
    assert no_temp_files(tmp_path) == []


@pytest.mark.parametrize("rel", sorted(NOT_DECODABLE))
def test_files_no_decoder_reads_fail_with_their_reason(rel: str, tmp_path: Path) -> None:
    reason, _why = NOT_DECODABLE[rel]
    with pytest.raises(ConversionError) as caught:
        convert_file(rel, spec_for(tmp_path))
    assert caught.value.reason == reason
    if rel.startswith("raw/"):
        assert "no usable pixels" in caught.value.message
    assert list(tmp_path.rglob("*.jpg")) == []


def test_every_corpus_file_outside_bad_has_an_expectation() -> None:
    """Each file outside bad/ converts (DECODABLE, RAW_WITH_PIXELS) or is named with a reason."""
    rest = {
        row["path"] for row in MANIFEST if row["category"] != "bad" and row["path"] not in DECODABLE
    }
    assert rest == set(NOT_DECODABLE) | RAW_WITH_PIXELS


@pytest.mark.parametrize("rel", sorted(RAW_WITH_PIXELS))
def test_raw_files_with_pixels_convert(rel: str, tmp_path: Path) -> None:
    conversion = convert_file(rel, spec_for(tmp_path))
    assert conversion.source.startswith(("libraw", "embedded preview"))
    for thumb in conversion.thumbnails:
        assert 0 < max(thumb.width, thumb.height) <= thumb.size
        with Image.open(thumb.path) as im:
            assert im.size == (thumb.width, thumb.height)


def test_raw_sources_and_orientation(tmp_path: Path) -> None:
    # An iPhone ProRAW DNG: no preview, a LibRaw decode that applies its orientation (6).
    dng = convert_file("raw/IMG_1361.dng", spec_for(tmp_path))
    assert dng.source.startswith("libraw")
    assert [(t.width, t.height) for t in dng.thumbnails] == [(192, 256), (1080, 1440)]
    # A Nikon Z 9 DNG whose sensor data LibRaw cannot decode: its 640 px embedded preview.
    z9 = convert_file(
        "raw/nikon_z_9_high_efficiency_compressed_dx_cropped_max_overexposed.dng",
        spec_for(tmp_path, sizes=(256,)),
    )
    assert z9.source.startswith("embedded preview")
    assert (z9.thumbnails[0].width, z9.thumbnails[0].height) == (256, 170)
    # A Panasonic RW2: a half-size LibRaw decode covers 1440 px.
    rw2 = convert_file("raw/Panasonic.rw2", spec_for(tmp_path))
    assert rw2.source == "libraw half"
    assert max(rw2.thumbnails[1].width, rw2.thumbnails[1].height) == 1440


def test_raw_without_rawpy_is_unsupported_naming_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "rawpy", None)  # import rawpy -> ImportError
    with pytest.raises(ConversionError) as caught:
        convert_file("raw/Panasonic.rw2", spec_for(tmp_path))
    assert caught.value.reason == outcomes.UNSUPPORTED
    assert "rawpy" in caught.value.message
    assert available_formats()["rw2"] == "rawpy"


def test_heif_without_pillow_heif_is_unsupported_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from photoscand.converters import heif

    heif.register()
    monkeypatch.setitem(heif._state, "heif", "pillow-heif")  # as if the import had failed
    with pytest.raises(ConversionError) as caught:
        convert_file("heic/spring_1440x960.heic", spec_for(tmp_path))
    assert caught.value.reason == outcomes.UNSUPPORTED
    assert "pillow-heif" in caught.value.message
    assert available_formats()["heif"] == "pillow-heif"


def test_available_formats_names_what_is_missing() -> None:
    found = available_formats()
    for name in ("jpeg", "png", "gif", "webp", "tiff", "heif", "avif", "dng", "cr3", "nef"):
        assert found[name] is None, name
    assert set(available_formats("magick")) == set(found)
    assert BACKENDS == ("pillow", "magick")


# --------------------------------------------------------------------------- orientation


@pytest.mark.parametrize("shape", ["landscape", "portrait"])
def test_all_eight_orientations_come_out_upright(shape: str, tmp_path: Path) -> None:
    spec = spec_for(tmp_path, sizes=(256,), quality=95)
    reference = convert_file(f"orientation/{shape}_1.jpg", spec).thumbnails[0]
    ref_pixels = pixels(reference.path, (32, 32), "L")
    for n in range(1, 9):
        thumb = convert_file(f"orientation/{shape}_{n}.jpg", spec).thumbnails[0]
        assert (thumb.width > thumb.height) == (shape == "landscape"), n
        assert (thumb.width, thumb.height) == (reference.width, reference.height), n
        got = pixels(thumb.path, (32, 32), "L")
        # The upright picture matches the reference; every other transposition does not.
        assert correlation(got, ref_pixels) > 0.97, n
        for wrong in (Image.Transpose.ROTATE_180, Image.Transpose.FLIP_LEFT_RIGHT):
            flipped = np.asarray(Image.fromarray(got.astype(np.uint8)).transpose(wrong), float)
            assert correlation(flipped, ref_pixels) < 0.9, (n, wrong)


@pytest.mark.parametrize(
    "family",
    [
        [f"orientation/libvips_rotation_{n}.jpg" for n in range(1, 9)],
        [f"orientation/g4_orientation_{n}.tif" for n in range(1, 9)],
        ["webp/hopper.webp"] + [f"orientation/hopper_orientation_{n}.webp" for n in range(2, 9)],
    ],
    ids=["libvips-jpeg", "tiff", "webp"],
)
def test_orientation_families_match_their_first_member(family: list[str], tmp_path: Path) -> None:
    spec = spec_for(tmp_path, sizes=(256,), quality=95)
    thumbs = [convert_file(rel, spec).thumbnails[0] for rel in family]
    sizes = {(t.width, t.height) for t in thumbs}
    assert len(sizes) == 1, sizes
    ref = pixels(thumbs[0].path, (32, 32), "L")
    for rel, thumb in zip(family, thumbs, strict=True):
        assert correlation(pixels(thumb.path, (32, 32), "L"), ref) > 0.95, rel


def test_heif_orientation_is_applied_once(tmp_path: Path) -> None:
    """libheif applies irot/imir itself; the Sony files show the same scene four ways."""
    spec = spec_for(tmp_path, sizes=(256,))
    shapes = {}
    for name in ("1_top_left", "3_bottom_right", "6_right_top", "8_left-bottom"):
        thumb = convert_file(f"orientation/issue_9292_sony_{name}.HIF", spec).thumbnails[0]
        shapes[name] = (thumb.width, thumb.height)
    assert shapes["1_top_left"] == shapes["3_bottom_right"] == (256, 171)
    assert shapes["6_right_top"] == shapes["8_left-bottom"] == (171, 256)
    iphone = convert_file("heic/iphone_13_pro_max.HEIC", spec).thumbnails[0]
    assert (iphone.width, iphone.height) == (192, 256)  # EXIF says 6, libheif already rotated


def test_png_orientation_from_exif_and_xmp(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, sizes=(256,), quality=95)
    plain = convert_file("png/exif_imagemagick.png", spec).thumbnails[0]
    turned = convert_file("orientation/exif_imagemagick_orientation.png", spec).thumbnails[0]
    # Orientation 3: the same picture turned half a circle.
    a, b = pixels(plain.path, (32, 32), "L"), pixels(turned.path, (32, 32), "L")
    assert correlation(a, b) > 0.95


# --------------------------------------------------------------------------- colour


def _patch_means(im: Image.Image, grid: tuple[int, int] = (8, 8)) -> np.ndarray:
    return np.asarray(im.convert("RGB").resize(grid, Image.Resampling.BOX), dtype=np.float64)


def test_cmyk_jpeg_colours_match_imagemagick(tmp_path: Path) -> None:
    cmyk = tmp_path / "cmyk.jpg"
    imagemagick_png(str(CORPUS / "no_exif/hopper.jpg"))  # skips without ImageMagick
    subprocess.run(
        [magick.program(), str(CORPUS / "no_exif/hopper.jpg"), "-colorspace", "CMYK",
         "-quality", "95", str(cmyk)],
        check=True, timeout=60,
    )  # fmt: skip
    with Image.open(cmyk) as im:
        assert im.mode == "CMYK" and im.info.get("adobe") is not None
    thumb = convert(cmyk.read_bytes(), spec_for(tmp_path / "out", sizes=(256,), quality=95))
    ours = Image.open(thumb.thumbnails[0].path)
    theirs = imagemagick_png(str(cmyk), "-colorspace", "sRGB")
    assert ours.size == theirs.size == (128, 128)
    diff = np.abs(_patch_means(ours) - _patch_means(theirs))
    assert diff.max() < 6, diff.max()
    # The test can fail: read as if not inverted, the colours are far off.
    assert np.abs(_patch_means(ours) - (255 - _patch_means(theirs))).max() > 60


def _adobe_rgb_test_card(path: Path) -> None:
    """Saturated patches tagged with the Adobe RGB (1998) profile of a corpus photo."""
    with Image.open(CORPUS / "cameras/xmp_test_Canon_Rebel_T6.jpg") as donor:
        profile = donor.info["icc_profile"]
    card = Image.new("RGB", (256, 128))
    colours = [(0, 255, 0), (255, 0, 0), (0, 0, 255), (0, 200, 200), (200, 0, 200), (128, 128, 128)]
    for i, colour in enumerate(colours):
        card.paste(colour, (i * 42, 0, i * 42 + 42, 128))
    card.save(path, "JPEG", quality=95, icc_profile=profile)


@pytest.mark.parametrize("rel", ["synthetic", "webp/exiv2-bug1199.webp"])
def test_adobe_rgb_is_converted_to_srgb(rel: str, tmp_path: Path) -> None:
    source = tmp_path / "card.jpg" if rel == "synthetic" else CORPUS / rel
    if rel == "synthetic":
        _adobe_rgb_test_card(source)
    conversion = convert(source.read_bytes(), spec_for(tmp_path / "o", sizes=(256,), quality=95))
    thumb = conversion.thumbnails[0]
    ours = Image.open(thumb.path)
    geometry = f"{thumb.width}x{thumb.height}!"
    srgb = str(REPO / "photoscand/converters/srgb.icc")
    converted = imagemagick_png(str(source), "-profile", srgb, "-resize", geometry)
    untouched = imagemagick_png(str(source), "+profile", "*", "-resize", geometry)
    good = np.abs(_patch_means(ours) - _patch_means(converted)).max()
    ignored = np.abs(_patch_means(ours) - _patch_means(untouched)).max()
    assert good < 5, good
    if rel == "synthetic":  # saturated colours: ignoring the profile would be far off
        assert ignored > 20, ignored


def test_sixteen_bit_grey_tiff_matches_imagemagick(tmp_path: Path) -> None:
    rel = "tiff/ifd_tag_type.tiff"
    with Image.open(CORPUS / rel) as im:
        assert im.mode == "I;16"
    thumb = convert_file(rel, spec_for(tmp_path, sizes=(1440,), quality=95)).thumbnails[0]
    ours = Image.open(thumb.path)
    theirs = imagemagick_png(str(CORPUS / rel), "-depth", "8")
    assert ours.size == theirs.size
    diff = np.abs(_patch_means(ours) - _patch_means(theirs))
    assert diff.max() < 2, diff.max()


def test_sixteen_bit_rgb_png_matches_imagemagick(tmp_path: Path) -> None:
    deep = tmp_path / "deep.png"
    imagemagick_png(str(CORPUS / "no_exif/hopper.png"))
    subprocess.run(
        [magick.program(), str(CORPUS / "no_exif/hopper.png"), "-depth", "16", f"PNG48:{deep}"],
        check=True, timeout=60,
    )  # fmt: skip
    thumb = convert(deep.read_bytes(), spec_for(tmp_path / "out", sizes=(256,), quality=95))
    ours = Image.open(thumb.thumbnails[0].path)
    theirs = imagemagick_png(str(deep), "-depth", "8")
    assert np.abs(_patch_means(ours) - _patch_means(theirs)).max() < 3


def test_lab_tiff_is_shown_in_srgb(tmp_path: Path) -> None:
    rel = "tiff/hopper.Lab.tif"
    thumb = convert_file(rel, spec_for(tmp_path, sizes=(256,), quality=95)).thumbnails[0]
    ours = Image.open(thumb.path)
    reference = Image.open(CORPUS / "no_exif/hopper.png")  # the same picture, stored as RGB
    assert np.abs(_patch_means(ours) - _patch_means(reference)).max() < 6
    # ImageMagick 6 is further off (up to 23 levels: its Lab white point differs).
    theirs = imagemagick_png(str(CORPUS / rel), "-colorspace", "sRGB")
    assert np.abs(_patch_means(ours) - _patch_means(theirs)).max() < 25


def test_alpha_kept_for_webp_and_flattened_on_white_for_jpeg(tmp_path: Path) -> None:
    rel = "webp/transparent.webp"
    with Image.open(CORPUS / rel) as im:
        clear = next(
            (x, y) for x in range(im.width) for y in range(im.height)
            if im.convert("RGBA").getpixel((x, y))[3] == 0
        )  # fmt: skip
    webp = convert_file(rel, spec_for(tmp_path / "w", sizes=(1440,), fmt="webp")).thumbnails[0]
    with Image.open(webp.path) as im:
        assert im.mode == "RGBA"
        assert im.getpixel(clear)[3] == 0
    jpeg = convert_file(rel, spec_for(tmp_path / "j", sizes=(1440,), quality=95)).thumbnails[0]
    with Image.open(jpeg.path) as im:
        assert im.mode == "RGB"
        assert min(im.getpixel(clear)) > 240  # white where the picture was transparent


def test_output_carries_no_metadata(tmp_path: Path) -> None:
    for fmt in ("jpeg", "webp"):
        conversion = convert_file("gps/DSCN0010.jpg", spec_for(tmp_path / fmt, fmt=fmt))
        for thumb in conversion.thumbnails:
            with Image.open(thumb.path) as im:
                assert "exif" not in im.info and "icc_profile" not in im.info, thumb.path
                assert "xmp" not in im.info and not im.getexif(), thumb.path


# --------------------------------------------------------------------------- decoding choices


def _big_jpeg(path: Path, size: tuple[int, int] = (4000, 3000)) -> bytes:
    """A 12 MP JPEG with detail everywhere (an upscaled corpus photo)."""
    with Image.open(CORPUS / "cameras/jolla.jpg") as im:
        im.resize(size, Image.Resampling.BICUBIC).save(path, "JPEG", quality=90)
    return path.read_bytes()


def test_jpeg_is_shrunk_on_load_and_matches_a_full_decode(tmp_path: Path) -> None:
    data = _big_jpeg(tmp_path / "big.jpg")
    conversion = convert(data, spec_for(tmp_path / "out"))
    assert conversion.source in ("jpeg 3/8", "jpeg 1/2")  # 3/8 needs libjpeg-turbo
    big = next(t for t in conversion.thumbnails if t.size == 1440)
    assert (big.width, big.height) == (1440, 1080)
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        reference = full.resize((1440, 1080), Image.Resampling.LANCZOS)
    ours = pixels(big.path)
    mse = float(((ours - np.asarray(reference, float)) ** 2).mean())
    psnr = 10 * np.log10(255**2 / mse)
    assert psnr > 33, psnr
    small = convert(data, spec_for(tmp_path / "small", sizes=(256,)))
    assert small.source == "jpeg 1/8"


@pytest.mark.parametrize(
    ("size", "mode", "options"),
    [((3841, 5121), "L", {"progressive": True}), ((4001, 2999), "CMYK", {"subsampling": 0})],
)
def test_three_eighths_decoding_holds_for_odd_layouts(size, mode, options, tmp_path: Path) -> None:
    with Image.open(CORPUS / "cameras/jolla.jpg") as im:
        im.resize(size, Image.Resampling.BILINEAR).convert(mode).save(
            tmp_path / "odd.jpg", "JPEG", quality=90, **options
        )
    data = (tmp_path / "odd.jpg").read_bytes()
    conversion = convert(data, spec_for(tmp_path / "out", sizes=(1440,)))
    thumb = conversion.thumbnails[0]
    expected = (1080, 1440) if size[1] > size[0] else (1440, 1079)
    assert (thumb.width, thumb.height) == expected
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        reference = np.asarray(
            full.convert("RGB").resize(expected, Image.Resampling.LANCZOS), float
        )
    ours = pixels(thumb.path)
    psnr = 10 * np.log10(255**2 / float(((ours - reference) ** 2).mean()))
    assert psnr > 33, (conversion.source, psnr)


def test_heic_uses_its_embedded_thumbnail_when_large_enough(tmp_path: Path) -> None:
    small = convert_file("heic/iphone_13_pro_max.HEIC", spec_for(tmp_path / "s", sizes=(256,)))
    assert small.source == "heif thumbnail 240x320"
    assert (small.thumbnails[0].width, small.thumbnails[0].height) == (192, 256)
    large = convert_file("heic/iphone_13_pro_max.HEIC", spec_for(tmp_path / "l", sizes=(1440,)))
    assert large.source == "heif 1/1"


def test_first_frame_of_animations_and_first_page_of_tiff(tmp_path: Path) -> None:
    for rel in ("gif/chi.gif", "webp/iss634.webp", "png/fixture.apng.png"):
        conversion = convert_file(rel, spec_for(tmp_path / Path(rel).stem, sizes=(1440,)))
        thumb = conversion.thumbnails[0]
        with Image.open(CORPUS / rel) as im:
            first = im.convert("RGBA")
            assert (thumb.width, thumb.height) == im.size
        flat = Image.new("RGB", first.size, "white")
        flat.paste(first, mask=first.getchannel("A"))
        assert np.abs(pixels(thumb.path) - np.asarray(flat, float)).mean() < 6, rel


def test_too_many_pixels_fail_before_any_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    spec = spec_for(tmp_path, max_pixels=640 * 480 - 1)
    with pytest.raises(ConversionError) as caught:
        convert_file("gps/DSCN0010.jpg", spec)  # 640x480
    assert caught.value.reason == outcomes.TOO_LARGE
    assert "workers.max_pixels" in caught.value.message
    assert Image.MAX_IMAGE_PIXELS == 640 * 480 - 1  # Pillow's own bomb limit is the same


def test_content_hash_and_timings(tmp_path: Path) -> None:
    data = (CORPUS / "gps/DSCN0010.jpg").read_bytes()
    conversion = convert(memoryview(data), spec_for(tmp_path))
    assert HASH_ALGORITHM == "sha256"
    assert conversion.content_hash == hashlib.sha256(data).hexdigest()
    for stage in ("hash", "decode", "resize", "encode", "write"):
        assert conversion.timings[stage] >= 0, stage
    assert conversion.thumbnails[0].path == thumbnail_path(
        str(tmp_path), conversion.content_hash, 256, "jpeg"
    )


def test_thumbnail_path_fans_out_by_hash() -> None:
    digest = "abcdef" + "0" * 58
    assert thumbnail_path("/t", digest, 256, "jpeg") == f"/t/ab/cd/{digest}-256.jpg"
    assert thumbnail_path("/t", digest, 1440, "webp") == f"/t/ab/cd/{digest}-1440.webp"
    with pytest.raises(ValueError):
        thumbnail_path("/t", "../../etc", 256, "jpeg")


def test_twelve_bit_jpeg_is_unsupported(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), "red").save(buffer, "JPEG")
    data = bytearray(buffer.getvalue())
    data[data.find(b"\xff\xc0") + 4] = 12  # the frame header's sample precision
    with pytest.raises(ConversionError) as caught:
        convert(bytes(data), spec_for(tmp_path))
    assert caught.value.reason == outcomes.UNSUPPORTED
    assert "12-bit" in caught.value.message


def test_detect_format_names_foreign_files() -> None:
    with pytest.raises(ConversionError) as caught:
        detect_format(b"BM" + bytes(100), "jpeg")
    assert caught.value.reason == outcomes.UNSUPPORTED and "BMP" in caught.value.message
    with pytest.raises(ConversionError) as caught:
        detect_format(b'{"not": "an image"}', "webp")
    assert caught.value.reason == outcomes.CORRUPT
    assert detect_format(b"II*\x00" + bytes(60), "nef") == "nef"
    assert detect_format(b"II*\x00" + bytes(60), None) == "tiff"


# --------------------------------------------------------------------------- hostile files

_DRIVER = textwrap.dedent(
    """
    import json, os, resource, signal, sys
    sys.path.insert(0, sys.argv[1])
    from photoscand.converters import ThumbnailSettings, ConversionError, convert
    from photoscand import formats

    corpus, out, backend = sys.argv[2], sys.argv[3], sys.argv[4]
    spec = ThumbnailSettings((256, 1440), "jpeg", 80, out, 100_000_000, backend=backend)
    with open("/proc/self/status") as fh:
        vm = next(int(l.split()[1]) for l in fh if l.startswith("VmSize")) * 1024
    for rel in sys.stdin.read().split("\\n"):
        if not rel:
            continue
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read)
            limit = vm + (1 << 30)
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
            signal.alarm(30)
            data = open(os.path.join(corpus, rel), "rb").read()
            hint = formats.detect_format(rel, data[:64])
            try:
                c = convert(data, spec, format_hint=hint)
                result = {"ok": [(t.width, t.height) for t in c.thumbnails]}
            except ConversionError as e:
                result = {"reason": e.reason, "message": e.message}
            except BaseException as e:
                result = {"exception": repr(e)}
            os.write(write, json.dumps(result).encode())
            os._exit(0)
        os.close(write)
        chunks = []
        while chunk := os.read(read, 65536):
            chunks.append(chunk)
        os.close(read)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            result = {"signal": os.WTERMSIG(status)}
        else:
            result = json.loads(b"".join(chunks) or b'{"exit": "no result"}')
        print(json.dumps({"path": rel, **result}), flush=True)
    """
)


def _run_hostile(paths: list[str], out: Path, backend: str, timeout: float) -> dict[str, dict]:
    driver = out.parent / "driver.py"
    driver.write_text(_DRIVER)
    done = subprocess.run(
        [sys.executable, str(driver), str(REPO), str(CORPUS), str(out), backend],
        input="\n".join(paths),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=True,
    )
    results = [json.loads(line) for line in done.stdout.splitlines()]
    return {r.pop("path"): r for r in results}


def test_every_bad_file_fails_with_a_reason_or_converts(tmp_path: Path) -> None:
    bad = [row["path"] for row in MANIFEST if row["category"] == "bad"]
    results = _run_hostile(bad, tmp_path / "out", "pillow", timeout=300)
    assert set(results) == set(bad)
    for rel, result in results.items():
        row = ROWS[rel]
        assert "signal" not in result and "exception" not in result, (rel, result)
        if "ok" in result:
            assert all(w > 0 and h > 0 for w, h in result["ok"]), (rel, result)
        else:
            assert result["reason"] in IMAGE_REASONS, (rel, result)
            assert result["message"] and "\n" not in result["message"], (rel, result)
        if rel in BAD_EXPECTED:
            assert result.get("reason") == BAD_EXPECTED[rel], (rel, result)
        elif row["im_decodes"] == row["vips_decodes"] == "yes" and rel not in TRUNCATED_BUT_SHOWN:
            assert "ok" in result, (rel, result)  # both reference decoders read it: so do we
    assert no_temp_files(tmp_path / "out") == []


def test_out_of_memory_is_too_large(tmp_path: Path) -> None:
    """A picture within max_pixels that does not fit the worker's memory limit."""
    big = tmp_path / "big.png"
    Image.new("RGB", (9000, 9000), (10, 200, 30)).save(big, compress_level=1)
    script = textwrap.dedent(
        f"""
        import resource, sys
        sys.path.insert(0, {str(REPO)!r})
        from photoscand.converters import (
            ThumbnailSettings, ConversionError, available_formats, convert
        )
        available_formats()  # load every decoder library before measuring the address space
        data = open({str(big)!r}, "rb").read()
        with open("/proc/self/status") as fh:
            vm = next(int(l.split()[1]) for l in fh if l.startswith("VmSize")) * 1024
        limit = vm + 150 * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        try:
            convert(data, ThumbnailSettings((256,), "jpeg", 80, {str(tmp_path / "out")!r}, 10**8))
        except ConversionError as e:
            print(e.reason, e.message)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.startswith("too_large "), done.stdout + done.stderr
    assert "workers.memory_limit_mb" in done.stdout


# --------------------------------------------------------------------------- ImageMagick

needs_magick = pytest.mark.skipif(magick.program() is None, reason="ImageMagick not installed")


@needs_magick
def test_magick_backend_sizes_and_orientation(tmp_path: Path) -> None:
    spec = spec_for(tmp_path, quality=95)
    jolla = convert_file("cameras/jolla.jpg", spec, backend="magick")
    assert [(t.width, t.height) for t in jolla.thumbnails] == [(256, 192), (1440, 1080)]
    assert jolla.source == "magick jpeg"
    small = spec_for(tmp_path, sizes=(256,), quality=95)
    reference = convert_file("orientation/landscape_1.jpg", small, backend="magick").thumbnails[0]
    ref = pixels(reference.path, (32, 32), "L")
    for shape in ("landscape", "portrait"):
        for n in range(1, 9):
            rel = f"orientation/{shape}_{n}.jpg"
            thumb = convert_file(rel, small, backend="magick").thumbnails[0]
            assert (thumb.width > thumb.height) == (shape == "landscape"), rel
            if shape == "landscape":
                assert correlation(pixels(thumb.path, (32, 32), "L"), ref) > 0.97, rel
    for thumb in jolla.thumbnails:
        with Image.open(thumb.path) as im:
            assert not im.getexif() and "icc_profile" not in im.info


@needs_magick
def test_magick_backend_on_a_sample_of_formats(tmp_path: Path) -> None:
    sample = [
        "png/libvips_indexed.png",
        "gif/chi.gif",
        "webp/transparent.webp",
        "tiff/hopper_webp.tif",
        "heic/spring_1440x960.heic",
        "heic/iphone_13_pro_max.HEIC",
        "unicode/Ünïcödé Ördner/Bild.jpg",
    ]
    for rel in sample:
        conversion = convert_file(rel, spec_for(tmp_path, sizes=(256,)), backend="magick")
        thumb = conversion.thumbnails[0]
        assert max(thumb.width, thumb.height) == min(256, longest_source_edge(rel)), rel
    iphone = convert_file("heic/iphone_13_pro_max.HEIC", spec_for(tmp_path, sizes=(256,)), "magick")
    assert (iphone.thumbnails[0].width, iphone.thumbnails[0].height) == (192, 256)


@needs_magick
def test_magick_bad_files_fail_with_reasons(tmp_path: Path) -> None:
    sample = [
        "bad/derived_bomb_jpeg_65500x65500.jpg",
        "bad/derived_truncated_half_nikon-e950.jpg",
        "bad/pillow_truncated_image.png",
        "bad/pillow_broken.png",
        "bad/libheif_clap-overflow-divide-zero.heic",
        "bad/derived_zero_bytes.jpg",
        "bad/corrupted.jpg",
    ]
    results = _run_hostile(sample, tmp_path / "out", "magick", timeout=300)
    for rel, result in results.items():
        assert "signal" not in result and "exception" not in result, (rel, result)
        assert "ok" in result or result["reason"] in IMAGE_REASONS, (rel, result)
    assert results["bad/derived_bomb_jpeg_65500x65500.jpg"]["reason"] == outcomes.TOO_LARGE
    assert results["bad/derived_truncated_half_nikon-e950.jpg"]["reason"] == outcomes.TRUNCATED


@needs_magick
def test_magick_hostile_names_and_payloads_stay_inert(tmp_path: Path) -> None:
    # A thumbnail folder whose name ImageMagick would read as options, coders and patterns.
    hostile = tmp_path / "-rf" / "msl:x[0]%d" / "@list" / "a b;$(touch pwned)"
    spec = spec_for(hostile, sizes=(256,))
    conversion = convert_file("gps/DSCN0010.jpg", spec, backend="magick")
    thumb = conversion.thumbnails[0]
    assert thumb.path.startswith(str(hostile) + "/") and os.path.isfile(thumb.path)
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()
    # The photo reaches ImageMagick only on stdin, behind an explicit coder.
    argv = magick.command("jpeg", spec, (256, 192), [(256, ".x.tmp")])
    assert "jpeg:-[0]" in argv and not any(str(hostile) in a for a in argv)
    # An MSL script with a JPEG signature is read as a (broken) JPEG, not run.
    marker = tmp_path / "msl-ran.txt"
    script = (
        b'\xff\xd8\xff<?xml version="1.0"?><image><read filename="'
        + str(CORPUS / "gps/DSCN0010.jpg").encode()
        + b'"/><write filename="'
        + str(marker).encode()
        + b'"/></image>'
    )
    with pytest.raises(ConversionError) as caught:
        spec = dataclasses.replace(spec_for(tmp_path / "o"), backend="magick")
        convert(script, spec, format_hint="jpeg")
    assert caught.value.reason in IMAGE_REASONS
    assert not marker.exists()


@needs_magick
def test_magick_runs_under_our_policy(tmp_path: Path) -> None:
    env = magick.child_environment()
    done = subprocess.run(
        [magick.program(), "-list", "policy"], env=env, capture_output=True, text=True, timeout=60
    )
    assert os.path.join(magick.POLICY_DIR, "policy.xml") in done.stdout
    # The module denials hold: an MSL script may not run even when named explicitly.
    script = tmp_path / "x.msl"
    script.write_text("<image/>")
    refused = subprocess.run(
        [magick.program(), f"msl:{script}", "null:"], env=env, capture_output=True, timeout=60
    )
    assert refused.returncode != 0 and b"security policy `MSL'" in refused.stderr
    assert all(missing is None for missing in available_formats("magick").values())


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def test_magick_child_dies_with_its_worker(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from photoscand.converters import magick
        print("ready", flush=True)
        magick.run(["/bin/sleep", "60"], b"", cwd={str(tmp_path)!r})
        """
    )
    worker = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert worker.stdout is not None and worker.stdout.readline() == b"ready\n"
        wait_for(lambda: _children(worker.pid), timeout=20, message="ImageMagick child started")
        (child,) = _children(worker.pid)
        assert os.getpgid(child) == child  # its own process group
        worker.kill()
        worker.wait(timeout=20)
        wait_for(lambda: not _alive(child), timeout=20, message="child died with the worker")
    finally:
        worker.kill()
        worker.wait()


def _processes_with_argument(argument: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if argument in fh.read().split(b"\0") and _alive(int(entry)):
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_magick_child_is_killed_when_the_worker_gives_up(tmp_path: Path) -> None:
    marker = f"{60 + os.getpid() % 1000 / 1000:.3f}"  # a sleep only this test starts
    started = time.monotonic()
    with pytest.raises(ConversionError) as caught:
        magick.run(["/bin/sh", "-c", f"sleep {marker} & wait"], b"", str(tmp_path), timeout=0.5)
    assert caught.value.reason == outcomes.TIMEOUT
    assert time.monotonic() - started < 10
    # The whole process group went, the shell's own child (the sleep) included.
    wait_for(
        lambda: not _processes_with_argument(marker.encode()),
        timeout=10,
        message="no sleep left behind",
    )


def test_magick_error_messages_map_to_reasons() -> None:
    where = " `x' @ error/coder.c/Read/1."
    cases = {
        "convert: width or height exceeds limit": "too_large",
        "convert: insufficient image data in file": "truncated",
        "convert: no decode delegate for this image format": "unsupported",
        "convert: improper image header": "corrupt",
        "convert: time limit exceeded": "timeout",
    }
    for text, reason in cases.items():
        error = magick.error_for(1, text + where)
        assert error.reason == reason, text
        assert " @ " not in error.message and "`" not in error.message
    assert magick.error_for(-11, "").reason == outcomes.CRASHED


# --------------------------------------------------------------------------- atomic writes


def test_existing_thumbnails_are_reused_without_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = spec_for(tmp_path)
    first = convert_file("cameras/jolla.jpg", spec)
    assert not first.reused
    stamps = {t.path: os.stat(t.path).st_mtime_ns for t in first.thumbnails}

    def no_decoding(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    # The same bytes under another name (a move, a copy): same hash, same thumbnails.
    again = convert((CORPUS / "cameras/jolla.jpg").read_bytes(), spec, format_hint="jpeg")
    assert again.reused and again.content_hash == first.content_hash
    assert again.thumbnails == first.thumbnails
    assert {t.path: os.stat(t.path).st_mtime_ns for t in again.thumbnails} == stamps
    monkeypatch.undo()
    # One missing size means a conversion (of every size).
    os.unlink(first.thumbnails[0].path)
    redone = convert_file("cameras/jolla.jpg", spec)
    assert not redone.reused and redone.thumbnails == first.thumbnails
    forced = convert((CORPUS / "cameras/jolla.jpg").read_bytes(), spec, reuse_existing=False)
    assert not forced.reused
    assert no_temp_files(tmp_path) == []


def test_a_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    blocker = tmp_path / "thumbs"
    blocker.write_bytes(b"a file where the folder should be")
    with pytest.raises(ConversionError) as caught:
        convert_file("gps/DSCN0010.jpg", spec_for(blocker))
    assert caught.value.reason == outcomes.IO_ERROR
    assert str(blocker) in caught.value.message


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True, timeout=30,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")


def _unmount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, timeout=30)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_thumbnail_disk_is_disk_full_and_leaves_no_temp_files(
    backend: str, tmp_path: Path
) -> None:
    if backend == "magick" and magick.program() is None:
        pytest.skip("ImageMagick not installed")
    small = tmp_path / "small"
    _mount_tmpfs(small, "size=64k")
    try:
        with pytest.raises(ConversionError) as caught:
            convert_file("cameras/jolla.jpg", spec_for(small, quality=95), backend=backend)
        assert caught.value.reason == outcomes.DISK_FULL
        assert str(small) in caught.value.message
        assert no_temp_files(small) == []
        assert [p for p in small.rglob("*") if p.is_file()] == []
    finally:
        _unmount(small)


def test_read_only_thumbnail_folder_is_an_io_error_naming_it(tmp_path: Path) -> None:
    frozen = tmp_path / "frozen"
    _mount_tmpfs(frozen, "ro,size=64k")
    try:
        with pytest.raises(ConversionError) as caught:
            convert_file("gps/DSCN0010.jpg", spec_for(frozen))
        assert caught.value.reason == outcomes.IO_ERROR
        assert str(frozen) in caught.value.message and "Read-only" in caught.value.message
    finally:
        _unmount(frozen)


def test_conversion_error_pickles_for_the_worker_pipe() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(ConversionError(outcomes.TRUNCATED, "ends early")))
    assert (error.reason, error.message) == (outcomes.TRUNCATED, "ends early")
    assert str(error) == "truncated: ends early"
    with pytest.raises(ValueError):
        ConversionError("exploded", "not a reason word")


def test_stale_temp_files_are_swept(tmp_path: Path) -> None:
    conversion = convert_file("gps/DSCN0010.jpg", spec_for(tmp_path))
    folder = Path(conversion.thumbnails[0].path).parent
    stale = Path(output.temp_name(conversion.thumbnails[0].path))
    stale.write_bytes(b"half a thumbnail")
    assert output.remove_stale_temp_files(str(tmp_path)) == 1
    assert not stale.exists() and len(list(folder.iterdir())) == 2
