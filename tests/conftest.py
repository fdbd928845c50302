"""Shared test fixtures: the photo corpus and its manifest, and the real daemon as a subprocess."""

from __future__ import annotations

import csv
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The photos the tests use travel with the repository (tests/corpus/README.md says where
# each one comes from).
CORPUS = REPO / "tests" / "corpus"


def load_manifest() -> list[dict[str, str]]:
    """Every row of the corpus's MANIFEST.csv (exiftool's reading of each file)."""
    with open(CORPUS / "MANIFEST.csv", newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The read-only photo corpus; tests that write copy from it into tmp_path."""
    if not (CORPUS / "MANIFEST.csv").is_file():
        pytest.fail(f"photo corpus not found at {CORPUS}")
    return CORPUS


@pytest.fixture(scope="session")
def manifest(corpus_dir: Path) -> list[dict[str, str]]:
    """MANIFEST.csv rows, one per corpus file."""
    return load_manifest()


# -- the real daemon as a subprocess ---------------------------------------------------


def photoscand(*args: str, cwd: Path, env: dict[str, str] | None = None,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:  # fmt: skip
    """The command line, run the way a user runs it (a one-shot command, not the daemon)."""
    return subprocess.run(
        [sys.executable, "-m", "photoscand", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05,
             message: str = "condition") -> Any:  # fmt: skip
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class DaemonProcess:
    """``photoscand run`` (or ``scan``) started as a real subprocess on a temporary config."""

    def __init__(self, root: Path, settings: dict[str, Any] | None = None) -> None:
        self.root = root
        self.photos = root / "photos"
        self.photos.mkdir(parents=True, exist_ok=True)
        self.var = root / "var"
        config: dict[str, Any] = {
            "watch": {"paths": [str(self.photos)], "settle_seconds": 1.0,
                      "rescan_interval_seconds": 0},
            "catalog": {"path": str(self.var / "photoscand.db")},
            "thumbnails": {"dir": str(self.var / "thumbnails"), "sizes": [256, 64]},
            "workers": {"count": 2, "timeout_seconds": 30, "retry_backoff_seconds": 0.5,
                        "stop_timeout_seconds": 5},
            # Readiness and walks are read from the daemon's own metrics.
            "metrics": {"listen": f"127.0.0.1:{free_port()}"},
            "logging": {"format": "json", "level": "debug"},
        }  # fmt: skip
        for section, values in (settings or {}).items():
            config.setdefault(section, {}).update(values)
        self.config = config
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = root / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0

    @property
    def catalog_path(self) -> Path:
        return Path(self.config["catalog"]["path"])

    def rewrite_config(self, **sections: dict[str, Any]) -> None:
        for section, values in sections.items():
            self.config.setdefault(section, {}).update(values)
        self.config_path.write_text(yaml.safe_dump(self.config))

    def start(self, command: str = "run", *extra: str) -> DaemonProcess:
        self.runs += 1
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child until it exits
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "photoscand", command, "--config", str(self.config_path),
             *extra],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root,
        )  # fmt: skip
        log.close()
        return self

    @property
    def metrics_port(self) -> int:
        return int(self.config["metrics"]["listen"].rpartition(":")[2])

    def metrics(self) -> dict[str, float]:
        """The running daemon's /metrics, or {} while it does not answer yet."""
        try:
            return scrape(self.metrics_port)
        except OSError:
            return {}

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Ready once every worker is up and the start-up walk finished, as this run's
        metrics say (each run starts with its own, so an earlier run's walk does not count)."""
        assert self.proc is not None
        workers = self.config["workers"]["count"]

        def ready() -> bool:
            if self.proc.poll() is not None:
                return True
            values = self.metrics()
            up = values.get("photoscand_workers_idle", 0) + values.get("photoscand_workers_busy", 0)
            return up >= workers and self.last_walk() > 0

        wait_for(ready, timeout, message="workers ready and the start-up walk")
        assert self.proc.poll() is None, self.log_text()[-3000:]

    def last_walk(self) -> float:
        """When this run's last walk finished (unix time; 0 before its first)."""
        return self.metrics().get("photoscand_last_walk_completed_timestamp_seconds", 0.0)

    def walks_done(self) -> int:
        """How many walks this run has finished (-1 while the daemon does not answer)."""
        values = self.metrics()
        if not values:
            return -1
        return int(sum(v for k, v in values.items() if k.startswith("photoscand_walks_total")))

    def wait_walks(self, count: int, timeout: float = 60.0) -> None:
        """Wait until this run has finished ``count`` walks (fail early if it exits)."""
        assert self.proc is not None

        def done() -> bool:
            assert self.proc.poll() is None, self.log_text()[-3000:]
            return self.walks_done() >= count

        wait_for(done, timeout, message=f"{count} walks finished")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                "daemon did not stop in time:\n" + self.log_text()[-3000:]
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        if not self.catalog_path.exists():
            return []
        conn = sqlite3.connect(f"file:{self.catalog_path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "no such table" in str(exc):
                return []
            raise
        finally:
            conn.close()

    def rows(self) -> dict[bytes, tuple[Any, ...]]:
        """path -> (id, status, error, size) for every row."""
        return {bytes(r[0]): r[1:] for r in
                self.query("SELECT path, id, status, error, size FROM images")}  # fmt: skip

    def row(self, path: Path | bytes) -> tuple[Any, ...] | None:
        key = path if isinstance(path, bytes) else os.fsencode(str(path))
        return self.rows().get(key)

    def wait_row(self, path: Path | bytes, status: str | None = None,
                 timeout: float = 30.0) -> tuple[Any, ...]:  # fmt: skip
        def found() -> tuple[Any, ...] | None:
            row = self.row(path)
            if row is not None and (status is None or row[1] == status):
                return row
            return None

        return wait_for(found, timeout, message=f"row for {path!r} ({status or 'any'})")

    def wait_settled(
        self,
        count: int,
        timeout: float = 120.0,
        statuses: tuple[str, ...] = ("done", "failed", "missing"),
    ) -> None:
        """Wait until ``count`` rows exist and all of them have a final status."""

        def settled() -> bool:
            rows = self.query("SELECT status FROM images")
            return len(rows) >= count and all(r[0] in statuses for r in rows)

        wait_for(settled, timeout, message=f"{count} rows in a final state")


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[Callable[..., DaemonProcess]]:
    """Make daemons under tmp_path; every one is stopped at the end of the test."""
    made: list[DaemonProcess] = []

    def make(settings: dict[str, Any] | None = None, name: str = "d") -> DaemonProcess:
        daemon = DaemonProcess(tmp_path / name, settings)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, grandchildren, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    todo = [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def process_name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as fh:
            return fh.read().strip()
    except OSError:
        return ""


def named_descendants(pid: int, name: str) -> list[int]:
    """Descendants of ``pid`` whose process name (comm) is ``name``."""
    return [p for p in descendants(pid) if process_name(p) == name]


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[str, float]:
    """The daemon's /metrics as {"name{labels}": value}."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values
