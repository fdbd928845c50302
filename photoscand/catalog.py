"""The catalog: the only module that speaks SQL.

One read-write :class:`Catalog` per daemon, owned by one thread (the writer); readers
(``photoscand status``, dashboards, ``sqlite3``) open their own connections, which WAL
mode lets them do while the daemon writes. Hazards: never carry a connection across
``fork()`` (workers are started with forkserver and never open the catalog), and never
open the database file with plain ``open()`` in this process (closing that descriptor
would drop SQLite's POSIX locks).

Writes are batched: they join the current transaction, which :meth:`Catalog.commit`
ends; the caller commits when a batch is full, when it is old, or when it goes idle.
When the disk is full, the transaction is rolled back and its operations are kept in
memory and replayed by :meth:`Catalog.resume` once space returns, so no row is lost.
"""

from __future__ import annotations

import contextlib
import dataclasses
import operator
import os
import sqlite3
import time
import urllib.parse
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from photoscand import outcomes
from photoscand.outcomes import STATUSES, retry_delay
from photoscand.protocol import PhotoMetadata, ThumbnailFile
from photoscand.storable import clamped, signed, storable_metadata

APPLICATION_ID = 0x50534344  # "PSCD": identifies the file as a photoscand catalog
SCHEMA_VERSION = 3

# What a lookup reads of a row: the fields of Known, in its order.
_KNOWN = "id, path, size, mtime_ns, dev, ino, status, metadata_error, fingerprint"
# Rows whose metadata phase 1 must read (again) before they are converted: never read
# (prefetch mode reads it from the bytes the reader brings), or failed for a reason that may
# be gone.
_RETRY_PREFIXES = " OR ".join(
    f"substr(metadata_error, 1, {len(reason) + 1}) = '{reason}:'"
    for reason in sorted(outcomes.METADATA_RETRY)
)
_NEEDS_METADATA = f"(exif IS NULL AND metadata_error IS NULL OR {_RETRY_PREFIXES})"
# Metadata columns filled by phase 1: the fields of PhotoMetadata, in its order.
META_COLUMNS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(PhotoMetadata))
_meta_values = operator.attrgetter(*META_COLUMNS)

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """
        CREATE TABLE images (
            id             INTEGER PRIMARY KEY,
            path           BLOB NOT NULL UNIQUE,
            display_path   TEXT NOT NULL,
            size           INTEGER NOT NULL,
            mtime_ns       INTEGER NOT NULL,
            dev            INTEGER NOT NULL,
            ino            INTEGER NOT NULL,
            disk_offset    INTEGER,
            status         TEXT NOT NULL DEFAULT 'pending'
                           CHECK (status IN ('pending','converting','done','failed','missing')),
            attempts       INTEGER NOT NULL DEFAULT 0,
            retry_at       REAL,
            queued_at      REAL,
            error          TEXT,
            metadata_error TEXT,
            format         TEXT,
            width          INTEGER,
            height         INTEGER,
            orientation    INTEGER,
            taken_at       TEXT,
            make           TEXT,
            model          TEXT,
            lens           TEXT,
            iso            INTEGER,
            exposure_time  REAL,
            f_number       REAL,
            focal_length   REAL,
            gps_lat        REAL,
            gps_lon        REAL,
            gps_alt        REAL,
            exif           TEXT,
            content_hash   TEXT,
            discovered_at  TEXT NOT NULL,
            converted_at   TEXT
        )
        """,
        "CREATE INDEX images_status ON images(status)",
        "CREATE INDEX images_disk_order ON images(status, dev, disk_offset, ino)",
        "CREATE INDEX images_inode ON images(dev, ino)",
        "CREATE INDEX images_content_hash ON images(content_hash)",
        """
        CREATE TABLE thumbnails (
            image_id INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
            size     INTEGER NOT NULL,
            path     TEXT NOT NULL,
            width    INTEGER NOT NULL,
            height   INTEGER NOT NULL,
            PRIMARY KEY (image_id, size)
        ) WITHOUT ROWID
        """,
    ),
    # `retry --all` must re-encode (new quality or format) even though thumbnails named by
    # the content hash already exist; reconvert = 1 says so until the row is done again.
    2: ("ALTER TABLE images ADD COLUMN reconvert INTEGER NOT NULL DEFAULT 0",),
    # fingerprint: a digest of the size and both ends of the file, which a move must match
    # before a new path takes a vanished row (inode numbers are reused). conditions: what
    # the running daemon reports about its folders, for `photoscand status` to show.
    3: (
        "ALTER TABLE images ADD COLUMN fingerprint TEXT",
        """
        CREATE TABLE conditions (
            kind    TEXT NOT NULL,
            subject TEXT NOT NULL,
            message TEXT NOT NULL,
            since   TEXT NOT NULL,
            PRIMARY KEY (kind, subject)
        ) WITHOUT ROWID
        """,
    ),
}


_UPSERT_COLUMNS = (
    *"path display_path size mtime_ns dev ino status attempts retry_at queued_at error".split(),
    *"content_hash converted_at reconvert discovered_at".split(),
    *META_COLUMNS,
)
# A known path keeps its id and discovered_at; everything else starts over.
_UPSERT = (
    f"INSERT INTO images ({', '.join(_UPSERT_COLUMNS)})"
    f" VALUES ({', '.join('?' * len(_UPSERT_COLUMNS))}) ON CONFLICT(path) DO UPDATE SET "
    + ", ".join(
        f"{c} = excluded.{c}" for c in _UPSERT_COLUMNS if c not in ("path", "discovered_at")
    )
    + " RETURNING id"
)


class CatalogError(Exception):
    """The catalog cannot be opened or used (corrupt, newer schema, not a catalog)."""


@dataclass(frozen=True, slots=True)
class FileStat:
    """The identity of a file as the catalog stores it (see :mod:`photoscand.storable`:
    the mtime clamped to 64 bits, device and inode numbers read as signed)."""

    path: bytes
    size: int
    mtime_ns: int
    dev: int
    ino: int

    @classmethod
    def of(cls, path: bytes, st: os.stat_result) -> FileStat:
        return cls.stored(path, st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino)

    @classmethod
    def stored(cls, path: bytes, size: int, mtime_ns: int, dev: int, ino: int) -> FileStat:
        """The identity as it is stored, from the numbers ``stat`` gave."""
        return cls(path, size, clamped(mtime_ns), signed(dev), signed(ino))


@dataclass(frozen=True, slots=True)
class Known:
    """What the catalog holds for one path."""

    id: int
    path: bytes
    size: int
    mtime_ns: int
    dev: int
    ino: int
    status: str
    metadata_error: str | None = None
    fingerprint: str | None = None

    @property
    def metadata_again(self) -> bool:
        """Phase 1 failed for a reason that may be gone (see outcomes.METADATA_RETRY)."""
        return outcomes.metadata_retry(self.metadata_error)


@dataclass(frozen=True, slots=True)
class Job:
    """A pending image claimed for conversion."""

    id: int
    path: bytes
    size: int
    mtime_ns: int
    format: str | None
    orientation: int | None
    attempts: int
    dev: int
    ino: int
    disk_offset: int | None
    needs_metadata: bool = False  # a prefetch-mode row whose EXIF is read from the bytes
    reconvert: bool = False  # re-encode even where thumbnails of this content exist


@dataclass(frozen=True, slots=True)
class Failure:
    """A failed or missing image, for ``status``."""

    id: int
    display_path: str
    status: str
    error: str | None
    attempts: int


def utc_now_iso(now: float | None = None) -> str:
    """ISO 8601 in UTC with milliseconds, e.g. ``2026-11-30T08:15:02.113Z``."""
    moment = datetime.fromtimestamp(time.time() if now is None else now, UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def display_of(path: bytes) -> str:
    """The ``display_path`` column: the name as text, undecodable bytes escaped."""
    return path.decode("utf-8", errors="backslashreplace")


def _prefix_bounds(root: bytes) -> tuple[bytes, bytes]:
    """Byte bounds that select every path strictly under ``root`` in an index range."""
    root = root.rstrip(b"/")
    # '0' is the byte after '/', so [root/, root0) is exactly the subtree.
    return root + b"/", root + b"0"


def _is_disk_full(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        primary = code & 0xFF
        return primary in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
    return "disk is full" in str(exc) or "disk I/O error" in str(exc)


class Catalog:
    """The SQLite catalog of images and their thumbnails.

    Args:
        path: the database file; its folder is created when missing.
        readonly: open for reading only (``status``); no migrations are run.
        busy_timeout: seconds to wait for another writer (``retry``) before failing.
    """

    def __init__(self, path: str, *, readonly: bool = False, busy_timeout: float = 5.0) -> None:
        self.path = path
        self.readonly = readonly
        self._txn_ops: list[tuple[Callable[..., Any], tuple[Any, ...]]] = []
        self._txn_started: float | None = None
        self._backlog: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        self.stalled_reason: str | None = None
        if readonly:
            if not os.path.exists(path):
                raise CatalogError(f"no catalog at {path}")
            self._conn = self._connect_readonly(busy_timeout, immutable=False)
        else:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            try:
                self._setup()
            except sqlite3.OperationalError:
                if not readonly or os.path.exists(path + "-wal"):
                    raise
                # A stopped daemon left no -wal/-shm, and a reader who may not write in
                # the catalog's folder (the operators' group under systemd) cannot create
                # the -shm that WAL mode needs. With no -wal file everything is in the
                # main file, so reading it as immutable is exact.
                self._conn.close()
                self._conn = self._connect_readonly(busy_timeout, immutable=True)
                self._setup()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            raise CatalogError(f"cannot open catalog {path}: {exc}") from exc

    def _connect_readonly(self, busy_timeout: float, *, immutable: bool) -> sqlite3.Connection:
        uri = "file:" + _uri_quote(self.path) + "?mode=ro" + ("&immutable=1" if immutable else "")
        return sqlite3.connect(uri, uri=True, timeout=busy_timeout, isolation_level=None)

    # -- set-up ---------------------------------------------------------------------

    def _setup(self) -> None:
        conn = self._conn
        conn.execute("PRAGMA foreign_keys=ON")
        if self.readonly:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalog {self.path} has schema version {version}, newer than this "
                    f"photoscand understands ({SCHEMA_VERSION}); upgrade photoscand"
                )
            return
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode.lower() != "wal":
            raise CatalogError(f"catalog {self.path} cannot use WAL mode (got {mode})")
        # NORMAL in WAL mode: consistent after a power cut, may lose the last commits,
        # which the next walk rediscovers. FULL would fsync on every batch.
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA journal_size_limit=67108864")
        self._migrate()

    def _migrate(self) -> None:
        conn = self._conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if app_id not in (0, APPLICATION_ID) or (app_id == 0 and tables and version == 0):
                raise CatalogError(f"{self.path} is an SQLite database but not a catalog")
            if version > SCHEMA_VERSION:
                raise CatalogError(
                    f"catalog {self.path} has schema version {version}, newer than this "
                    f"photoscand understands ({SCHEMA_VERSION}); upgrade photoscand"
                )
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[step]:
                    conn.execute(statement)
            conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def close(self) -> None:
        """Commit what is pending and close; checkpoints the WAL on a clean close."""
        try:
            if not self.readonly:
                self.commit()
                if self._backlog is None:
                    with contextlib.suppress(sqlite3.Error):
                        self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s answer ("ok" when sound)."""
        return "; ".join(row[0] for row in self._conn.execute("PRAGMA integrity_check"))

    # -- transactions ---------------------------------------------------------------

    @property
    def stalled(self) -> bool:
        """True while writes are held in memory because the disk is full."""
        return self._backlog is not None

    @property
    def backlog_size(self) -> int:
        return len(self._backlog) if self._backlog is not None else 0

    @property
    def in_transaction(self) -> bool:
        return self._txn_started is not None

    def transaction_age(self, now: float | None = None) -> float:
        if self._txn_started is None:
            return 0.0
        return (time.monotonic() if now is None else now) - self._txn_started

    @property
    def transaction_size(self) -> int:
        return len(self._txn_ops)

    def _write(self, op: Callable[..., Any], *args: Any) -> Any:
        if self.readonly:
            raise CatalogError("catalog opened read-only")
        if self._backlog is not None:
            self._backlog.append((op, args))
            return None
        if self._txn_started is None:
            self._conn.execute("BEGIN IMMEDIATE")
            self._txn_started = time.monotonic()
        try:
            result = op(*args)
        except sqlite3.OperationalError as exc:
            if _is_disk_full(exc):
                # Kept with the batch: replayed once the disk has room again.
                self._txn_ops.append((op, args))
                self._stall(str(exc))
                return None
            raise
        # Only a write that happened is replayed after a full disk: one that raised for
        # its own data must not raise again in the replay.
        self._txn_ops.append((op, args))
        return result

    def commit(self) -> bool:
        """End the current batch. False when the disk is full (the batch is kept)."""
        if self._backlog is not None:
            return False
        if self._txn_started is None:
            return True
        try:
            self._conn.execute("COMMIT")
        except sqlite3.OperationalError as exc:
            if _is_disk_full(exc):
                self._stall(str(exc))
                return False
            raise
        self._txn_ops.clear()
        self._txn_started = None
        return True

    def _stall(self, reason: str) -> None:
        # SQLite may or may not have rolled back by itself after SQLITE_FULL; make sure.
        with contextlib.suppress(sqlite3.Error):
            self._conn.execute("ROLLBACK")
        self._backlog = list(self._txn_ops)
        self._txn_ops.clear()
        self._txn_started = None
        self.stalled_reason = reason

    def resume(self) -> bool:
        """Replay the writes held since the disk filled up. True when they are committed."""
        if self._backlog is None:
            return True
        ops, self._backlog = self._backlog, None
        for op, args in ops:
            self._write(op, *args)
            if self._backlog is not None:
                # Still full: keep every operation, including those not replayed yet.
                self._backlog = self._backlog + ops[len(self._backlog) :]
                return False
        if self.commit():
            self.stalled_reason = None
            return True
        return False

    # -- phase 1 --------------------------------------------------------------------

    def lookup(self, path: bytes) -> Known | None:
        """The row for a path, if any."""
        row = self._conn.execute(f"SELECT {_KNOWN} FROM images WHERE path = ?", (path,)).fetchone()
        return Known(*row) if row else None

    def same_inode(
        self, dev: int, ino: int, size: int, mtime_ns: int, limit: int = 64
    ) -> list[Known]:
        """Rows whose file had this identity (candidates for a move while we were away);
        missing rows first."""
        rows = self._conn.execute(
            f"SELECT {_KNOWN} FROM images"
            " WHERE dev = ? AND ino = ? AND size = ? AND mtime_ns = ?"
            " ORDER BY status = 'missing' DESC LIMIT ?",
            (dev, ino, size, mtime_ns, limit),
        ).fetchall()
        return [Known(*row) for row in rows]

    def count_links(self, dev: int, ino: int) -> int:
        """How many rows name this inode (hard links are one row each), from the index."""
        return self._conn.execute(
            "SELECT count(*) FROM images INDEXED BY images_inode WHERE dev = ? AND ino = ?",
            (dev, ino),
        ).fetchone()[0]

    def add_image(
        self, st: FileStat, meta: PhotoMetadata, now: float, *, known: bool = False
    ) -> int | None:
        """Insert a new photo as ``pending``, or start a known path's row over (``known``:
        the file changed; its old thumbnails no longer describe it)."""
        return self._write(self._op_upsert, st, meta, now, known)

    def _op_upsert(self, st: FileStat, meta: PhotoMetadata, now: float, known: bool) -> int:
        meta, size = storable_metadata(meta, st.size)
        st = FileStat.stored(st.path, size, st.mtime_ns, st.dev, st.ino)
        # In _UPSERT_COLUMNS' order: status, attempts, retry_at, queued_at, error,
        # content_hash, converted_at, reconvert, discovered_at.
        state = ("pending", 0, None, now, None, None, None, 0, utc_now_iso(now))
        identity = (st.path, display_of(st.path), st.size, st.mtime_ns, st.dev, st.ino)
        values = (*identity, *state, *_meta_values(meta))
        image_id = int(self._conn.execute(_UPSERT, values).fetchone()[0])
        if known:
            self._conn.execute("DELETE FROM thumbnails WHERE image_id = ?", (image_id,))
        return image_id

    def update_metadata(self, image_id: int, meta: PhotoMetadata) -> None:
        """Fill in a row's metadata (prefetch mode parses it from the bytes it read)."""
        if meta.exif is None and meta.metadata_error is None:
            meta = dataclasses.replace(meta, exif="{}")  # parsed: never "still to read" again
        meta, _size = storable_metadata(meta, 0)
        self._write(self._op_update_metadata, image_id, meta)

    def _op_update_metadata(self, image_id: int, meta: PhotoMetadata) -> None:
        # The row keeps the place on disk it was given when the metadata does not say one.
        columns = [c for c in META_COLUMNS if c != "disk_offset" or meta.disk_offset is not None]
        assignments = ", ".join(f"{c} = ?" for c in columns)
        values = [getattr(meta, c) for c in columns]
        self._conn.execute(f"UPDATE images SET {assignments} WHERE id = ?", (*values, image_id))

    def set_device(self, image_id: int, dev: int) -> None:
        """The row's file is on a filesystem that now has another device number."""
        self._write(self._op_set_device, image_id, dev)

    def _op_set_device(self, image_id: int, dev: int) -> None:
        self._conn.execute("UPDATE images SET dev = ? WHERE id = ?", (dev, image_id))

    def set_metadata_error(self, image_id: int, error: str) -> None:
        """Phase 1 could not read a row's metadata again; what it had stays."""
        self._write(self._op_set_metadata_error, image_id, error)

    def _op_set_metadata_error(self, image_id: int, error: str) -> None:
        self._conn.execute("UPDATE images SET metadata_error = ? WHERE id = ?", (error, image_id))

    def restore(self, image_id: int, st: FileStat) -> None:
        """A ``missing`` file is back unchanged: it is ``done`` again if it was converted."""
        self._write(self._op_restore, image_id, st)

    def _op_restore(self, image_id: int, st: FileStat) -> None:
        self._conn.execute(
            "UPDATE images SET status = CASE WHEN content_hash IS NOT NULL"
            " AND EXISTS(SELECT 1 FROM thumbnails WHERE image_id = images.id)"
            " THEN 'done' ELSE 'pending' END, error = NULL, attempts = 0, retry_at = NULL,"
            " queued_at = ?, path = ?, display_path = ?, dev = ?, ino = ? WHERE id = ?",
            (time.time(), st.path, display_of(st.path), st.dev, st.ino, image_id),
        )

    def move(self, src: bytes, dst: bytes) -> int | None:
        """A file moved or renamed inside the tree: its row (and id) follows it.

        Returns the row's id, or None when ``src`` has no row. A row that ``dst`` had
        (the rename replaced a file) is removed: that file is gone.
        """
        return self._write(self._op_move, src, dst)

    def _op_move(self, src: bytes, dst: bytes) -> int | None:
        row = self._conn.execute("SELECT id FROM images WHERE path = ?", (src,)).fetchone()
        if row is None:
            return None
        self._conn.execute("DELETE FROM images WHERE path = ? AND id != ?", (dst, row[0]))
        self._conn.execute(
            "UPDATE images SET path = ?, display_path = ? WHERE id = ?",
            (dst, display_of(dst), row[0]),
        )
        return int(row[0])

    def move_tree(self, src: bytes, dst: bytes) -> int:
        """A folder moved inside the tree: every row under it follows. Returns the count."""
        return self._write(self._op_move_tree, src, dst) or 0

    def _op_move_tree(self, src: bytes, dst: bytes) -> int:
        low, high = _prefix_bounds(src)
        src_len = len(src.rstrip(b"/"))
        rows = self._conn.execute(
            "SELECT id, path FROM images WHERE path >= ? AND path < ?", (low, high)
        ).fetchall()
        dst = dst.rstrip(b"/")
        for image_id, path in rows:
            new = dst + bytes(path)[src_len:]
            self._conn.execute("DELETE FROM images WHERE path = ? AND id != ?", (new, image_id))
            self._conn.execute(
                "UPDATE images SET path = ?, display_path = ? WHERE id = ?",
                (new, display_of(new), image_id),
            )
        return len(rows)

    def move_to(self, image_id: int, st: FileStat) -> None:
        """A walk found a vanished row's file under a new path: the row follows it."""
        self._write(self._op_move_to, image_id, st)

    def _op_move_to(self, image_id: int, st: FileStat) -> None:
        self._conn.execute("DELETE FROM images WHERE path = ? AND id != ?", (st.path, image_id))
        self._conn.execute(
            "UPDATE images SET path = ?, display_path = ?, dev = ?, ino = ? WHERE id = ?",
            (st.path, display_of(st.path), st.dev, st.ino, image_id),
        )
        self._conn.execute(
            "UPDATE images SET status = CASE WHEN content_hash IS NOT NULL THEN 'done'"
            " ELSE 'pending' END, error = NULL WHERE id = ? AND status = 'missing'",
            (image_id,),
        )

    def mark_missing(self, path: bytes, message: str) -> bool | None:
        """The file is gone: its row becomes ``missing`` (reason vanished), never failed."""
        return self._write(self._op_missing, path, message)

    def _op_missing(self, path: bytes, message: str) -> bool:
        cur = self._conn.execute(
            "UPDATE images SET status = 'missing', error = ?, retry_at = NULL"
            " WHERE path = ? AND status != 'missing'",
            ("vanished: " + message, path),
        )
        return cur.rowcount > 0

    def mark_tree_missing(self, root: bytes, message: str) -> int:
        """Every row under a folder that was deleted or moved out becomes ``missing``."""
        return self._write(self._op_tree_missing, root, message) or 0

    def _op_tree_missing(self, root: bytes, message: str) -> int:
        low, high = _prefix_bounds(root)
        cur = self._conn.execute(
            "UPDATE images SET status = 'missing', error = ?, retry_at = NULL"
            " WHERE path >= ? AND path < ? AND status != 'missing'",
            ("vanished: " + message, low, high),
        )
        return cur.rowcount

    def rows_under(self, root: bytes) -> Iterator[tuple[int, bytes, str, int]]:
        """(id, path, status, dev) of every row under a watched root, in path order."""
        low, high = _prefix_bounds(root)
        cur = self._conn.execute(
            "SELECT id, path, status, dev FROM images WHERE path >= ? AND path < ? ORDER BY path",
            (low, high),
        )
        for image_id, path, status, dev in cur:
            yield image_id, bytes(path), status, dev

    def count_at_or_under(self, path: bytes) -> int:
        """How many rows are at ``path`` or under it (a file or a folder)."""
        low, high = _prefix_bounds(path)
        return self._conn.execute(
            "SELECT count(*) FROM images WHERE path = ? OR (path >= ? AND path < ?)",
            (path.rstrip(b"/") or b"/", low, high),
        ).fetchone()[0]

    def count_under(self, root: bytes, statuses: Sequence[str] = STATUSES) -> int:
        """How many rows under a watched root have one of these statuses."""
        low, high = _prefix_bounds(root)
        marks = ",".join("?" * len(statuses))
        return self._conn.execute(
            f"SELECT count(*) FROM images WHERE path >= ? AND path < ? AND status IN ({marks})",
            (low, high, *statuses),
        ).fetchone()[0]

    # -- phase 2 --------------------------------------------------------------------

    def reset_converting(self) -> int:
        """At start-up: conversions in hand when the daemon stopped go back to pending."""
        count = self._write(self._op_reset_converting)
        self.commit()
        return count or 0

    def _op_reset_converting(self) -> int:
        return self._conn.execute(
            "UPDATE images SET status = 'pending' WHERE status = 'converting'"
        ).rowcount

    def claim(
        self,
        limit: int,
        now: float,
        *,
        disk_order: bool = False,
        exclude: Collection[int] = (),
    ) -> list[Job]:
        """Up to ``limit`` pending rows whose back-off has passed, marked ``converting``.

        ``exclude`` names rows a worker still holds: a file that changed while it was
        converted is pending again, but must not be converted twice in parallel; the
        stale result is dropped when it arrives (the row is no longer ``converting``).
        """
        if limit <= 0 or self._backlog is not None:
            return []
        order = "dev, disk_offset, ino, id" if disk_order else "id"
        index = "images_disk_order" if disk_order else "images_status"
        rows = self._conn.execute(
            "SELECT id, path, size, mtime_ns, format, orientation, attempts, dev, ino,"
            f" disk_offset, {_NEEDS_METADATA}, reconvert"
            f" FROM images INDEXED BY {index}"
            " WHERE status = 'pending' AND (retry_at IS NULL OR retry_at <= ?)"
            f" ORDER BY {order} LIMIT ?",
            (now, limit + len(exclude)),
        ).fetchall()
        if exclude:
            rows = [row for row in rows if row[0] not in exclude][:limit]
        if not rows:
            return []
        ids = [row[0] for row in rows]
        self._write(self._op_set_converting, ids)
        if self._backlog is not None:
            # The claim did not happen; replaying it later would mark rows converting
            # that no worker holds.
            self._backlog.pop()
            return []
        return [Job(r[0], bytes(r[1]), *r[2:10], bool(r[10]), bool(r[11])) for r in rows]

    def _op_set_converting(self, ids: list[int]) -> None:
        self._conn.executemany(
            "UPDATE images SET status = 'converting' WHERE id = ? AND status = 'pending'",
            [(i,) for i in ids],
        )

    def refreshed(self, job: Job) -> Job:
        """A claimed job with the format and orientation phase 1 has read since the claim."""
        row = self._conn.execute(
            "SELECT format, orientation FROM images WHERE id = ?", (job.id,)
        ).fetchone()
        if row is None:
            return job
        return dataclasses.replace(job, format=row[0], orientation=row[1], needs_metadata=False)

    def next_retry_at(self) -> float | None:
        """The earliest back-off deadline among pending rows, if any is waiting."""
        row = self._conn.execute(
            "SELECT min(retry_at) FROM images WHERE status = 'pending' AND retry_at IS NOT NULL"
        ).fetchone()
        return row[0] if row else None

    def record_done(
        self, image_id: int, content_hash: str, thumbnails: Iterable[ThumbnailFile], now: float
    ) -> None:
        """A conversion succeeded: the row is ``done`` and lists its thumbnails."""
        self._write(self._op_done, image_id, content_hash, list(thumbnails), now)

    def _op_done(
        self, image_id: int, content_hash: str, thumbnails: list[ThumbnailFile], now: float
    ) -> None:
        cur = self._conn.execute(
            "UPDATE images SET status = 'done', content_hash = ?, converted_at = ?, error = NULL,"
            " retry_at = NULL, reconvert = 0 WHERE id = ? AND status = 'converting'",
            (content_hash, utc_now_iso(now), image_id),
        )
        if cur.rowcount == 0:
            # The file changed (back to pending) or vanished while it was converted:
            # this result describes old bytes, so it is not recorded.
            return
        self._conn.execute("DELETE FROM thumbnails WHERE image_id = ?", (image_id,))
        self._conn.executemany(
            "INSERT INTO thumbnails (image_id, size, path, width, height) VALUES (?, ?, ?, ?, ?)",
            [(image_id, t.size, t.path, t.width, t.height) for t in thumbnails],
        )

    def record_failure(
        self,
        image_id: int,
        error: str,
        *,
        transient: bool,
        max_attempts: int,
        backoff: float,
        now: float,
    ) -> None:
        """A conversion failed. Transient failures return to ``pending`` with a back-off
        doubling from ``backoff`` until ``max_attempts``; the others fail at once."""
        self._write(self._op_failure, image_id, error, transient, max_attempts, backoff, now)

    def _op_failure(
        self,
        image_id: int,
        error: str,
        transient: bool,
        max_attempts: int,
        backoff: float,
        now: float,
    ) -> None:
        row = self._conn.execute(
            "SELECT attempts FROM images WHERE id = ? AND status = 'converting'", (image_id,)
        ).fetchone()
        if row is None:
            return
        attempts = row[0] + 1
        if transient and attempts < max_attempts:
            retry_at = now + retry_delay(backoff, attempts)
            self._conn.execute(
                "UPDATE images SET status = 'pending', attempts = ?, retry_at = ?, error = ?"
                " WHERE id = ?",
                (attempts, retry_at, error, image_id),
            )
        else:
            self._conn.execute(
                "UPDATE images SET status = 'failed', attempts = ?, retry_at = NULL, error = ?"
                " WHERE id = ?",
                (attempts, error, image_id),
            )

    def record_vanished(self, image_id: int, message: str) -> None:
        """The file disappeared before the conversion could read it."""
        self._write(self._op_vanished, image_id, message)

    def _op_vanished(self, image_id: int, message: str) -> None:
        self._conn.execute(
            "UPDATE images SET status = 'missing', error = ?, retry_at = NULL"
            " WHERE id = ? AND status = 'converting'",
            ("vanished: " + message, image_id),
        )

    def postpone(self, image_id: int, retry_at: float) -> None:
        """Give a claimed row back to ``pending`` until ``retry_at``, no attempt counted."""
        self._write(self._op_postpone, image_id, retry_at)

    def _op_postpone(self, image_id: int, retry_at: float) -> None:
        self._conn.execute(
            "UPDATE images SET status = 'pending', retry_at = ?"
            " WHERE id = ? AND status = 'converting'",
            (retry_at, image_id),
        )

    def postpone_under(self, image_id: int, root: bytes, retry_at: float) -> None:
        """The image's watched folder is unavailable (unmounted, emptied): this row and every
        pending row under the folder wait until retry_at instead of being read as deleted."""
        self._write(self._op_postpone_under, image_id, root, retry_at)

    def _op_postpone_under(self, image_id: int, root: bytes, retry_at: float) -> None:
        self._conn.execute(
            "UPDATE images SET status = 'pending', retry_at = ?"
            " WHERE id = ? AND status = 'converting'",
            (retry_at, image_id),
        )
        low, high = _prefix_bounds(root)
        self._conn.execute(
            "UPDATE images SET retry_at = ? WHERE path >= ? AND path < ? AND status = 'pending'"
            " AND (retry_at IS NULL OR retry_at < ?)",
            (retry_at, low, high, retry_at),
        )

    def resume_under(self, root: bytes) -> int:
        """The folder is back: its pending rows may be claimed now (any back-off under it ends
        too: what failed there may have failed because the folder was away)."""
        return self._write(self._op_resume_under, root) or 0

    def _op_resume_under(self, root: bytes) -> int:
        low, high = _prefix_bounds(root)
        return self._conn.execute(
            "UPDATE images SET retry_at = NULL WHERE path >= ? AND path < ?"
            " AND status = 'pending' AND retry_at IS NOT NULL",
            (low, high),
        ).rowcount

    def release(self, image_id: int) -> None:
        """Give a claimed row back to ``pending`` without counting an attempt."""
        self._write(self._op_release, image_id)

    def _op_release(self, image_id: int) -> None:
        self._conn.execute(
            "UPDATE images SET status = 'pending' WHERE id = ? AND status = 'converting'",
            (image_id,),
        )

    def retry(self, paths: Sequence[bytes] | None = None, *, include_done: bool = False) -> int:
        """Failed rows back to ``pending`` (all, or those at or under the given paths).

        With ``include_done`` converted rows are queued again too (new sizes/format).
        """
        count = self._write(self._op_retry, list(paths) if paths else None, include_done)
        self.commit()
        return count or 0

    def _op_retry(self, paths: list[bytes] | None, include_done: bool) -> int:
        statuses = "('failed', 'done')" if include_done else "('failed')"
        sets = "status = 'pending', attempts = 0, retry_at = NULL, error = NULL, queued_at = ?"
        if include_done:
            sets += ", reconvert = 1"
        now = time.time()
        if paths is None:
            return self._conn.execute(
                f"UPDATE images SET {sets} WHERE status IN {statuses}", (now,)
            ).rowcount
        total = 0
        for path in paths:
            low, high = _prefix_bounds(path)
            total += self._conn.execute(
                f"UPDATE images SET {sets} WHERE status IN {statuses}"
                " AND (path = ? OR (path >= ? AND path < ?))",
                (now, path.rstrip(b"/") or b"/", low, high),
            ).rowcount
        return total

    # -- conditions -----------------------------------------------------------------

    def set_conditions(self, kind: str, conditions: Mapping[str, str], now: float) -> None:
        """What the running daemon reports of one kind, as ``{subject: message}``: it
        replaces that kind's earlier list; a condition still present keeps its start."""
        self._write(self._op_conditions, kind, dict(conditions), now)

    def _op_conditions(self, kind: str, conditions: dict[str, str], now: float) -> None:
        since = dict(
            self._conn.execute("SELECT subject, since FROM conditions WHERE kind = ?", (kind,))
        )
        self._conn.execute("DELETE FROM conditions WHERE kind = ?", (kind,))
        self._conn.executemany(
            "INSERT INTO conditions (kind, subject, message, since) VALUES (?, ?, ?, ?)",
            [(kind, s, m, since.get(s) or utc_now_iso(now)) for s, m in conditions.items()],
        )

    def clear_conditions(self) -> None:
        """A daemon starts or stops: nothing it reported holds any more."""
        self._write(self._op_clear_conditions)
        self.commit()

    def _op_clear_conditions(self) -> None:
        self._conn.execute("DELETE FROM conditions")

    def conditions(self) -> list[tuple[str, str, str, str]]:
        """(kind, subject, message, since) of everything the daemon reports now; none from
        a catalog made before conditions were kept."""
        try:
            rows = self._conn.execute(
                "SELECT kind, subject, message, since FROM conditions ORDER BY kind, subject"
            ).fetchall()
        except sqlite3.OperationalError:
            return []
        return [tuple(row) for row in rows]

    # -- reading --------------------------------------------------------------------

    def counts(self) -> dict[str, int]:
        """Rows per status (every status present, zeros included)."""
        result = dict.fromkeys(STATUSES, 0)
        for status, count in self._conn.execute(
            "SELECT status, count(*) FROM images GROUP BY status"
        ):
            result[status] = count
        return result

    def counts_under(self, roots: Sequence[bytes]) -> dict[str, int]:
        """Rows per status under the given roots."""
        result = dict.fromkeys(STATUSES, 0)
        for root in roots:
            low, high = _prefix_bounds(root)
            for status, count in self._conn.execute(
                "SELECT status, count(*) FROM images WHERE path >= ? AND path < ? GROUP BY status",
                (low, high),
            ):
                result[status] += count
        return result

    def failure_reasons(self) -> dict[str, int]:
        """Failed rows per reason word."""
        result: dict[str, int] = {}
        for reason, count in self._conn.execute(
            "SELECT substr(error, 1, instr(error || ':', ':') - 1), count(*) FROM images"
            " WHERE status = 'failed' GROUP BY 1"
        ):
            result[reason] = count
        return result

    def recent_failures(self, limit: int = 10) -> list[Failure]:
        """The most recently cataloged failed rows, newest first."""
        rows = self._conn.execute(
            "SELECT id, display_path, status, error, attempts FROM images"
            " WHERE status = 'failed' ORDER BY id DESC LIMIT ?",
            (limit,),
        ).fetchall()
        return [Failure(*row) for row in rows]

    def converted_since(self, since: Mapping[str, float]) -> dict[str, int]:
        """How many rows were converted after each given unix time (for rates)."""
        return {
            name: self._conn.execute(
                "SELECT count(*) FROM images WHERE converted_at >= ?", (utc_now_iso(moment),)
            ).fetchone()[0]
            for name, moment in since.items()
        }

    def oldest_pending_since(self) -> float | None:
        """The unix time the longest-waiting pending row was queued."""
        row = self._conn.execute(
            "SELECT min(queued_at) FROM images WHERE status IN ('pending', 'converting')"
        ).fetchone()
        return row[0] if row else None

    def thumbnails_of(self, image_id: int) -> list[tuple[int, str, int, int]]:
        """(size, path, width, height) of an image's thumbnails, largest first."""
        return self._conn.execute(
            "SELECT size, path, width, height FROM thumbnails WHERE image_id = ?"
            " ORDER BY size DESC",
            (image_id,),
        ).fetchall()

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read-only query for tools and tests (no writes go through here)."""
        if not sql.lstrip().upper().startswith(("SELECT", "PRAGMA", "WITH")):
            raise CatalogError("Catalog.query is for reading")
        return self._conn.execute(sql, params).fetchall()

    def wal_bytes(self) -> int:
        """The size of the write-ahead log (it should stay bounded)."""
        try:
            return os.path.getsize(self.path + "-wal")
        except OSError:
            return 0


def _uri_quote(path: str) -> str:
    return urllib.parse.quote(os.path.abspath(path))
