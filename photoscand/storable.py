"""Numbers from files and from ``stat`` made into values the catalog can store.

The catalog's integers are signed 64-bit and its reals finite; a file can say anything. A
camera with a bad clock or an archive tool sets an mtime past 2262 (nanoseconds beyond
2^63), a 200-byte BigTIFF declares a width beyond 64 bits, some filesystems hand out inode
numbers above 2^63. Left as they are, such values raise ``OverflowError`` where the row is
written. Here every number is checked on its way in:

- identities (``dev``, ``ino``) keep their 64 bits, read as signed, so that the same file
  always gives the same stored value;
- times are clamped to the range: kept as far as they can be represented;
- sizes out of range are the file's problem: dropped, and said in ``metadata_error`` as
  ``corrupt``; other EXIF numbers out of range (an ISO of 2^64, an infinite exposure) are
  dropped.
"""

from __future__ import annotations

import dataclasses
import math

from photoscand import outcomes
from photoscand.protocol import PhotoMetadata

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_UINT64 = 2**64

_INTEGER_FIELDS = ("width", "height", "orientation", "iso", "disk_offset")
_REAL_FIELDS = ("exposure_time", "f_number", "focal_length", "gps_lat", "gps_lon", "gps_alt")
# Out of range, these say the file is broken; the others are only tags.
_SIZE_FIELDS = frozenset({"width", "height"})


def clamped(value: int) -> int:
    """An integer clamped to the signed 64-bit range (times: as close as can be stored)."""
    return min(max(value, INT64_MIN), INT64_MAX)


def signed(value: int) -> int:
    """An unsigned 64-bit identity (a device or inode number) as a signed 64-bit integer
    with the same bits; values that do not fit even 64 bits keep their low 64."""
    value %= _UINT64
    return value - _UINT64 if value > INT64_MAX else value


def in_range(value: object) -> bool:
    """True for None, a signed 64-bit integer, or a finite real."""
    if value is None or isinstance(value, bool):
        return True
    if isinstance(value, int):
        return INT64_MIN <= value <= INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return True


def storable_metadata(meta: PhotoMetadata, size: int) -> tuple[PhotoMetadata, int]:
    """The metadata and the file size with every value the catalog cannot store dropped
    (a size out of range becomes INT64_MAX), and ``metadata_error`` saying so when a size
    was out of range."""
    changes: dict[str, object] = {}
    problems = []
    if not 0 <= size <= INT64_MAX:
        problems.append(f"the file size {size} cannot be stored")
        size = INT64_MAX if size > 0 else 0
    for name in (*_INTEGER_FIELDS, *_REAL_FIELDS):
        value = getattr(meta, name)
        if not in_range(value):
            changes[name] = None
            if name in _SIZE_FIELDS:
                problems.append(f"the {name} {value} is out of range")
    if problems:
        text = outcomes.format_error(outcomes.CORRUPT, "; ".join(problems))
        changes["metadata_error"] = (
            f"{text}; {meta.metadata_error}" if meta.metadata_error else text
        )
    return (dataclasses.replace(meta, **changes) if changes else meta), size
