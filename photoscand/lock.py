"""One daemon per catalog: both halves of the lock protocol.

``run`` and ``scan`` hold an exclusive ``flock`` on ``<catalog>.lock`` for as long as they
run, with their pid written in the file; ``status`` asks for a shared lock on the same file,
which fails exactly while a daemon holds it, and reads the pid. The file is opened, never
created, by the reader: ``status`` may run as an operator who can only read the catalog's
folder.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os


class CatalogLocked(Exception):
    """Another photoscand already runs on this catalog."""


def lock_path(catalog_path: str) -> str:
    return catalog_path + ".lock"


class CatalogLock:
    """The exclusive lock, taken at construction and held until :meth:`release`.

    Raises:
        CatalogLocked: another daemon holds it.
    """

    def __init__(self, catalog_path: str) -> None:
        self.path = lock_path(catalog_path)
        os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                holder = ""
                with contextlib.suppress(OSError, ValueError), open(self.path) as fh:
                    holder = fh.read().strip()
                who = f" (pid {holder})" if holder else ""
                raise CatalogLocked(
                    f"another photoscand{who} is already running on the catalog {catalog_path}"
                ) from exc
            raise
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def daemon_pid(catalog_path: str) -> int | None:
    """The pid of the daemon holding the catalog's lock, 0 when one runs but its pid is
    unreadable, or None when none runs."""
    try:
        fd = os.open(lock_path(catalog_path), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                return None
            with contextlib.suppress(ValueError, OSError, IndexError):
                return int(os.read(fd, 32).split()[0])
            return 0
        return None
    finally:
        os.close(fd)
