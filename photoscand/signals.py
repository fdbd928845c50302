"""The loop's wake-up pipe, and the signals that set its flags and write to it.

Hazard: Python runs signal handlers on the main thread between bytecodes, whatever the loop
is doing at that moment, so the handlers here only count and set flags;
``signal.set_wakeup_fd`` writes to the pipe so that the loop's wait returns at once, and the
loop does the work. Other threads wake the loop through the same pipe.
"""

from __future__ import annotations

import contextlib
import os
import signal
from typing import Any


class Signals:
    """The wake-up pipe and what SIGTERM, SIGINT and SIGHUP asked for.

    ``stop_requests`` counts SIGTERM and SIGINT (a second one forces the stop);
    ``reload_requested`` is set by SIGHUP and cleared by :meth:`take_reload`.
    """

    def __init__(self) -> None:
        self.read_fd, self._write_fd = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.stop_requests = 0
        self._reload_requested = False

    def install(self, *, reload: bool) -> None:
        """Handle SIGTERM and SIGINT (and SIGHUP when ``reload``)."""
        signal.set_wakeup_fd(self._write_fd, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)
        if reload:
            signal.signal(signal.SIGHUP, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGHUP:
            self._reload_requested = True
        else:
            self.stop_requests += 1

    def take_reload(self) -> bool:
        """True once per SIGHUP received."""
        requested, self._reload_requested = self._reload_requested, False
        return requested

    def wake(self) -> None:
        """Wake the loop (safe from any thread)."""
        with contextlib.suppress(BlockingIOError, OSError):
            os.write(self._write_fd, b"\0")

    def drain(self) -> None:
        """Empty the pipe after the wait returned for it."""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self.read_fd, 4096):
                pass

    def close(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            signal.set_wakeup_fd(-1)
        for fd in (self.read_fd, self._write_fd):
            with contextlib.suppress(OSError):
                os.close(fd)
