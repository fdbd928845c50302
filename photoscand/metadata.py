"""Phase 1's parser: a photo's format, stored pixel size and EXIF fields, from the few bytes
that hold them.

The input is hostile (truncated, fuzzed, lying about its own offsets): every parse problem becomes
data in ``PhotoMetadata.metadata_error`` and only an ``OSError`` (cannot open or read the file)
escapes; loops are bounded, and the caller runs this in a killable process for whatever is left.

Which value wins where a file holds several:

- ``width``/``height`` come from the image header, never from EXIF tags: JPEG SOF (the first
  frame of an MPO), PNG IHDR, GIF logical screen, WebP VP8/VP8L/VP8X, TIFF IFD0 (also BigTIFF).
  HEIF/AVIF: the primary item's ``ispe`` after its ``clap`` crop and ``irot`` rotation, which is
  the size the decoder delivers. RAW: the raw image size as exiftool reports it: for TIFF-based RAW
  the IFD (IFD0 or a SubIFD) that NewSubfileType 0 marks full-resolution, else IFD0; CR2 the Exif
  IFD's ExifImageWidth/Height (its raw IFD has no size tags); CR3 the CMT1 IFD0; RW2 the sensor
  borders; RAF the RawImageCroppedSize record; CRW the CIFF ImageInfo record.
- ``taken_at``: EXIF DateTimeOriginal (0x9003 in the Exif IFD, else in IFD0, where some RAW
  writers put it), to the second; SubSecTimeOriginal stays in ``exif`` only, so that every
  ``taken_at`` has the same shape. The UTC offset is the one written inside the value itself
  (``Z``/``+02:00``, as some writers do), else OffsetTimeOriginal (0x9011); OffsetTime (0x9010)
  belongs to DateTime and is not used. No fallback to DateTimeDigitized (for a scan, the scan
  date), to DateTime (the last edit) or to the file's mtime: without a capture date it is null.
  CRW: the CIFF TimeStamp record, also when a Canon JPEG carries CIFF in APP0.
- ``orientation``: IFD0's Orientation when it is 1..8. HEIF/AVIF: 1 whenever the file states an
  orientation, because there the container's ``irot``/``imir`` are authoritative and the decoder
  has applied them already (pillow-heif resets the EXIF value to 1 too); the original stays in
  ``exif``.
- XMP stands in where EXIF lacks a value (Lightroom exports, PNG and WebP files): tiff:Orientation
  (Pillow's ``exif_transpose`` honours it too), tiff:Make, tiff:Model, exif:DateTimeOriginal and
  exif:GPSLatitude/Longitude. EXIF always wins when both exist.
- ``iso``: ISOSpeedRatings, except when it holds the 65535 overflow marker and
  RecommendedExposureIndex or ISOSpeed has the real value. ``exposure_time``/``f_number``:
  ExposureTime/FNumber, else the APEX ShutterSpeedValue/ApertureValue. ``lens``: LensModel.
- GPS: the GPS IFD's Latitude/Longitude with their N/S/E/W references (no reference means
  positive); both or neither, out-of-range values dropped. Altitude with AltitudeRef 1 meaning
  below sea level.
- ``exif``: every tag exifread reads with ``details=False`` (IFD0 as ``Image``, IFD1 as
  ``Thumbnail``, Exif, GPS, Interoperability), as ``"<IFD> <Tag>": printable``; binary blobs
  (ICC profiles, PrintIM, JPEG tables) are dropped and sizes capped. Our own parsers add
  ``CIFF ...`` records (CRW) and IFD0's size and orientation for BigTIFF.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import html
import io
import json
import logging
import math
import os
import re
import stat
import struct
import zlib
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from fractions import Fraction
from typing import BinaryIO

from exifread.core.exif_header import ExifHeader
from exifread.core.ifd_tag import IfdTag
from exifread.tags import DEFAULT_STOP_TAG, IGNORE_TAGS
from exifread.tags.exif import EXIF_TAGS, GPS_TAGS, INTEROP_TAGS
from exifread.tags.fields import FIELD_DEFINITIONS, FieldType

from photoscand.formats import RAW_FORMATS, SNIFF_BYTES, detect_format, sniff_format
from photoscand.outcomes import CORRUPT, TRUNCATED, UNSUPPORTED, format_error
from photoscand.protocol import PhotoMetadata

# exifread logs a warning for every odd field it meets; on hostile input that is a flood on the
# metadata process's stderr, and every such problem already ends up in PhotoMetadata.metadata_error.
logging.getLogger("exifread").setLevel(logging.ERROR)

HEAD_BYTES = 64 * 1024  # one read covers the header and EXIF of nearly every JPEG
_MAX_BLOCK = 4 * 1024 * 1024  # largest EXIF/XMP/meta block read into memory
_MAX_HOPS = 20_000  # segments, chunks or boxes walked in one file
_MAX_IFDS = 32  # IFDs followed in one chain (exifread follows loops of distinct IFDs forever)
_MAX_VALUE_CHARS = 300  # longest printable kept per tag in the exif JSON
_MAX_EXIF_CHARS = 64 * 1024  # total size of the exif JSON
_MAX_BLOB = 64  # binary tags longer than this without a readable form are dropped
_MAX_MESSAGE = 400  # longest error message

_SOF_MARKERS = frozenset(
    (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
)
_STANDALONE_MARKERS = frozenset((0x01, 0xD0, 0xD1, 0xD2, 0xD3, 0xD4, 0xD5, 0xD6, 0xD7, 0xD8))
_XMP_APP1 = b"http://ns.adobe.com/xap/1.0/\x00"
# XMP properties read when EXIF lacks them (Lightroom exports, PNG and WebP often carry XMP only).
_XMP_NAMES = {
    "orientation": b"tiff:Orientation",
    "make": b"tiff:Make",
    "model": b"tiff:Model",
    "taken_at": b"exif:DateTimeOriginal",
    "gps_lat": b"exif:GPSLatitude",
    "gps_lon": b"exif:GPSLongitude",
}
_XMP_PATTERNS = {
    key: re.compile(
        rb"[\s<]"
        + name
        + rb"""\s*=\s*(?:"([^"]*)"|'([^']*)')|<"""
        + name
        + rb">([^<]*)</"
        + name
        + rb">"
    )
    for key, name in _XMP_NAMES.items()
}
_ORIENTATIONS = frozenset("12345678")
_XMP_GPS = re.compile(r"\s*(\d+(?:\.\d+)?),(\d+(?:\.\d+)?)(?:,(\d+(?:\.\d+)?))?\s*([NSEW])\s*$")
_DATE = re.compile(
    r"\s*(\d{4})[:\-/.](\d\d)[:\-/.](\d\d)[ T]+(\d\d):(\d\d)(?::(\d\d))?(?:[.,]\d+)?\s*"
    r"(Z|[+-]\d\d:?\d\d)?\s*$"
)
_OFFSET = re.compile(r"\s*([+-])(\d\d):?(\d\d)\s*$")
_CR3_UUID = bytes.fromhex("85c0b687820f11e08111f4ce462b6a48")

# FIEMAP (linux/fiemap.h): struct fiemap is 32 bytes, each struct fiemap_extent 56.
_FS_IOC_FIEMAP = 0xC020660B
_FIEMAP_MAX_OFFSET = 0xFFFFFFFFFFFFFFFF
_FIEMAP_EXTENT_UNKNOWN = 0x2  # no block allocated yet (delayed allocation): no position
_FIEMAP_EXTENT_DELALLOC = 0x4


def read_metadata(path: bytes, data: bytes | memoryview | None = None) -> PhotoMetadata | None:
    """The metadata of the photo at ``path``, or None when the file is not a photo.

    ``data`` holds the file's bytes when they are already in memory (prefetch mode); the file
    is then not opened and ``disk_offset`` stays None. Raises OSError only when the file cannot
    be opened or read; problems inside the file end up in ``metadata_error``.
    """
    if data is not None:
        mem = memoryview(data).cast("B")
        try:
            return _read(path, _Source(-1, mem, len(mem)))
        finally:
            # The caller unmaps its shared memory after this returns: hold no export of it.
            mem.release()
    # O_NONBLOCK: a FIFO that carries a photo's name must not block the open.
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        md = _read(path, _Source(fd, None, st.st_size))
        return None if md is None else replace(md, disk_offset=physical_offset(fd))
    finally:
        os.close(fd)


def physical_offset(fd: int) -> int | None:
    """The byte offset on its device of the file's first extent (FS_IOC_FIEMAP), or None.

    None where the filesystem has no FIEMAP (tmpfs, FUSE, NFS), for an empty file, and for data
    not yet given a place on disk (delayed allocation); callers then order by inode number.
    """
    request = bytearray(32 + 56)
    struct.pack_into("=QQIIII", request, 0, 0, _FIEMAP_MAX_OFFSET, 0, 0, 1, 0)
    try:
        fcntl.ioctl(fd, _FS_IOC_FIEMAP, request)
    except (OSError, ValueError, OverflowError):
        return None
    mapped = struct.unpack_from("=I", request, 20)[0]
    if mapped < 1:
        return None
    physical = struct.unpack_from("=Q", request, 32 + 8)[0]
    flags = struct.unpack_from("=I", request, 32 + 40)[0]
    if flags & (_FIEMAP_EXTENT_UNKNOWN | _FIEMAP_EXTENT_DELALLOC):
        return None
    return physical


# --------------------------------------------------------------------------------------------
# Reading bytes


class _Bad(ValueError):
    """A structure ran past its box or chunk; turned into a problem by the caller."""


class _Source:
    """Random access to a file's bytes: pread on a descriptor, or slices of bytes in memory."""

    __slots__ = ("_fd", "_head", "_mem", "size")

    def __init__(self, fd: int, mem: memoryview | None, size: int) -> None:
        self._fd = fd
        self._mem = mem
        self.size = size
        self._head = b""
        if mem is None and size > 0:
            self._head = self._pread(0, min(size, HEAD_BYTES))

    @property
    def memory(self) -> memoryview | None:
        """The file's bytes when they are in memory (prefetch mode)."""
        return self._mem

    def read(self, offset: int, n: int) -> bytes:
        """Up to ``n`` bytes at ``offset``; fewer at the end of the file, none beyond it."""
        end = min(offset + n, self.size)
        if offset < 0 or offset >= end:
            return b""
        if self._mem is not None:
            return bytes(self._mem[offset:end])
        if end <= len(self._head):
            return self._head[offset:end]
        return self._pread(offset, end - offset)

    def tail(self) -> bytes:
        """The last bytes that a fingerprint covers (none when the head covers the file)."""
        start = max(_PRINT_BYTES, self.size - _PRINT_BYTES)
        return self.read(start, self.size - start)

    def _pread(self, offset: int, n: int) -> bytes:
        # pread may return less than asked (FUSE, signals); loop until EOF or done.
        first = os.pread(self._fd, n, offset)
        if len(first) == n or not first:
            return first
        parts = [first]
        got = len(first)
        while got < n:
            more = os.pread(self._fd, n - got, offset + got)
            if not more:
                break
            parts.append(more)
            got += len(more)
        return b"".join(parts)

    def fileobj(self) -> BinaryIO:
        """A file object over the whole file, for exifread on TIFF-based files."""
        if self._mem is not None:
            return io.BytesIO(self._mem)
        return _CappedReader(io.FileIO(self._fd, closefd=False))


class _CappedReader(io.BufferedReader):
    """A buffered file whose reads are capped: exifread reads a tag's whole declared length,
    and a BufferedReader allocates that much before it reads (4 GiB for a fuzzed count).
    A total budget stops 65535 entries from each reading megabytes."""

    budget = 64 * _MAX_BLOCK

    def read(self, size: int | None = -1, /) -> bytes:
        if size is None or size < 0 or size > _MAX_BLOCK:
            size = _MAX_BLOCK
        self.budget -= size
        if self.budget < 0:
            raise _Bad("EXIF tags claim more data than the file can hold")
        return super().read(size)


class _Cursor:
    """Big-endian reads over a byte string with bounds checks (ISO-BMFF boxes)."""

    __slots__ = ("buf", "end", "pos")

    def __init__(self, buf: bytes, pos: int = 0, end: int | None = None) -> None:
        self.buf = buf
        self.pos = pos
        self.end = len(buf) if end is None else min(end, len(buf))

    def u(self, n: int) -> int:
        if n == 0:
            return 0
        if n not in (1, 2, 4, 8) or self.pos + n > self.end:
            raise _Bad("structure cut short")
        v = int.from_bytes(self.buf[self.pos : self.pos + n], "big")
        self.pos += n
        return v

    def raw(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise _Bad("structure cut short")
        v = self.buf[self.pos : self.pos + n]
        self.pos += n
        return v

    def cstr(self) -> bytes:
        nul = self.buf.find(b"\x00", self.pos, self.end)
        if nul < 0:
            v = self.buf[self.pos : self.end]
            self.pos = self.end
            return v
        v = self.buf[self.pos : nul]
        self.pos = nul + 1
        return v


# --------------------------------------------------------------------------------------------
# The parse state shared by the container parsers


class _Parse:
    """What the container parsers found so far, and what went wrong."""

    __slots__ = ("extra", "fmt", "height", "problems", "src", "tags", "width", "xmp")

    def __init__(self, src: _Source, fmt: str) -> None:
        self.src = src
        self.fmt = fmt
        self.width: int | None = None
        self.height: int | None = None
        self.tags: dict[str, object] = {}  # exifread's "IFD Tag" -> IfdTag
        self.extra: dict[str, str] = {}  # tags our own parsers read (CIFF, BigTIFF)
        self.problems: list[tuple[str, str]] = []
        self.xmp: list[tuple[int, int]] = []  # (offset, length) of XMP packets, read on demand

    def problem(self, reason: str, message: str) -> None:
        if len(self.problems) < 8:
            self.problems.append((reason, message))

    def size(self, width: int | None, height: int | None, what: str) -> None:
        if width is None or height is None:
            return
        if width <= 0 or height <= 0:
            self.problem(CORRUPT, f"{what} says {width}x{height} pixels")
            return
        self.width, self.height = width, height


def _read(path: bytes, src: _Source) -> PhotoMetadata | None:
    head = src.read(0, SNIFF_BYTES)
    fmt = detect_format(path, head)
    if fmt is None:
        return None
    p = _Parse(src, fmt)
    container = sniff_format(head)
    if src.size == 0:
        p.problem(TRUNCATED, "the file is empty")
    elif container is None:
        p.problem(CORRUPT, f"the bytes carry no {fmt.upper()} signature")
    else:
        parser = _PARSERS.get(container)
        if parser is None:
            p.problem(UNSUPPORTED, f"size and EXIF of {container.upper()} files are not read")
        else:
            try:
                parser(p)
            except _Bad as exc:
                p.problem(CORRUPT, str(exc))
    return replace(
        _finish(p), fingerprint=fingerprint(src.read(0, _PRINT_BYTES), src.tail(), src.size)
    )


# How much of each end of a file its fingerprint covers.
_PRINT_BYTES = 4096


def fingerprint(head: bytes, tail: bytes, size: int) -> str:
    """A short digest of a file's size, first and last bytes: what confirms that a new path
    holds the same photo as a row whose file went away (an inode number is handed to the
    next new file once the old one is deleted, and a re-export may keep size and mtime)."""
    digest = hashlib.blake2b(size.to_bytes(8, "little", signed=True), digest_size=16)
    digest.update(head)
    digest.update(tail)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# EXIF through exifread


_UNPACKERS = {
    endian: {
        (length, signed): struct.Struct(("<" if endian == "I" else ">") + code)
        for (length, signed), code in {
            (1, False): "B", (1, True): "b", (2, False): "H", (2, True): "h",
            (4, False): "I", (4, True): "i", (8, False): "Q", (8, True): "q",
        }.items()
    }
    for endian in "IM"
}  # fmt: skip


_FIELD_TYPES = {
    int(kind): (kind, FIELD_DEFINITIONS[kind][0])
    for kind in FieldType
    if kind != FieldType.PROPRIETARY
}


class _ExifReader(ExifHeader):
    """exifread's IFD reader with guards against IFD loops and offsets outside the block.

    When the EXIF block is in memory (``buf``), integers are unpacked straight from it instead
    of a seek and a read per value: exifread's own reader costs more than the rest of phase 1.
    """

    def __init__(
        self,
        fh: BinaryIO,
        endian: str,
        base: int,
        limit: int,
        buf: bytes | memoryview | None = None,
    ) -> None:
        super().__init__(fh, endian, base, 0, False, debug=False, detailed=False)
        self.limit = limit  # bytes available after ``base``
        self.seen: set[int] = set()
        self.notes: list[str] = []
        self.buf = buf
        self.unpackers = _UNPACKERS["I" if endian == "I" else "M"]

    def s2n(self, offset: int, length: int, signed: bool = False) -> int:
        buf = self.buf
        if buf is None:
            return super().s2n(offset, length, signed)
        unpacker = self.unpackers.get((length, signed))
        if unpacker is None:
            raise ValueError(f"unexpected unpacking length: {length}")
        start = self.offset + offset
        if start < 0:
            raise ValueError(f"negative offset {start}")
        if start + length > len(buf):
            return 0  # as exifread: a short read counts as zero
        return unpacker.unpack_from(buf, start)[0]

    def _process_tag(
        self,
        ifd: int,
        ifd_name: str,
        tag_entry: tuple | None,
        entry: int,
        tag: int,
        tag_name: str,
        relative: int,
        stop_tag: str,
    ) -> None:
        # exifread's, less the repr() it formats for a debug line on every tag (a tenth of
        # the parse) and the relative offsets of MakerNotes, which details=False never reads.
        known = _FIELD_TYPES.get(self.s2n(entry + 2, 2))
        if known is None:
            return  # unknown or proprietary type: exifread skips it too
        field_type, type_length = known
        count = self.s2n(entry + 4, 4)
        offset = entry + 8
        if count * type_length > 4:  # else the value sits in the entry itself
            offset = self.s2n(offset, 4)
        if field_type == FieldType.ASCII:
            values = self._process_ascii_field(ifd_name, tag_name, count, offset)
        else:
            values = self._process_field(tag_name, count, field_type, type_length, offset)
        printable, prefer_printable = self._get_printable_for_field(
            count, values, field_type, tag_entry, stop_tag
        )
        self.tags[f"{ifd_name} {tag_name}"] = IfdTag(
            printable, tag, field_type, values, offset, count * type_length, prefer_printable
        )

    def list_ifd(self) -> list[int]:
        ifds: list[int] = []
        ifd = self._first_ifd()
        while ifd and len(ifds) < _MAX_IFDS:
            if ifd in ifds:
                self.notes.append("the IFD chain loops")
                break
            ifds.append(ifd)
            ifd = self._next_ifd(ifd)
        return ifds

    def dump_ifd(
        self,
        ifd: int,
        ifd_name: str,
        tag_dict: dict | None = None,
        relative: int = 0,
        stop_tag: str = DEFAULT_STOP_TAG,
    ) -> None:
        # exifread follows sub-IFD pointers recursively and trusts them: a pointer back to an
        # IFD already read loops, and one past the block reads zeros for 65535 entries.
        if ifd == 0:  # "no such IFD"
            return
        if type(ifd) is not int or ifd < 2 or ifd + 2 > self.limit:
            self.notes.append(f"{ifd_name} IFD offset {ifd!r} lies outside the EXIF data")
            return
        if ifd in self.seen:
            self.notes.append(f"{ifd_name} IFD at {ifd} is referenced twice")
            return
        self.seen.add(ifd)
        # exifread's own loop, but over the entries that fit in the data: a fuzzed count
        # makes it read zeros for up to 65535 entries.
        if tag_dict is None:
            tag_dict = EXIF_TAGS
        entries = self.s2n(ifd, 2)
        room = (self.limit - ifd - 2) // 12
        if entries > room:
            self.notes.append(f"{ifd_name} IFD claims {entries} entries, room for {room}")
            entries = room
        for i in range(entries):
            entry = ifd + 2 + 12 * i
            tag = self.s2n(entry, 2)
            if tag in IGNORE_TAGS:  # MakerNote, UserComment, XMP: what details=False skips
                continue
            tag_entry = tag_dict.get(tag)
            tag_name = tag_entry[0] if tag_entry else f"Tag 0x{tag:04X}"
            try:
                self._process_tag(
                    ifd, ifd_name, tag_entry, entry, tag, tag_name, relative, stop_tag
                )
            except Exception as exc:
                # One tag's hostile value (exifread's printers raise TypeError, IndexError,
                # ...) costs that tag, not the rest of its IFD.
                _reraise_io_error(exc)
                self.notes.append(f"{ifd_name} {tag_name}: {type(exc).__name__}: {exc}")


def _is_offset(tag: object) -> bool:
    values = tag.values if isinstance(tag, IfdTag) else None
    return isinstance(values, list) and bool(values) and type(values[0]) is int


def _pointer(reader: _ExifReader, tag: object) -> int | None:
    """The IFD offset a pointer tag holds, also when it was written with a wrong type.

    exiftool reads the 4-byte value field as an offset whatever the type says; exifread then
    holds a string and gives up on the whole sub-IFD.
    """
    if not isinstance(tag, IfdTag):
        return None
    if _is_offset(tag):
        return tag.values[0]
    if 0 < tag.field_length <= 4 and type(tag.field_offset) is int:
        return reader.s2n(tag.field_offset, 4)
    return None


def _reraise_io_error(exc: Exception) -> None:
    # An OSError from the real file (EIO, ESTALE) means it cannot be read: the caller's
    # business. exifread's seeks to hostile offsets raise EINVAL, which is the file's fault.
    if isinstance(exc, OSError) and exc.errno not in (None, errno.EINVAL):
        raise exc


def _exif_failure(p: _Parse, where: str, exc: Exception) -> None:
    _reraise_io_error(exc)
    p.problem(CORRUPT, f"EXIF {where}: {type(exc).__name__}: {exc}")


def _exif_tiff(
    p: _Parse,
    fh: BinaryIO,
    limit: int,
    base: int = 0,
    kind: str = "main",
    buf: bytes | memoryview | None = None,
) -> None:
    """Read the TIFF structure at ``base`` in ``fh`` with exifread, merging tags into ``p``.

    ``kind`` is "main" (IFD0 chain, then the Exif IFD), "exif" (the first IFD is an Exif IFD)
    or "gps" (the first IFD is a GPS IFD), the last two for CR3's CMT2/CMT4 boxes.
    """
    fh.seek(base)
    header = fh.read(8)
    if len(header) < 8 or header[:2] not in (b"II", b"MM"):
        p.problem(CORRUPT, "the EXIF data has no TIFF header")
        return
    reader = _ExifReader(fh, chr(header[0]), base, limit, buf)
    try:
        if kind == "main":
            ifds = reader.list_ifd()
            for index, ifd in enumerate(ifds):
                name = ("Image", "Thumbnail")[index] if index < 2 else f"IFD {index}"
                try:
                    reader.dump_ifd(ifd, name)
                except Exception as exc:
                    _exif_failure(p, f"{name} IFD", exc)
            # exifread follows the GPS and Interoperability pointers itself when they hold
            # a proper offset; the Exif IFD, and pointers written with a wrong type, are ours.
            for holder, name, tag_dict in (
                ("Image ExifOffset", "EXIF", None),
                ("Image GPSInfo", "GPS", GPS_TAGS),
                ("EXIF InteroperabilityOffset", "Interoperability", INTEROP_TAGS),
            ):
                pointer_tag = reader.tags.get(holder)
                if pointer_tag is None or (name != "EXIF" and _is_offset(pointer_tag)):
                    continue
                offset = _pointer(reader, pointer_tag)
                if offset:
                    try:
                        reader.dump_ifd(offset, name, tag_dict)
                    except Exception as exc:
                        _exif_failure(p, f"{name} IFD", exc)
        else:
            first = reader._first_ifd()
            if kind == "exif":
                reader.dump_ifd(first, "EXIF")
            else:
                reader.dump_ifd(first, "GPS", GPS_TAGS)
    except Exception as exc:
        _exif_failure(p, "IFD chain", exc)
    for note in reader.notes[:3]:
        p.problem(CORRUPT, f"EXIF: {note}")
    for name, tag in reader.tags.items():
        p.tags.setdefault(name, tag)


def _exif_block(p: _Parse, block: bytes, where: str) -> None:
    """EXIF held in memory: a TIFF header and IFDs, possibly behind an "Exif\\0\\0" prefix."""
    if block[:4] == b"Exif":
        block = block[6:]
    if block[:2] not in (b"II", b"MM"):
        p.problem(CORRUPT, f"the EXIF data in the {where} has no TIFF header")
        return
    _exif_tiff(p, io.BytesIO(block), len(block), buf=block)


# --------------------------------------------------------------------------------------------
# JPEG


def _parse_jpeg(p: _Parse) -> None:
    _scan_jpeg(p, 0, p.src.size, want_size=True)


def _jpeg_stray_bytes(p: _Parse, pos: int) -> int | None:
    """How many stray bytes between segments to skip to the next marker (libjpeg skips them
    with a warning, and so does exiftool; so do we, within a bound), or None when none
    follows."""
    window = p.src.read(pos, HEAD_BYTES)
    i = window.find(b"\xff")
    while 0 <= i < len(window) - 1 and window[i + 1] in (0x00, 0xFF):
        i = window.find(b"\xff", i + 1)
    if i < 0 or i >= len(window) - 1:
        p.problem(CORRUPT, f"no JPEG marker after byte {pos}")
        return None
    return i


def _jpeg_frame(p: _Parse, pos: int) -> bool:
    """The size from the SOF segment at ``pos``; False when the file ends inside it."""
    frame = p.src.read(pos + 4, 5)
    if len(frame) < 5:
        p.problem(TRUNCATED, "the JPEG ends inside its frame header")
        return False
    height = frame[1] << 8 | frame[2]
    width = frame[3] << 8 | frame[4]
    if height == 0 and width > 0:
        p.problem(UNSUPPORTED, "the JPEG height is defined later by a DNL marker")
    else:
        p.size(width, height, "the JPEG frame header")
    return True


def _scan_jpeg(p: _Parse, start: int, end: int, want_size: bool) -> None:
    """Walk the JPEG markers from SOI to SOS: the first SOF's size, the first Exif APP1."""
    src = p.src
    pos = start + 2
    found_size = not want_size
    exif_found = ciff_found = False
    for _ in range(_MAX_HOPS):
        b = src.read(pos, 4)
        if len(b) < 2 or pos + 2 > end:
            p.problem(TRUNCATED, "the JPEG ends before its image data")
            break
        if b[0] != 0xFF:
            skip = _jpeg_stray_bytes(p, pos)
            if skip is None:
                break
            pos += skip
            continue
        marker = b[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _STANDALONE_MARKERS:
            pos += 2
            continue
        if marker == 0xD9:  # EOI
            break
        if len(b) < 4:
            p.problem(TRUNCATED, "the JPEG ends inside a marker")
            break
        length = b[2] << 8 | b[3]
        if length < 2:
            p.problem(CORRUPT, f"JPEG segment of length {length} at byte {pos}")
            break
        if marker == 0xDA:  # SOS: the image data follows, no more headers
            break
        if marker in _SOF_MARKERS and not found_size:
            found_size = True
            if not _jpeg_frame(p, pos):
                break
        elif marker == 0xE1:
            tag = src.read(pos + 4, len(_XMP_APP1))
            if not exif_found and tag[:5] == b"Exif\x00":
                exif_found = True
                want = length - 8
                block = src.read(pos + 10, want)
                if len(block) < want or pos + 10 + want > end:
                    p.problem(TRUNCATED, "the JPEG ends inside its EXIF segment")
                _exif_block(p, block, "JPEG APP1 segment")
            elif tag == _XMP_APP1 and not p.xmp:
                p.xmp.append((pos + 4 + len(_XMP_APP1), length - 2 - len(_XMP_APP1)))
        elif marker == 0xE0 and not ciff_found:
            ciff = src.read(pos + 4, 10)
            if ciff[:2] == b"II" and ciff[6:10] == b"HEAP":
                # Canon's early cameras wrote CIFF records, not EXIF, into APP0.
                ciff_found = True
                heap = pos + 4 + int.from_bytes(ciff[2:6], "little")
                _ciff_heap(p, heap, pos + 2 + length, 0, [2000])
        pos += 2 + length
        if found_size and exif_found:
            break
    if not found_size and not any(r == TRUNCATED for r, _ in p.problems):
        p.problem(CORRUPT, "the JPEG has no frame header (SOF)")


# --------------------------------------------------------------------------------------------
# PNG


def _parse_png(p: _Parse) -> None:
    src = p.src
    ihdr = src.read(8, 16)
    if len(ihdr) < 16 or ihdr[4:8] != b"IHDR":
        p.problem(CORRUPT if len(ihdr) == 16 else TRUNCATED, "the PNG has no IHDR chunk")
        return
    width, height = struct.unpack(">II", ihdr[8:16])
    p.size(width, height, "the PNG header")
    exif_chunk: bytes | None = None
    raw_profile: bytes | None = None
    pos = 8
    for _ in range(_MAX_HOPS):
        head = src.read(pos, 8)
        if len(head) < 8:
            p.problem(TRUNCATED, "the PNG ends before its IEND chunk")
            break
        length = int.from_bytes(head[:4], "big")
        kind = head[4:8]
        if length > 0x7FFFFFFF:
            p.problem(CORRUPT, f"PNG chunk of length {length} at byte {pos}")
            break
        if kind == b"IEND":
            break
        data_at = pos + 8
        if data_at + length + 4 > src.size:
            p.problem(TRUNCATED, f"the PNG ends inside its {kind!r} chunk")
        if kind == b"eXIf" and exif_chunk is None:
            exif_chunk = src.read(data_at, min(length, _MAX_BLOCK))
        elif kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword = src.read(data_at, min(length, 80)).split(b"\x00", 1)[0]
            if keyword in (b"Raw profile type exif", b"Raw profile type APP1"):
                if raw_profile is None:
                    raw_profile = _png_raw_profile(
                        p, kind, src.read(data_at, min(length, _MAX_BLOCK))
                    )
            elif keyword == b"XML:com.adobe.xmp" and kind == b"iTXt":
                p.xmp.append((data_at, length))
        pos = data_at + length + 4
    # The eXIf chunk is the standard place; ImageMagick's hex text profile is the older one.
    if exif_chunk is not None:
        _exif_block(p, exif_chunk, "PNG eXIf chunk")
    elif raw_profile is not None:
        _exif_block(p, raw_profile, "PNG text profile")


def _png_raw_profile(p: _Parse, kind: bytes, chunk: bytes) -> bytes | None:
    """The bytes of ImageMagick's "Raw profile type exif" text chunk (hex, maybe zlib)."""
    try:
        _, _, rest = chunk.partition(b"\x00")
        compressed = kind == b"zTXt"
        if kind == b"zTXt":
            rest = rest[1:]
        elif kind == b"iTXt":
            compressed = rest[:1] == b"\x01"
            rest = rest[2:].partition(b"\x00")[2].partition(b"\x00")[2]
        if compressed:
            inflater = zlib.decompressobj()
            rest = inflater.decompress(rest, 4 * _MAX_BLOCK)  # bounded: a zip bomb stops here
        fields = rest.split(None, 2)
        length = int(fields[1])
        digits = re.sub(rb"\s+", b"", fields[2])[: 2 * length]
        return bytes.fromhex(digits.decode("ascii"))
    except (ValueError, IndexError, zlib.error) as exc:
        p.problem(CORRUPT, f"unreadable EXIF text profile in the PNG: {exc}")
        return None


# --------------------------------------------------------------------------------------------
# GIF and WebP


def _parse_gif(p: _Parse) -> None:
    screen = p.src.read(6, 4)
    if len(screen) < 4:
        p.problem(TRUNCATED, "the GIF ends inside its header")
        return
    width, height = struct.unpack("<HH", screen)
    p.size(width, height, "the GIF screen descriptor")


def _parse_webp(p: _Parse) -> None:
    src = p.src
    end = min(src.size, 8 + int.from_bytes(src.read(4, 4), "little"))
    pos = 12
    first = True
    exif_found = False
    for _ in range(_MAX_HOPS):
        head = src.read(pos, 8)
        if len(head) < 8 or pos + 8 > end:
            if first:
                p.problem(TRUNCATED, "the WebP file has no image chunk")
            break
        kind = head[:4]
        length = int.from_bytes(head[4:8], "little")
        data_at = pos + 8
        if first:
            first = False
            frame = src.read(data_at, 10)
            if kind == b"VP8 " and len(frame) >= 10 and frame[3:6] == b"\x9d\x01\x2a":
                width, height = struct.unpack("<HH", frame[6:10])
                p.size(width & 0x3FFF, height & 0x3FFF, "the VP8 frame header")
                return  # the simple format holds no metadata
            if kind == b"VP8L" and len(frame) >= 5 and frame[0] == 0x2F:
                bits = int.from_bytes(frame[1:5], "little")
                p.size((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1, "the VP8L header")
                return
            if kind == b"VP8X" and len(frame) >= 10:
                width = 1 + int.from_bytes(frame[4:7], "little")
                height = 1 + int.from_bytes(frame[7:10], "little")
                p.size(width, height, "the VP8X header")
            else:
                p.problem(CORRUPT, f"the WebP file starts with a {kind!r} chunk")
                return
        elif kind == b"EXIF" and not exif_found:
            exif_found = True
            block = src.read(data_at, min(length, _MAX_BLOCK))
            if len(block) < length:
                p.problem(TRUNCATED, "the WebP file ends inside its EXIF chunk")
            _exif_block(p, block, "WebP EXIF chunk")
        elif kind == b"XMP ":
            p.xmp.append((data_at, length))
        pos = data_at + length + (length & 1)


# --------------------------------------------------------------------------------------------
# TIFF and TIFF-based RAW

_TIFF_TYPES = {1: ("B", 1), 3: ("H", 2), 4: ("I", 4), 8: ("h", 2), 9: ("i", 4), 13: ("I", 4),
               16: ("Q", 8), 18: ("Q", 8)}  # fmt: skip
_SIZE_TAGS = frozenset((0x0002, 0x0003, 0x0004, 0x0005, 0x0006, 0x0007, 0x00FE, 0x0100, 0x0101,
                        0x0112, 0x014A, 0x8769, 0x8825))  # fmt: skip


def _tiff_ifd(src: _Source, little: bool, big: bool, offset: int) -> dict[int, list[int]]:
    """The integer tags of one IFD that size detection needs (classic TIFF or BigTIFF)."""
    e = "<" if little else ">"
    count_size, entry_size, value_size = (8, 20, 8) if big else (2, 12, 4)
    raw_count = src.read(offset, count_size)
    if len(raw_count) < count_size:
        return {}
    entries = min(int.from_bytes(raw_count, "little" if little else "big"), 4096)
    table = src.read(offset + count_size, entries * entry_size)
    out: dict[int, list[int]] = {}
    for i in range(len(table) // entry_size):
        at = i * entry_size
        tag, kind = struct.unpack_from(e + "HH", table, at)
        if tag not in _SIZE_TAGS or kind not in _TIFF_TYPES:
            continue
        fmt, size = _TIFF_TYPES[kind]
        count = struct.unpack_from(e + ("Q" if big else "I"), table, at + 4)[0]
        count = min(count, 16)
        value_at = at + 4 + value_size
        if count * size <= value_size:
            data = table[value_at : value_at + count * size]
        else:
            pointer = struct.unpack_from(e + ("Q" if big else "I"), table, value_at)[0]
            data = src.read(pointer, count * size)
        out[tag] = [
            struct.unpack_from(e + fmt, data, k * size)[0] for k in range(len(data) // size)
        ]
    return out


def _first(values: dict[int, list[int]], tag: int) -> int | None:
    v = values.get(tag)
    return v[0] if v else None


def _parse_tiff(p: _Parse) -> None:
    src = p.src
    head = src.read(0, 16)
    little = head[:2] == b"II"
    order = "little" if little else "big"
    big = int.from_bytes(head[2:4], order) == 43
    first = int.from_bytes(head[8:16] if big else head[4:8], order)
    ifd0 = _tiff_ifd(src, little, big, first)
    if not ifd0:
        p.problem(CORRUPT if first < src.size else TRUNCATED, "the TIFF has no readable IFD0")
    _tiff_size(p, src, ifd0, little, big)
    if big:
        # exifread reads classic TIFF only; keep what our own reader saw.
        for tag, name in ((0x100, "ImageWidth"), (0x101, "ImageLength"), (0x112, "Orientation")):
            value = _first(ifd0, tag)
            if value is not None:
                p.extra[f"Image {name}"] = str(value)
        if 0x8769 in ifd0 or 0x8825 in ifd0:
            p.problem(UNSUPPORTED, "EXIF tags of BigTIFF files are not read")
        return
    fh = src.fileobj()
    try:
        _exif_tiff(p, fh, src.size, buf=src.memory)
    finally:
        fh.close()
    if p.fmt == "cr2" and p.width is None:
        # CR2's raw IFD has no size tags; exiftool reports the Exif IFD's size, and so do we.
        p.size(
            _tag_int(p.tags, "EXIF ExifImageWidth"),
            _tag_int(p.tags, "EXIF ExifImageLength"),
            "the CR2 Exif IFD",
        )


def _tiff_size(
    p: _Parse, src: _Source, ifd0: dict[int, list[int]], little: bool, big: bool
) -> None:
    if p.fmt == "rw2":
        left, top = _first(ifd0, 0x0005), _first(ifd0, 0x0004)
        right, bottom = _first(ifd0, 0x0007), _first(ifd0, 0x0006)
        if None not in (left, top, right, bottom):
            p.size(right - left, bottom - top, "the RW2 sensor borders")  # type: ignore[operator]
        return
    if p.fmt == "cr2":
        return
    chosen = ifd0
    if p.fmt in RAW_FORMATS and _first(ifd0, 0x00FE) not in (0, None):
        # IFD0 of most RAW files is a preview; the raw image is the SubIFD marked full-size.
        for sub in ifd0.get(0x014A, [])[:8]:
            entries = _tiff_ifd(src, little, big, sub)
            if _first(entries, 0x00FE) == 0 and 0x100 in entries:
                chosen = entries
                break
    width, height = _first(chosen, 0x100), _first(chosen, 0x101)
    if width is not None and height is not None:
        p.size(width, height, "the TIFF IFD")


# --------------------------------------------------------------------------------------------
# ISO base media files: HEIF, AVIF, CR3


def _top_boxes(src: _Source, start: int, end: int) -> Iterator[tuple[bytes, int, int, bool]]:
    """(type, payload start, payload end, cut short) of the boxes in [start, end) of the file."""
    pos = start
    for _ in range(_MAX_HOPS):
        head = src.read(pos, 16)
        if len(head) < 8 or pos + 8 > end:
            return
        size = int.from_bytes(head[:4], "big")
        kind = head[4:8]
        header = 8
        if size == 1:
            if len(head) < 16:
                return
            size = int.from_bytes(head[8:16], "big")
            header = 16
        elif size == 0:
            size = end - pos
        if size < header:
            raise _Bad(f"box {kind!r} at byte {pos} has size {size}")
        yield kind, pos + header, min(pos + size, end), pos + size > end
        pos += size


def _child_boxes(buf: bytes, start: int, end: int) -> Iterator[tuple[bytes, int, int]]:
    """(type, payload start, payload end) of the boxes in buf[start:end].

    A box that overruns its parent ends the walk with _Bad, after the boxes before it.
    """
    pos = start
    end = min(end, len(buf))
    for _ in range(_MAX_HOPS):
        if pos + 8 > end:
            return
        size = int.from_bytes(buf[pos : pos + 4], "big")
        kind = buf[pos + 4 : pos + 8]
        header = 8
        if size == 1:
            if pos + 16 > end:
                raise _Bad(f"box {kind!r} cut short")
            size = int.from_bytes(buf[pos + 8 : pos + 16], "big")
            header = 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise _Bad(f"box {kind!r} of size {size} overruns its parent")
        yield kind, pos + header, pos + size
        pos += size


def _tolerant(
    p: _Parse, where: str, boxes: Iterator[tuple[bytes, int, int]]
) -> Iterator[tuple[bytes, int, int]]:
    """The boxes of ``boxes`` up to the first broken one, which becomes a problem."""
    try:
        yield from boxes
    except _Bad as exc:
        p.problem(CORRUPT, f"{where}: {exc}")


def _read_box(p: _Parse, start: int, end: int, cut: bool, what: str) -> bytes | None:
    if end - start > _MAX_BLOCK:
        p.problem(UNSUPPORTED, f"the {what} box is larger than {_MAX_BLOCK} bytes")
        return None
    buf = p.src.read(start, end - start)
    if cut or len(buf) < end - start:
        p.problem(TRUNCATED, f"the file ends inside its {what} box")
    return buf


class _HeifMeta:
    """The parts of a HEIF 'meta' box that locate the primary image's size and its EXIF."""

    def __init__(self) -> None:
        self.primary: int | None = None
        self.types: dict[int, bytes] = {}
        self.content_types: dict[int, bytes] = {}
        self.locations: dict[int, tuple[int, int, list[tuple[int, int]]]] = {}
        self.properties: list[tuple[bytes, bytes]] = []
        self.associations: dict[int, list[int]] = {}
        self.references: list[tuple[bytes, int, list[int]]] = []
        self.idat: bytes = b""


def _heif_meta(p: _Parse, buf: bytes) -> _HeifMeta:
    """The meta box's parts; a broken child box costs only what it holds (fuzzed files)."""
    meta = _HeifMeta()
    for kind, start, end in _tolerant(p, "HEIF meta box", _child_boxes(buf, 4, len(buf))):
        try:
            _heif_meta_child(p, meta, buf, kind, start, end)
        except _Bad as exc:
            p.problem(CORRUPT, f"HEIF {kind.decode('latin-1')!r} box: {exc}")
    return meta


def _heif_meta_child(
    p: _Parse, meta: _HeifMeta, buf: bytes, kind: bytes, start: int, end: int
) -> None:
    c = _Cursor(buf, start, end)
    if kind == b"pitm":
        version = c.u(4) >> 24
        meta.primary = c.u(2 if version == 0 else 4)
    elif kind == b"iinf":
        version = c.u(4) >> 24
        c.u(2 if version == 0 else 4)
        for sub, s, e in _tolerant(p, "HEIF iinf box", _child_boxes(buf, c.pos, end)):
            if sub == b"infe":
                try:
                    _heif_infe(meta, _Cursor(buf, s, e))
                except _Bad as exc:
                    p.problem(CORRUPT, f"HEIF infe box: {exc}")
    elif kind == b"iloc":
        _heif_iloc(meta, c)
    elif kind == b"iprp":
        for sub, s, e in _tolerant(p, "HEIF iprp box", _child_boxes(buf, start, end)):
            if sub == b"ipco":
                boxes = _tolerant(p, "HEIF ipco box", _child_boxes(buf, s, e))
                meta.properties = [(t, buf[ps:pe]) for t, ps, pe in boxes]
            elif sub == b"ipma":
                _heif_ipma(meta, _Cursor(buf, s, e))
    elif kind == b"iref":
        version = c.u(4) >> 24
        id_size = 2 if version == 0 else 4
        for ref, s, e in _tolerant(p, "HEIF iref box", _child_boxes(buf, c.pos, end)):
            rc = _Cursor(buf, s, e)
            source = rc.u(id_size)
            meta.references.append((ref, source, [rc.u(id_size) for _ in range(rc.u(2))]))
    elif kind == b"idat":
        meta.idat = buf[start:end]


def _heif_infe(meta: _HeifMeta, c: _Cursor) -> None:
    version = c.u(4) >> 24
    if version < 2:
        return  # ISO/IEC 14496-12 item infos without an item type: no images here
    item = c.u(2 if version == 2 else 4)
    c.u(2)  # protection index
    item_type = c.raw(4)
    meta.types[item] = item_type
    c.cstr()  # item name
    if item_type == b"mime":
        meta.content_types[item] = c.cstr()


def _heif_iloc(meta: _HeifMeta, c: _Cursor) -> None:
    version = c.u(4) >> 24
    sizes = c.u(1)
    offset_size, length_size = sizes >> 4, sizes & 15
    sizes = c.u(1)
    base_size, index_size = sizes >> 4, (sizes & 15) if version in (1, 2) else 0
    count = c.u(2 if version < 2 else 4)
    for _ in range(count):
        item = c.u(2 if version < 2 else 4)
        method = c.u(2) & 15 if version in (1, 2) else 0
        c.u(2)  # data reference index
        base = c.u(base_size)
        extents = []
        count_extents = c.u(2)
        if count_extents and not index_size + offset_size + length_size:
            raise _Bad("iloc extents of zero size")  # else 65535 empty extents per item
        for _ in range(count_extents):
            c.u(index_size)
            extents.append((c.u(offset_size), c.u(length_size)))
        meta.locations[item] = (method, base, extents)


def _heif_ipma(meta: _HeifMeta, c: _Cursor) -> None:
    header = c.u(4)
    version, flags = header >> 24, header & 0xFFFFFF
    for _ in range(c.u(4)):
        item = c.u(2 if version < 1 else 4)
        indexes = []
        for _ in range(c.u(1)):
            indexes.append(c.u(2) & 0x7FFF if flags & 1 else c.u(1) & 0x7F)
        meta.associations[item] = indexes


def _heif_item_bytes(p: _Parse, meta: _HeifMeta, item: int) -> bytes | None:
    location = meta.locations.get(item)
    if location is None:
        return None
    method, base, extents = location
    parts = []
    total = 0
    if method not in (0, 1):
        p.problem(UNSUPPORTED, "a HEIF metadata item is built from another item")
        return None
    for offset, length in extents:
        at = base + offset
        if length == 0:  # "to the end of the file" (or of the idat box)
            length = (p.src.size if method == 0 else len(meta.idat)) - at
        if length > _MAX_BLOCK - total:
            raise _Bad("a metadata item is too large")
        part = p.src.read(at, length) if method == 0 else meta.idat[at : at + length]
        if len(part) < length:
            p.problem(TRUNCATED, "the file ends inside a metadata item")
        parts.append(part)
        total += len(part)
    return b"".join(parts)


def _parse_heif(p: _Parse) -> None:
    meta_box = None
    for kind, start, end, cut in _top_boxes(p.src, 0, p.src.size):
        if kind == b"meta":
            meta_box = (start, end, cut)
            break
    if meta_box is None:
        p.problem(CORRUPT, "the HEIF file has no meta box")
        return
    buf = _read_box(p, *meta_box, what="meta")
    if buf is None:
        return
    meta = _heif_meta(p, buf)
    _heif_size(p, meta)
    exif_items = [item for item, kind in meta.types.items() if kind == b"Exif"]
    described = {
        source
        for ref, source, targets in meta.references
        if ref == b"cdsc" and meta.primary in targets
    }
    exif_items.sort(key=lambda item: item not in described)
    if exif_items:
        block = _heif_item_bytes(p, meta, exif_items[0])
        if block is not None:
            # The item starts with the offset from its end to the TIFF header ("Exif\0\0" often).
            skip = 4 + int.from_bytes(block[:4], "big") if len(block) >= 4 else 0
            if block[skip : skip + 2] not in (b"II", b"MM"):
                found = [i for i in (block.find(b"II*\x00"), block.find(b"MM\x00*")) if 0 <= i < 64]
                skip = min(found) if found else skip
            _exif_block(p, block[skip:], "HEIF Exif item")
    for item, content in meta.content_types.items():
        if content.startswith(b"application/rdf+xml"):
            location = meta.locations.get(item)
            if location and location[0] == 0 and len(location[2]) == 1:
                offset, length = location[2][0]
                p.xmp.append((location[1] + offset, length))


def _heif_size(p: _Parse, meta: _HeifMeta) -> None:
    if meta.primary is None:
        p.problem(CORRUPT, "the HEIF file names no primary image")
        return
    size = clap = None
    rotation = 0
    for index in meta.associations.get(meta.primary, []):
        if not 1 <= index <= len(meta.properties):
            continue
        kind, payload = meta.properties[index - 1]
        if kind == b"ispe" and len(payload) >= 12:
            size = struct.unpack(">II", payload[4:12])
        elif kind == b"irot" and payload:
            rotation = payload[0] & 3
        elif kind == b"clap" and len(payload) >= 16:
            clap = struct.unpack(">IIII", payload[:16])
    if size is None:
        p.problem(CORRUPT, "the primary HEIF image has no size (ispe)")
        return
    width, height = size
    if clap is not None:
        # ISO/IEC 23008-12: the crop applies before the rotation, whatever the property order.
        wn, wd, hn, hd = clap
        if wd and hd and 0 < wn // wd <= width and 0 < hn // hd <= height:
            width, height = (wn + wd // 2) // wd, (hn + hd // 2) // hd
        else:
            p.problem(CORRUPT, "the HEIF clean aperture (clap) is invalid; ignored")
    if rotation in (1, 3):
        width, height = height, width
    p.size(width, height, "the primary HEIF image")


def _parse_cr3(p: _Parse) -> None:
    """CR3 keeps its TIFF blocks in moov/uuid(Canon)/CMT1..CMT4 boxes."""
    for kind, start, end, cut in _top_boxes(p.src, 0, p.src.size):
        if kind != b"moov":
            continue
        buf = _read_box(p, start, end, cut, "moov")
        if buf is None:
            return
        try:
            for sub, s, e in _child_boxes(buf, 0, len(buf)):
                if sub == b"uuid" and buf[s : s + 16] == _CR3_UUID:
                    for cmt, cs, ce in _child_boxes(buf, s + 16, e):
                        kind_of = {b"CMT1": "main", b"CMT2": "exif", b"CMT4": "gps"}.get(cmt)
                        if kind_of is not None:
                            block = buf[cs:ce]
                            _exif_tiff(p, io.BytesIO(block), len(block), 0, kind_of, block)
        except _Bad as exc:
            p.problem(CORRUPT, f"CR3 moov box: {exc}")
        p.size(
            _tag_int(p.tags, "Image ImageWidth"),
            _tag_int(p.tags, "Image ImageLength"),
            "the CR3 CMT1 IFD",
        )
        return
    p.problem(CORRUPT, "the CR3 file has no moov box")


def _parse_bmff(p: _Parse) -> None:
    if p.fmt == "cr3":
        _parse_cr3(p)
    else:
        _parse_heif(p)


# --------------------------------------------------------------------------------------------
# Other RAW containers


def _parse_raf(p: _Parse) -> None:
    src = p.src
    head = src.read(0, 100)
    if len(head) < 100:
        p.problem(TRUNCATED, "the RAF file ends inside its header")
        return
    jpeg_at, jpeg_length, dir_at = struct.unpack(">III", head[84:96])
    if src.read(jpeg_at, 2) == b"\xff\xd8":
        # The embedded preview JPEG carries the EXIF; its size is not the raw size.
        _scan_jpeg(p, jpeg_at, jpeg_at + jpeg_length, want_size=False)
    else:
        p.problem(CORRUPT, "the RAF preview JPEG is missing")
    count = int.from_bytes(src.read(dir_at, 4), "big")
    table = src.read(dir_at + 4, 64 * 1024)
    pos = 0
    for _ in range(min(count, 4096)):
        if pos + 4 > len(table):
            break
        tag, length = struct.unpack_from(">HH", table, pos)
        if tag == 0x111 and length >= 4 and pos + 8 <= len(table):
            height, width = struct.unpack_from(">HH", table, pos + 4)  # stored height first
            p.size(width, height, "the RAF RawImageCroppedSize record")
            return
        pos += 4 + length
    p.problem(CORRUPT, "the RAF file has no raw image size record")


def _parse_crw(p: _Parse) -> None:
    """Canon CRW (CIFF): a heap of records, not EXIF; make, model, size and capture time."""
    src = p.src
    header_length = int.from_bytes(src.read(2, 4), "little")
    budget = [2000]  # records visited, across all heaps
    _ciff_heap(p, header_length, src.size, 0, budget)
    width, height = p.extra.get("CIFF ImageWidth"), p.extra.get("CIFF ImageHeight")
    if width is not None and height is not None:
        p.size(int(width), int(height), "the CRW ImageInfo record")
    for name in ("Make", "Model", "ImageWidth", "ImageHeight", "DateTimeOriginal"):
        if f"CIFF {name}" not in p.extra:
            p.problem(CORRUPT, f"the CRW file has no {name} record")
            break


def _ciff_heap(p: _Parse, start: int, end: int, depth: int, budget: list[int]) -> None:
    src = p.src
    if depth > 6 or end - start < 6:
        return
    table_at = start + int.from_bytes(src.read(end - 4, 4), "little")
    count = int.from_bytes(src.read(table_at, 2), "little")
    table = src.read(table_at + 2, min(count, 1024) * 10)
    for i in range(len(table) // 10):
        budget[0] -= 1
        if budget[0] < 0:
            return
        tag, size, offset = struct.unpack_from("<HII", table, i * 10)
        if tag & 0xC000:  # value stored in the record itself: nothing we read
            continue
        kind, ident = tag & 0x3800, tag & 0x3FFF
        at = start + offset
        if kind in (0x2800, 0x3000):  # a sub-heap
            if start <= at < at + size <= end:
                _ciff_heap(p, at, at + size, depth + 1, budget)
        elif ident == 0x080A:  # make and model, NUL-separated
            make, _, rest = src.read(at, min(size, 256)).partition(b"\x00")
            p.extra["CIFF Make"] = make.decode("latin-1").strip()
            p.extra["CIFF Model"] = rest.split(b"\x00", 1)[0].decode("latin-1").strip()
        elif ident == 0x1810 and size >= 16:  # ImageInfo
            width, height, _, rotation = struct.unpack("<IIfi", src.read(at, 16).ljust(16, b"\0"))
            p.extra["CIFF ImageWidth"] = str(width)
            p.extra["CIFF ImageHeight"] = str(height)
            p.extra["CIFF Rotation"] = str(rotation)
        elif ident == 0x180E and size >= 4:  # TimeStamp: camera-local time as if it were UTC
            seconds = int.from_bytes(src.read(at, 4), "little")
            try:
                when = datetime.fromtimestamp(seconds, UTC).strftime("%Y:%m:%d %H:%M:%S")
            except (OverflowError, OSError, ValueError):
                continue
            p.extra["CIFF DateTimeOriginal"] = when


_PARSERS = {
    "jpeg": _parse_jpeg,
    "png": _parse_png,
    "gif": _parse_gif,
    "webp": _parse_webp,
    "tiff": _parse_tiff,
    "cr2": _parse_tiff,
    "orf": _parse_tiff,
    "rw2": _parse_tiff,
    "heif": _parse_bmff,
    "avif": _parse_bmff,
    "cr3": _parse_bmff,
    "raf": _parse_raf,
    "crw": _parse_crw,
}


# --------------------------------------------------------------------------------------------
# From tags to columns


def _tag_values(tags: dict[str, object], name: str) -> object:
    tag = tags.get(name)
    return tag.values if isinstance(tag, IfdTag) else None


def _tag_int(tags: dict[str, object], name: str) -> int | None:
    values = _tag_values(tags, name)
    if isinstance(values, list) and values and type(values[0]) is int:
        return values[0]
    return None


def _tag_text(tags: dict[str, object], name: str) -> str | None:
    values = _tag_values(tags, name)
    if isinstance(values, bytes):
        values = values.decode("latin-1")
    if not isinstance(values, str):
        return None
    text = values.replace("\x00", " ").strip()
    return text or None


def _number(value: object) -> float | None:
    """A finite float from an exifread value (Ratio, int, float or 1-tuple of float)."""
    if isinstance(value, tuple):
        value = value[0] if value else None
    if isinstance(value, Fraction):
        # exifread's Ratio keeps a zero denominator instead of raising
        if value.denominator == 0:
            return None
        result = value.numerator / value.denominator
    elif isinstance(value, int | float):
        result = float(value)
    else:
        return None
    return result if math.isfinite(result) else None


def _tag_number(tags: dict[str, object], name: str) -> float | None:
    values = _tag_values(tags, name)
    if isinstance(values, list) and values:
        return _number(values[0])
    return None


def _positive(value: float | None) -> float | None:
    return value if value is not None and value > 0 else None


def _gps_degrees(tags: dict[str, object], name: str, limit: float) -> float | None:
    values = _tag_values(tags, f"GPS GPS{name}")
    if not isinstance(values, list) or not 1 <= len(values) <= 3:
        return None
    parts = [_number(v) for v in values]
    if any(v is None or v < 0 for v in parts):
        return None
    degrees = sum(v / 60**i for i, v in enumerate(parts))  # type: ignore[operator]
    if degrees > limit:
        return None
    ref = _tag_text(tags, f"GPS GPS{name}Ref")
    return -degrees if ref and ref[0].upper() in "SW" else degrees


def _taken_at(tags: dict[str, object], extra: dict[str, str]) -> str | None:
    text = (
        _tag_text(tags, "EXIF DateTimeOriginal")
        or _tag_text(tags, "Image DateTimeOriginal")
        or extra.get("CIFF DateTimeOriginal")
    )
    return _parse_date(text, _tag_text(tags, "EXIF OffsetTimeOriginal"))


def _parse_date(text: str | None, offset_text: str | None) -> str | None:
    """ISO 8601 from an EXIF ("2015:09:08 11:02:17") or XMP date, with its UTC offset if any."""
    m = _DATE.match(text or "")
    if m is None:
        return None
    year, month, day, hour, minute = (int(g) for g in m.groups()[:5])
    second = int(m.group(6) or 0)
    if not (year and 1 <= month <= 12 and 1 <= day <= 31 and hour <= 23 and minute <= 59):
        return None
    if second > 60:
        return None
    stamp = f"{year:04d}-{month:02d}-{day:02d}T{hour:02d}:{minute:02d}:{second:02d}"
    zone = m.group(7)
    if zone == "Z":
        return stamp + "Z"
    offset = _OFFSET.match(zone or offset_text or "")
    if offset and int(offset.group(2)) <= 14 and int(offset.group(3)) <= 59:
        return f"{stamp}{offset.group(1)}{offset.group(2)}:{offset.group(3)}"
    return stamp


_BLOB_TYPES = (FieldType.BYTE, FieldType.UNDEFINED)


def _exif_json(tags: dict[str, object], extra: dict[str, str]) -> str:
    out: dict[str, str] = {}
    total = 2
    for name, tag in tags.items():
        if not isinstance(tag, IfdTag):
            continue
        if (
            tag.field_length > _MAX_BLOB  # first: cheaper than comparing enum members
            and not tag.prefer_printable
            and tag.field_type in _BLOB_TYPES
        ):
            continue  # ICC profiles, PrintIM and other blobs: unreadable as text
        text = tag.printable if isinstance(tag.printable, str) else str(tag.printable)
        if len(text) > _MAX_VALUE_CHARS:
            text = text[:_MAX_VALUE_CHARS] + "…"
        total += len(name) + len(text) + 8
        if total > _MAX_EXIF_CHARS:
            break
        out[name] = text
    out.update(extra)
    return json.dumps(out)


def _xmp(p: _Parse, wanted: list[str]) -> dict[str, str]:
    """The ``wanted`` XMP properties that stand in for missing EXIF tags."""
    found: dict[str, str] = {}
    for offset, length in p.xmp[:2]:
        packet = p.src.read(offset, min(length, _MAX_BLOCK))
        for key in wanted:
            # A plain find first: most packets lack most names, and a regex scan of a
            # 20 KB packet per name would cost more than the rest of the file's parse.
            at = packet.find(_XMP_NAMES[key])
            if key in found or at < 0:
                continue
            m = _XMP_PATTERNS[key].search(packet, max(0, at - 1), at + 4096)
            if m:
                raw = next(g for g in m.groups() if g is not None)
                found[key] = html.unescape(raw.decode("utf-8", "replace")).strip()
    return found


def _xmp_degrees(text: str | None, limit: float) -> float | None:
    """An XMP GPS coordinate ("54,59.38N" or "54,59,22.8N") as signed degrees."""
    m = _XMP_GPS.match(text or "")
    if m is None:
        return None
    degrees = float(m.group(1)) + float(m.group(2)) / 60 + float(m.group(3) or 0) / 3600
    if degrees > limit:
        return None
    return -degrees if m.group(4) in "SW" else degrees


def _finish(p: _Parse) -> PhotoMetadata:
    tags = p.tags
    orientation = _tag_int(tags, "Image Orientation")
    if orientation is None and "Image Orientation" in p.extra:
        orientation = int(p.extra["Image Orientation"])
    if orientation is not None and not 1 <= orientation <= 8:
        orientation = None
    taken_at = _taken_at(tags, p.extra)
    make = _tag_text(tags, "Image Make") or p.extra.get("CIFF Make") or None
    model = _tag_text(tags, "Image Model") or p.extra.get("CIFF Model") or None
    latitude = _gps_degrees(tags, "Latitude", 90.0)
    longitude = _gps_degrees(tags, "Longitude", 180.0)
    if p.xmp:
        missing = {
            "orientation": orientation,
            "taken_at": taken_at,
            "make": make,
            "model": model,
            "gps_lat": latitude,
            "gps_lon": longitude,
        }
        xmp = _xmp(p, [key for key, value in missing.items() if value is None])
        if orientation is None and xmp.get("orientation") in _ORIENTATIONS:
            orientation = int(xmp["orientation"])
        taken_at = taken_at or _parse_date(xmp.get("taken_at"), None)
        make = make or xmp.get("make") or None
        model = model or xmp.get("model") or None
        if latitude is None or longitude is None:
            latitude = _xmp_degrees(xmp.get("gps_lat"), 90.0)
            longitude = _xmp_degrees(xmp.get("gps_lon"), 180.0)
    if orientation is not None and p.fmt in ("heif", "avif"):
        orientation = 1
    if latitude is None or longitude is None:
        latitude = longitude = None
    return PhotoMetadata(
        format=p.fmt,
        width=p.width,
        height=p.height,
        orientation=orientation,
        taken_at=taken_at,
        make=make,
        model=model,
        lens=_tag_text(tags, "EXIF LensModel"),
        iso=_iso(tags),
        exposure_time=_exposure_time(tags),
        f_number=_f_number(tags),
        focal_length=_positive(_tag_number(tags, "EXIF FocalLength")),
        gps_lat=latitude,
        gps_lon=longitude,
        gps_alt=_gps_altitude(tags),
        exif=_exif_json(tags, p.extra),
        metadata_error=_problem_text(p),
    )


def _iso(tags: dict[str, object]) -> int | None:
    iso = _tag_int(tags, "EXIF ISOSpeedRatings")
    if iso == 65535 or iso is None:
        iso = (
            _tag_int(tags, "EXIF RecommendedExposureIndex")
            or _tag_int(tags, "EXIF ISOSpeed")
            or iso
        )
    return iso if iso else None


def _exposure_time(tags: dict[str, object]) -> float | None:
    exposure = _positive(_tag_number(tags, "EXIF ExposureTime"))
    if exposure is None:
        apex = _tag_number(tags, "EXIF ShutterSpeedValue")
        exposure = 2.0**-apex if apex is not None and abs(apex) < 64 else None
    return exposure


def _f_number(tags: dict[str, object]) -> float | None:
    f_number = _positive(_tag_number(tags, "EXIF FNumber"))
    if f_number is None:
        apex = _tag_number(tags, "EXIF ApertureValue")
        f_number = 2.0 ** (apex / 2) if apex is not None and 0 <= apex < 64 else None
    return f_number


def _gps_altitude(tags: dict[str, object]) -> float | None:
    altitude = _tag_number(tags, "GPS GPSAltitude")
    if altitude is None:
        return None
    below = _tag_values(tags, "GPS GPSAltitudeRef")
    return -altitude if isinstance(below, list) and below[:1] == [1] else altitude


def _problem_text(p: _Parse) -> str | None:
    if not p.problems:
        return None
    # Messages quote hostile bytes (exception texts, chunk names): keep them printable.
    message = "; ".join(m[:150] for _, m in p.problems)
    message = message.encode("ascii", "backslashreplace").decode("ascii")
    if len(message) > _MAX_MESSAGE:
        message = message[:_MAX_MESSAGE] + "..."
    return format_error(p.problems[0][0], message)
