"""A FUSE filesystem that mirrors a folder read-only and serves its reads like one 7200 rpm disk.

Hazard: the model only holds while every application read reaches this process, so the mount turns
the kernel's page cache off (direct_io), and the simulated time is real: each request sleeps its
service time while holding the one head's lock. docs/hddsim.md states the model and its constants.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import socketserver
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

MB = 1_000_000  # disk vendors' megabyte; every rate and size in the model uses it

# Paths reach Python as bytes from libfuse; fusepy decodes them with a codec named by string. A
# name that is not UTF-8 must survive the round trip, so a codec with surrogateescape is
# registered under its own name (fusepy cannot pass an errors= argument).
_FS_CODEC = "hddsim-utf8-surrogateescape"


def _codec_search(name: str) -> codecs.CodecInfo | None:
    if name.replace("_", "-") != _FS_CODEC:
        return None
    return codecs.CodecInfo(
        name=_FS_CODEC,
        encode=lambda s, errors="strict": codecs.utf_8_encode(s, "surrogateescape"),
        decode=lambda b, errors="strict": codecs.utf_8_decode(b, "surrogateescape", True),
    )


codecs.register(_codec_search)


# --------------------------------------------------------------------------------------------
# The disk model: pure arithmetic, no I/O


@dataclass(frozen=True)
class DiskModel:
    """Timing of one head on one platter; every figure is that of a 2 TB 7200 rpm desktop disk."""

    rpm: float = 7200.0
    rate_mbs: float = 150.0  # sustained media transfer rate, MB/s
    settle_ms: float = 1.0  # shortest seek (track to track, including settling)
    full_stroke_ms: float = 15.0  # seek across the whole platter
    capacity_gb: float = 2000.0  # bytes the full stroke spans
    time_scale: float = 1.0  # multiplies every sleep; 0.01 makes tests fast, counts are unchanged

    def __post_init__(self) -> None:
        for name in ("rpm", "rate_mbs", "capacity_gb", "time_scale"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive")
        if not 0 <= self.settle_ms <= self.full_stroke_ms:
            raise ValueError("need 0 <= settle_ms <= full_stroke_ms")

    @property
    def revolution_s(self) -> float:
        return 60.0 / self.rpm

    @property
    def half_rotation_s(self) -> float:
        """Mean rotational latency after a seek: half a revolution."""
        return self.revolution_s / 2

    @property
    def rate_bps(self) -> float:
        return self.rate_mbs * MB

    def transfer_s(self, nbytes: int) -> float:
        return nbytes / self.rate_bps

    def seek_s(self, distance: int) -> float:
        """Arm travel for a jump of `distance` bytes: settle + (full - settle) * sqrt(d / size)."""
        if distance == 0:
            return 0.0
        fraction = min(1.0, abs(distance) / (self.capacity_gb * 1000 * MB))
        return (self.settle_ms + (self.full_stroke_ms - self.settle_ms) * math.sqrt(fraction)) / 1e3

    def position_s(self, head: int, start: int) -> tuple[str, float]:
        """How the head gets from `head` to `start`: ("none" | "skip" | "seek", seconds).

        A forward jump short enough that letting the platter turn past the gap is cheaper than a
        seek plus half a rotation is a "skip" (the disk just reads on); anything else is a seek.
        """
        if start == head:
            return "none", 0.0
        seek = self.seek_s(start - head) + self.half_rotation_s
        if start > head:
            wait = self.transfer_s(start - head)
            if wait < seek:
                return "skip", wait
        return "seek", seek


# --------------------------------------------------------------------------------------------
# The layout: where each file lies on the virtual platter, and its inode number


@dataclass
class Entry:
    path: str  # "/a/b.jpg", relative to the mirrored folder
    ino: int
    is_file: bool
    offset: int = 0  # first byte on the platter (files only)
    size: int = 0  # bytes reserved on the platter (the size when first seen)


@dataclass
class Layout:
    """Files in a fixed platter order with gaps between them; inode numbers follow that order."""

    gap_mb: float = 4.0
    seed: int = 0
    order: str = "sorted"  # "sorted": path order | "shuffled": seeded random order
    entries: dict[str, Entry] = field(default_factory=dict)
    end: int = 0  # first free byte after the last file
    next_ino: int = 1
    rng: random.Random = field(default_factory=random.Random)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def plan(
        cls, source: Path, gap_mb: float = 4.0, seed: int = 0, order: str = "sorted"
    ) -> Layout:
        if order not in ("sorted", "shuffled"):
            raise ValueError("order must be 'sorted' or 'shuffled'")
        if gap_mb < 0:
            raise ValueError("gap_mb must be >= 0")
        layout = cls(gap_mb=gap_mb, seed=seed, order=order, rng=random.Random(seed))
        dirs: list[str] = []
        files: list[tuple[str, int]] = []
        for root, dirnames, filenames in os.walk(source):
            relative = os.path.relpath(root, source)
            rel = "/" if relative == "." else "/" + relative.replace(os.sep, "/")
            dirs.append(rel)
            for name in dirnames + filenames:
                st = os.lstat(os.path.join(root, name))
                if stat.S_ISREG(st.st_mode):
                    files.append((_join(rel, name), st.st_size))
        dirs.sort(key=_path_key)
        files.sort(key=lambda item: _path_key(item[0]))
        if order == "shuffled":
            layout.rng.shuffle(files)
        for path in dirs:  # "/" comes first and gets inode 1, as FUSE expects of the root
            layout._add_dir(path)
        for path, size in files:
            layout._add_file(path, size)
        return layout

    def _add_dir(self, path: str) -> Entry:
        entry = Entry(path, self.next_ino, is_file=False)
        self.next_ino += 1
        self.entries[path] = entry
        return entry

    def _add_file(self, path: str, size: int) -> Entry:
        gap = round(self.gap_mb * MB * self.rng.uniform(0.5, 1.5))
        entry = Entry(path, self.next_ino, is_file=True, offset=self.end + gap, size=size)
        self.next_ino += 1
        self.end = entry.offset + size
        self.entries[path] = entry
        return entry

    def lookup(self, path: str, st: os.stat_result) -> Entry:
        """The entry of `path`; one that appeared in the source after mounting goes at the end."""
        entry = self.entries.get(path)
        if entry is not None and entry.is_file == stat.S_ISREG(st.st_mode):
            return entry
        with self.lock:  # FUSE threads may meet the same new name at once
            entry = self.entries.get(path)
            if entry is None or entry.is_file != stat.S_ISREG(st.st_mode):
                if stat.S_ISREG(st.st_mode):
                    entry = self._add_file(path, st.st_size)
                else:
                    entry = self._add_dir(path)
            return entry

    def files(self) -> list[Entry]:
        """Files in platter order."""
        with self.lock:  # FUSE threads may be adding new names meanwhile
            placed = [e for e in self.entries.values() if e.is_file]
        return sorted(placed, key=lambda e: e.offset)


def warm(source: Path, layout: Layout) -> None:
    """Ask the kernel to pull every file into the page cache, so the source is never the slow part.

    The simulated service time includes the real read from the source; a cold read from a slow
    source could take longer than the model allows (`late_requests` counts those).
    """
    for entry in layout.files():
        try:
            fd = os.open(str(source) + entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def _join(parent: str, name: str) -> str:
    return parent.rstrip("/") + "/" + name


def _path_key(path: str) -> tuple[str, ...]:
    # Component-wise so that a folder's contents stay together ("a/b" before "a.b").
    return tuple(p for p in path.split("/") if p)


# --------------------------------------------------------------------------------------------
# The head: one request at a time, each one sleeping its service time


STAT_FIELDS = (
    "requests",
    "bytes_read",
    "seeks",
    "skips",
    "seek_distance_bytes",
    "seek_seconds",
    "rotation_seconds",
    "skip_seconds",
    "transfer_seconds",
    "model_seconds",
    "overlap_seconds",
    "busy_seconds",
    "late_requests",
    "max_queue_depth",
)


class Head:
    """The one read head: a lock, a position and counters."""

    def __init__(self, model: DiskModel) -> None:
        self.model = model
        self._lock = threading.Lock()  # the head itself: held for the whole service time
        self._meta = threading.Lock()  # guards counters read while the head is busy
        self.position = 0
        self._ready_at = 0.0  # perf_counter() when the head finished its last request
        self._waiting = 0
        self.version = 0
        self._reset_counters()

    def _reset_counters(self) -> None:
        self.counters: dict[str, float] = {name: 0 for name in STAT_FIELDS}
        self.since = time.time()

    def serve(self, start: int, nbytes: int, fetch: Any) -> bytes:
        """Move to `start`, call `fetch()` for the bytes, and sleep until the model's time is up."""
        with self._meta:
            self._waiting += 1
            depth = self._waiting
            if depth > self.counters["max_queue_depth"]:
                self.counters["max_queue_depth"] = depth
        try:
            with self._lock:
                began = time.perf_counter()
                kind, position_s = self.model.position_s(self.position, start)
                # The source read happens inside the service time, so the source's own speed
                # (SSD or page cache) is hidden unless it is slower than the simulated disk.
                data = fetch()
                fetched = time.perf_counter()
                n = len(data)
                if not n:  # at or past EOF: nothing passes under the head
                    kind, position_s = "none", 0.0
                transfer_s = self.model.transfer_s(n)
                service_s = position_s + transfer_s
                scale = self.model.time_scale
                if kind == "seek" or not n:
                    deadline = began + service_s * scale
                else:
                    # The platter kept turning since the last request ended, and a disk reads
                    # ahead into its cache: a request that continues (or skips a little ahead)
                    # finishes when those bytes have passed the head, which may be already.
                    # This also absorbs the per-request overhead of FUSE and of sleep().
                    deadline = max(began, self._ready_at + service_s * scale)
                overlap_s = (began + service_s * scale - deadline) / scale
                # The source read alone outlasted the modelled media time: the source set the pace.
                late = n > 0 and fetched - began > service_s * scale
                while (left := deadline - time.perf_counter()) > 0:
                    time.sleep(left)
                busy = time.perf_counter() - began
                with self._meta:
                    c = self.counters
                    c["requests"] += 1
                    c["bytes_read"] += n
                    if kind == "seek":
                        c["seeks"] += 1
                        c["seek_distance_bytes"] += abs(start - self.position)
                        c["seek_seconds"] += position_s - self.model.half_rotation_s
                        c["rotation_seconds"] += self.model.half_rotation_s
                    elif kind == "skip":
                        c["skips"] += 1
                        c["skip_seconds"] += position_s
                    c["transfer_seconds"] += transfer_s
                    c["model_seconds"] += service_s
                    c["overlap_seconds"] += overlap_s
                    c["busy_seconds"] += busy
                    c["late_requests"] += late
                    if n:
                        self.position = start + n
                        self._ready_at = deadline
                    self.version += 1
                return data
        finally:
            with self._meta:
                self._waiting -= 1

    def stats(self) -> dict[str, Any]:
        with self._meta:
            out: dict[str, Any] = dict(self.counters)
            for name in STAT_FIELDS:
                if not name.endswith("_seconds"):
                    out[name] = int(out[name])
            out["head_position"] = self.position
            out["since"] = self.since
            out["model"] = asdict(self.model)
            return out

    def reset(self, counters: bool = True, head: bool = True) -> None:
        # Taking the head lock waits for a request in service, so a reset never splits one.
        with self._lock, self._meta:
            if counters:
                self._reset_counters()
            if head:
                self.position = 0
                self._ready_at = 0.0
            self.version += 1


# --------------------------------------------------------------------------------------------
# The FUSE filesystem


def _fuse() -> Any:
    # Imported late: fusepy loads libfuse.so.2 at import time, and the pure model above must stay
    # usable (and testable) where libfuse is missing.
    import fuse

    return fuse


def make_filesystem(
    source: Path,
    layout: Layout,
    head: Head,
    on_init: Callable[[], None] = lambda: None,
    on_destroy: Callable[[], None] = lambda: None,
) -> Any:
    """The fusepy Operations object of the mirror; the hooks run when FUSE starts and stops."""
    fuse = _fuse()

    class HddSimFS(fuse.Operations):
        use_ns = True  # times as integer nanoseconds: mtimes pass through exactly

        def __init__(self) -> None:
            self.source = str(source)

        def _real(self, path: str) -> str:
            return self.source + path if path != "/" else self.source

        def _attrs(self, path: str, st: os.stat_result) -> dict[str, Any]:
            entry = layout.lookup(path, st)
            return {
                "st_ino": entry.ino,
                "st_mode": st.st_mode & ~0o222,  # read-only: no write bits
                "st_nlink": st.st_nlink,
                "st_uid": st.st_uid,
                "st_gid": st.st_gid,
                "st_size": st.st_size,
                "st_blocks": st.st_blocks,
                "st_blksize": st.st_blksize,
                "st_atime": st.st_atime_ns,
                "st_mtime": st.st_mtime_ns,
                "st_ctime": st.st_ctime_ns,
            }

        def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
            return self._attrs(path, os.lstat(self._real(path)))

        def readdir(self, path: str, fh: int) -> Iterator[tuple[str, dict[str, Any] | None, int]]:
            yield ".", None, 0
            yield "..", None, 0
            real = self._real(path)
            for name in sorted(os.listdir(real)):
                try:
                    st = os.lstat(os.path.join(real, name))
                except FileNotFoundError:
                    continue
                # d_ino must equal st_ino: a reader may order files by DirEntry.inode() alone.
                yield (
                    name,
                    {"st_ino": layout.lookup(_join(path, name), st).ino, "st_mode": st.st_mode},
                    0,
                )

        def readlink(self, path: str) -> str:
            return os.readlink(self._real(path))

        def statfs(self, path: str) -> dict[str, int]:
            sv = os.statvfs(self.source)
            keys = ("f_bsize", "f_frsize", "f_blocks", "f_bfree", "f_bavail", "f_files")
            return {k: getattr(sv, k) for k in (*keys, "f_ffree", "f_favail", "f_namemax")}

        def access(self, path: str, amode: int) -> int:
            if amode & os.W_OK:
                raise fuse.FuseOSError(errno.EROFS)
            if not os.access(self._real(path), amode):
                raise fuse.FuseOSError(errno.EACCES)
            return 0

        def open(self, path: str, flags: int) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_TRUNC | os.O_APPEND | os.O_CREAT):
                raise fuse.FuseOSError(errno.EROFS)
            return os.open(self._real(path), os.O_RDONLY)

        def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
            entry = layout.lookup(path, os.fstat(fh))
            return head.serve(entry.offset + offset, size, lambda: os.pread(fh, size, offset))

        def release(self, path: str, fh: int) -> int:
            os.close(fh)
            return 0

        def init(self, path: str) -> None:
            on_init()

        def destroy(self, path: str) -> None:
            on_destroy()

    return HddSimFS()


def _quiet_thread(target: Any, name: str) -> threading.Thread:
    def run() -> None:
        # libfuse ends its loop from a C signal handler that must run on the main thread (it
        # interrupts sem_wait there); a Python thread must never be the one that takes SIGTERM.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


class _ControlHandler(socketserver.StreamRequestHandler):
    """One command per line: stats | reset | reset-head | reset-counters | layout | ping."""

    def handle(self) -> None:
        server: Any = self.server
        head: Head = server.head
        layout: Layout = server.layout
        for raw in self.rfile:
            command = raw.decode("utf-8", "replace").strip()
            reply: Any
            if command == "stats":
                reply = head.stats()
            elif command in ("reset", "reset-head", "reset-counters"):
                head.reset(counters=command != "reset-head", head=command != "reset-counters")
                reply = {"ok": True}
            elif command == "layout":
                reply = [asdict(e) for e in layout.files()]
            elif command == "ping":
                reply = {"ok": True, "pid": os.getpid()}
            else:
                reply = {"error": f"unknown command {command!r}"}
            self.wfile.write(json.dumps(reply).encode() + b"\n")
            self.wfile.flush()


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # readers never see a half-written file


def serve(
    source: Path,
    mountpoint: Path,
    model: DiskModel,
    layout: Layout,
    *,
    foreground: bool = True,
    control: Path | None = None,
    stats_file: Path | None = None,
    parent_pid: int | None = None,
    allow_other: bool = False,
) -> None:
    """Mount and serve until unmounted or sent SIGTERM/SIGINT."""
    fuse = _fuse()
    head = Head(model)
    stop = threading.Event()
    server: socketserver.ThreadingUnixStreamServer | None = None

    def start_threads() -> None:
        # Started from FUSE's init, not before: without --foreground libfuse forks into the
        # background after mounting, and threads do not survive a fork.
        nonlocal server
        if control is not None:
            with contextlib.suppress(FileNotFoundError):
                control.unlink()
            server = socketserver.ThreadingUnixStreamServer(str(control), _ControlHandler)
            server.daemon_threads = True
            server.head = head  # type: ignore[attr-defined]
            server.layout = layout  # type: ignore[attr-defined]
            _quiet_thread(lambda: server.serve_forever(0.05), "hddsim-control")
        if stats_file is not None:
            _quiet_thread(lambda: _stats_writer(head, stats_file, stop), "hddsim-stats")
        if parent_pid is not None:
            _quiet_thread(lambda: _parent_watch(parent_pid, stop), "hddsim-parent")

    def stop_threads() -> None:
        stop.set()
        if server is not None:
            server.shutdown()
            server.server_close()
            with contextlib.suppress(FileNotFoundError):
                control.unlink()  # type: ignore[union-attr]
        if stats_file is not None:
            _write_json_atomic(stats_file, head.stats())

    options: dict[str, Any] = {
        "foreground": foreground,
        "ro": True,
        "use_ino": True,  # pass our st_ino through instead of libfuse's own counter
        "direct_io": True,  # no page cache: every read(2) becomes requests to this process
        "max_readahead": 0,
        "fsname": "hddsim",
        "subtype": "hddsim",
        "allow_other": allow_other,
    }
    # No kernel_cache, no auto_cache: both would let the page cache answer repeated reads.
    operations = make_filesystem(source, layout, head, start_threads, stop_threads)
    fuse.FUSE(operations, str(mountpoint), encoding=_FS_CODEC, **options)


def _stats_writer(head: Head, path: Path, stop: threading.Event) -> None:
    written = -1
    while True:
        if head.version != written:
            written = head.version
            _write_json_atomic(path, head.stats())
        if stop.wait(0.2):
            return


def _parent_watch(parent_pid: int, stop: threading.Event) -> None:
    # A benchmark that dies without unmounting would leave a live mount behind; SIGTERM makes
    # libfuse leave its loop and unmount (lazily, as root) before the process exits.
    while not stop.wait(0.5):
        if os.getppid() != parent_pid:
            os.kill(os.getpid(), signal.SIGTERM)
            return


# --------------------------------------------------------------------------------------------
# Python API: start the filesystem as a subprocess and stop it again


_MODEL_FLAGS = {f.name: "--" + f.name.replace("_", "-") for f in fields(DiskModel)}
_LAYOUT_FLAGS = {"gap_mb": "--gap-mb", "seed": "--seed", "order": "--order"}


def is_mounted(mountpoint: Path | str) -> bool:
    """Whether `mountpoint` is a mount point in /proc/self/mountinfo."""
    target = os.fsencode(os.path.realpath(mountpoint))
    with open("/proc/self/mountinfo", "rb") as fh:
        for line in fh:
            field_ = line.split(b" ")[4]
            # mountinfo escapes space, tab, newline and backslash as three octal digits
            unescaped = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), field_)
            if unescaped == target:
                return True
    return False


class HddSim:
    """A live mount: query and reset the simulated disk through its control socket."""

    def __init__(
        self, source: Path, mountpoint: Path, control: Path, proc: subprocess.Popen[bytes]
    ):
        self.source = source
        self.mountpoint = mountpoint
        self.control = control
        self.proc = proc

    def command(self, command: str, timeout: float = 10.0) -> Any:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(str(self.control))
            sock.sendall(command.encode() + b"\n")
            with sock.makefile("rb") as fh:
                line = fh.readline()
        if not line:
            raise RuntimeError(f"hddsim control socket closed on {command!r}")
        reply = json.loads(line)
        if isinstance(reply, dict) and "error" in reply:
            raise RuntimeError(reply["error"])
        return reply

    def stats(self) -> dict[str, Any]:
        """Counters since the last reset: requests, bytes_read, seeks, skips, busy_seconds, ..."""
        return self.command("stats")

    def reset(self) -> None:
        """Zero the counters and park the head at byte 0, so that runs start equal."""
        self.command("reset")

    def reset_head(self) -> None:
        self.command("reset-head")

    def reset_counters(self) -> None:
        self.command("reset-counters")

    def layout(self) -> list[dict[str, Any]]:
        """Files in platter order: path, ino, offset, size."""
        return self.command("layout")


@contextlib.contextmanager
def mounted(
    source: Path | str,
    mountpoint: Path | str,
    *,
    stats_file: Path | str | None = None,
    start_timeout: float = 20.0,
    **model: Any,
) -> Iterator[HddSim]:
    """Mount `source` at `mountpoint` as a simulated disk; unmount and stop it on exit.

    `model` takes DiskModel's fields (rpm, rate_mbs, settle_ms, full_stroke_ms, capacity_gb,
    time_scale) and the layout's (gap_mb, seed, order).
    """
    unknown = set(model) - set(_MODEL_FLAGS) - set(_LAYOUT_FLAGS)
    if unknown:
        raise TypeError(f"unknown model parameters: {sorted(unknown)}")
    source = Path(source).resolve()
    mountpoint = Path(mountpoint).resolve()
    if is_mounted(mountpoint):
        raise RuntimeError(f"{mountpoint} is already a mount point")
    # A Unix socket path is limited to 108 bytes; tmp_path-style folders can be longer.
    workdir = Path(tempfile.mkdtemp(prefix="hddsim-"))
    control = workdir / "ctl"
    log_path = workdir / "log"
    cmd = [sys.executable, str(Path(__file__).resolve()), str(source), str(mountpoint)]
    cmd += ["--foreground", "--control", str(control), "--parent-pid", str(os.getpid())]
    if stats_file is not None:
        cmd += ["--stats", str(Path(stats_file).resolve())]
    for name, value in model.items():
        cmd += [{**_MODEL_FLAGS, **_LAYOUT_FLAGS}[name], str(value)]
    proc: subprocess.Popen[bytes] | None = None
    try:
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        handle = HddSim(source, mountpoint, control, proc)
        _wait_live(handle, log_path, start_timeout)
        yield handle
    finally:
        try:
            if proc is not None:
                _unmount(mountpoint, proc)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)


def _wait_live(handle: HddSim, log_path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if handle.proc.poll() is not None:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(
                f"hddsim exited with {handle.proc.returncode} before mounting:\n{log}"
            )
        if is_mounted(handle.mountpoint) and handle.control.exists():
            with contextlib.suppress(OSError):
                handle.command("ping", timeout=1.0)
                return
        if time.monotonic() > deadline:
            log = log_path.read_text(errors="replace")
            raise RuntimeError(f"hddsim did not mount within {timeout} s:\n{log}")
        time.sleep(0.02)


def _run_quiet(cmd: list[str]) -> bool:
    if shutil.which(cmd[0]) is None:
        return False
    return subprocess.run(cmd, capture_output=True, timeout=30).returncode == 0


def _unmount(mountpoint: Path, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Unmount and stop the process, whatever state either is in; raise if a mount remains."""
    mp = str(mountpoint)
    unmounted = False
    if proc.poll() is None and is_mounted(mountpoint):
        for cmd in (["fusermount3", "-u", mp], ["fusermount", "-u", mp], ["umount", mp]):
            if _run_quiet(cmd):
                unmounted = True
                break
    if not unmounted and proc.poll() is None:
        # A plain unmount fails while something still has a file open or mapped (EBUSY);
        # SIGTERM makes libfuse leave its loop and detach the mount lazily, as root.
        proc.terminate()
    try:
        proc.wait(timeout=timeout / 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=timeout / 2)
    # A process killed by SIGKILL, or one that crashed, leaves a dead mount
    # ("Transport endpoint is not connected") that only a lazy unmount clears.
    if is_mounted(mountpoint):
        for cmd in (["fusermount3", "-uz", mp], ["umount", "-l", mp]):
            if _run_quiet(cmd):
                break
    deadline = time.monotonic() + timeout
    while is_mounted(mountpoint):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint} is still mounted")
        time.sleep(0.02)


# --------------------------------------------------------------------------------------------
# Command line


def _control_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hddsim.py ctl", description="Talk to a running hddsim.")
    parser.add_argument("socket", type=Path, help="the --control socket of the running hddsim")
    parser.add_argument(
        "command", choices=["stats", "reset", "reset-head", "reset-counters", "layout", "ping"]
    )
    args = parser.parse_args(argv)
    handle = HddSim(Path(), Path(), args.socket, None)  # type: ignore[arg-type]
    print(json.dumps(handle.command(args.command), indent=1))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["ctl"]:
        return _control_main(argv[1:])
    defaults = DiskModel()
    parser = argparse.ArgumentParser(
        description="Mirror SOURCE read-only at MOUNTPOINT, served like one 7200 rpm disk.",
        epilog="Also: hddsim.py ctl SOCKET {stats,reset,reset-head,reset-counters,layout,ping}",
    )
    parser.add_argument("source", type=Path)
    parser.add_argument("mountpoint", type=Path)
    parser.add_argument(
        "--stats", type=Path, help="JSON file rewritten whenever the counters change"
    )
    parser.add_argument("--control", type=Path, help="Unix socket for stats/reset commands")
    parser.add_argument("--gap-mb", type=float, default=4.0, help="mean gap between files (MB)")
    parser.add_argument("--seed", type=int, default=0, help="seed of gap sizes and shuffled order")
    parser.add_argument("--order", choices=["sorted", "shuffled"], default="sorted")
    parser.add_argument("--rpm", type=float, default=defaults.rpm)
    parser.add_argument("--rate-mbs", type=float, default=defaults.rate_mbs)
    parser.add_argument("--settle-ms", type=float, default=defaults.settle_ms)
    parser.add_argument("--full-stroke-ms", type=float, default=defaults.full_stroke_ms)
    parser.add_argument("--capacity-gb", type=float, default=defaults.capacity_gb)
    parser.add_argument("--time-scale", type=float, default=defaults.time_scale)
    parser.add_argument("--foreground", action="store_true", help="do not detach")
    parser.add_argument("--allow-other", action="store_true", help="let other users read it")
    parser.add_argument(
        "--parent-pid", type=int, help="with --foreground: unmount when this process is gone"
    )
    parser.add_argument(
        "--no-warm", action="store_true", help="do not preload the source into the page cache"
    )
    args = parser.parse_args(argv)
    model = DiskModel(
        rpm=args.rpm,
        rate_mbs=args.rate_mbs,
        settle_ms=args.settle_ms,
        full_stroke_ms=args.full_stroke_ms,
        capacity_gb=args.capacity_gb,
        time_scale=args.time_scale,
    )
    source = args.source.resolve()
    if not source.is_dir():
        parser.error(f"{source} is not a folder")
    layout = Layout.plan(source, gap_mb=args.gap_mb, seed=args.seed, order=args.order)
    if not args.no_warm:
        warm(source, layout)
    serve(
        source,
        args.mountpoint.resolve(),
        model,
        layout,
        foreground=args.foreground,
        control=args.control.resolve() if args.control else None,
        stats_file=args.stats.resolve() if args.stats else None,
        parent_pid=args.parent_pid,
        allow_other=args.allow_other,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
