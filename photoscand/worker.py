"""Code that runs in the daemon's child processes: the metadata parser and the converters.

Children are started by the supervisor with the ``forkserver`` method (the daemon has
threads, so plain fork is unsafe), get plain data, and talk to the daemon over one pipe
each. They never open the catalog and never touch metrics: they receive a job, do it,
and send back a result. The daemon kills them on a timeout, so nothing here needs to
guard against hangs in the libraries it calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import resource
import signal
import stat
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

from photoscand import outcomes

_PR_SET_NAME = 15
_PR_SET_PDEATHSIG = 1
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def _die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent exits.

    A worker whose daemon was killed must not keep converting: a restarted daemon
    would then convert the same image twice in parallel. With forkserver the parent
    is the fork server, which itself exits as soon as the daemon's end of its pipe
    closes, so the chain holds.
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe's EOF still ends the loop
        pass
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(0)


def _set_process_name(name: bytes) -> None:
    """Name the process for ps/top/pgrep (``photoscand-work``, ``photoscand-meta``)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _child_setup(name: bytes, nice: int = 0) -> None:
    # Ctrl-C on a terminal, or `timeout`/`kill -- -PGID`, signals the whole process
    # group; the daemon decides when children stop (it finishes the images in hand,
    # then SIGKILLs what is left), so they ignore these.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    # Only the main process may talk to systemd (NotifyAccess=main).
    for variable in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        os.environ.pop(variable, None)
    _die_with_parent()
    _set_process_name(name)
    if nice:
        with contextlib.suppress(OSError):
            os.nice(nice)


def _keep_freed_memory() -> None:
    """Keep the pixel buffers a conversion frees for the next one, instead of returning them.

    glibc gives the top of the heap back to the kernel whenever more than its trim threshold
    is free there; that threshold only grows as large blocks happen to be freed, so in a
    worker it may stay below what one 12 MP photo frees (decoded and resized buffers, tens
    of MB), and every photo then faults all of it in again: ~5,000 page faults and ~8 ms of
    CPU per photo, measured. Fixing the thresholds at the values glibc's own adjustment
    tops out at (blocks up to 32 MiB from the heap, trim above 64 MiB free) keeps them;
    more than 64 MiB free is still returned. Without glibc (no mallopt) nothing changes.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(_M_MMAP_THRESHOLD, 32 << 20)
    mallopt(_M_TRIM_THRESHOLD, 64 << 20)


def _limit_memory(limit_mb: int) -> None:
    """Cap this process's address space so a decompression bomb fails one image.

    RLIMIT_AS counts mapped libraries too; they are mapped already when this runs,
    so the limit is raised by what is mapped now.
    """
    if limit_mb <= 0:
        return
    mapped = _mapped_bytes()
    limit = mapped + limit_mb * 1024 * 1024
    # Only the soft limit: the prefetch window, mapped later, raises it (see _allow_shared).
    _soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _mapped_bytes() -> int:
    try:
        with open("/proc/self/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# -- phase 1: the metadata process ----------------------------------------------------


def metadata_main(conn: Connection) -> None:
    """Parse one file at a time for the daemon's phase 1.

    Requests are ``(seq, path, shm)``, ``shm`` being None (read the file) or the place
    in shared memory where the prefetcher put its bytes; replies are ``(seq, kind,
    payload, seconds)`` with kind
    ``"meta"`` (stat tuple, column dict), ``"skip"`` (not a photo / not a regular
    file: a short why) or ``"oserror"`` (errno name, message). ``None`` ends the loop.
    """
    _child_setup(b"photoscand-meta")
    from photoscand import metadata  # imported here: a converter problem must not stop phase 1

    global _read_metadata
    _read_metadata = metadata.read_metadata
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        seq, path, shm = request
        started = time.perf_counter()
        if shm is None:
            answer = _parse_one(path)
        else:
            view = attach(shm, _mappings)
            try:
                answer = _parse_memory(path, view)
            finally:
                with contextlib.suppress(BufferError):
                    view.release()
                _forget_mapping(shm, _mappings)
        conn.send((seq, *answer, time.perf_counter() - started))


def _parse_one(path: bytes) -> tuple[str, Any]:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return "skip", "not a regular file"
        meta = _read_metadata(path)
    except OSError as exc:
        return "oserror", (errno.errorcode.get(exc.errno or 0, "EIO"), exc.strerror or str(exc))
    if meta is None:
        return "skip", "not a photo"
    try:
        # The row should describe the bytes that were parsed: stat again after reading.
        after = os.lstat(path)
    except OSError as exc:
        return "oserror", (errno.errorcode.get(exc.errno or 0, "EIO"), exc.strerror or str(exc))
    columns = {name: getattr(meta, name) for name in _META_FIELDS}
    columns["metadata_error"] = meta.error
    identity = (after.st_size, after.st_mtime_ns, after.st_dev, after.st_ino)
    return "meta", (identity, columns)


def _parse_memory(path: bytes, view: memoryview) -> tuple[str, Any]:
    """Parse bytes the prefetcher already read (the disk is not touched again)."""
    meta = _read_metadata(path, view)
    if meta is None:
        return "skip", "not a photo"
    columns = {name: getattr(meta, name) for name in _META_FIELDS}
    columns["metadata_error"] = meta.error
    return "meta", (None, columns)


_read_metadata: Any = None
_mappings: dict[str, mmap.mmap] = {}


def attach(shm: tuple[str, int, int, bool], cache: dict[str, mmap.mmap]) -> memoryview:
    """The bytes the prefetcher read, mapped read-only from the daemon's memory file.

    ``shm`` is (path, offset, length, keep): the window's mapping is kept across jobs;
    a photo larger than the window has its own memory, mapped for one job.
    """
    path, offset, length, keep = shm
    mapping = cache.get(path)
    if mapping is None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if keep:
                _allow_shared(os.fstat(fd).st_size)
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        cache[path] = mapping
    return memoryview(mapping)[offset : offset + length]


def _allow_shared(nbytes: int) -> None:
    """Widen this process's address-space limit by the prefetch window it is about to map.

    The window is the daemon's memory, mapped whole and shared by every worker, not what
    one image needs: left inside workers.memory_limit_mb it would shrink every decode's
    budget by its size, and a window as large as the limit would fail every image.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return
    wanted = soft + nbytes
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_AS, (wanted, hard))


def _forget_mapping(shm: tuple[str, int, int, bool], cache: dict[str, mmap.mmap]) -> None:
    path, _offset, _length, keep = shm
    if not keep:
        mapping = cache.pop(path, None)
        if mapping is not None:
            # A view still exported (held by a decoder object) keeps it mapped until
            # garbage collection; that is fine, the daemon already owns the memory.
            with contextlib.suppress(BufferError):
                mapping.close()


_META_FIELDS = (
    "format", "width", "height", "orientation", "taken_at", "make", "model", "lens", "iso",
    "exposure_time", "f_number", "focal_length", "gps_lat", "gps_lon", "gps_alt", "exif",
    "disk_offset",
)  # fmt: skip


# -- phase 2: the conversion workers ---------------------------------------------------


def conversion_main(conn: Connection, settings: dict[str, Any]) -> None:
    """Convert one image at a time for the daemon's phase 2.

    ``settings`` holds the thumbnail spec, the backend and the memory limit. Jobs are
    dicts (see :func:`convert_job`); ``None`` ends the loop.
    """
    _child_setup(b"photoscand-work", nice=settings.get("nice", 0))
    from photoscand import converters  # imported here: phase 1's process does not need it

    spec = converters.ThumbnailSpec(
        sizes=tuple(settings["sizes"]),
        format=settings["format"],
        quality=settings["quality"],
        out_dir=settings["out_dir"],
        max_pixels=settings["max_pixels"],
    )
    backend = settings["backend"]
    _keep_freed_memory()
    _limit_memory(settings.get("memory_limit_mb", 0))
    conn.send({"ready": os.getpid()})
    while True:
        try:
            job = conn.recv()
        except (EOFError, OSError):
            return
        if job is None:
            return
        conn.send(convert_job(job, spec, backend))


def sweep_main(conn: Connection, out_dir: str) -> None:
    """Delete the temporary thumbnails that workers of an earlier run left behind.

    Runs once at start-up, before any worker: a worker SIGKILLed mid-write (the daemon
    killed, power lost) leaves its hidden temporary file, and no running worker can own one
    yet. A child does it so the daemon's main thread neither walks the thumbnail tree nor
    imports the converters.
    """
    _child_setup(b"photoscand-sweep")
    from photoscand import converters

    conn.send(converters.remove_stale_temp_files(out_dir))


def _read_whole(path: bytes) -> bytes:
    """Read a file in one go and make sure it did not change while it was read."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        before = os.fstat(fd)
        if not stat.S_ISREG(before.st_mode):
            raise IsADirectoryError(errno.EISDIR, "not a regular file")
        with contextlib.suppress(OSError):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
        chunks = []
        remaining = before.st_size
        while True:
            chunk = os.read(fd, max(remaining, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            remaining -= len(chunk)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or len(
        data
    ) != after.st_size:
        raise _ChangedWhileRead()
    return data


class _ChangedWhileRead(Exception):
    pass


def convert_job(job: dict[str, Any], spec: Any, backend: str) -> dict[str, Any]:
    """Read a photo once, convert it, and describe the outcome as plain data.

    Job keys: ``id``, ``path`` (bytes), ``format`` and ``orientation`` (hints from
    phase 1), optionally ``shm`` (where the prefetcher put the bytes; see :func:`attach`).
    """
    from photoscand import converters

    started = time.perf_counter()
    result: dict[str, Any] = {"id": job["id"], "ok": False}
    shm = job.get("shm")
    try:
        data = attach(shm, _mappings) if shm is not None else _read_whole(job["path"])
        read_seconds = time.perf_counter() - started
        conversion = converters.convert(
            data,
            spec,
            backend=backend,
            format_hint=job.get("format"),
            orientation=job.get("orientation"),
            reuse_existing=job.get("reuse", True),
        )
    except FileNotFoundError as exc:
        result.update(reason=outcomes.VANISHED, message=f"file disappeared: {exc.strerror}")
    except PermissionError as exc:
        result.update(reason=outcomes.PERMISSION, message=f"cannot read: {exc.strerror}")
    except _ChangedWhileRead:
        result.update(reason=outcomes.IO_ERROR, message="the file changed while it was read")
    except converters.ConversionError as exc:
        result.update(reason=exc.reason, message=exc.message)
    except MemoryError:
        result.update(reason=outcomes.TOO_LARGE, message="out of memory (workers.memory_limit_mb)")
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            result.update(reason=outcomes.DISK_FULL, message=str(exc))
        else:
            result.update(reason=outcomes.IO_ERROR, message=f"{exc.strerror or exc}")
    except Exception as exc:  # a decoder bug must fail this image only
        result.update(reason=outcomes.CORRUPT, message=f"{type(exc).__name__}: {exc}")
    else:
        result.update(
            ok=True,
            content_hash=conversion.content_hash,
            thumbnails=[(t.size, t.path, t.width, t.height) for t in conversion.thumbnails],
            timings={"read": read_seconds, **conversion.timings},
        )
    result["bytes"] = len(data) if "data" in locals() else 0
    result["seconds"] = time.perf_counter() - started
    if shm is not None:
        if isinstance(data, memoryview):
            with contextlib.suppress(BufferError):
                data.release()
        _forget_mapping(shm, _mappings)
    return result


if __name__ == "__main__":  # pragma: no cover - workers are started by the supervisor
    sys.exit("photoscand.worker is started by the daemon")
