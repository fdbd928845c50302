"""Thumbnail throughput: `photoscand scan` end to end, side by side with the thumbnail yardsticks.

Every method runs interleaved in one invocation on the same warm perf corpus, and the
results are ratios per rep, because absolute timings on this shared machine drift. The
hazard is comparing unequal work: every method's outputs are checked (sizes, orientation,
no metadata) before its numbers count.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import time
from pathlib import Path

import harness as h
import yardsticks as y

SECTION = "thumbnails"
SIZES = (1440, 256)
TARGETS = {
    # (method, reference): minimum speed ratio, from the performance issue.
    ("photoscand", "pyvips_pool"): 1.3,
    ("photoscand", "pil_pool"): 0.9,
    ("photoscand_256", "djpeg_1_8"): 0.85,
}


# --------------------------------------------------------------------------- photoscand


def photoscand_scan_method(sizes: tuple[int, ...], key: str = "photoscand"):
    """`photoscand scan` end to end (phase 1 + phase 2, 2 workers) with a fresh catalog per run."""

    def build(ctx):
        cfg = h.write_photoscand_config(ctx.run_dir, [ctx.corpus], sizes=sizes, worker_count=2)
        # The harness starts the process right after build() returns.
        (ctx.run_dir / LAUNCH_FILE).write_text(repr(time.time()))
        argv = [str(h.PHOTOSCAND), "scan", "--config", str(cfg)]
        argv += ["--metrics-file", str(ctx.run_dir / METRICS_FILE)]
        return h.Invocation(argv, timeout=1800)

    def count(ctx, _m):
        tdir = ctx.run_dir / "thumbnails"
        names = [p.name for p in tdir.rglob("*") if p.is_file()] if tdir.is_dir() else []
        for size in sizes:
            n = sum(1 for name in names if name.endswith(f"-{size}.jpg"))
            if n != len(ctx.files):
                return f"{n} thumbnails of {size} px, expected {len(ctx.files)}"
        return None

    def check(ctx, _m):
        upright = y.load_display_sizes(ctx.corpus)
        try:
            rows = _catalog_thumbnails(ctx.run_dir / "catalog.db")
        except sqlite3.Error as exc:
            return f"catalog unreadable: {exc}"
        if len(rows) != len(sizes) * len(ctx.files):
            return (
                f"{len(rows)} thumbnail rows in the catalog, expected {len(sizes) * len(ctx.files)}"
            )
        for thumb, size, image in rows:
            err = y.check_thumbnail(Path(thumb), size, upright.get(Path(image).stem))
            if err:
                return err
        return None

    label = f"**photoscand scan**, {' + '.join(map(str, sizes))}, 2 workers, end to end"
    return h.Method(
        key,
        label,
        build,
        check=check,
        check_every_run=count,
        collect=lambda ctx, _m: {"breakdown": photoscand_breakdown(ctx.run_dir)},
    )


def _catalog_thumbnails(catalog: Path) -> list[tuple[str, int, str]]:
    con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT t.path, t.size, i.path FROM thumbnails t JOIN images i ON i.id = t.image_id"
        ).fetchall()
    finally:
        con.close()
    # Paths may be stored as raw bytes (BLOB) or text.
    return [(os.fsdecode(t), int(s), os.fsdecode(i)) for t, s, i in rows]


METRICS_FILE = "metrics.prom"
LAUNCH_FILE = "launched-at"
WORKER_STAGES = (
    ("read", "read the file"),
    ("hash", "content hash"),
    ("decode", "decode (DCT-scaled)"),
    ("resize", "resize"),
    ("color", "colour to sRGB"),
    ("orient", "orient"),
    ("encode", "encode"),
    ("write", "write + fsync + rename"),
)


def _catalog_span(catalog: Path) -> tuple[float, float, float, int] | None:
    """(first row, last row, last conversion) as Unix times, and the row count."""
    con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True)
    try:
        # julianday() reads the ISO timestamps to the millisecond on every SQLite version.
        row = con.execute(
            "SELECT (julianday(min(discovered_at)) - 2440587.5) * 86400,"
            " (julianday(max(discovered_at)) - 2440587.5) * 86400,"
            " (julianday(max(converted_at)) - 2440587.5) * 86400, count(*) FROM images"
        ).fetchone()
    finally:
        con.close()
    if row is None or None in row[:3] or not row[3]:
        return None
    return float(row[0]), float(row[1]), float(row[2]), int(row[3])


def photoscand_breakdown(run_dir: Path, workers: int = 2) -> dict[str, float]:
    """Where photoscand's time went in one scan, in ms per photo unless the name says %.

    From the catalog (when rows appeared and were converted) and the final metrics the scan
    wrote with --metrics-file: the workers' own per-stage clocks, the time each job was in a
    worker's hands (the difference is dispatch and pipe transfer), the daemon's CPU, the
    metadata parser and the catalog commits. Empty when the run left neither behind.
    """
    metrics_file = run_dir / METRICS_FILE
    m = h.metric_samples(metrics_file.read_text()) if metrics_file.exists() else {}
    span = _catalog_span(run_dir / "catalog.db")
    if not m or span is None:
        return {}
    first_row, last_row, last_done, n = span
    ms = 1000.0 / n
    out: dict[str, float] = {}
    # Not process_start_time_seconds: it counts from the kernel's boot time, which /proc/stat
    # gives in whole seconds, so it is off by a constant of up to a second.
    launch = run_dir / LAUNCH_FILE
    started = float(launch.read_text()) if launch.exists() else None
    if started is not None:
        out["start-up: launch to first row (ms, whole run)"] = (first_row - started) * 1000
        busy = m.get("photoscand_worker_busy_seconds_total", 0.0)
        out["workers idle (% of launch to last conversion)"] = 100 * (
            1 - busy / (workers * max(last_done - started, 1e-9))
        )
    out["phase 1: first to last row (ms, whole run)"] = (last_row - first_row) * 1000
    for stage, label in WORKER_STAGES:
        key = f'photoscand_conversion_stage_seconds_total{{stage="{stage}"}}'
        if key in m:
            out[f"worker: {label}"] = m[key] * ms
    conversion = m.get("photoscand_conversion_duration_seconds_sum", 0.0)
    busy = m.get("photoscand_worker_busy_seconds_total", 0.0)
    out["worker: whole conversion"] = conversion * ms
    out["dispatch + pipes (job in hand minus conversion)"] = max(busy - conversion, 0.0) * ms
    out["daemon CPU (main process)"] = m.get("process_cpu_seconds_total", 0.0) * ms
    out["phase 1 parser (EXIF, per photo)"] = (
        m.get("photoscand_metadata_duration_seconds_sum", 0.0) * ms
    )
    out["catalog commits"] = m.get("photoscand_catalog_commit_duration_seconds_sum", 0.0) * ms
    return out


def probe_photoscand(corpus: Path, sizes: tuple[int, ...]) -> str | None:
    """Run photoscand once on 2 photos; the reason it cannot be benchmarked yet, or None."""
    if not h.PHOTOSCAND.exists():
        return f"{h.PHOTOSCAND} does not exist"
    folder = h.subset_folder(corpus, 2)
    method = photoscand_scan_method(sizes)
    with h.temp_dir("probe-") as run_dir:
        out = run_dir / "out"
        out.mkdir()
        files = h.photos_in(folder)
        lists = run_dir / "lists"
        lists.mkdir()
        ctx = h.RunContext(files, folder, lists / "l", lists / "s", run_dir, out)
        inv = method.build(ctx)
        inv.timeout = 120
        m = h.measure(inv)
        if m.timed_out:
            return "a scan of 2 photos did not finish in 120 s"
        if m.returncode != 0:
            return f"exit code {m.returncode}: {h.last_lines(m.stderr_tail, 2)}"
        return method.check_every_run(ctx, m) or method.check(ctx, m)


# --------------------------------------------------------------------------- report


def render_set(
    title: str,
    methods,
    summaries: dict[str, h.Summary],
    refs: list[tuple[str, str]],
    pending: dict[str, str],
) -> str:
    headers = ["method", "files/s (median)", "range", "CPU ms/file"]
    headers += [f"× {name}" for _key, name in refs]
    rows = []
    for method in methods:
        s = summaries.get(method.key)
        if method.key in pending or s is None or s.runs == 0:
            why = pending.get(method.key) or (s.error if s else None) or "no run"
            rows.append([method.label, f"pending ({why})", "", "", *["" for _ in refs]])
            continue
        rows.append(
            [
                method.label + h.leftover_note(s),
                h.fmt(s.files_per_s) + h.noisy_note(s),
                f"{h.fmt(s.files_per_s_min)}–{h.fmt(s.files_per_s_max)}",
                h.fmt(s.cpu_ms_per_file),
                *[h.fmt(s.ratios.get(key, float("nan")), 2) for key, _ in refs],
            ]
        )
    return f"{title}\n\n" + h.md_table(headers, rows, right=range(1, len(headers)))


def render_targets(summaries_by_set: list[dict[str, h.Summary]], names: dict[str, str]) -> str:
    lines = []
    for (key, ref), target in TARGETS.items():
        s = next((ss[key] for ss in summaries_by_set if key in ss), None)
        got = s.ratios.get(ref, float("nan")) if s and s.runs else float("nan")
        if got != got:  # NaN: no run of the method or its reference
            measured = "pending"
        else:
            measured = f"{got:.2f}× ({'met' if got >= target else '**missed**'})"
        lines.append(
            f"- {names.get(key, key)} vs {names.get(ref, ref)}: ≥ {target:g}× — {measured}"
        )
    return "Targets (speed ratios, same-rep, median):\n\n" + "\n".join(lines)


def render_breakdown(all_summaries: list[dict[str, h.Summary]]) -> str:
    """One table: a column per photoscand set, a row per stage (medians over its runs)."""
    columns: list[tuple[str, list[dict[str, float]]]] = []
    for summaries in all_summaries:
        for key, label in (("photoscand", "1440 + 256"), ("photoscand_256", "256 only")):
            s = summaries.get(key)
            dicts = [e["breakdown"] for e in (s.extra if s else []) if e.get("breakdown")]
            if dicts:
                columns.append((label, dicts))
    title = (
        "Where photoscand's time goes (medians over its runs; ms per photo unless stated; from"
        " the catalog's timestamps and the metrics the scan writes with `--metrics-file`):"
    )
    if not columns:
        return f"{title} not measured in this run."
    keys: list[str] = []
    for _label, dicts in columns:
        for d in dicts:
            keys += [k for k in d if k not in keys]
    rows = []
    for k in keys:
        cells = []
        for _label, dicts in columns:
            values = [d[k] for d in dicts if k in d]
            cells.append(h.fmt(h.median(values), 1) if values else "–")
        rows.append([k, *cells])
    headers = ["stage", *(label for label, _ in columns)]
    return f"{title}\n\n" + h.md_table(headers, rows, right=list(range(1, len(headers))))


# --------------------------------------------------------------------------- main


def plan_sets(which: str) -> list[tuple[str, str, list, list[tuple[str, str]]]]:
    """(name, title, methods, references) of each set to run."""
    sets = []
    if which in ("all", "both"):
        methods = [photoscand_scan_method(SIZES), *y.thumbnail_yardsticks(SIZES)]
        refs = [("pil_pool", "bare Pillow pool"), ("pyvips_pool", "pyvips pool")]
        sets.append(("both", "12 MP JPEG → 1440 px and 256 px, JPEG q80", methods, refs))
    if which in ("all", "256"):
        methods = [
            photoscand_scan_method((256,), key="photoscand_256"),
            y.djpeg_method(8),
            y.pool_method("pil", (256,)),
        ]
        methods[0].label = "**photoscand scan**, 256 only, 2 workers, end to end"
        refs = [("djpeg_1_8", "djpeg 1/8, 2 procs"), ("pil_pool", "bare Pillow pool")]
        sets.append(("256", "12 MP JPEG → 256 px only, JPEG q80", methods, refs))
    return sets


def report(
    plan, results: list[h.SetResult], facts: dict, pending: dict[str, str], reps: int
) -> str:
    """The markdown section: one table per set, the targets, the breakdown, the facts."""
    blocks, all_summaries, names = [], [], {}
    for (_name, title, methods, refs), res in zip(plan, results, strict=True):
        runnable = [m for m in methods if m.key not in pending]
        summaries = h.summarize(res, runnable, [k for k, _ in refs])
        all_summaries.append(summaries)
        names.update({m.key: m.label.replace("**", "") for m in methods})
        names.update(dict(refs))
        heading = f"### {title} ({res.files} files, {res.reps} reps)"
        blocks.append(render_set(heading, methods, summaries, refs, pending))
    names.update({"photoscand": "photoscand end to end", "photoscand_256": "photoscand 256 px"})
    blocks.append(render_targets(all_summaries, names))
    blocks.append(render_breakdown(all_summaries))
    notes = [
        "Ratios are speed ratios: the method's files/s divided by the reference's in the same "
        "rep, median over reps (above 1 = faster than the reference).",
        "Foreign load: " + h.gating_outcome(results) + ". Noisy runs are left out of medians "
        f"and ratios when at least {h.min_clean_runs(reps)} clean ones exist.",
    ]
    blocks.append(h.facts_markdown(facts, reps, notes))
    return "\n\n".join(blocks)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__ + "\nWrites its section of docs/benchmarks.md (full runs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--files", type=int, default=150, help="12 MP photos in the run [%(default)s]")
    ap.add_argument("--reps", type=int, default=5, help="interleaved repetitions [%(default)s]")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 20 files, 1 rep, no doc update by default"
    )
    ap.add_argument(
        "--sets",
        choices=["all", "both", "256"],
        default="all",
        help="both = 1440 + 256 px; 256 = 256 px only [%(default)s]",
    )
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
        help="run nothing: render the tables again from a bench/out/thumbnails-*.json",
    )
    h.add_gate_args(ap)
    args = ap.parse_args(argv)
    if args.rerender:
        payload = json.loads(Path(args.rerender).read_text())
        saved = payload["args"]
        plan = plan_sets(saved["sets"])
        results = [h.load_set(d) for d in payload["sets"]]
        body = report(plan, results, payload["facts"], payload["pending"], saved["reps"])
        h.publish(SECTION, body, args.doc if args.doc is not None else not saved["quick"])
        return 0
    if args.quick:
        args.files, args.reps = min(args.files, 20), 1
    write_doc = args.doc if args.doc is not None else not args.quick
    gate = h.gate_from_args(args)
    h.install_signal_handlers()

    corpus = h.subset_folder(h.perf_corpus(count=max(150, args.files)), args.files)
    files = h.photos_in(corpus)
    h.log(f"{len(files)} photos in {corpus}")

    pending: dict[str, str] = {}
    if args.no_photoscand:
        pending["photoscand"] = pending["photoscand_256"] = "not run (--no-photoscand)"
    else:
        why = probe_photoscand(corpus, SIZES)
        if why:
            h.log(f"photoscand cannot be benchmarked yet: {why}")
            pending["photoscand"] = pending["photoscand_256"] = "daemon not ready"

    plan = plan_sets(args.sets)
    facts = h.machine_facts()
    results = []
    for set_name, _title, methods, _refs in plan:
        runnable = [m for m in methods if m.key not in pending]
        h.log(f"set {set_name}: {', '.join(m.key for m in runnable)}; {args.reps} reps")
        results.append(h.run_set(f"thumbs-{set_name}", runnable, files, corpus, args.reps, gate))
    body = report(plan, results, facts, pending, args.reps)
    raw = h.save_raw(
        "thumbnails", {"args": vars(args), "facts": facts, "sets": results, "pending": pending}
    )
    h.log(f"raw results: {raw}")
    h.publish(SECTION, body, write_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
