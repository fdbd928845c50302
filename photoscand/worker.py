"""Code that runs in the daemon's child processes: the metadata parser and the converters.

Children come from the fork server (see :mod:`photoscand.children`), get plain data, and
talk to the daemon over one pipe each, in the typed messages of :mod:`photoscand.protocol`.
They never open the catalog and never touch metrics: they receive a request, do it, and
send back an answer. The daemon kills them on a timeout, so nothing here needs to guard
against hangs in the libraries it calls.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import mmap
import os
import resource
import signal
import stat
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection

from photoscand import outcomes
from photoscand.protocol import (
    STOP,
    ConversionFailed,
    ConversionJob,
    ConversionResult,
    Converted,
    FileIdentity,
    MetadataAnswer,
    MetadataRequest,
    NotAPhoto,
    Parsed,
    PhotoMetadata,
    SharedBytes,
    SweepDone,
    ThumbnailSettings,
    Unreadable,
    WorkerReady,
)

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


class OutputCatcher:
    """What this process writes to its stdout and stderr, caught per request.

    Decoders' C libraries (LibRaw, libheif, libtiff) print warnings straight to file
    descriptors 1 and 2, which the children share with the daemon: in the daemon's JSON log
    such a line would break every reader. Both descriptors point instead at one memory file;
    after each request its text is taken and sent along with the answer, and the daemon logs
    it as an event on the image it came from.
    """

    LIMIT = 4000  # characters kept of one request's output

    def __init__(self) -> None:
        self._fd = os.memfd_create("photoscand-output", os.MFD_CLOEXEC)
        for target in (1, 2):
            os.dup2(self._fd, target)

    def take(self) -> str:
        """The text written since the last call (the memory file starts over)."""
        with contextlib.suppress(ValueError, OSError):
            sys.stdout.flush()
            sys.stderr.flush()
        size = os.lseek(self._fd, 0, os.SEEK_END)
        if size == 0:
            return ""
        data = os.pread(self._fd, min(size, 4 * self.LIMIT), 0)
        # 1 and 2 share the memory file's offset with this descriptor: both start over too.
        os.ftruncate(self._fd, 0)
        os.lseek(self._fd, 0, os.SEEK_SET)
        return data.decode("utf-8", "replace").strip()[: self.LIMIT]


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
    """Answer one :class:`MetadataRequest` at a time for the daemon's phase 1, in order."""
    _child_setup(b"photoscand-meta")
    # Imported here: the metadata process must not depend on the converters, nor they on it.
    from photoscand.metadata import read_metadata

    mappings: dict[str, mmap.mmap] = {}
    output = OutputCatcher()
    while True:
        try:
            request: MetadataRequest | None = conn.recv()
        except (EOFError, OSError):
            return
        if request is STOP:
            return
        started = time.perf_counter()
        if request.shared is None:
            outcome = _parse_file(request.path, read_metadata)
        else:
            view = attach(request.shared, mappings)
            try:
                metadata = read_metadata(request.path, view)
            finally:
                with contextlib.suppress(BufferError):
                    view.release()
                forget_mapping(request.shared, mappings)
            outcome = NotAPhoto("not a photo") if metadata is None else Parsed(None, metadata)
        seconds = time.perf_counter() - started
        conn.send(MetadataAnswer(request.seq, outcome, seconds, output.take()))


def _parse_file(
    path: bytes, read_metadata: Callable[[bytes], PhotoMetadata | None]
) -> Parsed | NotAPhoto | Unreadable:
    try:
        st = os.lstat(path)
        if not stat.S_ISREG(st.st_mode):
            return NotAPhoto("not a regular file")
        metadata = read_metadata(path)
        if metadata is None:
            return NotAPhoto("not a photo")
        # The row should describe the bytes that were parsed: stat again after reading.
        after = os.lstat(path)
    except OSError as exc:
        return Unreadable(errno.errorcode.get(exc.errno or 0, "EIO"), exc.strerror or str(exc))
    return Parsed(
        FileIdentity(after.st_size, after.st_mtime_ns, after.st_dev, after.st_ino), metadata
    )


def attach(shared: SharedBytes, cache: dict[str, mmap.mmap]) -> memoryview:
    """The bytes the prefetcher read, mapped read-only from the daemon's memory file.

    The window's mapping (``keep``) is cached across jobs; a photo larger than the window
    has its own memory, mapped for one job.
    """
    mapping = cache.get(shared.path)
    if mapping is None:
        fd = os.open(shared.path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if shared.keep:
                _allow_shared(os.fstat(fd).st_size)
            mapping = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        cache[shared.path] = mapping
    return memoryview(mapping)[shared.offset : shared.offset + shared.length]


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


def forget_mapping(shared: SharedBytes, cache: dict[str, mmap.mmap]) -> None:
    """Unmap a photo's own memory once its job is done (the window's mapping stays)."""
    if not shared.keep:
        mapping = cache.pop(shared.path, None)
        if mapping is not None:
            # A view still exported (held by a decoder object) keeps it mapped until
            # garbage collection; that is fine, the daemon already owns the memory.
            with contextlib.suppress(BufferError):
                mapping.close()


# -- phase 2: the conversion workers ---------------------------------------------------


def conversion_main(conn: Connection, settings: ThumbnailSettings) -> None:
    """Convert one :class:`ConversionJob` at a time for the daemon's phase 2."""
    _child_setup(b"photoscand-work", nice=settings.nice)
    _keep_freed_memory()
    _limit_memory(settings.memory_limit_mb)
    output = OutputCatcher()
    conn.send(WorkerReady(os.getpid()))
    mappings: dict[str, mmap.mmap] = {}
    while True:
        try:
            job: ConversionJob | None = conn.recv()
        except (EOFError, OSError):
            return
        if job is STOP:
            return
        result = convert_job(job, settings, mappings)
        conn.send(dataclasses.replace(result, output=output.take()))


def sweep_main(conn: Connection, out_dir: str) -> None:
    """Delete the temporary thumbnails that workers of an earlier run left behind.

    Runs once at start-up, before any worker: a worker SIGKILLed mid-write (the daemon
    killed, power lost) leaves its hidden temporary file, and no running worker can own one
    yet. A child does it so the daemon's main thread neither walks the thumbnail tree nor
    imports the converters.
    """
    _child_setup(b"photoscand-sweep")
    from photoscand import converters

    conn.send(SweepDone(converters.remove_stale_temp_files(out_dir)))


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


def convert_job(
    job: ConversionJob, settings: ThumbnailSettings, mappings: dict[str, mmap.mmap]
) -> ConversionResult:
    """Read a photo once (or map the bytes the prefetcher read), convert it, and describe
    the outcome."""
    # Imported here, not at the top: the metadata process runs this module too, and must
    # not depend on the converters (the fork server has them loaded already).
    from photoscand import converters

    started = time.perf_counter()
    data: bytes | memoryview = b""
    try:
        data = attach(job.shared, mappings) if job.shared else _read_whole(job.path)
        read_seconds = time.perf_counter() - started
        conversion = converters.convert(
            data,
            settings,
            format_hint=job.format,
            orientation=job.orientation,
            reuse_existing=job.reuse,
        )
        return Converted(
            job.image_id,
            conversion.content_hash,
            tuple(conversion.thumbnails),
            time.perf_counter() - started,
            {"read": read_seconds, **conversion.timings},
        )
    except Exception as exc:  # a decoder bug must fail this image only
        reason, message = _failure(exc)
        return ConversionFailed(job.image_id, reason, message, time.perf_counter() - started)
    finally:
        if job.shared is not None:
            if isinstance(data, memoryview):
                with contextlib.suppress(BufferError):
                    data.release()
            forget_mapping(job.shared, mappings)


def _failure(exc: Exception) -> tuple[str, str]:
    """The reason word and message for what a conversion raised."""
    from photoscand.converters import ConversionError

    if isinstance(exc, ConversionError):
        return exc.reason, exc.message
    if isinstance(exc, FileNotFoundError):
        return outcomes.VANISHED, f"file disappeared: {exc.strerror}"
    if isinstance(exc, PermissionError):
        return outcomes.PERMISSION, f"cannot read: {exc.strerror}"
    if isinstance(exc, _ChangedWhileRead):
        return outcomes.IO_ERROR, "the file changed while it was read"
    if isinstance(exc, MemoryError):
        return outcomes.TOO_LARGE, "out of memory (workers.memory_limit_mb)"
    if isinstance(exc, OSError):
        if exc.errno == errno.ENOSPC:
            return outcomes.DISK_FULL, str(exc)
        return outcomes.IO_ERROR, f"{exc.strerror or exc}"
    return outcomes.CORRUPT, f"{type(exc).__name__}: {exc}"


if __name__ == "__main__":  # pragma: no cover - workers are started by the supervisor
    sys.exit("photoscand.worker is started by the daemon")
