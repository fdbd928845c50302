"""The converters' data contract: what a conversion is asked for, what it returns, how it fails.

Plain data only, so that results cross the worker's pipe by pickling; the hazard is an
exception class that does not pickle (ConversionError keeps its arguments in ``args``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from photoscand import outcomes

# Every reason a ConversionError may carry: the catalog's failure words plus DISK_FULL.
ERROR_REASONS: frozenset[str] = frozenset(
    {
        outcomes.CORRUPT,
        outcomes.TRUNCATED,
        outcomes.UNSUPPORTED,
        outcomes.TOO_LARGE,
        outcomes.TIMEOUT,
        outcomes.CRASHED,
        outcomes.IO_ERROR,
        outcomes.PERMISSION,
        outcomes.VANISHED,
        outcomes.DISK_FULL,
    }
)

OUTPUT_FORMATS: dict[str, str] = {"jpeg": "jpg", "webp": "webp"}  # format -> file extension


@dataclass(frozen=True, slots=True)
class ThumbnailSpec:
    """What to make: longest edges in pixels, format, quality, where, and the pixel cap."""

    sizes: tuple[int, ...]
    format: str
    quality: int
    out_dir: str
    max_pixels: int

    def __post_init__(self) -> None:
        # A bad spec is a configuration bug, not an image's fault: plain ValueError.
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"thumbnail sizes must be positive integers, got {self.sizes!r}")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"thumbnail format must be one of {sorted(OUTPUT_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"thumbnail quality must be 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")

    @property
    def largest(self) -> int:
        return max(self.sizes)

    def descending(self) -> tuple[int, ...]:
        """The distinct sizes, largest first: the order in which they are produced."""
        return tuple(sorted(set(self.sizes), reverse=True))


@dataclass(slots=True)
class Thumbnail:
    """One written thumbnail; width and height are after orientation."""

    size: int
    path: str
    width: int
    height: int


@dataclass(slots=True)
class Conversion:
    """A finished conversion: the input's content hash, its thumbnails and seconds per stage."""

    content_hash: str
    thumbnails: list[Thumbnail]
    timings: dict[str, float] = field(default_factory=dict)
    reused: bool = False  # every thumbnail already existed; nothing was decoded
    source: str = ""  # how the pixels were obtained ("jpeg 3/8", "embedded preview, ...")


class ConversionError(Exception):
    """A conversion that failed for a known reason (a word from photoscand.outcomes)."""

    def __init__(self, reason: str, message: str):
        if reason not in ERROR_REASONS:
            raise ValueError(f"unknown failure reason {reason!r}")
        super().__init__(reason, message)
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return outcomes.format_error(self.reason, self.message)

    def __reduce__(self):
        return (type(self), (self.reason, self.message))
