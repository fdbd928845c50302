"""Where thumbnails live and how they get there: content-hash names, atomic replace, disk errors.

Hazards: a crash mid-write must never leave a half file under a final name (temporary name in
the destination folder, fsync, rename, fsync of the folder), and a full or read-only thumbnail
folder is the daemon's problem, not the image's (ENOSPC -> DISK_FULL, EACCES/EROFS -> io_error).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets

from PIL import Image

from photoscand import outcomes
from photoscand.converters.model import ConversionError
from photoscand.protocol import OUTPUT_FORMATS, ThumbnailFile, ThumbnailSettings

# Temporary files are hidden (".") and end in TEMP_SUFFIX, so a start-up sweep can find the
# leftovers of a killed worker and the watcher would ignore them even in a watched folder.
TEMP_SUFFIX = ".tmp"

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_WRITE = (errno.EACCES, errno.EPERM, errno.EROFS)


def thumbnail_path(out_dir: str, content_hash: str, size: int, fmt: str) -> str:
    """out_dir/ab/cd/<hash>-<size>.<jpg|webp>: two levels of fan-out keep folders small."""
    if len(content_hash) < 4 or not all(c in "0123456789abcdef" for c in content_hash):
        raise ValueError(f"content hash must be lower-case hex, got {content_hash!r}")
    try:
        ext = OUTPUT_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"thumbnail format must be one of {sorted(OUTPUT_FORMATS)}") from None
    return os.path.join(
        out_dir, content_hash[:2], content_hash[2:4], f"{content_hash}-{size}.{ext}"
    )


def targets(spec: ThumbnailSettings, content_hash: str) -> dict[int, str]:
    """Each distinct size's final path."""
    return {
        size: thumbnail_path(spec.out_dir, content_hash, size, spec.format)
        for size in spec.descending()
    }


def existing(spec: ThumbnailSettings, paths: dict[int, str]) -> list[ThumbnailFile] | None:
    """The thumbnails of a conversion done before (in spec.sizes order), or None if any is missing.

    Dimensions come from each file's header; a file that cannot be read counts as missing.
    """
    found: dict[int, ThumbnailFile] = {}
    for size, path in paths.items():
        try:
            with Image.open(path) as im:
                width, height = im.size
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None
        found[size] = ThumbnailFile(size=size, path=path, width=width, height=height)
    return ordered(spec, found)


def ordered(spec: ThumbnailSettings, by_size: dict[int, ThumbnailFile]) -> list[ThumbnailFile]:
    """Thumbnails in the configured order, each size once."""
    seen: set[int] = set()
    out = []
    for size in spec.sizes:
        if size not in seen:
            seen.add(size)
            out.append(by_size[size])
    return out


def disk_error(exc: OSError, folder: str) -> ConversionError:
    """The ConversionError for a failure to write into the thumbnail folder."""
    if exc.errno in _NO_SPACE:
        return ConversionError(outcomes.DISK_FULL, f"no space left in thumbnail folder {folder}")
    if exc.errno in _NO_WRITE:
        return ConversionError(
            outcomes.IO_ERROR,
            f"cannot write to thumbnail folder {folder}: {os.strerror(exc.errno)}",
        )
    detail = os.strerror(exc.errno) if exc.errno else str(exc)
    return ConversionError(outcomes.IO_ERROR, f"writing to thumbnail folder {folder}: {detail}")


def make_folder(path: str) -> str:
    """Create the folder of a thumbnail path; return it."""
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as exc:
        raise disk_error(exc, folder) from exc
    return folder


def temp_name(final_path: str) -> str:
    """A unique hidden name beside final_path (unique per process and call: two workers may
    convert the same content at once, and each must rename its own complete file)."""
    folder, base = os.path.split(final_path)
    _discard_dead_writers(folder, base)
    return os.path.join(folder, f".{base}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")


def _discard_dead_writers(folder: str, base: str) -> None:
    """Remove temporary files for the same final name whose writer died mid-write.

    A worker SIGKILLed while the daemon runs (a timeout, the OOM killer) leaves its file;
    the retry of that image comes back to this very name, so leftovers are cleared here
    instead of piling up until the next start-up sweep. A live writer's file (another
    worker converting the same content) is left alone; the pid is in the name.
    """
    prefix = f".{base}."
    try:
        names = os.listdir(folder)
    except OSError:
        return
    for name in names:
        if not (name.startswith(prefix) and name.endswith(TEMP_SUFFIX)):
            continue
        writer = name[len(prefix) : -len(TEMP_SUFFIX)].split("-", 1)[0]
        if writer.isdigit() and not _alive(int(writer)):
            discard(os.path.join(folder, name))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, under another user
    return True


def write_file(final_path: str, payload: bytes | memoryview) -> None:
    """Write payload under a temporary name, fsync it and rename it to final_path."""
    folder = make_folder(final_path)
    tmp = temp_name(final_path)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(payload)
            while view:
                written = os.write(fd, view)
                view = view[written:]
            # fdatasync: the data and the size, not the timestamps (cheaper on every filesystem).
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final_path)
    except OSError as exc:
        discard(tmp)
        raise disk_error(exc, folder) from exc


def commit_file(tmp: str, final_path: str) -> None:
    """fsync a complete temporary file written by someone else (ImageMagick) and rename it."""
    folder = os.path.dirname(final_path)
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fdatasync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final_path)
    except OSError as exc:
        discard(tmp)
        raise disk_error(exc, folder) from exc


def sync_folders(paths: list[str]) -> None:
    """fsync the folders that received renames, so the new names survive a power loss."""
    for folder in sorted({os.path.dirname(p) for p in paths}):
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise disk_error(exc, folder) from exc
        try:
            os.fsync(fd)
        except OSError as exc:
            # Some filesystems refuse fsync on a directory (EINVAL); the rename itself is done.
            if exc.errno not in (errno.EINVAL, errno.ENOTSUP):
                raise disk_error(exc, folder) from exc
        finally:
            os.close(fd)


def discard(path: str) -> None:
    """Remove a temporary file if it is there."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def remove_stale_temp_files(out_dir: str) -> int:
    """Delete temporary files that killed workers left in the thumbnail tree; return how many.

    Only call this when no worker is running (at start-up): a live worker's file looks the same.
    """
    removed = 0
    for folder, _dirs, files in os.walk(out_dir):
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                discard(os.path.join(folder, name))
                removed += 1
    return removed
