"""Tests for photoscand.formats: signatures, extensions, the format column and temporary names."""

from __future__ import annotations

from pathlib import Path

import pytest

from photoscand.formats import (
    PHOTO_EXTENSIONS,
    RAW_FORMATS,
    SNIFF_BYTES,
    TIFF_BASED_RAW,
    detect_format,
    extension,
    format_from_extension,
    has_photo_extension,
    is_temporary_name,
    sniff_format,
)


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    """An ISO-BMFF ftyp box followed by the start of a meta box."""
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x20meta"


SIGNATURES = [
    (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "jpeg"),
    (b"\xff\xd8\xff\xe1\x12\x34Exif\x00\x00", "jpeg"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR", "png"),
    (b"GIF87a\x10\x00\x10\x00", "gif"),
    (b"GIF89a\x10\x00\x10\x00", "gif"),
    (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "webp"),
    (b"II*\x00\x08\x00\x00\x00", "tiff"),
    (b"MM\x00*\x00\x00\x00\x08", "tiff"),
    (b"II*\x00\x10\x00\x00\x00CR\x02\x00", "cr2"),
    (b"II+\x00\x08\x00\x00\x00\x10\x00\x00\x00\x00\x00\x00\x00", "tiff"),
    (b"MM\x00+\x00\x08\x00\x00", "tiff"),
    (b"IIRO\x08\x00\x00\x00", "orf"),
    (b"IIRS\x08\x00\x00\x00", "orf"),
    (b"MMOR\x00\x00\x00\x08", "orf"),
    (b"IIU\x00\x18\x00\x00\x00", "rw2"),
    (b"FUJIFILMCCD-RAW 0201FF383501", "raf"),
    (b"II\x1a\x00\x00\x00HEAPCCDR\x00\x00\x01\x00", "crw"),
    (b"FOVb\x00\x00\x02\x00", "x3f"),
    (b"\x00MRM\x00\x00\x10\x00", "mrw"),
    (ftyp(b"heic", b"mif1", b"heic"), "heif"),
    (ftyp(b"heix", b"mif1"), "heif"),
    (ftyp(b"mif1", b"mif1", b"heic"), "heif"),
    (ftyp(b"msf1", b"msf1", b"hevc"), "heif"),
    (ftyp(b"avif", b"mif1", b"avif"), "avif"),
    (ftyp(b"avis", b"msf1", b"avis"), "avif"),
    (ftyp(b"mif1", b"mif1", b"avif", b"miaf"), "avif"),
    (ftyp(b"crx ", b"crx ", b"isom"), "cr3"),
]

NOT_PHOTOS = [
    b"",
    b"\xff\xd8",  # too short to say JPEG
    b"hello, world\n",
    b"%PDF-1.7\n",
    b"PK\x03\x04\x14\x00",
    b"RIFF\x24\x00\x00\x00WAVEfmt ",
    ftyp(b"isom", b"isom", b"mp41"),  # a video
    ftyp(b"qt  ", b"qt  "),
    b"\x00\x00\x00\x0cjP  \r\n\x87\n",  # JPEG 2000 is not on the list
]


@pytest.mark.parametrize(("head", "expected"), SIGNATURES)
def test_each_signature_is_sniffed(head: bytes, expected: str) -> None:
    assert sniff_format(head) == expected
    # The same answer from only the first SNIFF_BYTES, as callers read no more.
    assert sniff_format((head + bytes(100))[:SNIFF_BYTES]) == expected


@pytest.mark.parametrize("head", NOT_PHOTOS)
def test_other_bytes_have_no_photo_signature(head: bytes) -> None:
    assert sniff_format(head) is None
    assert detect_format(b"notes.bin", head) is None


def test_ftyp_with_a_box_size_too_small_still_reads_the_major_brand() -> None:
    head = (8).to_bytes(4, "big") + b"ftypheic" + bytes(20)
    assert sniff_format(head) == "heif"


@pytest.mark.parametrize("ext", sorted(TIFF_BASED_RAW))
def test_tiff_based_raw_extensions_name_the_format(ext: str) -> None:
    tiff = b"II*\x00\x08\x00\x00\x00"
    assert detect_format(f"/photos/IMG_0001.{ext}".encode(), tiff) == ext
    assert detect_format(f"/photos/IMG_0001.{ext.upper()}".encode(), tiff) == ext


def test_cr2_header_wins_over_its_extension_and_tiff_over_a_wrong_one() -> None:
    cr2 = b"II*\x00\x10\x00\x00\x00CR\x02\x00"
    assert detect_format(b"a.cr2", cr2) == "cr2"
    assert detect_format(b"a.tif", cr2) == "cr2"
    assert detect_format(b"a.jpg", b"II*\x00\x08\x00\x00\x00") == "tiff"
    assert detect_format(b"a.heic", b"MM\x00*\x00\x00\x00\x08") == "tiff"


def test_content_wins_over_a_misleading_extension() -> None:
    jpeg = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00"
    png = b"\x89PNG\r\n\x1a\n"
    assert detect_format(b"holiday.png", jpeg) == "jpeg"
    assert detect_format(b"holiday.jpg", png) == "png"
    assert detect_format(b"holiday.txt", jpeg) == "jpeg"
    assert detect_format(b"holiday", png) == "png"


def test_a_photo_extension_without_a_signature_keeps_the_extensions_format() -> None:
    garbage = b"\x00\x01\x02 not an image at all"
    assert detect_format(b"a.jpg", garbage) == "jpeg"
    assert detect_format(b"a.JPE", garbage) == "jpeg"
    assert detect_format(b"a.tif", garbage) == "tiff"
    assert detect_format(b"a.HEIC", garbage) == "heif"
    assert detect_format(b"a.hif", garbage) == "heif"
    assert detect_format(b"a.avif", garbage) == "avif"
    assert detect_format(b"a.orf", b"") == "orf"
    assert detect_format(b"a.txt", garbage) is None
    assert detect_format(b"a", b"") is None


def test_extension_handles_bytes_str_folders_and_undecodable_names() -> None:
    assert extension(b"/a/b/IMG.JPG") == "jpg"
    assert extension("/a/b/IMG.JPG") == "jpg"
    assert extension(b"/a.b/IMG") == ""  # a dot in a folder is no extension
    assert extension(b"/a/.hidden") == "hidden"
    assert extension(b"/a/caf\xe9.Jpeg") == "jpeg"  # Latin-1 name, not UTF-8
    assert extension(b"/a/line\nbreak.png") == "png"
    assert has_photo_extension(b"/x/\xff\xfe.nef")
    assert not has_photo_extension(b"/x/photo.jpg.xmp")
    assert format_from_extension(b"x.tiff") == "tiff"
    assert format_from_extension(b"x.dng") == "dng"
    assert format_from_extension(b"x.xmp") is None


def test_the_extension_list_is_the_designs() -> None:
    # docs/architecture.md, "Which files are photos".
    design = (
        "jpg jpeg jpe png tif tiff webp gif heic heif hif avif dng cr2 cr3 crw nef nrw arw srf "
        "sr2 orf rw2 raf pef srw x3f mrw 3fr erf kdc dcr iiq"
    )
    assert set(design.split()) == PHOTO_EXTENSIONS
    assert TIFF_BASED_RAW <= RAW_FORMATS
    assert all(format_from_extension(f"x.{ext}") is not None for ext in PHOTO_EXTENSIONS)


@pytest.mark.parametrize(
    ("name", "temporary"),
    [
        (b"/p/.IMG_0001.JPG.abc123", True),  # rsync's temporary name
        (b"/p/.hidden.jpg", True),
        (b"/p/IMG_0001.JPG.part", True),
        (b"/p/IMG_0001.JPG.PART", True),
        (b"/p/IMG_0001.jpg.tmp", True),
        (b"/p/IMG_0001.jpg.crdownload", True),
        (b"/p/IMG_0001.jpg.partial", True),
        (b"/p/IMG_0001.jpg~", True),
        ("/p/IMG_0001.jpg.part", True),
        (b"/p/IMG_0001.JPG", False),
        (b"/p/.folder/IMG_0001.JPG", False),  # only the file's own name counts
        (b"/p/x.part/IMG_0001.JPG", False),
        (b"/p/partial.jpg", False),
        (b"/p/\xff\xfe.jpg", False),
    ],
)
def test_temporary_names(name: bytes | str, temporary: bool) -> None:
    assert is_temporary_name(name) is temporary


# exiftool's FileType in MANIFEST.csv -> the format column for files of that type.
_EXIFTOOL_TYPES = {
    "JPEG": "jpeg", "MPO": "jpeg", "PNG": "png", "APNG": "png", "GIF": "gif", "WEBP": "webp",
    "Extended WEBP": "webp", "TIFF": "tiff", "BTF": "tiff", "HEIC": "heif", "HEIF": "heif",
    "AVIF": "avif", "CR2": "cr2", "CR3": "cr3", "CRW": "crw", "ARW": "arw", "NEF": "nef",
    "DNG": "dng", "RW2": "rw2", "RAW": "rw2", "ORF": "orf", "RAF": "raf",
}  # fmt: skip


def test_detect_format_agrees_with_exiftool_on_the_corpus(
    corpus_dir: Path, manifest: list[dict[str, str]]
) -> None:
    checked = 0
    for row in manifest:
        expected = _EXIFTOOL_TYPES.get(row["FileType"])
        if expected is None:
            continue  # EXV, JP2, MP4, JSON or unreadable: not photos by content
        path = corpus_dir / row["path"]
        with open(path, "rb") as fh:
            head = fh.read(SNIFF_BYTES)
        assert detect_format(bytes(path), head) == expected, row["path"]
        checked += 1
    assert checked > 280
