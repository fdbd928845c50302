"""How the daemon starts its child processes: one fork server, and a pipe to each child.

Hazard: the daemon has threads (watchdog, the walker, the metrics server), and forking a
threaded process can copy a lock some thread holds. Every child therefore comes from a
fork server, a single-threaded process started first, which imports the worker code once.
This module stays light (no daemon imports) so the command line can start the server
before it imports the rest of the daemon.
"""

from __future__ import annotations

import contextlib
import importlib.util
import multiprocessing
import multiprocessing.forkserver
import os
import queue
import signal
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.context import BaseContext
from typing import Any

from photoscand.protocol import STOP

# What the fork server imports once for every child: the metadata parser and the converters.
PRELOAD = ["photoscand.worker", "photoscand.metadata", "photoscand.converters"]


def start_fork_server() -> BaseContext:
    """Start the fork server that every child comes from, and return its context.

    Children come from a fork server, not from this process: the daemon has threads,
    and forking it could copy a lock some thread holds. The server imports the worker
    code (Pillow, exifread, ...) once, so a replaced worker starts in milliseconds; it
    is started first so those imports overlap the daemon's own start-up.
    """
    main = sys.modules.get("__main__")
    if main is not None and getattr(main, "__spec__", None) is None:
        # Started as the console script: multiprocessing would run that script again in
        # every child (importing the whole daemon, ~0.3 s and 30 MB each). Children need
        # only the preloaded worker code; naming the package's own __main__ tells
        # multiprocessing there is nothing to re-run.
        main.__spec__ = importlib.util.find_spec("photoscand.__main__")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()
    return ctx


# How the daemon starts a child: (entry point, its arguments after the pipe, process name).
# ``functools.partial(Child, ctx)`` in the daemon; tests hand in fakes.
StartChild = Callable[[Callable[..., None], tuple[Any, ...], str], "Child"]


class ChildStartError(Exception):
    """A child could not be started (the fork server died, or the system is out of
    processes or memory); the caller tries again later."""


class Child:
    """A child process with a duplex pipe to it (the parent's end is ``conn``).

    Raises:
        ChildStartError: the process could not be started.
    """

    def __init__(
        self, ctx: BaseContext, target: Callable[..., None], args: tuple[Any, ...], name: str
    ) -> None:
        parent_end, child_end = ctx.Pipe(duplex=True)
        self.process = ctx.Process(  # type: ignore[attr-defined]
            target=target, args=(child_end, *args), name=name, daemon=True
        )
        try:
            # A fork server killed a moment ago still looks alive to multiprocessing
            # (it is not reaped yet): the request then dies with EOF. The next start
            # finds it dead and starts a new server.
            self.process.start()
        except (OSError, EOFError) as exc:
            parent_end.close()
            child_end.close()
            raise ChildStartError(f"cannot start {name}: {exc or type(exc).__name__}") from exc
        # Close our copy of the child's end, or EOF would never reach either side.
        child_end.close()
        self.conn: Connection = parent_end
        self.pid: int = self.process.pid
        self.sentinel: int = self.process.sentinel

    def alive(self) -> bool:
        return self.process.is_alive()

    def exitcode(self) -> int | None:
        self.process.join(timeout=0)
        return self.process.exitcode

    def kill(self) -> None:
        with contextlib.suppress(OSError, ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)

    def close(self, *, graceful: bool) -> None:
        """Stop the child (politely first when ``graceful``) and reap it."""
        if graceful and self.alive():
            with contextlib.suppress(OSError, ValueError):
                self.conn.send(STOP)
            self.process.join(timeout=2)
        if self.alive():
            self.kill()
        self.process.join(timeout=5)
        self._release()

    def kill_now(self) -> bool:
        """SIGKILL the child and reap it only if that can be done at once; True when it is
        reaped. Its exit is reported by the fork server, which may itself be stopped or
        slow: a caller that must not wait keeps the child and calls :meth:`reaped` later."""
        self.kill()
        with contextlib.suppress(OSError):
            self.conn.close()
        return self.reaped()

    def reaped(self) -> bool:
        """True (and the child's resources freed) once its exit has been reported."""
        self.process.join(timeout=0)
        if self.process.exitcode is None:
            return False
        self._release()
        return True

    def _release(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        with contextlib.suppress(ValueError):
            self.process.close()


class Starter:
    """Starts children on a thread of its own, and hands them over when they are up.

    Hazard: starting a child asks the fork server and waits for it to answer with the pid;
    a fork server that is stopped or slow would hold the daemon's loop for as long, and
    with it phase 1, the metrics and the watchdog. Requests are served one at a time, in
    order; each result is ``(key, Child)`` or ``(key, ChildStartError)``.

    Args:
        start_child: how one child is started (``functools.partial(Child, ctx)``).
        wake: called when a result is ready (wakes the daemon's loop).
        name: the thread's name.
    """

    def __init__(
        self, start_child: StartChild, wake: Callable[[], None], name: str = "photoscand-start"
    ) -> None:
        self.start_child = start_child
        self._wake = wake
        self._requests: queue.SimpleQueue[tuple[Any, Callable[..., None], tuple, str] | None]
        self._requests = queue.SimpleQueue()
        self._done: queue.SimpleQueue[tuple[Any, Child | ChildStartError]] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def request(
        self, key: Any, target: Callable[..., None], args: tuple[Any, ...], name: str
    ) -> None:
        self._requests.put((key, target, args, name))

    def finished(self) -> list[tuple[Any, Child | ChildStartError]]:
        """The children started (or that could not be) since the last call."""
        results = []
        while True:
            try:
                results.append(self._done.get_nowait())
            except queue.Empty:
                return results

    def close(self) -> list[Child]:
        """Stop taking requests; returns the children started that nobody took."""
        self._requests.put(None)
        self._thread.join(timeout=10)
        return [child for _key, child in self.finished() if isinstance(child, Child)]

    def _run(self) -> None:
        while (request := self._requests.get()) is not None:
            key, target, args, name = request
            try:
                result: Child | ChildStartError = self.start_child(target, args, name)
            except ChildStartError as exc:
                result = exc
            self._done.put((key, result))
            self._wake()


# The longest a child that keeps failing waits before it is started again.
RESTART_DELAY_CAP_SECONDS = 30.0


def restart_delay(base: float, failures: int) -> float:
    """How long to wait before starting a child again after ``failures`` failures in a row:
    ``base`` doubled for each, capped, so a child that cannot live does not spin the CPU."""
    return min(RESTART_DELAY_CAP_SECONDS, base * 2**failures)


def describe_exit(code: int | None) -> str:
    """A child's exit code in words (negative codes are signals)."""
    if code is None:
        return "its pipe closed; exit status not reported yet"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if -code == signal.SIGKILL:
            return f"killed by {name}: out of memory, or killed by hand"
        return f"killed by {name}"
    return f"exit code {code}"
