"""The converters' data contract: what a conversion returns and how it fails.

What a conversion is asked for is :class:`photoscand.protocol.ThumbnailSettings`. The hazard is
an exception class that does not pickle (ConversionError keeps its arguments in ``args``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from photoscand import outcomes
from photoscand.protocol import ThumbnailFile

# Every reason a ConversionError may carry: the catalog's failure words plus DISK_FULL.
ERROR_REASONS: frozenset[str] = frozenset((*outcomes.REASONS, outcomes.DISK_FULL))


@dataclass(slots=True)
class Conversion:
    """A finished conversion: the input's content hash, its thumbnails and seconds per stage."""

    content_hash: str
    thumbnails: list[ThumbnailFile]
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
