"""Hostile names and trees: newlines, invalid UTF-8, leading dashes, 255-byte names,
NFC/NFD twins, dots, a FIFO named like a photo, symlink loops and symlinks that leave the
watched tree, and 20 levels of folders. Every real photo gets one row whose path holds its
exact bytes and is converted; nothing outside the tree is read; every log line stays valid
JSON; ``photoscand status`` reads the result."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

from tests.reliability import SMALL_PHOTO, distinct_copies, log_events

NAMES: list[bytes] = [
    b"new\nline.jpg",
    b"\xff\xfe not utf-8 \xc3(.jpg",
    b"-rf.jpg",
    b"--help.jpg",
    b"a" * 251 + b".jpg",
    unicodedata.normalize("NFC", "café.jpg").encode(),
    unicodedata.normalize("NFD", "café.jpg").encode(),
    b"dots..in..name.jpg",
    b"tab\tand space .jpg",
    b"quote'\"`$(reboot);.jpg",
    b"\x1b[31mred.jpg",
    b"back\\slash.jpg",
]


def test_hostile_names_and_trees_are_stored_byte_exact_and_never_followed_out(
    daemon_factory, tmp_path: Path
) -> None:
    daemon = daemon_factory()
    root = os.fsencode(daemon.photos)
    data = SMALL_PHOTO.read_bytes()
    expected: list[bytes] = []
    for i, name in enumerate(NAMES):
        path = os.path.join(root, name)
        with open(path, "wb") as fh:
            fh.write(data + b"name-%d" % i)
        expected.append(path)
    # 20 levels of long folder names: a path of over 3,000 bytes (PATH_MAX is 4,096).
    deep = root
    for level in range(20):
        deep = os.path.join(deep, b"level%02d-" % level + b"d" * 150)
    os.makedirs(deep)
    deep_photo = os.path.join(deep, b"bottom.jpg")
    with open(deep_photo, "wb") as fh:
        fh.write(data + b"deep")
    expected.append(deep_photo)
    # Outside the tree: photos that links point at, and which must never be read.
    outside = tmp_path / "outside"
    distinct_copies(outside, 3, prefix="outside")
    os.symlink(".", os.path.join(root, b"loop"))
    os.symlink(os.path.join(root, b"loop"), os.path.join(root, b"loop2"))
    os.symlink("/", os.path.join(root, b"escape"))
    os.symlink(outside, os.path.join(root, b"outside-dir"))
    os.symlink(outside / "outside00000.jpg", os.path.join(root, b"linked.jpg"))
    os.symlink(b"../../..", os.path.join(deep, b"up"))
    os.mkfifo(os.path.join(root, b"fifo.jpg"))
    daemon.start().wait_ready()
    daemon.wait_settled(len(expected), timeout=90)
    rows = {
        bytes(r[0]): r[1:] for r in daemon.query("SELECT path, status, display_path FROM images")
    }
    assert sorted(rows) == sorted(expected), sorted(set(rows) ^ set(expected))[:5]
    assert {r[0] for r in rows.values()} == {"done"}, rows
    for path, (_, display) in rows.items():
        # display_path is text that round-trips to the bytes (undecodable bytes escaped).
        assert display.encode("utf-8", "surrogatepass")
        assert display == path.decode("utf-8", "backslashreplace")
    nfc, nfd = NAMES[5], NAMES[6]
    assert nfc != nfd and os.path.join(root, nfc) in rows and os.path.join(root, nfd) in rows
    # The daemon is still fine, and every line it logged is one JSON object.
    lines = [line for line in daemon.log_text().splitlines() if line.strip()]
    bad = [line for line in lines if not _is_json(line)]
    assert not bad, bad[:3]
    assert any(e.get("event") == "walk finished" for e in log_events(daemon))
    status = subprocess.run(
        [sys.executable, "-m", "photoscand", "status", "--json", "--config",
         str(daemon.config_path)], capture_output=True, timeout=60,
    )  # fmt: skip
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)
    # Nothing outside was touched: its files are still unread since they were written.
    for path in outside.iterdir():
        st = path.stat()
        assert st.st_atime_ns <= st.st_mtime_ns or _noatime(), path
    assert daemon.stop() == 0
    shutil.rmtree(outside)


def _is_json(line: str) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _noatime() -> bool:
    """True when atime does not prove anything here (noatime mounts)."""
    with open("/proc/self/mounts") as fh:
        return any(" / " in line and "noatime" in line for line in fh)
