"""One daemon per catalog: both halves of the lock protocol.

``run`` and ``scan`` hold an exclusive ``flock`` on the catalog file itself for as long as
they run: a file nobody deletes from under a running daemon (a lock on a separate file was
lost when a tmp cleaner removed it, and a second daemon then started). Linux keeps ``flock``
apart from the POSIX record locks SQLite takes on the same file; the hazard is that closing
*any* descriptor of the file drops this process's POSIX locks, so the lock's descriptor is
closed only after the catalog is. The daemon's pid goes in ``<catalog>.lock`` beside it, for
people and for ``status``.

``status`` asks for a shared lock on the catalog, which fails exactly while a daemon holds
it, and reads the pid; it does so before it opens the catalog itself, for the same reason.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os

from photoscand.catalog import CatalogError


class CatalogLocked(Exception):
    """Another photoscand already runs on this catalog."""


def pid_path(catalog_path: str) -> str:
    return catalog_path + ".lock"


def _held_elsewhere(exc: OSError) -> bool:
    return exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES)


def _pid_of_holder(catalog_path: str) -> int | None:
    with contextlib.suppress(OSError, ValueError, IndexError), open(pid_path(catalog_path)) as fh:
        return int(fh.read().split()[0])
    return None


class CatalogLock:
    """The exclusive lock, taken at construction and held until :meth:`release`.

    Raises:
        CatalogLocked: another daemon holds it.
        CatalogError: the catalog file cannot be opened.
    """

    def __init__(self, catalog_path: str) -> None:
        self.catalog_path = catalog_path
        os.makedirs(os.path.dirname(catalog_path) or ".", exist_ok=True)
        try:
            # O_CREAT: an empty file is what SQLite makes a new catalog from.
            self._fd = os.open(catalog_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CatalogError(f"cannot open the catalog {catalog_path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            if not _held_elsewhere(exc):
                raise CatalogError(f"cannot lock the catalog {catalog_path}: {exc}") from exc
            holder = _pid_of_holder(catalog_path)
            who = f" (pid {holder})" if holder else ""
            raise CatalogLocked(
                f"another photoscand{who} is already running on the catalog {catalog_path}"
            ) from exc
        self._write_pid()

    def _write_pid(self) -> None:
        temp = f"{pid_path(self.catalog_path)}.{os.getpid()}"
        try:
            with open(temp, "w") as fh:
                fh.write(f"{os.getpid()}\n")
            os.replace(temp, pid_path(self.catalog_path))
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(temp)  # the pid is for people; the lock holds without it

    def release(self) -> None:
        """Give the lock up; call it after the catalog is closed (see the module doc)."""
        with contextlib.suppress(OSError):
            os.unlink(pid_path(self.catalog_path))
        with contextlib.suppress(OSError):
            os.close(self._fd)


def daemon_pid(catalog_path: str) -> int | None:
    """The pid of the daemon holding the catalog, 0 when one runs but its pid is unknown,
    or None when none runs. Call it while this process has the catalog closed."""
    try:
        fd = os.open(catalog_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        return (_pid_of_holder(catalog_path) or 0) if _held_elsewhere(exc) else None
    finally:
        os.close(fd)
    return None
