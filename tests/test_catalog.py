"""The catalog against a real SQLite file: schema, identity, queue states, disk full."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from pathlib import Path

import pytest

from photoscand.catalog import APPLICATION_ID, SCHEMA_VERSION, Catalog, CatalogError, FileStat
from photoscand.protocol import PhotoMetadata, ThumbnailFile


def stat_of(path: bytes, size: int = 100, mtime_ns: int = 1, ino: int = 7) -> FileStat:
    return FileStat(path, size, mtime_ns, 2049, ino)


META = PhotoMetadata(format="jpeg", width=40, height=30, orientation=6, make="Canon")


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    cat = Catalog(str(tmp_path / "var" / "catalog.db"))
    yield cat
    cat.close()


def test_new_catalog_has_schema_wal_and_identity(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    Catalog(str(path)).close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    assert conn.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    columns = {row[1] for row in conn.execute("PRAGMA table_info(images)")}
    for name in ("id", "path", "display_path", "size", "mtime_ns", "dev", "ino", "status",
                 "attempts", "error", "metadata_error", "format", "width", "height",
                 "orientation", "taken_at", "make", "model", "lens", "iso", "exposure_time",
                 "f_number", "focal_length", "gps_lat", "gps_lon", "gps_alt", "exif",
                 "content_hash", "discovered_at", "converted_at"):  # fmt: skip
        assert name in columns
    thumb_columns = {row[1] for row in conn.execute("PRAGMA table_info(thumbnails)")}
    assert {"image_id", "size", "path", "width", "height"} <= thumb_columns


def test_refuses_a_newer_schema_and_foreign_databases(tmp_path: Path) -> None:
    newer = tmp_path / "newer.db"
    Catalog(str(newer)).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="newer than this photoscand"):
        Catalog(str(newer))
    foreign = tmp_path / "foreign.db"
    conn = sqlite3.connect(foreign)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(CatalogError, match="not a catalog"):
        Catalog(str(foreign))


def test_reopening_migrates_nothing_and_keeps_rows(tmp_path: Path) -> None:
    path = str(tmp_path / "c.db")
    cat = Catalog(path)
    cat.add_image(stat_of(b"/p/a.jpg"), META, time.time())
    cat.close()
    cat = Catalog(path)
    assert cat.lookup(b"/p/a.jpg") is not None
    cat.close()


def test_paths_are_stored_byte_exact(catalog: Catalog) -> None:
    weird = b"/photos/caf\xe9\n-rf \xff.jpg"
    image_id = catalog.add_image(stat_of(weird), META, time.time())
    catalog.commit()
    row = catalog.query("SELECT path, display_path FROM images WHERE id = ?", (image_id,))[0]
    assert bytes(row[0]) == weird
    assert "\\xe9" in row[1] and "\\xff" in row[1]
    assert catalog.lookup(weird).id == image_id


def test_upsert_is_idempotent_and_a_change_requeues(catalog: Catalog) -> None:
    now = time.time()
    first = catalog.add_image(stat_of(b"/p/a.jpg"), META, now)
    again = catalog.add_image(stat_of(b"/p/a.jpg"), META, now)
    catalog.commit()
    assert first == again
    assert catalog.counts()["pending"] == 1
    (job,) = catalog.claim(5, now)
    catalog.record_done(job.id, "ab" * 32, [ThumbnailFile(256, "/t/x-256.jpg", 256, 192)], now)
    catalog.commit()
    assert catalog.counts()["done"] == 1
    changed = catalog.add_image(stat_of(b"/p/a.jpg", size=999), META, now, known=True)
    catalog.commit()
    assert changed == first
    row = catalog.query("SELECT status, content_hash, size FROM images WHERE id = ?", (first,))
    assert row == [("pending", None, 999)]
    assert catalog.thumbnails_of(first) == []


def test_move_keeps_the_row_id_and_replaces_a_target(catalog: Catalog) -> None:
    now = time.time()
    a = catalog.add_image(stat_of(b"/p/a.jpg", ino=1), META, now)
    b = catalog.add_image(stat_of(b"/p/b.jpg", ino=2), META, now)
    assert catalog.move(b"/p/a.jpg", b"/p/b.jpg") == a
    catalog.commit()
    assert catalog.lookup(b"/p/b.jpg").id == a
    assert catalog.lookup(b"/p/a.jpg") is None
    assert catalog.query("SELECT count(*) FROM images WHERE id = ?", (b,)) == [(0,)]
    assert catalog.move(b"/p/nothing.jpg", b"/p/c.jpg") is None


def test_move_tree_moves_only_that_subtree(catalog: Catalog) -> None:
    now = time.time()
    inside = catalog.add_image(stat_of(b"/p/trip/a.jpg", ino=1), META, now)
    deeper = catalog.add_image(stat_of(b"/p/trip/day1/b.jpg", ino=2), META, now)
    sibling = catalog.add_image(stat_of(b"/p/trip2/c.jpg", ino=3), META, now)
    assert catalog.move_tree(b"/p/trip", b"/p/2026/trip") == 2
    catalog.commit()
    assert catalog.lookup(b"/p/2026/trip/a.jpg").id == inside
    assert catalog.lookup(b"/p/2026/trip/day1/b.jpg").id == deeper
    assert catalog.lookup(b"/p/trip2/c.jpg").id == sibling


def test_missing_restore_and_tree_missing(catalog: Catalog) -> None:
    now = time.time()
    image_id = catalog.add_image(stat_of(b"/p/d/a.jpg"), META, now)
    (job,) = catalog.claim(1, now)
    catalog.record_done(job.id, "cd" * 32, [ThumbnailFile(256, "/t/y.jpg", 10, 10)], now)
    assert catalog.mark_missing(b"/p/d/a.jpg", "deleted")
    catalog.commit()
    assert catalog.query("SELECT status, error FROM images") == [("missing", "vanished: deleted")]
    catalog.restore(image_id, stat_of(b"/p/d/a.jpg"))
    catalog.commit()
    assert catalog.query("SELECT status FROM images") == [("done",)]
    assert catalog.mark_tree_missing(b"/p/d", "folder gone") == 1
    assert catalog.mark_tree_missing(b"/p/d", "folder gone") == 0


def test_claim_order_backoff_and_attempts(catalog: Catalog) -> None:
    now = time.time()
    ids = [catalog.add_image(stat_of(f"/p/{i}.jpg".encode(), ino=i), META, now) for i in range(3)]
    jobs = catalog.claim(2, now)
    assert [j.id for j in jobs] == ids[:2]
    assert catalog.counts()["converting"] == 2
    # Transient: back to pending with a doubling back-off, then failed at max_attempts.
    catalog.record_failure(ids[0], "timeout: slow", transient=True, max_attempts=2, backoff=30,
                           now=now)  # fmt: skip
    row = catalog.query("SELECT status, attempts, retry_at, error FROM images WHERE id=?",
                        (ids[0],))[0]  # fmt: skip
    assert row[0] == "pending" and row[1] == 1 and row[2] == pytest.approx(now + 30)
    assert [j.id for j in catalog.claim(5, now)] == [ids[2]]  # ids[0] waits for its back-off
    assert catalog.next_retry_at() == pytest.approx(now + 30)
    (retried,) = catalog.claim(5, now + 31)
    assert retried.id == ids[0] and retried.attempts == 1
    catalog.record_failure(ids[0], "timeout: slow", transient=True, max_attempts=2, backoff=30,
                           now=now)  # fmt: skip
    assert catalog.query("SELECT status, attempts FROM images WHERE id=?", (ids[0],)) == [
        ("failed", 2)
    ]
    # Permanent: failed at once, reason kept.
    catalog.record_failure(ids[1], "corrupt: not a JPEG", transient=False, max_attempts=3,
                           backoff=30, now=now)  # fmt: skip
    assert catalog.failure_reasons() == {"timeout": 1, "corrupt": 1}
    assert [f.id for f in catalog.recent_failures()] == [ids[1], ids[0]]


def test_release_reset_and_retry(catalog: Catalog) -> None:
    now = time.time()
    a = catalog.add_image(stat_of(b"/p/a/1.jpg", ino=1), META, now)
    b = catalog.add_image(stat_of(b"/p/b/2.jpg", ino=2), META, now)
    catalog.claim(2, now)
    catalog.release(a)
    catalog.commit()
    assert catalog.query("SELECT status, attempts FROM images WHERE id=?", (a,)) == [("pending", 0)]
    assert catalog.reset_converting() == 1
    catalog.claim(2, now)
    catalog.record_failure(a, "corrupt: x", transient=False, max_attempts=3, backoff=1, now=now)
    catalog.record_failure(b, "corrupt: y", transient=False, max_attempts=3, backoff=1, now=now)
    catalog.commit()
    assert catalog.retry([b"/p/a"]) == 1
    assert catalog.counts()["failed"] == 1
    assert catalog.retry(None) == 1
    assert catalog.counts()["pending"] == 2


def test_results_for_rows_that_changed_meanwhile_are_dropped(catalog: Catalog) -> None:
    now = time.time()
    image_id = catalog.add_image(stat_of(b"/p/a.jpg"), META, now)
    catalog.claim(1, now)
    # The file changed while it was converted: phase 1 put it back to pending.
    catalog.add_image(stat_of(b"/p/a.jpg", size=5), META, now)
    catalog.record_done(image_id, "ee" * 32, [ThumbnailFile(256, "/t/z.jpg", 1, 1)], now)
    catalog.commit()
    assert catalog.query("SELECT status FROM images") == [("pending",)]
    assert catalog.thumbnails_of(image_id) == []


def test_readers_see_commits_while_the_writer_works(tmp_path: Path, catalog: Catalog) -> None:
    reader = Catalog(catalog.path, readonly=True)
    catalog.add_image(stat_of(b"/p/a.jpg"), META, time.time())
    assert reader.counts()["pending"] == 0  # not committed yet
    catalog.commit()
    assert reader.counts()["pending"] == 1
    with pytest.raises(CatalogError):
        reader.add_image(stat_of(b"/p/b.jpg"), META, time.time())
    reader.close()


def test_disk_full_keeps_writes_and_replays_them(tmp_path: Path) -> None:
    """SQLITE_FULL (a real one, from max_page_count) holds the batch in memory; once
    there is room the held writes are committed and nothing is lost."""
    cat = Catalog(str(tmp_path / "c.db"))
    cat.add_image(stat_of(b"/p/first.jpg", ino=1), META, time.time())
    cat.commit()
    pages = cat.query("PRAGMA page_count")[0][0]
    cat._conn.execute(f"PRAGMA max_page_count={pages}")
    big = dataclasses.replace(META, exif="x" * 200_000)
    for i in range(5):
        cat.add_image(stat_of(f"/p/{i}.jpg".encode(), ino=10 + i), big, time.time())
    cat.commit()
    assert cat.stalled
    assert cat.claim(5, time.time()) == []
    cat.add_image(stat_of(b"/p/late.jpg", ino=99), META, time.time())
    assert cat.backlog_size >= 6
    assert not cat.resume()  # still full
    cat._conn.execute("PRAGMA max_page_count=1073741823")
    assert cat.resume()
    assert not cat.stalled
    assert cat.counts()["pending"] == 7
    assert cat.integrity_check() == "ok"
    cat.close()


def test_a_row_in_hand_is_not_claimed_twice_after_it_changed(catalog: Catalog) -> None:
    now = time.time()
    image_id = catalog.add_image(stat_of(b"/p/a.jpg"), META, now)
    (job,) = catalog.claim(1, now)
    catalog.add_image(stat_of(b"/p/a.jpg", size=5), META, now)  # changed while converting
    assert catalog.claim(5, now, exclude={job.id}) == []
    catalog.release(job.id)  # the stale job ends: the row stays pending for the new bytes
    (again,) = catalog.claim(5, now)
    assert again.id == image_id and again.size == 5


def test_a_version_1_catalog_is_migrated_in_place(tmp_path: Path) -> None:
    from photoscand.catalog import _MIGRATIONS

    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    for statement in _MIGRATIONS[1]:
        conn.execute(statement)
    conn.execute(
        "INSERT INTO images (path, display_path, size, mtime_ns, dev, ino, status,"
        " discovered_at, content_hash) VALUES (?, 'x', 1, 1, 1, 1, 'done', 'then', 'aa')",
        (b"/p/old.jpg",),
    )
    conn.execute(f"PRAGMA application_id={APPLICATION_ID}")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    cat = Catalog(str(path))
    assert cat.query("PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert cat.query("SELECT status, reconvert FROM images") == [("done", 0)]
    assert cat.retry(None, include_done=True) == 1
    (job,) = cat.claim(1, time.time())
    assert job.reconvert
    cat.record_done(job.id, "bb" * 32, [], time.time())
    cat.commit()
    assert cat.query("SELECT reconvert FROM images") == [(0,)]
    cat.close()
