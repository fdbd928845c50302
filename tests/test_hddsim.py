"""Tests of the simulated hard disk (bench/hddsim.py): its model, and real FUSE mounts of it."""

from __future__ import annotations

import contextlib
import errno
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
HDDSIM_PY = REPO / "bench" / "hddsim.py"


def _load_hddsim() -> Any:
    # bench/ is a folder of scripts, not a package; dataclasses need the module registered.
    spec = importlib.util.spec_from_file_location("hddsim", HDDSIM_PY)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hddsim"] = module
    spec.loader.exec_module(module)
    return module


hddsim = _load_hddsim()

needs_fuse = pytest.mark.skipif(
    not os.path.exists("/dev/fuse"), reason="/dev/fuse is absent: no FUSE in this kernel/container"
)

CHUNK = 128 * 1024
MiB = 1024 * 1024
FAST = 0.01  # time scale for tests that only count: a 12 ms seek sleeps 0.12 ms


def _write_tree(root: Path) -> dict[str, bytes]:
    """A small photo-like tree; returns {relative path: content}."""
    rng = random.Random(42)
    files = {
        "a/01.bin": rng.randbytes(MiB),
        "a/02.bin": rng.randbytes(MiB),
        "b/été/photo ü.jpg": rng.randbytes(300_000),
        "日本/写真 1.jpg": rng.randbytes(200_000),
        "top.txt": b"top\n",
        "empty.bin": b"",
        "z/stream.bin": rng.randbytes(8 * MiB),
        os.fsdecode(b"b/latin-1 caf\xe9.bin"): rng.randbytes(5000),  # not UTF-8
    }
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "emptydir").mkdir()
    return files


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, bytes]]:
    source = tmp_path_factory.mktemp("hddsrc")
    return source, _write_tree(source)


@pytest.fixture(scope="module")
def disk(
    tree: tuple[Path, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """One mount shared by the tests that only count; each test resets it first."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is absent: no FUSE in this kernel/container")
    mnt = tmp_path_factory.mktemp("hddmnt")
    with hddsim.mounted(tree[0], mnt, time_scale=FAST, gap_mb=4, seed=1) as handle:
        yield handle


@pytest.fixture(scope="module")
def realtime_disk(
    tree: tuple[Path, dict[str, bytes]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """A mount at full model speed, for the tests that compare time with the model."""
    if not os.path.exists("/dev/fuse"):
        pytest.skip("/dev/fuse is absent: no FUSE in this kernel/container")
    mnt = tmp_path_factory.mktemp("hddmnt-rt")
    with hddsim.mounted(tree[0], mnt, time_scale=1.0, gap_mb=4, seed=1) as handle:
        yield handle


def _read_chunks(path: Path, chunk: int = CHUNK) -> bytes:
    out = bytearray()
    with open(path, "rb", buffering=0) as fh:
        while data := fh.read(chunk):
            out += data
    return bytes(out)


def _read_interleaved(paths: list[Path], chunk: int = CHUNK) -> int:
    """Read the files in turns, one chunk of each; returns how many chunks carried data."""
    handles = [open(p, "rb", buffering=0) for p in paths]  # noqa: SIM115 - closed below
    chunks = 0
    try:
        live = list(handles)
        while live:
            for fh in list(live):
                if fh.read(chunk):
                    chunks += 1
                else:
                    live.remove(fh)
    finally:
        for fh in handles:
            fh.close()
    return chunks


# ---------------------------------------------------------------------------------------------
# The model alone


def test_model_constants_are_a_7200_rpm_desktop_disk() -> None:
    m = hddsim.DiskModel()
    assert m.half_rotation_s == pytest.approx(60 / 7200 / 2)  # 4.17 ms
    assert m.seek_s(0) == 0
    assert m.seek_s(1) == pytest.approx(0.001, abs=1e-6)  # settle: track to track
    assert m.seek_s(2_000 * 10**9) == pytest.approx(0.015)  # full stroke
    assert m.seek_s(10 * 2_000 * 10**9) == pytest.approx(0.015)  # capped
    assert m.seek_s(500 * 10**9) == pytest.approx(0.001 + 0.014 * 0.5)  # quarter stroke: sqrt
    assert m.seek_s(-(500 * 10**9)) == m.seek_s(500 * 10**9)
    assert m.transfer_s(150_000_000) == pytest.approx(1.0)
    # Random reads over the whole platter average the datasheet's ~8.5 ms seek.
    rng = random.Random(3)
    cap = 2_000 * 10**9
    mean = sum(m.seek_s(rng.randrange(cap) - rng.randrange(cap)) for _ in range(20_000)) / 20_000
    assert mean == pytest.approx(0.0085, abs=0.0003)


def test_model_skips_short_forward_gaps_and_seeks_otherwise() -> None:
    m = hddsim.DiskModel()
    assert m.position_s(1000, 1000) == ("none", 0.0)
    kind, cost = m.position_s(0, 64 * 1024)  # 0.44 ms of platter beats 5.2 ms of seek
    assert kind == "skip" and cost == pytest.approx(64 * 1024 / 150e6)
    kind, cost = m.position_s(64 * 1024, 0)  # backwards: always a seek
    assert kind == "seek" and cost == pytest.approx(m.seek_s(64 * 1024) + m.half_rotation_s)
    kind, cost = m.position_s(0, 4_000_000)  # 27 ms of platter: a seek is cheaper
    assert kind == "seek" and cost == pytest.approx(m.seek_s(4_000_000) + m.half_rotation_s)


def test_model_rejects_nonsense() -> None:
    with pytest.raises(ValueError):
        hddsim.DiskModel(rate_mbs=0)
    with pytest.raises(ValueError):
        hddsim.DiskModel(settle_ms=20, full_stroke_ms=15)


def test_layout_orders_files_with_seeded_gaps(tree: tuple[Path, dict[str, bytes]]) -> None:
    source, files = tree
    layout = hddsim.Layout.plan(source, gap_mb=4, seed=1)
    placed = layout.files()
    assert [e.path for e in placed] == sorted(
        ("/" + rel for rel in files), key=lambda p: p.split("/")
    )
    assert [e.ino for e in placed] == sorted(e.ino for e in placed)
    end = 0
    for e in placed:
        assert 2_000_000 <= e.offset - end <= 6_000_000  # 4 MB +- 50 %
        assert e.size == len(files[e.path[1:]])
        end = e.offset + e.size
    assert layout.entries["/"].ino == 1
    again = hddsim.Layout.plan(source, gap_mb=4, seed=1).files()
    assert [(e.path, e.offset) for e in again] == [(e.path, e.offset) for e in placed]

    shuffled = hddsim.Layout.plan(source, gap_mb=4, seed=7, order="shuffled").files()
    assert sorted(e.path for e in shuffled) == sorted(e.path for e in placed)
    assert [e.path for e in shuffled] != [e.path for e in placed]
    assert [e.ino for e in shuffled] == sorted(e.ino for e in shuffled)
    same = hddsim.Layout.plan(source, gap_mb=4, seed=7, order="shuffled").files()
    assert [e.path for e in same] == [e.path for e in shuffled]


# ---------------------------------------------------------------------------------------------
# A real mount


@needs_fuse
def test_mirror_has_the_source_names_bytes_sizes_and_mtimes(
    disk: Any, tree: tuple[Path, dict[str, bytes]]
) -> None:
    source, files = tree
    mnt = disk.mountpoint
    seen_files, seen_dirs = set(), set()
    for root, dirs, names in os.walk(mnt):
        rel_root = Path(root).relative_to(mnt)
        seen_dirs.update(str(rel_root / d) for d in dirs)
        seen_files.update(str(rel_root / n) for n in names)
    assert seen_files == set(files)
    assert seen_dirs == {"a", "b", "b/été", "日本", "emptydir", "z"}
    for rel, data in files.items():
        st, src = os.stat(mnt / rel), os.stat(source / rel)
        assert st.st_size == src.st_size
        assert st.st_mtime_ns == src.st_mtime_ns
        assert st.st_mode & 0o222 == 0
        assert (mnt / rel).read_bytes() == data
        assert _read_chunks(mnt / rel, 100_000) == data  # unaligned chunks too


@needs_fuse
def test_inode_numbers_follow_the_platter_order(disk: Any) -> None:
    layout = disk.layout()
    mnt = disk.mountpoint
    for entry in layout:
        assert os.stat(mnt / entry["path"][1:]).st_ino == entry["ino"]
    assert [e["ino"] for e in layout] == sorted(e["ino"] for e in layout)
    assert [e["path"] for e in layout] == sorted(
        (e["path"] for e in layout), key=lambda p: p.split("/")
    )
    # A reader that orders a folder by DirEntry.inode() (d_ino, no stat) gets the same numbers.
    with os.scandir(mnt / "a") as it:
        for entry in it:
            assert entry.inode() == os.stat(entry.path).st_ino
    inos = [os.stat(os.path.join(r, n)).st_ino for r, ds, fs in os.walk(mnt) for n in ds + fs]
    assert len(inos) == len(set(inos))


@needs_fuse
def test_reading_files_in_platter_order_costs_one_seek_per_file(disk: Any) -> None:
    mnt = disk.mountpoint
    disk.reset()
    _read_chunks(mnt / "a/01.bin")
    _read_chunks(mnt / "a/02.bin")
    stats = disk.stats()
    assert stats["bytes_read"] == 2 * MiB
    assert stats["seeks"] == 2  # from the parked head to 01, across the gap to 02
    assert stats["skips"] == 0
    assert stats["requests"] >= 16  # the kernel splits reads into <= 128 KiB requests


@needs_fuse
def test_reading_two_files_interleaved_costs_a_seek_per_chunk(disk: Any) -> None:
    mnt = disk.mountpoint
    disk.reset()
    chunks = _read_interleaved([mnt / "a/01.bin", mnt / "a/02.bin"])
    stats = disk.stats()
    assert chunks == 16
    assert stats["seeks"] == 16
    assert stats["bytes_read"] == 2 * MiB


@needs_fuse
def test_one_large_read_is_split_by_the_kernel_but_costs_one_seek(disk: Any) -> None:
    disk.reset()
    fd = os.open(disk.mountpoint / "a/02.bin", os.O_RDONLY)
    try:
        assert len(os.pread(fd, MiB, 0)) == MiB
    finally:
        os.close(fd)
    stats = disk.stats()
    assert stats["requests"] >= 8
    assert stats["seeks"] == 1


@needs_fuse
def test_going_back_costs_a_seek_and_a_short_hop_forward_does_not(disk: Any) -> None:
    disk.reset()
    fd = os.open(disk.mountpoint / "a/01.bin", os.O_RDONLY)
    try:
        os.pread(fd, 4096, 0)
        os.pread(fd, 4096, 65536)  # forward within the track: the platter turns past the gap
        os.pread(fd, 4096, 8192)  # backwards: the head must go round again
    finally:
        os.close(fd)
    stats = disk.stats()
    assert (stats["seeks"], stats["skips"]) == (2, 1)


@needs_fuse
def test_reset_parks_the_head_and_zeroes_the_counters(disk: Any) -> None:
    layout = {e["path"]: e for e in disk.layout()}
    disk.reset()
    (disk.mountpoint / "top.txt").read_bytes()
    stats = disk.stats()
    assert stats["head_position"] == layout["/top.txt"]["offset"] + 4
    disk.reset_counters()
    stats = disk.stats()
    assert stats["requests"] == stats["seeks"] == stats["bytes_read"] == 0
    assert stats["head_position"] == layout["/top.txt"]["offset"] + 4
    disk.reset_head()
    assert disk.stats()["head_position"] == 0


@needs_fuse
def test_writes_fail_with_erofs_and_leave_the_source_alone(
    disk: Any, tree: tuple[Path, dict[str, bytes]]
) -> None:
    source, files = tree
    mnt = disk.mountpoint
    attempts = [
        lambda: open(mnt / "top.txt", "w"),  # noqa: SIM115 - it must fail before returning
        lambda: open(mnt / "top.txt", "ab"),  # noqa: SIM115
        lambda: open(mnt / "new.txt", "x"),  # noqa: SIM115
        lambda: os.mkdir(mnt / "newdir"),
        lambda: os.unlink(mnt / "top.txt"),
        lambda: os.rename(mnt / "top.txt", mnt / "moved.txt"),
        lambda: os.chmod(mnt / "top.txt", 0o666),
        lambda: os.truncate(mnt / "top.txt", 0),
        lambda: os.utime(mnt / "top.txt"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as info:
            attempt()
        assert info.value.errno == errno.EROFS
    assert (source / "top.txt").read_bytes() == files["top.txt"]
    assert not (source / "new.txt").exists() and not (source / "newdir").exists()


@needs_fuse
def test_busy_time_follows_the_model(realtime_disk: Any) -> None:
    disk = realtime_disk
    mnt = disk.mountpoint
    m = hddsim.DiskModel()
    where = {e["path"]: e["offset"] for e in disk.layout()}
    # 128 KiB reads taking turns between two files, then two more files: a seek each.
    pattern = [(path, off) for off in range(0, MiB, CHUNK) for path in ("/a/02.bin", "/a/01.bin")]
    pattern += [("/b/été/photo ü.jpg", 0), ("/a/01.bin", 0)]
    predicted, head = 0.0, 0
    for path, off in pattern:
        start = where[path] + off
        predicted += m.position_s(head, start)[1]
        size = min(CHUNK, os.stat(mnt / path[1:]).st_size - off)
        predicted += m.transfer_s(size)
        head = start + size

    disk.reset()
    fds = {p: os.open(mnt / p[1:], os.O_RDONLY) for p in {p for p, _ in pattern}}
    began = time.perf_counter()
    try:
        for path, off in pattern:
            os.pread(fds[path], CHUNK, off)
    finally:
        wall = time.perf_counter() - began
        for fd in fds.values():
            os.close(fd)
    stats = disk.stats()
    assert stats["seeks"] == len(pattern)
    assert stats["model_seconds"] == pytest.approx(predicted, rel=1e-9)
    assert predicted > 0.08  # 18 seeks of ~5 ms and 2.3 MB: big enough to time
    # Each request holds the head for its service time (sleep overshoots a little). Every read
    # here starts with a seek; only the tail of a read the kernel split in two can overlap the
    # FUSE round trip before it (the disk's read-ahead), so that credit stays tiny.
    overlap = stats["overlap_seconds"]
    assert 0 <= overlap < 0.05 * predicted
    busy = stats["busy_seconds"]
    assert predicted - overlap <= busy <= (predicted - overlap) * 1.5 + 0.002 * stats["requests"]
    assert wall >= busy


@needs_fuse
def test_a_sequential_stream_runs_at_the_media_rate(realtime_disk: Any) -> None:
    realtime_disk.reset()
    began = time.perf_counter()
    _read_chunks(realtime_disk.mountpoint / "z/stream.bin")
    wall = time.perf_counter() - began
    stats = realtime_disk.stats()
    model = stats["model_seconds"]
    # 8 MiB at 150 MB/s is 56 ms, plus one seek of ~5 ms. The disk's read-ahead hides the
    # per-request overhead of FUSE, so the stream cannot beat the media rate but comes near it.
    assert stats["seeks"] == 1
    assert stats["transfer_seconds"] == pytest.approx(8 * MiB / 150e6)
    assert wall >= 8 * MiB / 150e6
    assert wall <= 3 * model + 0.05


@needs_fuse
def test_concurrent_readers_queue_on_the_one_head(realtime_disk: Any) -> None:
    mnt = realtime_disk.mountpoint
    realtime_disk.reset()
    barrier = threading.Barrier(2)

    def reader(path: Path) -> None:
        barrier.wait()
        _read_chunks(path)

    threads = [threading.Thread(target=reader, args=(mnt / n,)) for n in ("a/01.bin", "a/02.bin")]
    began = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    wall = time.perf_counter() - began
    stats = realtime_disk.stats()
    assert stats["bytes_read"] == 2 * MiB
    assert stats["max_queue_depth"] == 2
    assert stats["seeks"] > 2  # the two streams took turns, and each turn moved the head
    # One head: the two readers' service times add up instead of overlapping.
    assert wall >= 0.95 * (stats["model_seconds"] - stats["overlap_seconds"])


@needs_fuse
def test_unmounts_when_the_body_raises_with_a_file_still_open(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with (
        pytest.raises(RuntimeError, match="boom"),
        hddsim.mounted(tree[0], mnt, time_scale=FAST) as handle,
    ):
        held = open(mnt / "top.txt", "rb")  # noqa: SIM115 - kept open on purpose: EBUSY
        assert hddsim.is_mounted(mnt)
        raise RuntimeError("boom")
    try:
        assert not hddsim.is_mounted(mnt)
        assert handle.proc.poll() is not None
    finally:
        # The lazily detached mount's process is gone: closing says ENOTCONN, as it should.
        with contextlib.suppress(OSError):
            held.close()


@needs_fuse
def test_a_mount_outliving_its_parent_unmounts_itself(
    tree: tuple[Path, dict[str, bytes]], tmp_path: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = textwrap.dedent(
        f"""
        import importlib.util, os, sys
        spec = importlib.util.spec_from_file_location("hddsim", {str(HDDSIM_PY)!r})
        hddsim = importlib.util.module_from_spec(spec)
        sys.modules["hddsim"] = hddsim
        spec.loader.exec_module(hddsim)
        with hddsim.mounted({str(tree[0])!r}, {str(mnt)!r}, time_scale=0.01) as h:
            print(h.proc.pid, h.control.parent, flush=True)
            os._exit(0)  # no clean-up: the FUSE process must notice on its own
        """
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    pid_text, workdir = done.stdout.split()
    pid = int(pid_text)
    deadline = time.monotonic() + 15
    while hddsim.is_mounted(mnt) or os.path.exists(f"/proc/{pid}"):
        if time.monotonic() > deadline:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
            pytest.fail("the orphaned hddsim process did not unmount")
        time.sleep(0.05)
    shutil.rmtree(workdir, ignore_errors=True)


@needs_fuse
def test_stats_file_control_command_and_files_added_later(tmp_path: Path) -> None:
    source, mnt, stats_file = tmp_path / "src", tmp_path / "mnt", tmp_path / "stats.json"
    _write_tree(source)
    mnt.mkdir()
    with hddsim.mounted(source, mnt, stats_file=stats_file, time_scale=FAST) as handle:
        (mnt / "top.txt").read_bytes()
        deadline = time.monotonic() + 10
        while True:
            with_bytes = stats_file.exists() and json.loads(stats_file.read_text())["bytes_read"]
            if with_bytes == 4:
                break
            assert time.monotonic() < deadline, "the stats file never showed the read"
            time.sleep(0.05)
        cli = [sys.executable, str(HDDSIM_PY), "ctl", str(handle.control), "stats"]
        out = subprocess.run(cli, capture_output=True, text=True, timeout=30, check=True)
        assert json.loads(out.stdout)["bytes_read"] == 4

        last = handle.layout()[-1]
        (source / "later.bin").write_bytes(b"x" * 1000)
        assert (mnt / "later.bin").read_bytes() == b"x" * 1000
        later = handle.layout()[-1]
        assert later["path"] == "/later.bin"
        assert later["offset"] > last["offset"] + last["size"]
        assert os.stat(mnt / "later.bin").st_ino == later["ino"] > last["ino"]
    final = json.loads(stats_file.read_text())
    assert final["bytes_read"] == 1004
    assert not hddsim.is_mounted(mnt)


@needs_fuse
def test_mounted_rejects_unknown_parameters_and_reports_a_failed_start(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="rmp"), hddsim.mounted(tmp_path, tmp_path, rmp=5400):
        pass
    with (
        pytest.raises(RuntimeError, match="not a folder"),
        hddsim.mounted(tmp_path / "missing", tmp_path, time_scale=FAST),
    ):
        pass
    assert not hddsim.is_mounted(tmp_path)
