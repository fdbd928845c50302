"""One sequential reader that feeds the workers from memory (``io.mode: prefetch``).

On a spinning disk, N workers each reading their own file make the head jump between
files for every chunk. Here one thread reads the claimed files whole, one after another,
in the order they lie on the disk, into a bounded shared-memory window; a worker gets
an image only once its bytes are in memory and never touches the disk.

The window is an anonymous memory file (``memfd``) of ``io.prefetch_window_mb`` that the
children map read-only through ``/proc/<daemon pid>/fd/<fd>``: a hard bound (the reader
waits for space), a consistent snapshot (the worker converts the bytes that were read,
whatever happens to the file afterwards), no copy through a pipe, and nothing left
behind in /dev/shm if the daemon is killed. A photo larger than the window is read
alone, into its own memory file, once the window is empty.

Hazards: the reader thread never touches the catalog (the daemon's loop owns it);
slices are released only when every child using them is done or dead, so memory a
child still reads is never overwritten.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from photoscand import outcomes
from photoscand.catalog import Job
from photoscand.metrics import Metrics
from photoscand.protocol import SharedBytes

READ_CHUNK = 8 << 20  # large sequential reads


class _Memory:
    """One anonymous shared-memory file and its mapping."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(self.fd, max(size, 1))
            self.map = mmap.mmap(self.fd, max(size, 1))
        except BaseException:
            os.close(self.fd)
            raise
        # Children open the same memory through the daemon's descriptor.
        self.path = f"/proc/{os.getpid()}/fd/{self.fd}"

    def close(self) -> None:
        with contextlib.suppress(BufferError, ValueError):
            self.map.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass(slots=True)
class _Block:
    offset: int
    length: int
    live: bool = True


class Arena:
    """A ring allocator over one shared-memory window; blocks may be freed in any order.

    Reading is sequential and dispatch roughly first-in first-out, so allocating at the
    head of a ring and reclaiming from its tail keeps the window contiguous and cheap.
    """

    def __init__(self, size: int) -> None:
        self.memory = _Memory(size, "photoscand-prefetch")
        self.size = size
        self._blocks: deque[_Block] = deque()
        self._by_offset: dict[int, _Block] = {}
        self._head = 0
        self.used = 0

    def allocate(self, length: int) -> int | None:
        """The offset of a free region of ``length`` bytes, or None when there is no room."""
        length = max(length, 1)
        if length > self.size:
            return None
        if not self._blocks:
            start: int | None = 0
        else:
            tail = self._blocks[0].offset
            wrapped = self._blocks[-1].offset < tail
            if wrapped:
                start = self._head if self._head + length <= tail else None
            elif self._head + length <= self.size:
                start = self._head
            elif length <= tail:
                start = 0
            else:
                start = None
        if start is None:
            return None
        block = _Block(start, length)
        self._blocks.append(block)
        self._by_offset[start] = block
        self._head = start + length
        self.used += length
        return start

    def free(self, offset: int) -> None:
        block = self._by_offset.pop(offset, None)
        if block is None or not block.live:
            return
        block.live = False
        self.used -= block.length
        while self._blocks and not self._blocks[0].live:
            self._blocks.popleft()
        if not self._blocks:
            self._head = 0

    def view(self, offset: int, length: int) -> memoryview:
        return memoryview(self.memory.map)[offset : offset + length]

    def close(self) -> None:
        self.memory.close()


@dataclass(slots=True)
class Loaded:
    """A claimed job whose bytes are in memory (or whose read failed)."""

    job: Job
    shared: SharedBytes | None = None
    reason: str | None = None  # set when the read failed
    message: str = ""
    users: int = 0  # children still using the bytes
    arena_offset: int | None = None
    own: _Memory | None = None  # a photo larger than the window has its own memory


class Prefetcher(threading.Thread):
    """The sequential reader thread.

    Args:
        window_bytes: io.prefetch_window_mb in bytes.
        wake: called when a job's bytes are ready (wakes the daemon's loop).
        metrics: the daemon's metrics (bytes read, read time, waits, window use).
    """

    def __init__(self, window_bytes: int, wake: Callable[[], None], metrics: Metrics) -> None:
        super().__init__(name="photoscand-prefetch", daemon=True)
        self.arena = Arena(window_bytes)
        self._wake = wake
        self.metrics = metrics
        self._cond = threading.Condition()
        self._todo: deque[Job] = deque()
        self._ready: deque[Loaded] = deque()
        self._loaded: dict[int, Loaded] = {}  # image id -> bytes held (ready or in use)
        self._reading: Job | None = None
        self._stopping = False
        metrics.prefetch_window_limit_bytes.set(window_bytes)

    # -- the daemon's side -------------------------------------------------------------

    def submit(self, jobs: list[Job]) -> None:
        with self._cond:
            self._todo.extend(jobs)
            self._cond.notify_all()

    def queued(self) -> int:
        """Jobs claimed and not yet handed to a worker."""
        with self._cond:
            return len(self._todo) + len(self._ready) + (1 if self._reading else 0)

    def held_ids(self) -> set[int]:
        """Every image this reader holds (to read, reading, ready, or in a worker)."""
        with self._cond:
            ids = {job.id for job in self._todo} | set(self._loaded)
            if self._reading is not None:
                ids.add(self._reading.id)
            return ids

    def take_ready(self) -> Loaded | None:
        with self._cond:
            return self._ready.popleft() if self._ready else None

    def put_back(self, loaded: Loaded) -> None:
        """A ready job no worker could take yet."""
        with self._cond:
            self._ready.appendleft(loaded)

    def wants(self, workers: int) -> int:
        """How many more jobs to claim to keep the reader ahead of the workers."""
        with self._cond:
            queued = len(self._todo) + len(self._ready) + (1 if self._reading else 0)
            queued_bytes = sum(job.size for job in self._todo)
            if self.arena.used + queued_bytes >= self.arena.size:
                return 0
            return max(0, max(4 * workers, 16) - queued)

    def use(self, loaded: Loaded) -> None:
        """A child starts using the bytes (a worker, or the metadata process)."""
        with self._cond:
            loaded.users += 1

    def done_with(self, image_id: int) -> None:
        """A child finished with (or died holding) an image's bytes."""
        with self._cond:
            loaded = self._loaded.get(image_id)
            if loaded is None:
                return
            loaded.users -= 1
            if loaded.users <= 0:
                self._release(loaded)

    def drop(self, loaded: Loaded) -> None:
        """The bytes of a job that will not be converted (its read failed, or stopping)."""
        with self._cond:
            if loaded.users <= 0:
                self._release(loaded)

    def _release(self, loaded: Loaded) -> None:
        self._loaded.pop(loaded.job.id, None)
        if loaded.arena_offset is not None:
            self.arena.free(loaded.arena_offset)
        if loaded.own is not None:
            loaded.own.close()
        self.metrics.prefetch_window_bytes.set(self.arena.used)
        self._cond.notify_all()

    def unclaimed(self) -> list[Job]:
        """Stop reading; the jobs never read (to go back to pending)."""
        with self._cond:
            self._stopping = True
            jobs = list(self._todo)
            self._todo.clear()
            jobs.extend(item.job for item in self._ready)
            for item in self._ready:
                self._release(item)
            self._ready.clear()
            self._cond.notify_all()
            return jobs

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self.join(timeout=10)
        self.arena.close()

    # -- the reader thread ---------------------------------------------------------------

    def run(self) -> None:
        while True:
            with self._cond:
                while not self._todo and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                job = self._todo.popleft()
                self._reading = job
            loaded = self._load(job)
            with self._cond:
                self._reading = None
                if loaded is None:  # stopping while waiting for room
                    self._todo.appendleft(job)
                    return
                if loaded.reason is None:
                    self._loaded[job.id] = loaded
                self._ready.append(loaded)
            self._wake()

    def _load(self, job: Job) -> Loaded | None:
        try:
            fd = os.open(job.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            return _failed(job, exc)
        try:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                return Loaded(job, reason=outcomes.UNSUPPORTED, message="not a regular file")
            with contextlib.suppress(OSError):
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            size = before.st_size
            loaded = self._allocate(job, size)
            if loaded is None:
                return None
            view = self._view(loaded, size)
            started = time.perf_counter()
            got = 0
            try:
                while got < size:
                    n = os.readv(fd, [view[got : min(size, got + READ_CHUNK)]])
                    if n == 0:
                        break
                    got += n
                after = os.fstat(fd)
            finally:
                view.release()
            self.metrics.prefetch_read_seconds.inc(time.perf_counter() - started)
            self.metrics.prefetch_bytes_read.inc(got)
            if got != size or (after.st_size, after.st_mtime_ns) != (size, before.st_mtime_ns):
                self._free_unused(loaded)
                return Loaded(
                    job, reason=outcomes.IO_ERROR, message="the file changed while it was read"
                )
            return loaded
        except OSError as exc:
            return _failed(job, exc)
        finally:
            os.close(fd)

    def _allocate(self, job: Job, size: int) -> Loaded | None:
        """Room for ``size`` bytes; waits (and counts the wait) while the window is full."""
        waited = time.perf_counter()
        with self._cond:
            while True:
                if self._stopping:
                    return None
                if size > self.arena.size:
                    # Larger than the whole window: read alone, once the window is empty.
                    if not self._loaded:
                        own = _Memory(size, "photoscand-prefetch-large")
                        loaded = Loaded(job, SharedBytes(own.path, 0, size, False), own=own)
                        break
                else:
                    offset = self.arena.allocate(size)
                    if offset is not None:
                        shared = SharedBytes(self.arena.memory.path, offset, size, True)
                        loaded = Loaded(job, shared, arena_offset=offset)
                        break
                self._cond.wait(timeout=1.0)
            self._loaded[job.id] = loaded
            self.metrics.prefetch_window_bytes.set(self.arena.used)
        self.metrics.prefetch_reader_wait_seconds.inc(time.perf_counter() - waited)
        return loaded

    def _view(self, loaded: Loaded, size: int) -> memoryview:
        if loaded.own is not None:
            return memoryview(loaded.own.map)[:size]
        assert loaded.arena_offset is not None
        return self.arena.view(loaded.arena_offset, size)

    def _free_unused(self, loaded: Loaded) -> None:
        with self._cond:
            self._release(loaded)


def _failed(job: Job, exc: OSError) -> Loaded:
    if exc.errno == errno.ENOENT:
        return Loaded(job, reason=outcomes.VANISHED, message="file disappeared before it was read")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return Loaded(job, reason=outcomes.PERMISSION, message=f"cannot read: {exc.strerror}")
    return Loaded(job, reason=outcomes.IO_ERROR, message=exc.strerror or str(exc))
