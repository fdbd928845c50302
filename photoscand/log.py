"""structlog set-up: JSON lines for journald and pipes, a readable console on a terminal.

Hazard: configure once per process. Worker processes started with spawn/forkserver do
not inherit the configuration and call :func:`configure` themselves.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from typing import Any

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# sd-daemon(3) priority prefixes: journald strips them and sets PRIORITY, so
# `journalctl -p warning -u photoscand` works.
_SYSLOG_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def display_path(path: bytes | str) -> str:
    """A path for people: undecodable bytes and control characters escaped, one line."""
    if isinstance(path, bytes):
        text = path.decode("utf-8", errors="backslashreplace")
    else:
        text = path.encode("utf-8", errors="surrogateescape").decode(
            "utf-8", errors="backslashreplace"
        )
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in text)


def _journald_prefix(_logger: Any, method: str, event: dict[str, Any]) -> dict[str, Any]:
    event["_prefix"] = _SYSLOG_PRIORITY.get(method, 6)
    return event


class _PrefixedJSON:
    """JSON renderer that puts the sd-daemon ``<N>`` priority in front of the line."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event: dict[str, Any]) -> str:
        prefix = event.pop("_prefix", None)
        line = self._json(logger, method, event)
        return f"<{prefix}>{line}" if prefix is not None else line


# Bumped by every configure(): component loggers bind again on their next call.
_generation = 0


def configure(level: str = "info", fmt: str = "auto", stream: Any = None) -> None:
    """Configure structlog (and route stdlib logging from libraries through it).

    Args:
        level: debug, info, warning or error.
        fmt: "auto" (console on a TTY, JSON otherwise), "json" or "console".
        stream: where lines go; stderr by default.
    """
    global _generation
    _generation += 1
    stream = stream or sys.stderr
    tty = hasattr(stream, "isatty") and stream.isatty()
    console = fmt == "console" or (fmt == "auto" and tty)
    under_journald = bool(os.environ.get("JOURNAL_STREAM")) and not tty
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
    ]
    # journald timestamps every line itself.
    if not under_journald:
        processors.append(structlog.processors.TimeStamper(fmt="iso", utc=True))
    if console:
        processors.append(structlog.dev.ConsoleRenderer(colors=tty))
    else:
        processors.append(structlog.processors.dict_tracebacks)
        if under_journald:
            processors.append(_journald_prefix)
            processors.append(_PrefixedJSON())
        else:
            processors.append(structlog.processors.JSONRenderer())
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS.get(level, logging.INFO)),
        logger_factory=structlog.WriteLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    # Libraries (watchdog's overflow warning, PIL) log through stdlib logging.
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_photoscand", False):
            root.removeHandler(handler)
    handler = _StdlibBridge()
    handler._photoscand = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(max(_LEVELS.get(level, logging.INFO), logging.INFO))


class _StdlibBridge(logging.Handler):
    """Forwards stdlib log records into structlog so every line has one format."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            log = structlog.get_logger(record.name)
            method = record.levelname.lower()
            if method not in ("debug", "info", "warning", "error", "critical"):
                method = "info"
            getattr(log, method)(record.getMessage(), logger=record.name)
        except Exception:  # logging must never take the daemon down
            self.handleError(record)


@contextlib.contextmanager
def one_file(log: Any, path: bytes, what: str) -> Iterator[None]:
    """Handle one file: an exception its data raises (a bug, a value nothing expected) is
    logged with the file's name and the daemon goes on with the next one, instead of
    ending the loop and every later restart on the same file."""
    try:
        yield
    except Exception as exc:
        log.error(
            f"{what} failed; the file is skipped",
            path=display_path(path),
            error=f"{type(exc).__name__}: {exc}",
            exc_info=True,
        )


class _ComponentLogger:
    """A structlog logger bound to a component name, bound again after each configure().

    The daemon's parts make their loggers at start-up; a reload's new level and format must
    reach them. structlog's lazy proxy would, but it binds on every call (about 15 us, twice
    per file in phase 2); this binds once per configuration.
    """

    __slots__ = ("_bound", "_generation", "_name")

    def __init__(self, name: str) -> None:
        self._name = name
        self._bound: Any = None
        self._generation = -1

    def __getattr__(self, attr: str) -> Any:
        if self._generation != _generation:
            self._bound = structlog.get_logger(self._name).bind(component=self._name)
            self._generation = _generation
        return getattr(self._bound, attr)


def get_logger(name: str = "photoscand") -> Any:
    """A structlog logger bound to a component name that follows reloads' level and format."""
    return _ComponentLogger(name)
