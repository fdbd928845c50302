"""The messages between the daemon and its children, as typed values.

Every value here crosses a pipe by pickling, so each is a frozen dataclass (made by
:func:`message`) or a NamedTuple of plain fields, and this module imports nothing of
photoscand's: the daemon, the metadata process, the workers and the converters all read the
same definitions. See docs/architecture.md for who sends what to whom.

=====================  ========================  ==========================================
from                   to                        message
=====================  ========================  ==========================================
daemon                 metadata process          :class:`MetadataRequest`, ``STOP``
metadata process       daemon                    :class:`MetadataAnswer`
daemon                 worker                    :class:`ConversionJob`, ``STOP``
worker                 daemon                    :class:`WorkerReady`, then one
                                                 :class:`Converted` or
                                                 :class:`ConversionFailed` per job
sweep child            daemon                    :class:`SweepDone`
=====================  ========================  ==========================================
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import field
from typing import NamedTuple, TypeVar

_T = TypeVar("_T")


def message(cls: type[_T]) -> type[_T]:
    """A frozen, slotted dataclass that pickles as its class and its fields in order.

    A slotted dataclass's own pickling goes through ``dataclasses.fields()`` on both ends,
    about half the cost of a message's round trip; with several messages per file that is
    measurable in phase 1. Unpickling calls ``__init__``, so ``__post_init__`` checks hold.
    """
    made = dataclasses.dataclass(frozen=True, slots=True)(cls)
    names = tuple(f.name for f in dataclasses.fields(made))
    get = operator.attrgetter(*names)
    if len(names) == 1:

        def reduce(self: object) -> tuple:
            return (made, (get(self),))
    else:

        def reduce(self: object) -> tuple:
            return (made, get(self))

    made.__reduce__ = reduce  # type: ignore[method-assign, assignment]
    return made


# Sent instead of a request or a job: the child finishes and exits.
STOP = None

OUTPUT_FORMATS: dict[str, str] = {"jpeg": "jpg", "webp": "webp"}  # format -> file extension
BACKENDS = ("pillow", "magick")


@message
class ThumbnailSettings:
    """What the workers make and how: from the config to the converters, in one value.

    ``sizes`` are longest edges in pixels; ``max_pixels`` refuses larger images unread;
    ``backend`` names the converter; ``memory_limit_mb`` caps each worker's address space
    (0: no cap); ``nice`` lowers the workers' CPU priority, so that phase 1 (a row the
    moment a file lands) wins the CPU when both want it.
    """

    sizes: tuple[int, ...]
    format: str
    quality: int
    out_dir: str
    max_pixels: int
    backend: str = "pillow"
    memory_limit_mb: int = 0
    nice: int = 0

    def __post_init__(self) -> None:
        # A bad value is a configuration bug, not an image's fault: plain ValueError.
        if not self.sizes or any(not isinstance(s, int) or s < 1 for s in self.sizes):
            raise ValueError(f"thumbnail sizes must be positive integers, got {self.sizes!r}")
        if self.format not in OUTPUT_FORMATS:
            raise ValueError(f"thumbnail format must be one of {sorted(OUTPUT_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"thumbnail quality must be 1..100, got {self.quality}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels must be positive, got {self.max_pixels}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")

    @property
    def largest(self) -> int:
        return max(self.sizes)

    def descending(self) -> tuple[int, ...]:
        """The distinct sizes, largest first: the order in which they are produced."""
        return tuple(sorted(set(self.sizes), reverse=True))


class SharedBytes(NamedTuple):
    """Where the prefetcher put a photo's bytes: ``length`` bytes at ``offset`` of the
    memory file at ``path``; ``keep`` says the mapping is the window's, kept across jobs
    (a photo larger than the window has its own memory, mapped for one job)."""

    path: str
    offset: int
    length: int
    keep: bool


# -- phase 1: the metadata process ------------------------------------------------------


@message
class PhotoMetadata:
    """What phase 1 learns about one photo: the catalog row's metadata columns."""

    format: str | None = None
    width: int | None = None
    height: int | None = None
    orientation: int | None = None
    taken_at: str | None = None
    make: str | None = None
    model: str | None = None
    lens: str | None = None
    iso: int | None = None
    exposure_time: float | None = None
    f_number: float | None = None
    focal_length: float | None = None
    gps_lat: float | None = None
    gps_lon: float | None = None
    gps_alt: float | None = None
    exif: str | None = "{}"  # None: not read yet (a prefetch-mode row)
    metadata_error: str | None = None
    disk_offset: int | None = None
    fingerprint: str | None = None  # the size, first and last bytes, digested


@message
class FileIdentity:
    """A file's size, modification time and inode, as ``lstat`` gave them."""

    size: int
    mtime_ns: int
    dev: int
    ino: int


@message
class MetadataRequest:
    """Parse one file: from its path, or from the bytes the prefetcher read (``shared``)."""

    seq: int
    path: bytes
    shared: SharedBytes | None = None


@message
class Parsed:
    """A photo's metadata; ``identity`` is the file as it was after reading (None when the
    bytes came from memory)."""

    identity: FileIdentity | None
    metadata: PhotoMetadata


@message
class NotAPhoto:
    """No photo signature and no photo name, or not a regular file: ``why`` says which."""

    why: str


@message
class Unreadable:
    """The file could not be opened or read (``errno_name`` as in ``errno.errorcode``)."""

    errno_name: str
    message: str


@message
class MetadataAnswer:
    """The answer to the request numbered ``seq`` (answers come back in request order)."""

    seq: int
    outcome: Parsed | NotAPhoto | Unreadable
    seconds: float
    output: str = ""  # what C libraries printed while parsing (see worker.OutputCatcher)


# -- phase 2: the conversion workers ------------------------------------------------------


@message
class ConversionJob:
    """Convert one image. ``format`` and ``orientation`` are phase 1's hints; ``reuse``
    allows thumbnails of the same content made before to stand; ``shared`` holds the bytes
    when the prefetcher read them (the worker then never touches the disk)."""

    image_id: int
    path: bytes
    format: str | None
    orientation: int | None
    reuse: bool = True
    shared: SharedBytes | None = None


@message
class ThumbnailFile:
    """One written thumbnail; width and height are after orientation."""

    size: int
    path: str
    width: int
    height: int


@message
class Converted:
    """A job's thumbnails are written; ``timings`` gives seconds per stage."""

    image_id: int
    content_hash: str
    thumbnails: tuple[ThumbnailFile, ...]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    output: str = ""  # what C libraries printed while converting


@message
class ConversionFailed:
    """A job failed; ``reason`` is a word from :mod:`photoscand.outcomes`."""

    image_id: int
    reason: str
    message: str
    seconds: float
    output: str = ""  # what C libraries printed while converting


ConversionResult = Converted | ConversionFailed


@message
class WorkerReady:
    """A worker has set itself up and waits for its first job."""

    pid: int


@message
class SweepDone:
    """The start-up sweep removed this many stale temporary thumbnails."""

    removed: int
