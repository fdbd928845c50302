"""Stand-ins for what the decision logic talks to: a clock the test moves by hand, and child
processes whose pipes the test reads and writes. The real ones are tested by the
integration tests (the daemon as a subprocess, real workers); these let the supervisor's and
phase 1's decisions run in milliseconds."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from typing import Any

from photoscand.protocol import STOP


class FakeClock:
    """Monotonic and wall time that only move when the test says so."""

    def __init__(self, now: float = 1000.0, wall: float = 1_800_000_000.0) -> None:
        self.now = now
        self._wall_offset = wall - now

    def monotonic(self) -> float:
        return self.now

    def wall(self) -> float:
        return self.now + self._wall_offset

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class FakeConn:
    """The daemon's end of a child's pipe: what the daemon sent, and answers to give it."""

    def __init__(self) -> None:
        self.sent: list[Any] = []
        self.inbox: deque[Any] = deque()
        self.broken = False  # sending fails
        self.eof = False  # the child's end is closed: reading ends

    def send(self, message: Any) -> None:
        if self.broken:
            raise BrokenPipeError(32, "Broken pipe")
        self.sent.append(message)

    def poll(self, timeout: float = 0.0) -> bool:
        return bool(self.inbox) or self.eof

    def recv(self) -> Any:
        if not self.inbox:
            raise EOFError
        return self.inbox.popleft()

    def close(self) -> None:
        self.broken = True


class FakeChild:
    """A child process that does nothing by itself: the test answers for it."""

    _pids = itertools.count(50_000)

    def __init__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> None:
        self.target = target
        self.args = args
        self.name = name
        self.pid = next(self._pids)
        self.conn = FakeConn()
        self.sentinel = object()  # what the daemon's wait() would report when it exits
        self.code: int | None = None
        self.closed: str | None = None  # "graceful" or "killed" once closed

    def alive(self) -> bool:
        return self.code is None and self.closed is None

    def exitcode(self) -> int | None:
        return self.code

    def close(self, *, graceful: bool) -> None:
        if graceful and self.alive():
            self.conn.sent.append(STOP)
        self.closed = "graceful" if graceful and self.code is None else "killed"
        self.conn.close()

    def kill_now(self) -> bool:
        self.closed = "killed"
        self.conn.close()
        return self.reaped()

    def reaped(self) -> bool:
        return self.unreported is False

    # Set by a test to True to keep the exit unreported (a stopped fork server), False once
    # it is reported.
    unreported = False

    def die(self, code: int = -9) -> None:
        """The process exits (SIGKILL by default)."""
        self.code = code

    def jobs(self) -> list[Any]:
        """What the daemon sent this child, STOP excepted."""
        return [m for m in self.conn.sent if m is not STOP]


class FakeChildren:
    """``start_child`` for the parts under test: every child started, in order."""

    def __init__(self, on_start: Callable[[FakeChild], None] | None = None) -> None:
        self.started: list[FakeChild] = []
        self.on_start = on_start
        self.failures = 0  # the next this many starts fail (the fork server is gone)

    def __call__(self, target: Callable[..., None], args: tuple[Any, ...], name: str) -> FakeChild:
        from photoscand.children import ChildStartError

        if self.failures:
            self.failures -= 1
            raise ChildStartError(f"cannot start {name}: fork server gone")
        child = FakeChild(target, args, name)
        self.started.append(child)
        if self.on_start is not None:
            self.on_start(child)
        return child

    def named(self, prefix: str) -> list[FakeChild]:
        return [c for c in self.started if c.name.startswith(prefix)]


class ImmediateStarter:
    """A children.Starter that starts each child at once, in the caller's thread; the result
    is handed over at the next ``finished()``, as the real one does once its thread is done."""

    def __init__(self, start_child: Callable[..., Any]) -> None:
        self.start_child = start_child
        self._done: list[tuple[Any, Any]] = []

    def request(self, key: Any, target: Callable[..., None], args: tuple, name: str) -> None:
        from photoscand.children import ChildStartError

        try:
            result: Any = self.start_child(target, args, name)
        except ChildStartError as exc:
            result = exc
        self._done.append((key, result))

    def finished(self) -> list[tuple[Any, Any]]:
        done, self._done = self._done, []
        return done

    def close(self) -> list[Any]:
        return [child for _key, child in self.finished() if isinstance(child, FakeChild)]
