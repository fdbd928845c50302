"""sd_notify against real AF_UNIX datagram sockets, and the daemon's conversation with systemd:
READY once it is up, STATUS as progress changes, WATCHDOG only while healthy, RELOADING then
READY on SIGHUP (a valid config applied, an invalid one refused), STOPPING on SIGTERM."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from watchdog.events import FileSystemEventHandler

from photoscand import systemd
from photoscand.config import load_config
from photoscand.daemon import Daemon
from tests.conftest import CORPUS, DaemonProcess, wait_for
from tests.scrape import free_port, scrape, value

PHOTO = CORPUS / "cameras" / "exif-org_canon-ixus.jpg"  # 640x480

Message = dict[str, str]


class NotifyListener:
    """A datagram socket playing systemd's side of NOTIFY_SOCKET."""

    def __init__(self, path: Path | None = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:
            name = f"photoscand-test-{uuid.uuid4().hex}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.received: list[tuple[float, Message]] = []
        self._read = 0

    def close(self) -> None:
        self.sock.close()

    def _receive(self, timeout: float) -> bool:
        self.sock.settimeout(max(timeout, 0.001))
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return False
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        self.received.append((time.monotonic(), fields))
        return True

    def drain(self) -> list[Message]:
        """Everything that arrived and was not consumed yet, without waiting."""
        while self._receive(0.001):
            pass
        new = [m for _, m in self.received[self._read :]]
        self._read = len(self.received)
        return new

    def expect(self, predicate: Callable[[Message], bool], timeout: float = 30.0,
               what: str = "message") -> Message:  # fmt: skip
        """The next message (in arrival order) that satisfies ``predicate``."""
        deadline = time.monotonic() + timeout
        while True:
            while self._read < len(self.received):
                message = self.received[self._read][1]
                self._read += 1
                if predicate(message):
                    return message
            left = deadline - time.monotonic()
            if left <= 0:
                seen = [m for _, m in self.received[-8:]]
                raise AssertionError(f"no {what} within {timeout}s; last received: {seen}")
            self._receive(min(left, 0.2))


@pytest.fixture
def listener(monkeypatch: pytest.MonkeyPatch) -> Any:
    notify = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    # Half a second between pings: a few seconds of test see several of them.
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield notify
    notify.close()


def is_ready(message: Message) -> bool:
    return message.get("READY") == "1"


# -- the protocol ------------------------------------------------------------------------


def test_notify_is_a_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify(READY=1) is False


def test_notify_sends_one_datagram_to_an_abstract_socket(listener: NotifyListener) -> None:
    assert systemd.notify(READY=1, STATUS="Phase 1: 3 images found\nsecond line") is True
    data = listener.expect(is_ready, timeout=2)
    # A newline inside a value would start a new field: it is flattened.
    assert data == {"READY": "1", "STATUS": "Phase 1: 3 images found second line"}


def test_notify_sends_to_a_socket_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    notify = NotifyListener(tmp_path / "notify.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", notify.address)
    try:
        assert systemd.notify(STOPPING=1) is True
        assert notify.expect(lambda m: True, timeout=2) == {"STOPPING": "1"}
    finally:
        notify.close()


@pytest.mark.parametrize("address", ["vsock:2:1234", "relative/path"])
def test_unsupported_addresses_are_ignored(monkeypatch: pytest.MonkeyPatch, address: str) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", address)
    assert systemd.notify(READY=1) is False


def test_a_vanished_socket_does_not_raise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify(WATCHDOG=1) is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        ("60000000", None, 30.0),
        ("1000000", "self", 0.5),
        ("1000000", "1", None),  # WATCHDOG_PID names another process
        ("", None, None),
        ("soon", None, None),
        ("0", None, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_sec(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, expected: float | None
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is None:
        monkeypatch.delenv("WATCHDOG_PID", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)
    assert systemd.watchdog_interval() == expected


def test_notifier_sends_status_only_when_it_changes(listener: NotifyListener) -> None:
    notifier = systemd.Notifier()
    notifier.ready("Phase 1: 0 images found")
    notifier.status("Phase 1: 0 images found")
    notifier.status("Phase 1: 1 images found")
    time.sleep(0.05)  # datagrams are in the socket buffer at once; this only orders reads
    assert listener.drain() == [
        {"READY": "1", "STATUS": "Phase 1: 0 images found"},
        {"STATUS": "Phase 1: 1 images found"},
    ]


def test_reloading_carries_the_monotonic_clock(listener: NotifyListener) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    systemd.Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    message = listener.expect(lambda m: "RELOADING" in m, timeout=2)
    assert message["RELOADING"] == "1"
    assert before <= int(message["MONOTONIC_USEC"]) <= after


# -- the real daemon ---------------------------------------------------------------------


def _start(make: Callable[..., DaemonProcess], **settings: dict[str, Any]) -> tuple[
    DaemonProcess, int
]:  # fmt: skip
    port = free_port()
    daemon = make({"metrics": {"listen": f"127.0.0.1:{port}"}, **settings})
    daemon.start()
    return daemon, port


def test_ready_status_watchdog_reload_and_stop(
    listener: NotifyListener, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    daemon, port = _start(daemon_factory)
    ready = listener.expect(is_ready, what="READY=1")
    # READY means up: the metrics port answers, every worker reported ready, the watches
    # are registered and the catalog exists.
    body = scrape(port)
    assert value(body, "photoscand_workers_idle") == 2
    assert value(body, "photoscand_watches") >= 1
    assert daemon.catalog_path.exists()
    assert ready["STATUS"].startswith("Phase 1: 0 images found.")

    pings = [listener.expect(lambda m: m.get("WATCHDOG") == "1", timeout=3) for _ in range(3)]
    assert len(pings) == 3

    shutil.copy(PHOTO, daemon.photos / "one.jpg")
    listener.expect(lambda m: "Phase 1: 1 images found" in m.get("STATUS", ""), timeout=15,
                    what="a STATUS line counting the new photo")  # fmt: skip

    # SIGHUP with a valid config: RELOADING=1 (with the monotonic clock), the new worker
    # count applied, then READY=1.
    daemon.rewrite_config(workers={"count": 1})
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    daemon.proc.send_signal(signal.SIGHUP)
    reloading = listener.expect(lambda m: "RELOADING" in m, timeout=10, what="RELOADING=1")
    assert reloading["RELOADING"] == "1"
    assert int(reloading["MONOTONIC_USEC"]) >= before
    listener.expect(is_ready, timeout=10, what="READY=1 after the reload")
    wait_for(lambda: value(scrape(port), "photoscand_workers") == 1, 10,
             message="the pool shrunk to one worker")  # fmt: skip

    # SIGHUP with an invalid config: refused, logged, the old one kept, READY=1 again.
    daemon.config_path.write_text("workers:\n  count: zero\n")
    daemon.proc.send_signal(signal.SIGHUP)
    listener.expect(lambda m: "RELOADING" in m, timeout=10, what="RELOADING=1")
    listener.expect(is_ready, timeout=10, what="READY=1 after the refused reload")
    wait_for(lambda: "reload refused" in daemon.log_text(), 5, message="the refusal logged")
    refusal = [line for line in daemon.log_text().splitlines() if "reload refused" in line]
    assert "workers.count" in refusal[0]
    assert daemon.proc.poll() is None
    assert value(scrape(port), "photoscand_workers") == 1

    daemon.proc.send_signal(signal.SIGTERM)
    stopping = listener.expect(lambda m: "STOPPING" in m, timeout=10, what="STOPPING=1")
    assert stopping["STOPPING"] == "1"
    assert daemon.proc.wait(timeout=30) == 0


def test_sighup_applies_workers_paths_and_sizes(
    listener: NotifyListener, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    daemon, port = _start(daemon_factory)
    listener.expect(is_ready, what="READY=1")
    shutil.copy(PHOTO, daemon.photos / "before.jpg")
    daemon.wait_row(daemon.photos / "before.jpg", "done")

    second = daemon.root / "more-photos"
    second.mkdir()
    daemon.rewrite_config(
        watch={"paths": [str(daemon.photos), str(second)]},
        thumbnails={"sizes": [128]},
        workers={"count": 3},
    )
    daemon.proc.send_signal(signal.SIGHUP)
    listener.expect(lambda m: "RELOADING" in m, timeout=10, what="RELOADING=1")
    listener.expect(is_ready, timeout=10, what="READY=1 after the reload")

    # The new folder is watched (an event, not a walk, announces this file) ...
    shutil.copy(PHOTO, second / "after.jpg")
    row = daemon.wait_row(second / "after.jpg", "done")
    # ... new images get the new sizes; the old image keeps its thumbnails.
    sizes = daemon.query("SELECT size, max(width, height) FROM thumbnails WHERE image_id = ?",
                         (row[0],))  # fmt: skip
    assert sizes == [(128, 128)]
    old = daemon.row(daemon.photos / "before.jpg")
    assert {s for (s,) in daemon.query(
        "SELECT size FROM thumbnails WHERE image_id = ?", (old[0],))} == {256, 64}  # fmt: skip
    body = scrape(port)
    assert value(body, "photoscand_workers") == 3
    assert value(body, "photoscand_files_discovered_total", {"source": "event"}) >= 2


def test_reload_keeps_the_command_line_flags(
    listener: NotifyListener, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Flags win over the file, after a reload too: `run --workers 1` stays at one worker."""
    port = free_port()
    daemon = daemon_factory({"metrics": {"listen": f"127.0.0.1:{port}"}})
    daemon.start("run", "--workers", "1")
    listener.expect(is_ready, what="READY=1")
    assert value(scrape(port), "photoscand_workers") == 1
    daemon.rewrite_config(workers={"count": 3}, thumbnails={"sizes": [128]})
    daemon.proc.send_signal(signal.SIGHUP)
    listener.expect(lambda m: "RELOADING" in m, timeout=10, what="RELOADING=1")
    listener.expect(is_ready, timeout=10, what="READY=1 after the reload")
    wait_for(lambda: "configuration reloaded" in daemon.log_text(), 5, message="the reload")
    assert value(scrape(port), "photoscand_workers") == 1


def test_a_deleted_root_is_reported_and_the_watchdog_keeps_pinging(
    listener: NotifyListener, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """A root that disappears (deleted, unmounted) kills its inotify emitter; the daemon
    reports it (STATUS, metric) and stays healthy, and watches it again when it returns."""
    daemon, port = _start(daemon_factory)
    listener.expect(is_ready, what="READY=1")
    shutil.rmtree(daemon.photos)
    listener.expect(lambda m: "watched folder(s) unavailable" in m.get("STATUS", ""),
                    timeout=15, what="STATUS reporting the missing folder")  # fmt: skip
    assert value(scrape(port), "photoscand_roots_unavailable") == 1
    for _ in range(2):
        listener.expect(lambda m: m.get("WATCHDOG") == "1", timeout=3, what="WATCHDOG=1")

    daemon.photos.mkdir()
    listener.expect(lambda m: "STATUS" in m and "unavailable" not in m["STATUS"], timeout=15,
                    what="STATUS without the missing folder")  # fmt: skip
    shutil.copy(PHOTO, daemon.photos / "back.jpg")
    daemon.wait_row(daemon.photos / "back.jpg")
    assert value(scrape(port), "photoscand_roots_unavailable") == 0


class _Raising(FileSystemEventHandler):
    """What watchdog bug #427 looks like: an exception in a handler kills the observer."""

    def on_any_event(self, event: Any) -> None:
        raise RuntimeError("handler bug")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_watchdog_pings_stop_while_the_observer_or_the_walker_is_dead(
    listener: NotifyListener, tmp_path: Path
) -> None:
    """The health gate of the real daemon, run in this process so the test can break its
    threads the way they break in production: the observer thread dies from an exception
    in a handler; the walker thread stops."""
    photos = tmp_path / "photos"
    photos.mkdir()
    config_path = tmp_path / "config.yaml"
    config_path.write_text(
        f"watch: {{paths: ['{photos}'], rescan_interval_seconds: 0}}\n"
        f"catalog: {{path: '{tmp_path / 'var' / 'c.db'}'}}\n"
        f"thumbnails: {{dir: '{tmp_path / 'var' / 'thumbs'}'}}\n"
        "workers: {count: 1}\nmetrics: {listen: ''}\n"
    )
    state: dict[str, Any] = {"step": "ready", "dead_turns_due": 0, "restarted_at": None}
    deadline = time.monotonic() + 60

    def tick(d: Daemon) -> None:
        assert time.monotonic() < deadline, f"stuck at step {state['step']}"
        messages = listener.drain()
        pinged = any(m.get("WATCHDOG") == "1" for m in messages)
        step = state["step"]
        if step == "ready" and any(is_ready(m) for m in messages):
            state["step"] = "healthy"
        elif step == "healthy" and pinged:
            # Break the observer the way watchdog breaks it.
            observer = d.watcher._observer  # the real thread, as a handler bug would find it
            observer.schedule(_Raising(), str(photos))
            (photos / "trigger.txt").write_text("x")
            state["step"] = "killing"
        elif step == "killing" and not d.watcher.observer_alive():
            state["step"] = "observer dead"
            state["last_ping"] = time.monotonic()
            # The loop replaces a dead observer at its next check (every 2 s); start that
            # clock now so the gate is seen holding back pings for a whole check interval.
            d.watcher._checked_at = time.monotonic()
        elif step == "observer dead":
            if d.watcher.observer_alive():
                # The daemon restarted it (it checks every 2 s): pings may resume.
                restarts = d.metrics.registry.get_sample_value("photoscand_observer_restarts_total")
                assert restarts == 1
                state["step"] = "observer back"
                return
            assert not pinged, "WATCHDOG=1 sent while the observer was dead"
            if time.monotonic() - state["last_ping"] > d.notifier.watchdog_every:
                state["dead_turns_due"] += 1  # a ping was due and withheld
        elif step == "observer back" and pinged:
            d.walker.stop()
            state["step"] = "walker stopping"
        elif step == "walker stopping" and not d.walker.is_alive():
            state["step"] = "walker dead"
            state["walker_dead_at"] = time.monotonic()
        elif step == "walker dead":
            assert not pinged, "WATCHDOG=1 sent while the walker was dead"
            if time.monotonic() - state["walker_dead_at"] > 3 * d.notifier.watchdog_every:
                state["step"] = "stopping"
                os.kill(os.getpid(), signal.SIGTERM)  # the daemon's own handler takes it

    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    daemon = Daemon(load_config(str(config_path)), on_turn=tick)
    try:
        assert daemon.run() == 0
    finally:
        for signum, handler in saved.items():
            signal.signal(signum, handler)
    assert state["step"] == "stopping"
    assert state["dead_turns_due"] > 0, "no ping fell due while the observer was dead"
    assert any("STOPPING" in m for m in listener.drain())
