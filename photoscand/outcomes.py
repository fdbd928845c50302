"""The image states, the fixed words that say why an image failed, and which failures are
worth a retry.

A row's ``error`` column is ``"<reason>: <message>"`` with the reason from this list;
metrics label states and failures with the same words, so both sets stay bounded.
docs/architecture.md shows how an image moves between the states.
"""

from __future__ import annotations

# An image's states: pending -> converting -> done | failed; missing when its file vanished.
STATUSES: tuple[str, ...] = ("pending", "converting", "done", "failed", "missing")

CORRUPT = "corrupt"  # the bytes are not a valid image of the format they claim
TRUNCATED = "truncated"  # the image data ends before the picture does
UNSUPPORTED = "unsupported"  # a format, codec or variant this installation cannot decode
TOO_LARGE = "too_large"  # more pixels than workers.max_pixels, refused before decoding
TIMEOUT = "timeout"  # the worker ran past workers.timeout_seconds and was killed
CRASHED = "crashed"  # the worker died (decoder crash, out of memory, killed by hand)
IO_ERROR = "io_error"  # reading the photo failed (EIO, a stale NFS handle, ...)
PERMISSION = "permission"  # the photo or its folder cannot be read by the daemon
VANISHED = "vanished"  # the file disappeared before or while it was read

REASONS: tuple[str, ...] = (
    CORRUPT,
    TRUNCATED,
    UNSUPPORTED,
    TOO_LARGE,
    TIMEOUT,
    CRASHED,
    IO_ERROR,
    PERMISSION,
    VANISHED,
)

# Retried until workers.max_attempts; the others fail at once.
TRANSIENT: frozenset[str] = frozenset({TIMEOUT, CRASHED, IO_ERROR, PERMISSION})

# Phase 1 problems that may be gone on the next try: a row whose metadata failed for one of
# these is read again when its file changes, at the next walk and on `photoscand retry`.
METADATA_RETRY: frozenset[str] = frozenset({PERMISSION, IO_ERROR, TIMEOUT})

# Not an image's fault: ENOSPC on the thumbnail folder. It counts no attempt; phase 2
# pauses until space returns. Never stored in a row.
DISK_FULL = "disk_full"


def retry_delay(backoff: float, attempts: int) -> float:
    """How long an image waits after its ``attempts``-th transient failure: ``backoff``
    seconds after the first, doubling after each one after that."""
    return backoff * 2 ** (attempts - 1)


def format_error(reason: str, message: str) -> str:
    """The ``error`` column's text: ``reason: message`` on one line."""
    flat = " ".join(message.split())
    return f"{reason}: {flat}" if flat else reason


def metadata_retry(metadata_error: str | None) -> bool:
    """True when a row's ``metadata_error`` is one that phase 1 should try again."""
    return split_error(metadata_error)[0] in METADATA_RETRY


def split_error(error: str | None) -> tuple[str | None, str]:
    """The reason and the message of an ``error`` column's text."""
    if not error:
        return None, ""
    reason, _, message = error.partition(":")
    return reason.strip(), message.strip()
