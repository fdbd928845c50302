"""The long run (slow; ``PSCD_TEST_SOAK_SECONDS``, 600 by default): photos arrive all the
time (and some are deleted or replaced) while the memory of the daemon and of its children,
their open file descriptors, their threads and the catalog's write-ahead log are sampled.
After a warm-up they must stay flat, and phase 2 must keep up with the arrivals."""

from __future__ import annotations

import json
import os
import random
import statistics
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import CORPUS, descendants, process_name, wait_for
from tests.reliability import start_and_walk

SOAK_SECONDS = float(os.environ.get("PSCD_TEST_SOAK_SECONDS", "600"))
ARRIVALS_PER_SECOND = 6
SAMPLE_EVERY = 5.0
SOURCES = sorted((CORPUS / "cameras").glob("*.jpg")) + sorted((CORPUS / "png").glob("*.png"))


def _status(pid: int) -> dict[str, int]:
    found = {}
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "Threads"):
                    found[key] = int(rest.split()[0])
        found["fds"] = len(os.listdir(f"/proc/{pid}/fd"))
    except (OSError, ValueError):
        return {}
    return found


class Arrivals(threading.Thread):
    """Writes photos at a steady rate (atomic renames and plain copies), deletes a few and
    replaces a few, in rotating folders."""

    def __init__(self, root: Path, staging: Path, seed: int) -> None:
        super().__init__(daemon=True)
        self.root, self.staging = root, staging
        self.rng = random.Random(seed)
        self.stop = threading.Event()
        self.created = self.deleted = self.replaced = 0
        self.sources = [p.read_bytes() for p in SOURCES]

    def run(self) -> None:
        live: list[Path] = []
        while not self.stop.wait(1 / ARRIVALS_PER_SECOND):
            n = self.created
            folder = self.root / f"day{n // 500:03d}"
            folder.mkdir(exist_ok=True)
            data = self.rng.choice(self.sources) + b"soak-%09d" % n
            suffix = ".png" if data.startswith(b"\x89PNG") else ".jpg"
            target = folder / f"img{n:07d}{suffix}"
            if self.rng.random() < 0.5:
                tmp = self.staging / target.name
                tmp.write_bytes(data)
                os.rename(tmp, target)
            else:
                target.write_bytes(data)
            live.append(target)
            self.created += 1
            roll = self.rng.random()
            if roll < 0.05 and len(live) > 10:
                os.unlink(live.pop(self.rng.randrange(len(live) - 5)))
                self.deleted += 1
            elif roll < 0.08 and len(live) > 10:
                victim = live[self.rng.randrange(len(live) - 5)]
                victim.write_bytes(self.rng.choice(self.sources) + b"again-%09d" % n)
                self.replaced += 1


@pytest.mark.slow
def test_a_long_run_with_continuous_arrivals_stays_flat(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory(
        {"watch": {"rescan_interval_seconds": 60}, "logging": {"level": "info"}}
    )
    start_and_walk(daemon)
    staging = tmp_path / "staging"
    staging.mkdir()
    arrivals = Arrivals(daemon.photos, staging, seed=3)
    wal = Path(str(daemon.catalog_path) + "-wal")
    samples: list[dict] = []
    started = time.monotonic()
    arrivals.start()
    try:
        while time.monotonic() - started < SOAK_SECONDS:
            time.sleep(SAMPLE_EVERY)
            assert daemon.proc.poll() is None, daemon.log_text()[-3000:]
            pid = daemon.proc.pid
            kids = {p: process_name(p) for p in descendants(pid)}
            workers = [_status(p) for p, n in kids.items() if n == "photoscand-work"]
            meta = [_status(p) for p, n in kids.items() if n == "photoscand-meta"]
            row = daemon.query("SELECT count(*), sum(status IN ('pending', 'converting'))"
                               " FROM images")[0]  # fmt: skip
            samples.append({
                "t": round(time.monotonic() - started, 1),
                "daemon": _status(pid),
                "workers_rss_kb": max((w.get("VmRSS", 0) for w in workers), default=0),
                "workers_fds": max((w.get("fds", 0) for w in workers), default=0),
                "meta_rss_kb": max((m.get("VmRSS", 0) for m in meta), default=0),
                "children": len(kids),
                "wal_bytes": wal.stat().st_size if wal.exists() else 0,
                "rows": row[0],
                "backlog": row[1] or 0,
            })  # fmt: skip
    finally:
        arrivals.stop.set()
        arrivals.join()
    wait_for(lambda: daemon.query("SELECT count(*) FROM images WHERE status IN"
                                  " ('pending', 'converting')")[0][0] == 0,
             timeout=120, message="the backlog drained")  # fmt: skip
    failed = daemon.query("SELECT count(*) FROM images WHERE status = 'failed'")[0][0]
    assert daemon.stop() == 0
    out = tmp_path / "soak.json"
    out.write_text(json.dumps(samples, indent=1))

    def series(key: str, sub: str | None = None) -> list[int]:
        return [(s[key].get(sub, 0) if sub else s[key]) for s in samples]

    # Warm-up: the first fifth (catalog pages, Pillow's caches, the first folders).
    cut = len(samples) // 5
    early, late = slice(cut, 2 * cut), slice(-cut, None)

    def drift(values: list[int]) -> float:
        return statistics.median(values[late]) - statistics.median(values[early])

    figures = {
        "seconds": round(time.monotonic() - started),
        "created": arrivals.created,
        "deleted": arrivals.deleted,
        "replaced": arrivals.replaced,
        "failed": failed,
        "daemon_rss_mb": (min(series("daemon", "VmRSS")) // 1024,
                          max(series("daemon", "VmRSS")) // 1024),
        "daemon_rss_drift_mb": round(drift(series("daemon", "VmRSS")) / 1024, 1),
        "worker_rss_mb": (min(series("workers_rss_kb")) // 1024,
                          max(series("workers_rss_kb")) // 1024),
        "worker_rss_drift_mb": round(drift(series("workers_rss_kb")) / 1024, 1),
        "meta_rss_drift_mb": round(drift(series("meta_rss_kb")) / 1024, 1),
        "daemon_fds": (min(series("daemon", "fds")), max(series("daemon", "fds"))),
        "daemon_threads": (min(series("daemon", "Threads")), max(series("daemon", "Threads"))),
        "worker_fds": (min(series("workers_fds")), max(series("workers_fds"))),
        "wal_mb": round(max(series("wal_bytes")) / 2**20, 2),
        "max_backlog": max(series("backlog")),
        "samples": str(out),
    }  # fmt: skip
    print(f"\nsoak: {figures}")
    assert SOAK_SECONDS < 600 or figures["seconds"] >= 600
    assert failed == 0
    assert abs(figures["daemon_rss_drift_mb"]) < 15, figures
    assert abs(figures["worker_rss_drift_mb"]) < 30, figures
    assert abs(figures["meta_rss_drift_mb"]) < 15, figures
    assert figures["daemon_fds"][1] - figures["daemon_fds"][0] <= 8, figures
    assert figures["daemon_threads"][1] - figures["daemon_threads"][0] <= 4, figures
    assert figures["worker_fds"][1] - figures["worker_fds"][0] <= 4, figures
    assert figures["wal_mb"] < 16, figures
    # Phase 2 keeps up: the backlog late in the run is no larger than early on.
    assert max(series("backlog")[late]) <= max(20, 2 * max(series("backlog")[early])), figures
