"""Crash loops: the real daemon SIGKILLed at seeded random moments and restarted, then the
same with its workers. Afterwards the catalog is sound, every photo is ``done`` once with
complete thumbnails, no temporary file is left, and no image was ever converted twice in
parallel: no process of a killed daemon outlives it, and within each run no image id is
converted twice."""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

from tests.conftest import wait_for
from tests.reliability import (
    ProcessId,
    assert_complete,
    conversions_per_run,
    distinct_copies,
    log_events,
    process_tree,
    slow_jpeg,
    start_and_walk,
    survivors,
    temp_files,
    workers,
)

SEED = 20261130
DAEMON_ROUNDS = 20
WORKER_KILLS = 25


def done_count(daemon) -> int:
    rows = daemon.query("SELECT count(*) FROM images WHERE status = 'done'")
    return rows[0][0] if rows else 0


def test_stale_temporary_thumbnails_are_removed_at_start_up(daemon_factory) -> None:
    daemon = daemon_factory()
    thumbs = Path(daemon.config["thumbnails"]["dir"])
    folder = thumbs / "ab" / "cd"
    folder.mkdir(parents=True)
    # What a worker killed mid-write leaves: its hidden temporary name beside the final one.
    stale = folder / (".abcd" + "0" * 60 + "-256.jpg.4242-0badcafe.tmp")
    stale.write_bytes(b"\xff\xd8half a thumbnail")
    kept = folder / ("abcd" + "0" * 60 + "-256.jpg")
    kept.write_bytes(b"a finished thumbnail stays")
    distinct_copies(daemon.photos, 1)
    daemon.start().wait_ready()
    daemon.wait_settled(1)
    wait_for(lambda: not stale.exists(), timeout=10, message="the stale temporary file removed")
    assert kept.exists()
    assert daemon.stop() == 0


def test_kill_9_of_the_daemon_at_random_moments_loses_and_duplicates_nothing(
    daemon_factory, tmp_path: Path
) -> None:
    rng = random.Random(SEED)
    daemon = daemon_factory({"workers": {"count": 2}})
    base = slow_jpeg(tmp_path / "base.jpg")
    photos = distinct_copies(daemon.photos / "first", 100, base=base)
    # Every round, more photos are moved in while the daemon runs (events, not only the
    # start-up walk), so each kill lands with work in hand.
    staged = distinct_copies(tmp_path / "staging", 15 * DAEMON_ROUNDS, base=base, start=100)
    figures = []
    offsets: list[int] = []
    orphans_seen = 0
    for round_no in range(DAEMON_ROUNDS):
        batch = staged[round_no * 15 : (round_no + 1) * 15]
        target = daemon.photos / "later" / f"r{round_no:02d}"
        target.mkdir(parents=True)

        def move_in(batch=batch, target=target) -> None:
            for path in batch:
                os.rename(path, target / path.name)
                photos.append(target / path.name)

        offsets.append(len(daemon.log_text()))
        daemon.start()
        assert daemon.proc is not None
        pid = daemon.proc.pid
        delay = rng.uniform(0.2, 3.0)
        deadline = time.monotonic() + delay
        seen: dict[tuple[int, int], ProcessId] = {}
        moved = False
        while time.monotonic() < deadline:
            if not moved and time.monotonic() > deadline - delay / 2:
                move_in()
                moved = True
            for p in process_tree(pid):
                seen[(p.pid, p.started)] = p
            time.sleep(0.02)
        for p in process_tree(pid):
            seen[(p.pid, p.started)] = p
        os.kill(pid, signal.SIGKILL)
        daemon.proc.wait()
        if not moved:
            move_in()
        # Nothing of the killed daemon may go on converting next to its successor.
        alive = survivors(list(seen.values()))
        assert not alive, f"round {round_no}: outlived the daemon: {alive}"
        orphans_seen += len(temp_files(Path(daemon.config["thumbnails"]["dir"])))
        names = sorted({p.name for p in seen.values()})
        figures.append((round(delay, 2), done_count(daemon), len(seen), names))
    total = 100 + 15 * DAEMON_ROUNDS
    assert len(photos) == total
    # Most kills landed while there was still work (the batch was not over early).
    busy_rounds = sum(1 for i, f in enumerate(figures) if f[1] < 100 + 15 * (i + 1))
    assert busy_rounds >= DAEMON_ROUNDS // 4, figures
    offsets.append(start_and_walk(daemon))
    daemon.wait_settled(total, timeout=180)
    assert daemon.stop() == 0
    end = assert_complete(daemon, photos)
    runs = conversions_per_run(daemon, offsets)
    twice = [(i, image_id) for i, run in enumerate(runs) for image_id, n in run.items() if n > 1]
    assert not twice, f"converted twice within one run: {twice[:5]}"
    conversions = sum(sum(run.values()) for run in runs)
    # Progress was made under fire (not everything in the final, quiet run).
    assert figures[-1][1] > 0, figures
    print(f"\ndaemon kill -9: {DAEMON_ROUNDS} rounds ({busy_rounds} with work in hand), "
          f"{end['rows']} photos, {conversions} conversions "
          f"({conversions - end['rows']} redone after a kill), temp files left by kills: "
          f"{orphans_seen}; (delay, done, processes) per round: "
          f"{[f[:3] for f in figures]}")  # fmt: skip


def test_kill_9_of_workers_at_random_moments_costs_only_attempts(
    daemon_factory, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 1)
    daemon = daemon_factory(
        {"workers": {"count": 2, "max_attempts": 100, "retry_backoff_seconds": 0.05}}
    )
    photos = distinct_copies(daemon.photos, 400, base=slow_jpeg(tmp_path / "base.jpg"))
    daemon.start().wait_ready()
    kills = 0
    # Kill until the batch is nearly through (a faster machine finishes sooner).
    while kills < WORKER_KILLS and done_count(daemon) < len(photos) - 40:
        time.sleep(rng.uniform(0.05, 0.3))
        pids = wait_for(lambda: len(workers(daemon)) == 2 and workers(daemon), timeout=20,
                        message="two workers")  # fmt: skip
        victim = rng.choice(sorted(pids))
        os.kill(victim, signal.SIGKILL)
        kills += 1
        wait_for(lambda v=victim: v not in workers(daemon), timeout=10, message="victim reaped")
    assert kills >= WORKER_KILLS * 2 // 3, f"only {kills} kills landed during the batch"
    assert done_count(daemon) < len(photos), "the batch ended before the last kill"
    daemon.wait_settled(len(photos), timeout=180)
    assert daemon.stop() == 0
    end = assert_complete(daemon, photos)
    events = log_events(daemon)
    in_hand = [e for e in events if e.get("event") == "worker died"]
    idle = [e for e in events if e.get("event") == "idle worker died"]
    assert len(in_hand) + len(idle) == kills
    attempts = daemon.query("SELECT sum(attempts) FROM images")[0][0]
    # Each kill of a busy worker costs exactly its image one attempt; innocents none.
    assert attempts == len(in_hand)
    runs = conversions_per_run(daemon, [0])
    assert max(runs[0].values()) == 1
    print(f"\nworker kill -9: {kills} kills ({len(in_hand)} mid-conversion), "
          f"{end['rows']} photos done, attempts counted {attempts}")  # fmt: skip


def test_kill_9_of_the_metadata_parser_loses_no_row_and_blames_no_file(
    daemon_factory, tmp_path: Path
) -> None:
    rng = random.Random(SEED + 2)
    daemon = daemon_factory({"workers": {"count": 1}})
    start_and_walk(daemon)
    staged = distinct_copies(tmp_path / "staging", 1500)
    (tmp_path / "staging").rename(daemon.photos / "batch")
    photos = [daemon.photos / "batch" / p.name for p in staged]
    kills = 0

    def rows() -> int:
        return daemon.query("SELECT count(*) FROM images")[0][0]

    while kills < 10 and rows() < len(photos) - 100:
        parsers = [p.pid for p in process_tree(daemon.proc.pid) if p.name == "photoscand-meta"]
        if not parsers:
            time.sleep(0.01)
            continue
        before = rows()
        time.sleep(rng.uniform(0.0, 0.05))
        try:
            os.kill(parsers[0], signal.SIGKILL)
        except ProcessLookupError:
            continue
        kills += 1
        # The next kill only once the new parser has answered (a second kill of the same
        # head-of-line file would rightly make it the suspect).
        wait_for(lambda b=before: rows() >= b + 40 or rows() >= len(photos), timeout=30,
                 message="phase 1 going on")  # fmt: skip
    assert kills >= 3, "phase 1 finished before the parser could be killed"
    daemon.wait_settled(len(photos), timeout=240)
    assert daemon.stop() == 0
    end = assert_complete(daemon, photos)
    # The parser was killed by hand: no innocent file may be blamed and lose its metadata.
    hit = daemon.query("SELECT count(*) FROM images WHERE metadata_error IS NOT NULL")[0][0]
    unsized = daemon.query("SELECT count(*) FROM images WHERE width IS NULL")[0][0]
    assert (hit, unsized) == (0, 0), (hit, unsized)
    print(f"\nparser kill -9: {kills} kills, no row lost or blamed, {end['rows']} photos done")


def test_kill_9_of_the_fork_server_is_survived(daemon_factory) -> None:
    """The fork server (every worker's and the parser's parent) killed: its children die
    with it (PR_SET_PDEATHSIG), and the daemon starts a new server and new children."""
    daemon = daemon_factory()
    start_and_walk(daemon)
    wait_for(lambda: len(workers(daemon)) == 2, message="two workers")
    tree = process_tree(daemon.proc.pid)
    parents = {p.pid: _parent(p.pid) for p in tree}
    server = [p for p in tree if p.pid in parents.values() and p.name != "photoscand-work"]
    assert len(server) == 1, tree
    children = [p for p in tree if parents[p.pid] == server[0].pid]
    os.kill(server[0].pid, signal.SIGKILL)
    assert not survivors(children), "children outlived their fork server"
    photos = distinct_copies(daemon.photos, 10)
    daemon.wait_settled(10, timeout=60)
    assert daemon.proc.poll() is None
    assert len(workers(daemon)) == 2
    assert daemon.stop() == 0
    assert_complete(daemon, photos)


def _parent(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as fh:
        return int(fh.read().rsplit(b")", 1)[1].split()[1])
