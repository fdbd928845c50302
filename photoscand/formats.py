"""Which files are photos: extensions, content signatures and temporary names.

Shared by phase 1 (which files get a row, the ``format`` column) and phase 2 (which
decoder to use). Pure functions over names and the first bytes of a file; no I/O.
"""

from __future__ import annotations

import os

# Extensions that make a file a photo (docs/architecture.md, "Which files are photos"),
# lower case, no dot.
PHOTO_EXTENSIONS: frozenset[str] = frozenset(
    "jpg jpeg jpe png tif tiff webp gif heic heif hif avif dng cr2 cr3 crw nef nrw arw srf "
    "sr2 orf rw2 raf pef srw x3f mrw 3fr erf kdc dcr iiq".split()
)

# Camera RAW formats whose container is TIFF: the signature says "tiff", the extension
# says which camera format it is.
TIFF_BASED_RAW: frozenset[str] = frozenset(
    "dng cr2 nef nrw arw srf sr2 pef srw 3fr erf kdc dcr iiq".split()
)

RAW_FORMATS: frozenset[str] = TIFF_BASED_RAW | frozenset("cr3 crw orf rw2 raf x3f mrw".split())

# Extensions (normalised) that map to a format name different from the extension.
_EXTENSION_FORMAT: dict[str, str] = {
    "jpg": "jpeg",
    "jpe": "jpeg",
    "tif": "tiff",
    "heic": "heif",
    "hif": "heif",
}

# Suffixes of names that are still being written by a downloader or a copy tool.
TEMPORARY_SUFFIXES: tuple[bytes, ...] = (b".part", b".tmp", b".crdownload", b".partial", b"~")

# How many leading bytes ``sniff_format`` needs.
SNIFF_BYTES = 64

_HEIF_BRANDS = frozenset(b"heic heix hevc hevx heim heis hevm hevs mif1 msf1 mif2 miaf".split())
_AVIF_BRANDS = frozenset((b"avif", b"avis"))


def extension(name: bytes | str) -> str:
    """The lower-case extension of a file name, without the dot ('' if none)."""
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    base = name.rsplit("/", 1)[-1]
    if "." not in base:
        return ""
    return base.rsplit(".", 1)[-1].lower()


def has_photo_extension(name: bytes | str) -> bool:
    """True when the name ends in one of the photo extensions."""
    return extension(name) in PHOTO_EXTENSIONS


def format_from_extension(name: bytes | str) -> str | None:
    """The format a name claims, or None when its extension is not a photo's."""
    ext = extension(name)
    if ext not in PHOTO_EXTENSIONS:
        return None
    return _EXTENSION_FORMAT.get(ext, ext)


def is_temporary_name(name: bytes | str) -> bool:
    """True for names that copy tools use while a file is incomplete.

    Hidden names (``.*``) cover rsync's ``.name.XXXXXX`` and most atomic-rename
    writers; the suffixes cover browsers and download managers.
    """
    if isinstance(name, str):
        name = os.fsencode(name)
    base = name.rsplit(b"/", 1)[-1]
    if base.startswith(b"."):
        return True
    lower = base.lower()
    return lower.endswith(TEMPORARY_SUFFIXES)


def _iso_bmff_brand(head: bytes) -> str | None:
    """'heif' or 'avif' for an ISO-BMFF file whose ftyp names an image brand."""
    if len(head) < 12 or head[4:8] != b"ftyp":
        return None
    box_size = int.from_bytes(head[0:4], "big")
    major = head[8:12]
    end = min(len(head), box_size if box_size >= 16 else len(head))
    compatible = [head[i : i + 4] for i in range(16, end - 3, 4)]
    if major in _AVIF_BRANDS:
        return "avif"
    if major == b"crx ":
        return "cr3"
    if major in _HEIF_BRANDS:
        # A mif1 file whose compatible brands say AVIF holds AV1 pictures.
        if major in (b"mif1", b"msf1") and any(b in _AVIF_BRANDS for b in compatible):
            return "avif"
        return "heif"
    if any(b in _AVIF_BRANDS for b in compatible):
        return "avif"
    if any(b in _HEIF_BRANDS for b in compatible):
        return "heif"
    return None


def sniff_format(head: bytes) -> str | None:
    """The format named by a file's first bytes, or None when no photo signature matches.

    TIFF-based RAW files (DNG, NEF, ARW, ...) answer "tiff" except CR2, whose header
    carries its own marker; use :func:`detect_format` to take the extension into account.
    """
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        if head[8:10] == b"CR":
            return "cr2"
        return "tiff"
    if head.startswith((b"II+\x00", b"MM\x00+")):
        return "tiff"  # BigTIFF
    if head.startswith((b"IIRO", b"IIRS", b"MMOR")):
        return "orf"
    if head.startswith(b"IIU\x00"):
        return "rw2"
    if head.startswith(b"FUJIFILMCCD-RAW"):
        return "raf"
    if head.startswith(b"II\x1a\x00\x00\x00HEAPCCDR"):
        return "crw"
    if head.startswith(b"FOVb"):
        return "x3f"
    if head.startswith(b"\x00MRM"):
        return "mrw"
    return _iso_bmff_brand(head)


def detect_format(name: bytes | str, head: bytes) -> str | None:
    """The catalog's ``format`` for a file: its signature, refined by its extension.

    Returns None when neither the signature nor the extension is a photo's. A file whose
    extension is a photo's but whose bytes match no signature gets the extension's format
    (it will fail in phase 2 with a reason).
    """
    sniffed = sniff_format(head)
    claimed = format_from_extension(name)
    if sniffed == "tiff" and claimed in TIFF_BASED_RAW:
        return claimed
    if sniffed is not None:
        return sniffed
    return claimed
