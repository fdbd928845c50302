"""sd_notify(3) without libsystemd: READY, STATUS, WATCHDOG, RELOADING and STOPPING.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). Outside systemd
the variable is unset and every call is a no-op. Send errors are logged once and
otherwise ignored, as systemd recommends: the daemon must not fail because its
supervisor went away. Hazard: a newline inside a value would start a new field, so
values are flattened to one line.
"""

from __future__ import annotations

import os
import socket
import time

from photoscand.log import get_logger

_log = get_logger("systemd")
_warned: set[str] = set()


def _warn_once(key: str, message: str, **fields: object) -> None:
    if key not in _warned:
        _warned.add(key)
        _log.warning(message, **fields)


def _address(raw: str) -> str | None:
    if raw.startswith("/"):
        return raw
    if raw.startswith("@"):
        return "\0" + raw[1:]
    return None  # vsock: and other forms are not supported


def _one_line(value: object) -> str:
    return " ".join(str(value).splitlines())


def notify(**fields: object) -> bool:
    """Send one notification; True when a datagram was sent.

    Example: ``notify(READY=1, STATUS="watching 2 roots")``.
    """
    raw = os.environ.get("NOTIFY_SOCKET")
    if not raw:
        return False
    address = _address(raw)
    if address is None:
        _warn_once(
            "address", "NOTIFY_SOCKET address not supported; not notifying systemd", address=raw
        )
        return False
    payload = "\n".join(f"{key}={_one_line(value)}" for key, value in fields.items()).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(payload)
    except OSError as exc:
        _warn_once("send", "cannot notify systemd", address=raw, error=str(exc))
        return False
    return True


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = os.environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    try:
        interval = int(usec) / 1_000_000 / 2
    except ValueError:
        return None
    return interval if interval > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """What the daemon tells systemd, in the order systemd expects it.

    READY=1 once at start-up and again after each reload; STATUS= whenever the summary
    changes; WATCHDOG=1 every half WatchdogSec, but only when the caller's health checks
    passed; RELOADING=1 with MONOTONIC_USEC= before a reload; STOPPING=1 at the start of
    a graceful stop.
    """

    def __init__(self) -> None:
        self.watchdog_every = watchdog_interval()
        self._last_ping = 0.0
        self._last_status = ""

    def ready(self, status: str) -> None:
        self._last_status = status
        notify(READY=1, STATUS=status)

    def status(self, status: str) -> None:
        if status != self._last_status:
            self._last_status = status
            notify(STATUS=status)

    def ping_due(self, now: float) -> bool:
        return self.watchdog_every is not None and now - self._last_ping >= self.watchdog_every

    def ping(self, now: float) -> None:
        """WATCHDOG=1; call only after the health checks passed."""
        self._last_ping = now
        notify(WATCHDOG=1)

    def reloading(self) -> None:
        notify(RELOADING=1, MONOTONIC_USEC=monotonic_usec())

    def stopping(self, status: str = "stopping") -> None:
        self._last_status = status
        notify(STOPPING=1, STATUS=status)
