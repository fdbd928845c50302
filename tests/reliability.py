"""Shared tools of the fault-injection tests (tests/test_reliability_*.py): photo batches,
the end state every fault must leave behind, process-tree snapshots that survive a kill -9,
small tmpfs mounts, and running the daemon as an unprivileged user.

Hazards: these helpers mount filesystems, change sysctls and kill processes; each of them
restores what it changed in a ``finally`` and only ever kills pids it recorded itself.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from photoscand.converters.output import TEMP_SUFFIX
from tests.conftest import CORPUS, DaemonProcess, descendants, process_name, wait_for

# A 1024x768 camera JPEG: big enough that a conversion takes tens of milliseconds (kills
# land mid-conversion), small enough for batches of hundreds.
BASE_PHOTO = CORPUS / "cameras" / "exif-org_fujifilm-dx10.jpg"
SMALL_PHOTO = CORPUS / "cameras" / "Canon_40D.jpg"
# 2048x1536: for batches that must last while faults are injected.
LARGE_PHOTO = CORPUS / "cameras" / "Reconyx_HC500_Hyperfire.jpg"
NOBODY = 65534


def slow_jpeg(path: Path) -> Path:
    """A progressive 1600x1200 JPEG (no cheap DCT-scaled decode): about 0.1 s a conversion,
    so a batch of a few hundred lasts through many kills."""
    if not path.exists():
        with Image.open(LARGE_PHOTO) as im:
            im.convert("RGB").resize((1600, 1200)).save(path, quality=90, progressive=True)
    return path


def distinct_copies(folder: Path, count: int, base: Path = BASE_PHOTO, prefix: str = "p",
                    start: int = 0) -> list[Path]:  # fmt: skip
    """``count`` copies of a JPEG, each with different bytes (a unique trailer after the
    end-of-image marker, which decoders ignore), so each has its own content hash and
    its own thumbnails. Cheap: no encoding."""
    data = base.read_bytes()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + count):
        path = folder / f"{prefix}{i:05d}.jpg"
        path.write_bytes(data + b"photoscand-test-%08d" % i)
        paths.append(path)
    return paths


# -- the end state -------------------------------------------------------------------------


def temp_files(folder: Path) -> list[Path]:
    """Temporary thumbnail files (hidden, ``.tmp``) anywhere under a folder."""
    found = []
    for dirpath, _dirs, files in os.walk(folder):
        found += [Path(dirpath, f) for f in files if f.startswith(".") and f.endswith(TEMP_SUFFIX)]
    return found


def integrity(catalog: Path) -> str:
    conn = sqlite3.connect(catalog, timeout=10)
    try:
        return "; ".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def check_thumbnail(path: str, width: int, height: int, size: int) -> str | None:
    """Why a listed thumbnail is not a complete picture of the recorded size, or None."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        return f"{path}: {exc.strerror}"
    if path.endswith(".jpg") and not data.rstrip(b"\0").endswith(b"\xff\xd9"):
        return f"{path}: no JPEG end marker ({len(data)} bytes)"
    try:
        with Image.open(path) as im:
            im.load()  # LOAD_TRUNCATED_IMAGES is off: a cut file raises here
            if im.size != (width, height):
                return f"{path}: {im.size} on disk, {(width, height)} in the catalog"
    except (OSError, SyntaxError, ValueError) as exc:
        return f"{path}: does not decode ({exc})"
    if max(width, height) > size:
        return f"{path}: {width}x{height} is larger than its size {size}"
    return None


def assert_complete(daemon: DaemonProcess, expected: list[Path], sizes: int = 2) -> dict:
    """The end state after any fault: a sound catalog, one ``done`` row per photo, every
    listed thumbnail complete, no temporary file left. Returns figures for the report."""
    assert integrity(daemon.catalog_path) == "ok"
    rows = daemon.query("SELECT id, path, status, error, content_hash FROM images")
    by_path = {bytes(r[1]): r for r in rows}
    want = {os.fsencode(str(p)) for p in expected}
    assert len(by_path) == len(rows), "two rows for one path"
    missing = sorted(want - set(by_path))
    assert not missing, f"{len(missing)} photos have no row, e.g. {missing[:3]}"
    extra = sorted(set(by_path) - want)
    assert not extra, f"rows for files that do not exist: {extra[:3]}"
    not_done = [(bytes(r[1]), r[2], r[3]) for r in rows if r[2] != "done"]
    assert not not_done, f"{len(not_done)} rows not done, e.g. {not_done[:3]}"
    thumbs = daemon.query(
        "SELECT t.image_id, t.size, t.path, t.width, t.height FROM thumbnails t"
        " JOIN images i ON i.id = t.image_id"
    )
    per_image = Counter(t[0] for t in thumbs)
    short = [r[0] for r in rows if per_image[r[0]] != sizes]
    assert not short, f"{len(short)} images lack thumbnails, e.g. ids {short[:5]}"
    problems = [p for t in thumbs if (p := check_thumbnail(t[2], t[3], t[4], t[1]))]
    assert not problems, problems[:5]
    leftovers = temp_files(Path(daemon.config["thumbnails"]["dir"]))
    assert not leftovers, f"temporary files left: {leftovers[:5]}"
    return {"rows": len(rows), "thumbnails": len(thumbs)}


def start_and_walk(daemon: DaemonProcess, timeout: float = 60.0) -> int:
    """Start the daemon and wait for its start-up walk (this run's metrics count its own
    walks). Returns the log offset where this run begins."""
    offset = len(daemon.log_text())
    daemon.start()
    daemon.wait_walks(1, timeout)
    return offset


# -- the debug log ---------------------------------------------------------------------------


def log_events(daemon: DaemonProcess, start: int = 0, end: int | None = None) -> list[dict]:
    """The daemon's JSON log lines (every run appends to the same file), optionally only
    those between two character offsets."""
    events = []
    for line in daemon.log_text()[start:end].splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def conversions_per_run(daemon: DaemonProcess, offsets: list[int]) -> list[Counter[int]]:
    """For every run (starting at each log offset), how many times each image id was
    converted: the supervisor logs one "converted" line per result, recorded or not."""
    bounds = [*offsets, None]
    return [
        Counter(e["id"] for e in log_events(daemon, a, b) if e.get("event") == "converted")
        for a, b in itertools.pairwise(bounds)
    ]


# -- processes -------------------------------------------------------------------------------


def start_time(pid: int) -> int | None:
    """A process's start time in clock ticks (tells a pid from its reuse)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return int(fh.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


@dataclass(frozen=True)
class ProcessId:
    pid: int
    started: int
    name: str

    def alive(self) -> bool:
        if start_time(self.pid) != self.started:
            return False
        try:
            with open(f"/proc/{self.pid}/stat", "rb") as fh:
                state = fh.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            return False
        return state != b"Z"


def process_tree(pid: int) -> list[ProcessId]:
    """Every descendant of ``pid`` with its start time and name (a kill -9 orphans them,
    so they must be recorded before it)."""
    found = []
    for child in descendants(pid):
        started = start_time(child)
        if started is not None:
            found.append(ProcessId(child, started, process_name(child)))
    return found


def survivors(tree: list[ProcessId], timeout: float = 10.0) -> list[ProcessId]:
    """Processes of ``tree`` still alive after ``timeout`` (PR_SET_PDEATHSIG needs a moment)."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in tree if p.alive()]
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.02)


def workers(daemon: DaemonProcess) -> list[int]:
    """The conversion workers (not their ImageMagick children) of a running daemon."""
    tree = process_tree(daemon.proc.pid)
    return [p.pid for p in tree if p.name == "photoscand-work"]


# -- filesystems -----------------------------------------------------------------------------


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``path`` (root only); always unmounted afterwards."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                   check=True)  # fmt: skip
    try:
        yield path
    finally:
        for _ in range(50):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        else:
            subprocess.run(["umount", "-l", str(path)], check=False)


def fill(folder: Path, name: str = "filler") -> Path:
    """Fill a filesystem to the last byte; returns the filler file."""
    filler = folder / name
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for chunk in (b"\0" * (1 << 16), b"\0" * 512, b"\0"):
            with contextlib.suppress(OSError):
                while os.write(fd, chunk):
                    pass
    finally:
        os.close(fd)
    return filler


@contextlib.contextmanager
def sysctl(name: str, value: str) -> Iterator[str]:
    """Set a sysctl for the duration of a block (root only); yields the old value."""
    path = Path("/proc/sys") / name.replace(".", "/")
    old = path.read_text().strip()
    path.write_text(value)
    try:
        yield old
    finally:
        path.write_text(old)


# -- an unprivileged daemon --------------------------------------------------------------------


# What the daemon needs from its interpreter: photoscand importable and a forkserver child
# that starts (an interpreter whose installation that user cannot read fails here).
_PROBE = """
import multiprocessing, photoscand.daemon, photoscand.progress
if __name__ == "__main__":
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["photoscand.worker"])
    child = ctx.Process(target=photoscand.progress.progress_line, args=({},))
    child.start()
    child.join(30)
    print(child.exitcode)
"""


@dataclass(frozen=True)
class Unprivileged:
    """How to run a command where file mode bits count, and whom its files must belong to."""

    prefix: tuple[str, ...]
    uid: int


@functools.cache
def unprivileged() -> Unprivileged:
    """CI runs as root, which ignores mode bits. The daemon runs as ``nobody`` when that
    user can start this interpreter and import photoscand (a venv may live under a folder
    it cannot enter); otherwise as root without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH,
    the two capabilities that bypass file permissions."""
    nobody = ("setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
    probe = subprocess.run(
        [*nobody, sys.executable, "-c", _PROBE], capture_output=True, cwd="/", timeout=60
    )
    if probe.returncode == 0 and probe.stdout.strip() == b"0":
        return Unprivileged(nobody, NOBODY)
    drop = "-dac_override,-dac_read_search"
    return Unprivileged(("setpriv", f"--inh-caps={drop}", f"--bounding-set={drop}"), 0)


def chown_tree(path: Path, uid: int) -> None:
    """Hand a test's own tree to ``uid``."""
    for dirpath, dirs, files in os.walk(path):
        os.chown(dirpath, uid, uid)
        for name in dirs + files:
            os.lchown(os.path.join(dirpath, name), uid, uid)


class UnprivilegedDaemon(DaemonProcess):
    """The real daemon, started through an :class:`Unprivileged` prefix."""

    def __init__(self, root: Path, who: Unprivileged, settings: dict[str, Any] | None = None):
        super().__init__(root, settings)
        self.who = who

    def start(self, command: str = "run", *extra: str) -> UnprivilegedDaemon:
        self.runs += 1
        chown_tree(self.root, self.who.uid)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.who.prefix, sys.executable, "-m", "photoscand", command, "--config",
                 str(self.config_path), *extra],
                stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
            )  # fmt: skip
        return self


def freeze(pids: list[int]) -> None:
    """SIGSTOP processes and wait until the kernel shows them stopped."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    for pid in pids:
        wait_for(lambda p=pid: _state(p) in ("T", "t"), timeout=10, message=f"pid {pid} stopped")


def thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return ""


def files_under(root: Path) -> set[bytes]:
    """Every regular file under a folder that the daemon catalogs (no hidden names)."""
    found = set()
    for dirpath, dirs, files in os.walk(os.fsencode(root)):
        dirs[:] = [d for d in dirs if not d.startswith(b".")]
        found |= {os.path.join(dirpath, f) for f in files if not f.startswith(b".")}
    return found


def catalog_matches_tree(daemon: DaemonProcess) -> tuple[set[bytes], set[bytes]]:
    """(files without a live row, live rows without a file): both empty when the catalog
    equals the filesystem."""
    live = {bytes(r[0]) for r in daemon.query("SELECT path FROM images WHERE status != 'missing'")}
    on_disk = files_under(daemon.photos)
    return on_disk - live, live - on_disk
