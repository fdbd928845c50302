"""Phase 1: files/s into the catalog against exiftool and a bare exifread loop, and the delay
from a file's close to its catalog row while files keep arriving.

Hazards: a daemon has no natural end for phase 1, so its run ends when the catalog holds
every row (then SIGTERM); and a delay is only meaningful against the writer's own close
times on the same monotonic clock, so a separate writer process records them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import harness as h
import yardsticks as y

SECTION = "phase1"
DELAY_TARGET_MS = 50.0
MODES = {
    "close": "written in place, closed",
    "rename": "written as .name.part, renamed (moved event)",
    "movein": "moved in from outside the watched tree (created event only: settle)",
}


# --------------------------------------------------------------------------- photoscand


def photoscand_phase1_method() -> h.Method:
    """Phase 1 throughput of photoscand, cold start.

    Each run gets a fresh run folder (ctx.run_dir) and the folder of N photos (ctx.corpus,
    ctx.files). It starts `photoscand run` on a fresh catalog and counts as done when the
    catalog holds N rows: `until` polls it every 20 ms, then the harness sends SIGTERM and
    waits for the exit (wall = start to N rows; CPU = the whole process tree, shutdown
    included). Phase 2 is kept out of the way by a max_pixels that every photo exceeds, so
    the workers fail each image as too_large without decoding it.
    """

    # Per run: when the build happened (just before the start), the first row, the last row.
    marks: dict[Path, dict[str, float]] = {}

    def build(ctx: h.RunContext) -> h.Invocation:
        cfg = h.write_photoscand_config(
            ctx.run_dir,
            [ctx.corpus],
            sizes=(256,),
            overrides={"workers": {"max_pixels": 1000}},
        )
        catalog = ctx.run_dir / "catalog.db"
        n = len(ctx.files)
        mark = marks.setdefault(ctx.run_dir, {"start": time.monotonic()})

        def until() -> bool:
            rows = h.catalog_count(catalog)
            if rows and "first" not in mark:
                mark["first"], mark["rows_at_first"] = time.monotonic(), rows
            if rows >= n:
                mark["last"] = time.monotonic()
                return True
            return False

        return h.Invocation(
            [str(h.PHOTOSCAND), "run", "--config", str(cfg)],
            until=until,
            poll_interval=0.02,
            timeout=600,
        )

    def collect(ctx: h.RunContext, _m: h.Measurement) -> dict:
        """Start-up (to the first row) apart from the steady rate (first row to the last)."""
        mark = marks.pop(ctx.run_dir, {})
        if "first" not in mark or "last" not in mark or mark["last"] <= mark["first"]:
            return {}
        if mark["rows_at_first"] >= len(ctx.files):
            return {}  # every row showed in the first poll: no steady rate to tell
        return {
            "first_row_s": mark["first"] - mark["start"],
            "steady_files_per_s": (len(ctx.files) - mark["rows_at_first"])
            / (mark["last"] - mark["first"]),
        }

    return h.Method(
        "photoscand",
        "**photoscand run**, cold start until N rows are in the catalog",
        build,
        collect=collect,
        # SIGTERM is how the run ends; a graceful stop exits 0 (-15 if it does not handle it).
        ok_returncodes=(0, -15),
    )


@dataclass
class WatcherSpec:
    """How to start one watching process for the delay benchmark, and where its rows appear."""

    argv: list[str]
    env: dict[str, str]
    catalog: Path
    settle: float = 0.0  # allowed extra delay for files that are not closed after a write


def photoscand_delay_watcher(watch_dir: Path, run_dir: Path, settle: float) -> WatcherSpec:
    """`photoscand run` watching watch_dir.

    Receives the empty watched folder and the run folder (fresh catalog and thumbnails go
    there). The harness waits for READY=1 on $NOTIFY_SOCKET before the writer starts, polls
    images (id, path) in the returned catalog every 5 ms, and sends SIGTERM at the end.
    Phase 2 runs as configured (both sizes, 2 workers), because phase 1 must stay prompt
    while conversions load the CPU.
    """
    cfg = h.write_photoscand_config(
        run_dir, [watch_dir], overrides={"watch": {"settle_seconds": settle}}
    )
    return WatcherSpec(
        [str(h.PHOTOSCAND), "run", "--config", str(cfg)], {}, run_dir / "catalog.db", settle
    )


def reference_delay_watcher(watch_dir: Path, run_dir: Path, _settle: float) -> WatcherSpec:
    """The bare watchdog + exifread + one-commit-per-row reference (close and move events only)."""
    catalog = run_dir / "ref.db"
    return WatcherSpec(y.watch_ref_argv(watch_dir, catalog), {}, catalog)


# --------------------------------------------------------------------------- delay machinery


@dataclass
class DelayRecord:
    method: str
    mode: str
    rep: int
    files: int
    delays_ms: list[float] = field(default_factory=list)
    unseen: int = 0
    foreign: float = 0.0
    noisy: bool = False
    attempts: int = 1
    error: str | None = None


class CatalogPoller(threading.Thread):
    """Records when each row first becomes visible in the catalog (monotonic clock)."""

    def __init__(self, catalog: Path, interval: float = 0.005):
        super().__init__(daemon=True)
        self.catalog, self.interval = catalog, interval
        self.seen: dict[bytes, float] = {}
        self.stop_event = threading.Event()

    def run(self) -> None:
        con = None
        last_id = 0
        while not self.stop_event.is_set():
            try:
                if con is None and self.catalog.exists():
                    con = sqlite3.connect(f"file:{self.catalog}?mode=ro", uri=True, timeout=0.05)
                if con is not None:
                    rows = con.execute(
                        "SELECT id, path FROM images WHERE id > ? ORDER BY id", (last_id,)
                    ).fetchall()
                    now = time.monotonic()
                    for row_id, path in rows:
                        key = path if isinstance(path, bytes) else os.fsencode(path)
                        self.seen.setdefault(key, now)
                        last_id = max(last_id, row_id)
            except sqlite3.Error:
                # The schema may not exist yet, or the catalog is being created: try again.
                if con is not None:
                    con.close()
                    con = None
            self.stop_event.wait(self.interval)
        if con is not None:
            con.close()


def delay_run(
    method: str,
    factory: Callable[[Path, Path, float], WatcherSpec],
    mode: str,
    rep: int,
    list_file: Path,
    rate: float,
    count: int,
    settle: float,
    gate: h.Gate,
) -> DelayRecord:
    """One delay run: start the watcher, wait for READY, let the writer deliver `count` files at
    `rate`/s, then match each file's close time with the time its row became visible."""
    attempts = 0
    while True:
        attempts += 1
        rec = _delay_once(method, factory, mode, rep, list_file, rate, count, settle, gate)
        rec.attempts = attempts
        if rec.error or not rec.noisy or not gate.may_redo(attempts):
            return rec
        gate.spent += count / rate
        h.log(f"  {method}/{mode}: foreign load {100 * rec.foreign:.1f} %, redoing")


def _delay_once(method, factory, mode, rep, list_file, rate, count, settle, gate) -> DelayRecord:
    rec = DelayRecord(method, mode, rep, count)
    h.become_subreaper()
    with h.temp_dir(f"delay-{method}-") as run_dir:
        watch = (run_dir / "watch").resolve()
        staging = run_dir / "staging"
        watch.mkdir()
        staging.mkdir()
        log_file = run_dir / "closes.jsonl"
        notify = h.NotifySocket(run_dir)
        spec = factory(watch, run_dir, settle)
        daemon = writer = None
        poller = CatalogPoller(spec.catalog)
        try:
            gate.wait_quiet()
            env = {**os.environ, **spec.env, **notify.env()}
            busy0, self0 = h.proc_stat_busy(), h.self_cpu()
            t0 = time.monotonic()
            with open(run_dir / "watcher.log", "wb") as out:
                daemon = subprocess.Popen(
                    spec.argv,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=out,
                    start_new_session=True,
                )
            if not notify.wait_ready(60):
                rec.error = "no READY=1 within 60 s: " + h.last_lines(
                    (run_dir / "watcher.log").read_text(errors="replace")
                )
                return rec
            poller.start()
            writer = subprocess.Popen(
                [
                    *(h.venv_python(), str(Path(__file__).resolve()), "writer"),
                    *("--list", str(list_file), "--dest", str(watch), "--staging", str(staging)),
                    *("--rate", str(rate), "--count", str(count), "--mode", mode),
                    *("--log", str(log_file)),
                ],
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
            writer_ru = h.wait_rusage(writer, count / rate + 60)
            if writer_ru is None or writer.returncode != 0:
                rec.error = f"writer failed (exit {writer.returncode})"
                return rec
            closes = [json.loads(line) for line in log_file.read_text().splitlines()]
            wanted = {os.fsencode(c["path"]) for c in closes}
            deadline = time.monotonic() + (spec.settle if mode == "movein" else 0) + 10
            while time.monotonic() < deadline and not wanted <= poller.seen.keys():
                time.sleep(0.05)
            poller.stop_event.set()
            poller.join()
            daemon_ru = h.stop_process(daemon)
            # Its forkserver and workers may outlive it briefly; their CPU is the daemon's.
            leftovers, orphan_cpu = h.reap_leftovers(daemon.pid)
            if leftovers:
                h.log(f"  {method}/{mode}: processes left after the watcher exited (killed)")
            wall = time.monotonic() - t0
            busy1, self1 = h.proc_stat_busy(), h.self_cpu()
            own = (self1 - self0) + orphan_cpu
            own += sum(ru.ru_utime + ru.ru_stime for ru in (daemon_ru, writer_ru) if ru is not None)
            rec.foreign = max(0.0, (busy1 - busy0) - own) / (wall * h.NCPU)
            rec.noisy = rec.foreign > gate.threshold + h.STAT_SLACK_S / (wall * h.NCPU)
            for c in closes:
                seen = poller.seen.get(os.fsencode(c["path"]))
                if seen is None:
                    rec.unseen += 1
                else:
                    rec.delays_ms.append(1000 * (seen - c["t"]))
            return rec
        finally:
            poller.stop_event.set()
            if poller.is_alive():
                poller.join()
            # Stop both before reaping leftovers: the reaper would take the other one too.
            procs = [p for p in (writer, daemon) if p is not None]
            for proc in procs:
                h.stop_process(proc, grace=5)
            for proc in procs:
                h.reap_leftovers(proc.pid, grace=0)
            notify.close()


# --------------------------------------------------------------------------- writer (child)


def writer_main(argv: list[str]) -> None:
    """Deliver photos into a folder at a steady rate and log each one's close time."""
    ap = argparse.ArgumentParser(prog="phase1.py writer", description=writer_main.__doc__)
    ap.add_argument("--list", required=True, help="file with one source photo per line")
    ap.add_argument("--dest", required=True, help="the watched folder")
    ap.add_argument("--staging", required=True, help="folder outside it, same filesystem")
    ap.add_argument("--rate", type=float, default=10.0, help="files per second")
    ap.add_argument("--count", type=int, default=200)
    ap.add_argument("--mode", choices=sorted(MODES), default="close")
    ap.add_argument("--log", required=True, help="JSON lines: path, monotonic close time")
    a = ap.parse_args(argv)
    sources = [line for line in Path(a.list).read_text().splitlines() if line]
    dest, staging = Path(a.dest), Path(a.staging)
    start = time.monotonic() + 0.2
    with open(a.log, "w") as log:
        for i in range(a.count):
            src = sources[i % len(sources)]
            name = f"w{i:05d}.jpg"
            data = Path(src).read_bytes()
            # Steady arrivals: sleep to the schedule, never "as fast as possible".
            delay = start + i / a.rate - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            if a.mode == "close":
                with open(dest / name, "wb") as fh:
                    fh.write(data)
            elif a.mode == "rename":
                tmp = dest / f".{name}.part"
                with open(tmp, "wb") as fh:
                    fh.write(data)
                os.rename(tmp, dest / name)
            else:
                with open(staging / name, "wb") as fh:
                    fh.write(data)
                os.rename(staging / name, dest / name)
            # CLOCK_MONOTONIC is system-wide, so the parent compares it with its own readings.
            log.write(json.dumps({"path": str(dest / name), "t": time.monotonic()}) + "\n")


# --------------------------------------------------------------------------- report


def render_throughput(methods, summaries, pending: dict[str, str], n: int, reps: int) -> str:
    refs = [("exifread_loop", "exifread loop"), ("exiftool", "exiftool")]
    headers = ["method", "files/s (median)", "range", "CPU ms/file", *[f"× {r}" for _, r in refs]]
    rows = []
    for m in methods:
        s = summaries.get(m.key)
        if m.key in pending or s is None or s.runs == 0:
            why = pending.get(m.key) or (s.error if s else None) or "no run"
            rows.append([m.label, f"pending ({why})", "", "", "", ""])
            continue
        rows.append(
            [
                m.label + h.leftover_note(s),
                h.fmt(s.files_per_s) + h.noisy_note(s),
                f"{h.fmt(s.files_per_s_min)}–{h.fmt(s.files_per_s_max)}",
                h.fmt(s.cpu_ms_per_file, 2),
                *[h.fmt(s.ratios.get(k, float("nan")), 2) for k, _ in refs],
            ]
        )
    ps = summaries.get("photoscand")
    r_loop = ps.ratios.get("exifread_loop", float("nan")) if ps and ps.runs else float("nan")
    r_tool = ps.ratios.get("exiftool", float("nan")) if ps and ps.runs else float("nan")
    targets = [
        f"- photoscand vs the bare exifread loop: ≥ 0.8× — {_verdict(r_loop, 0.8)}",
        f"- photoscand vs exiftool: > 1× — {_verdict(r_tool, 1.0, strict=True)}",
    ]
    split = [e for e in (ps.extra if ps and ps.runs else []) if "first_row_s" in e]
    if split:
        targets.append(
            "- photoscand, start-up apart (medians): first row after "
            f"{h.median([e['first_row_s'] for e in split]):.2f} s, then "
            f"{h.median([e['steady_files_per_s'] for e in split]):,.0f} files/s from the first "
            "row to the last (20 ms catalog polls)"
        )
    return (
        f"### Phase 1 throughput, cold start ({n} photos, hard links to the 12 MP corpus; "
        f"{reps} reps)\n\n"
        + h.md_table(headers, rows, right=range(1, len(headers)))
        + "\n\nTargets (speed ratios, same-rep, median):\n\n"
        + "\n".join(targets)
    )


def _verdict(got: float, target: float, strict: bool = False) -> str:
    if got != got:  # NaN: not measured
        return "pending"
    ok = got > target if strict else got >= target
    return f"{got:.2f}× ({'met' if ok else '**missed**'})"


def render_delay(
    plan, records: list[DelayRecord], pending: dict[str, str], rate: float, settle: float
) -> str:
    headers = ["method", "arrival", "files", "median ms", "p90 ms", "p99 ms", "max ms"]
    headers += ["not seen", "target p99"]
    rows = []
    for method, label, mode in plan:
        target = DELAY_TARGET_MS + (1000 * settle if mode == "movein" else 0)
        if method in pending:
            rows.append(
                [label, MODES[mode], "", f"pending ({pending[method]})", "", "", "", "", ""]
            )
            continue
        recs = [r for r in records if r.method == method and r.mode == mode]
        err = next((r.error for r in recs if r.error), None)
        ok = [r for r in recs if not r.error]
        if not ok:
            rows.append([label, MODES[mode], "", f"failed ({err})", "", "", "", "", ""])
            continue
        d = [x for r in ok for x in r.delays_ms]
        p99 = h.percentile(d, 99)
        noisy = sum(r.noisy for r in ok)
        verdict = "" if method != "photoscand" else (" met" if p99 < target else " **missed**")
        rows.append(
            [
                label,
                MODES[mode],
                f"{len(d)}" + (f" ({noisy} of {len(ok)} runs noisy)" if noisy else ""),
                h.fmt(h.median(d)),
                h.fmt(h.percentile(d, 90)),
                h.fmt(p99),
                h.fmt(max(d) if d else float("nan")),
                str(sum(r.unseen for r in ok)),
                f"< {target:g}" + verdict,
            ]
        )
    return (
        f"### Close-to-row delay, files arriving at {rate:g}/s (12 MP JPEGs)\n\n"
        + h.md_table(headers, rows, right=range(2, len(headers) - 1))
        + "\n\nDelay = first poll (every 5 ms) that sees the row in the catalog − the writer's "
        "close (or rename) time, both on CLOCK_MONOTONIC; includes up to 5 ms of polling. "
        f"photoscand runs with settle_seconds = {settle:g} and converts while it catalogs."
    )


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["writer"]:
        writer_main(argv[1:])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__ + "\n(`phase1.py writer --help`: the file writer it starts.)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--files",
        type=int,
        nargs="+",
        default=[1000, 10000],
        help="photos for throughput, one set per count: start-up weighs on small sets, the"
        " steady rate on large ones [%(default)s]",
    )
    ap.add_argument("--reps", type=int, default=5, help="throughput repetitions [%(default)s]")
    ap.add_argument(
        "--delay-files", type=int, default=200, help="files per delay run [%(default)s]"
    )
    ap.add_argument("--rate", type=float, default=10.0, help="arrivals per second [%(default)s]")
    ap.add_argument("--delay-reps", type=int, default=2, help="delay repetitions [%(default)s]")
    ap.add_argument(
        "--settle", type=float, default=2.0, help="photoscand settle_seconds [%(default)s]"
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: 100 files, 1 rep, 40 arrivals")
    ap.add_argument("--skip-delay", action="store_true", help="throughput only")
    ap.add_argument("--no-photoscand", action="store_true", help="yardsticks only")
    ap.add_argument(
        "--doc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md (default: yes, except with --quick)",
    )
    ap.add_argument(
        "--rerender",
        metavar="RAW_JSON",
        help="run nothing: render the tables again from a bench/out/phase1-*.json",
    )
    h.add_gate_args(ap)
    args = ap.parse_args(argv)
    if args.rerender:
        payload = json.loads(Path(args.rerender).read_text())
        raw_sets = payload["throughput"]
        results = [h.load_set(d) for d in (raw_sets if isinstance(raw_sets, list) else [raw_sets])]
        records = [DelayRecord(**d) for d in payload["delay"]]
        body = report(results, records, payload["facts"], payload["pending"], payload["args"])
        h.publish(SECTION, body, args.doc if args.doc is not None else not payload["args"]["quick"])
        return 0
    if args.quick:
        args.files, args.reps, args.delay_files, args.delay_reps = [100], 1, 40, 1
        args.rate = max(args.rate, 20.0)
    write_doc = args.doc if args.doc is not None else not args.quick
    gate = h.gate_from_args(args)
    h.install_signal_handlers()

    corpus = h.perf_corpus()
    sources = h.photos_in(corpus)

    pending: dict[str, str] = {}
    if args.no_photoscand:
        pending["photoscand"] = "not run (--no-photoscand)"
    elif not h.PHOTOSCAND.exists() or _photoscand_broken():
        pending["photoscand"] = "daemon not ready"

    facts = h.machine_facts()
    methods = throughput_methods()
    runnable = [m for m in methods if m.key not in pending]
    results = []
    for count in args.files:
        folder = h.linked_folder(sources, count, corpus.name)
        files = h.photos_in(folder)
        h.log(f"{len(files)} photos (hard links) in {folder}")
        # Phase 1 reads headers only, so warming the 150 source files warms every link.
        results.append(
            h.run_set(f"phase1-{count}", runnable, files, folder, args.reps, gate, warm=sources)
        )

    records: list[DelayRecord] = []
    if not args.skip_delay:
        factories = {"photoscand": photoscand_delay_watcher, "reference": reference_delay_watcher}
        runnable_plan = [p for p in DELAY_PLAN if p[0] not in pending]
        with h.temp_dir("delay-lists-") as lists:
            list_file = lists / "sources.list"
            list_file.write_text("".join(f"{p}\n" for p in sources))
            for rep in range(args.delay_reps):
                shift = rep % max(1, len(runnable_plan))
                for method, _label, mode in runnable_plan[shift:] + runnable_plan[:shift]:
                    h.warm_cache(sources)
                    rec = delay_run(
                        method,
                        factories[method],
                        mode,
                        rep,
                        list_file,
                        args.rate,
                        args.delay_files,
                        args.settle,
                        gate,
                    )
                    records.append(rec)
                    if rec.error:
                        h.log(f"  delay {method}/{mode}: FAILED: {rec.error}")
                    else:
                        h.log(
                            f"  delay {method}/{mode} rep {rep + 1}: median "
                            f"{h.median(rec.delays_ms):.1f} ms, p99 "
                            f"{h.percentile(rec.delays_ms, 99):.1f} ms, unseen {rec.unseen}, "
                            f"foreign {100 * rec.foreign:.1f} %"
                        )

    body = report(results, records, facts, pending, vars(args))
    raw = h.save_raw(
        "phase1",
        {
            "args": vars(args),
            "facts": facts,
            "throughput": results,
            "delay": records,
            "pending": pending,
        },
    )
    h.log(f"raw results: {raw}")
    h.publish(SECTION, body, write_doc)
    return 0


def throughput_methods() -> list[h.Method]:
    return [photoscand_phase1_method(), y.exifread_loop_method(), y.exiftool_method()]


DELAY_PLAN = [
    ("photoscand", "**photoscand run**", "close"),
    ("photoscand", "**photoscand run**", "rename"),
    ("photoscand", "**photoscand run**", "movein"),
    ("reference", "bare watchdog → exifread → SQLite commit per row", "close"),
    ("reference", "bare watchdog → exifread → SQLite commit per row", "rename"),
]


def report(
    results: list[h.SetResult],
    records: list[DelayRecord],
    facts: dict,
    pending: dict[str, str],
    args: dict,
) -> str:
    """The markdown section: a throughput table and targets per set, delay table, facts."""
    methods = throughput_methods()
    runnable = [m for m in methods if m.key not in pending]
    blocks = []
    for res in results:
        summaries = h.summarize(res, runnable, ["exifread_loop", "exiftool"])
        blocks.append(render_throughput(methods, summaries, pending, res.files, res.reps))
    reps = results[0].reps if results else 0
    if not args["skip_delay"]:
        blocks.append(render_delay(DELAY_PLAN, records, pending, args["rate"], args["settle"]))
    notes = [
        "Ratios are speed ratios: files/s divided by the reference's in the same rep, median "
        "over reps (above 1 = faster). Every method is timed as a whole process, start-up "
        "included (cold start).",
        "Foreign load (throughput runs): " + h.gating_outcome(results) + ". Noisy runs are left "
        f"out of medians and ratios when at least {h.min_clean_runs(reps)} clean ones exist.",
    ]
    if records:
        noisy = sum(r.noisy for r in records)
        notes.append(
            f"Foreign load (delay runs): {len(records)} runs kept, {noisy} flagged noisy "
            f"(their delays are included), {sum(r.attempts - 1 for r in records)} redone."
        )
    blocks.append(h.facts_markdown(facts, reps, notes))
    return "\n\n".join(blocks)


def _photoscand_broken() -> bool:
    """True while the daemon's command line does not even answer --help."""
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        cp = subprocess.run([str(h.PHOTOSCAND), "--help"], capture_output=True, timeout=60)
        return cp.returncode != 0
    return True


if __name__ == "__main__":
    sys.exit(main())
