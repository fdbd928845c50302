"""Phase 1's settle rule, on a clock of the tests' own: a created-only file is taken exactly
when it has held still for settle_seconds, and files still changing are looked at meanwhile."""

from __future__ import annotations

import functools
import multiprocessing
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from photoscand.catalog import Catalog
from photoscand.children import Child
from photoscand.config import WatchConfig
from photoscand.ingest import Ingest
from photoscand.metrics import Metrics
from tests.fakes import FakeClock

SETTLE = 2.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
def ingest(tmp_path: Path, clock: FakeClock) -> Iterator[Ingest]:
    (tmp_path / "photos").mkdir()
    catalog = Catalog(str(tmp_path / "catalog.db"))
    # The clock is the tests' own; a completed file goes to the real metadata parser, which
    # the first tick after a completion starts (and stop() ends). Its answers are never read
    # here (no on_ready), so a file sent to it stays counted in the metadata depth.
    start_child = functools.partial(Child, multiprocessing.get_context("forkserver"))
    watch = WatchConfig(
        paths=(str(tmp_path / "photos"),),
        settle_seconds=SETTLE,
        metadata_timeout_seconds=10.0,
        rescan_interval_seconds=0,
        polling=False,
    )
    ingest = Ingest(
        catalog,
        [os.fsencode(tmp_path / "photos")],
        start_child,
        watch,
        metrics=Metrics(),
        clock=clock,
    )
    yield ingest
    ingest.stop()
    catalog.close()


def at(clock: FakeClock, moment: float) -> float:
    """Move the clock to ``moment`` (the parts read it too) and return it."""
    clock.now = moment
    return moment


def test_a_file_that_holds_still_is_taken_at_its_settle_deadline(
    ingest: Ingest, clock: FakeClock, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    photo = root / "moved-in.jpg"
    photo.write_bytes(b"\xff\xd8\xff" + b"x" * 1000)
    t0 = 1000.0
    ingest.created(os.fsencode(photo), t0)
    assert ingest.depths() == {"settle": 1, "metadata": 0}

    # Polled every settle/4 (at most 0.25 s) while it settles...
    assert ingest.next_deadline(t0) == t0 + 0.25
    ingest.tick(at(clock, t0 + 0.25))
    assert ingest.depths()["settle"] == 1
    ingest.tick(at(clock, t0 + 1.9))
    # ...but the last wake-up is the settle deadline itself, not the next poll after it.
    assert ingest.next_deadline(t0 + 1.9) == t0 + SETTLE
    ingest.tick(at(clock, t0 + SETTLE - 0.001))
    assert ingest.depths() == {"settle": 1, "metadata": 0}
    ingest.tick(at(clock, t0 + SETTLE))
    assert ingest.depths() == {"settle": 0, "metadata": 1}


def test_a_file_still_growing_starts_its_wait_again(
    ingest: Ingest, clock: FakeClock, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    growing, still = root / "growing.jpg", root / "still.jpg"
    growing.write_bytes(b"\xff\xd8\xff" + b"x" * 1000)
    still.write_bytes(b"\xff\xd8\xff" + b"y" * 1000)
    t0 = 1000.0
    ingest.created(os.fsencode(growing), t0)
    ingest.created(os.fsencode(still), t0 + 0.5)

    with growing.open("ab") as fh:
        fh.write(b"more")
    ingest.tick(at(clock, t0 + 1.0))  # sees the growth: growing.jpg now settles at t0 + 3.0
    ingest.tick(at(clock, t0 + 2.0))
    assert ingest.depths() == {"settle": 2, "metadata": 0}
    assert ingest.next_deadline(t0 + 2.4) == t0 + 2.25  # the next poll comes first
    ingest.tick(at(clock, t0 + 2.5))  # still.jpg: 2 s since it was created
    assert ingest.depths() == {"settle": 1, "metadata": 1}
    ingest.tick(at(clock, t0 + 2.9))
    assert ingest.next_deadline(t0 + 2.9) == t0 + 3.0
    ingest.tick(at(clock, t0 + 3.0))
    assert ingest.depths() == {"settle": 0, "metadata": 2}


def test_a_file_deleted_while_it_settles_is_dropped(
    ingest: Ingest, clock: FakeClock, tmp_path: Path
) -> None:
    root = tmp_path / "photos"
    photo = root / "brief.jpg"
    photo.write_bytes(b"\xff\xd8\xff" + b"z" * 1000)
    ingest.created(os.fsencode(photo), 1000.0)
    photo.unlink()
    ingest.tick(at(clock, 1000.25))
    assert ingest.depths() == {"settle": 0, "metadata": 0}
    assert ingest.next_deadline(1000.25) is None
