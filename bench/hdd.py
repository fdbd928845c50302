"""Prefetch mode on a simulated hard disk: `photoscand scan`, direct vs prefetch, next to
ImageMagick.

Every method runs interleaved in one set, on the simulated disk (bench/hddsim.py) and on the
machine's own SSD, so that the disk's share of each method's time shows as a same-rep ratio.
Hazards: the FUSE mounts and every daemon must go away whatever happens (Ctrl-C, an error);
each run starts from a parked head and zeroed counters; the simulator's own CPU is part of the
set-up, not foreign load.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import harness as h
import thumbnails as t
import yardsticks as y

SECTION = "hdd"
SIZES = (1440, 256)  # photoscand's default thumbnail sizes
# The simulated disk: hddsim's 7200 rpm defaults, and a layout chosen on purpose (see --help).
GAP_MB = 4.0
LAYOUT_SEED = 1
# What "clearly ahead" of direct mode means in the targets below.
CLEARLY_AHEAD = 1.2
TARGETS_TEXT = {
    "ssd_ratio": 0.90,  # prefetch on the simulated disk vs the same scan on the SSD
    "seeks": 1.2,  # seeks per image, prefetch on the simulated disk
    "ssd_cost": 0.90,  # prefetch vs direct on the SSD
}
# Counters of the daemon that say where prefetch mode waits (its final --metrics-file).
PROFILE_METRICS = {
    "worker_wait_s": "photoscand_worker_wait_seconds_total",
    "worker_busy_s": "photoscand_worker_busy_seconds_total",
    "reader_wait_s": "photoscand_prefetch_reader_wait_seconds_total",
    "reader_read_s": "photoscand_prefetch_read_seconds_total",
    "reader_bytes": "photoscand_prefetch_bytes_read_total",
    "worker_read_s": 'photoscand_conversion_stage_seconds_total{stage="read"}',
}


def _load_hddsim():
    """bench/hddsim.py is a script, not a package module: load it by path."""
    spec = importlib.util.spec_from_file_location("hddsim", h.BENCH_DIR / "hddsim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["hddsim"] = module
    spec.loader.exec_module(module)
    return module


# --------------------------------------------------------------------------- per-run bookkeeping


class Disk:
    """One simulated disk (a live hddsim mount) and the counters of the run on it."""

    def __init__(self, name: str, sim: Any, model: dict[str, Any]) -> None:
        self.name = name
        self.sim = sim
        self.model = model
        self.mountpoint = Path(sim.mountpoint)
        self._cpu0 = 0.0

    def cpu(self) -> float:
        """CPU seconds the simulator process has used (all its threads)."""
        with open(f"/proc/{self.sim.proc.pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / h.CLK_TCK

    def begin(self) -> None:
        self.sim.reset()  # zero the counters and park the head at byte 0
        self._cpu0 = self.cpu()

    def cpu_since_begin(self) -> float:
        return self.cpu() - self._cpu0

    def end(self) -> dict[str, Any]:
        stats = self.sim.stats()
        keep = ("requests", "bytes_read", "seeks", "skips", "model_seconds", "busy_seconds")
        out = {k: stats[k] for k in keep}
        out["seek_seconds"] = stats["seek_seconds"] + stats["rotation_seconds"]
        out["late_requests"] = stats["late_requests"]
        out["max_queue_depth"] = stats["max_queue_depth"]
        out["sim_cpu"] = self.cpu_since_begin()
        return out


def parse_metrics(text: str) -> dict[str, float]:
    samples = h.metric_samples(text)
    return {key: samples[series] for key, series in PROFILE_METRICS.items() if series in samples}


class Runs:
    """What the run in progress uses: its disk (None on the SSD).

    The harness runs one method at a time, so one instance serves them all; `begin` is called
    from a method's build (after the cache warm-up and the quiet wait, right before the run)
    and `end` from its first check after the run, before anything else reads the mount.
    """

    def __init__(self) -> None:
        self.disk: Disk | None = None
        self.results: dict[Path, dict[str, Any]] = {}

    def begin(self, disk: Disk | None) -> None:
        self.disk = disk
        if disk is not None:
            disk.begin()

    def end(self, run_dir: Path) -> None:
        out: dict[str, Any] = {}
        if self.disk is not None:
            out["disk"] = self.disk.end()
        metrics = run_dir / "metrics.prom"
        if metrics.is_file():
            out["metrics"] = parse_metrics(metrics.read_text())
        self.results[run_dir] = out

    def sim_cpu_now(self) -> float:
        return self.disk.cpu_since_begin() if self.disk is not None else 0.0


RUNS = Runs()


@dataclasses.dataclass
class SimGate(h.Gate):
    """The harness's gate, except that the simulator's CPU is not foreign load.

    The FUSE process answers the run's reads: a real disk would not use that CPU, but it is
    part of this set-up, not another tenant. It is moved out of the measurement's foreign
    share here, the one place that sees each measurement before it is judged.
    """

    def is_noisy(self, m: h.Measurement) -> bool:
        sim = min(RUNS.sim_cpu_now(), m.foreign_cpu)
        m.foreign_cpu -= sim
        m.foreign = m.foreign_cpu / (m.window * h.NCPU)
        return super().is_noisy(m)


# --------------------------------------------------------------------------- methods


def on_folder(method: h.Method, folder: Path, disk: Disk | None) -> h.Method:
    """`method` run on the photos in `folder` (the mount or the SSD), with per-run bookkeeping.

    The harness hands every method the same context (the SSD corpus); here the folder is
    swapped in for the build and every check, so the same yardstick code runs on either disk.
    """
    build, check, every, collect = (
        method.build,
        method.check,
        method.check_every_run,
        method.collect,
    )

    def moved(ctx: h.RunContext) -> h.RunContext:
        return dataclasses.replace(ctx, corpus=folder, files=[folder / p.name for p in ctx.files])

    def new_build(ctx: h.RunContext) -> h.Invocation:
        inv = build(moved(ctx))
        RUNS.begin(disk)
        return inv

    def new_every(ctx: h.RunContext, m: h.Measurement) -> str | None:
        RUNS.end(ctx.run_dir)  # first: the checks below may read the mount
        return every(moved(ctx), m) if every is not None else None

    def new_check(ctx: h.RunContext, m: h.Measurement) -> str | None:
        return check(moved(ctx), m) if check is not None else None

    def new_collect(ctx: h.RunContext, m: h.Measurement) -> dict:
        extra = dict(collect(moved(ctx), m)) if collect is not None else {}
        extra.update(RUNS.results.pop(ctx.run_dir, {}))
        return extra

    return dataclasses.replace(
        method,
        build=new_build,
        check=new_check if check is not None else None,
        check_every_run=new_every,
        collect=new_collect,
    )


def scan_method(key: str, mode: str, workers: int, profile: bool) -> h.Method:
    """`photoscand scan` end to end with a fresh config, catalog and thumbnail folder per run.

    With `profile`, the daemon writes its final metrics into the run folder on exit.
    """
    method = t.photoscand_scan_method(SIZES, key=key)

    def build(ctx: h.RunContext) -> h.Invocation:
        cfg = h.write_photoscand_config(
            ctx.run_dir,
            [ctx.corpus],
            sizes=SIZES,
            worker_count=workers,
            overrides={"io": {"mode": mode}},
        )
        argv = [str(h.PHOTOSCAND), "scan", "--config", str(cfg)]
        if profile:
            argv += ["--metrics-file", str(ctx.run_dir / "metrics.prom")]
        return h.Invocation(argv, timeout=1800)

    plural = "s" if workers > 1 else ""
    return dataclasses.replace(
        method,
        label=f"**photoscand scan**, {mode}, {workers} worker{plural}",
        build=build,
        collect=None,
    )


def magick_through_cat(parallel: bool) -> h.Method:
    """ImageMagick (two at a time, or one with two threads), reading each photo through
    `cat FILE | convert jpg:- ...`.

    convert maps its input file (mmap); with no page cache (the simulator's mount) every 4 KiB
    page fault becomes a request of its own, and two converts interleave them: ~190 seeks per
    photo, where a real kernel's read-ahead would fetch 128 KiB at a time. cat reads 128 KiB at
    a time, so the simulated disk sees the requests a real one would. It is used on the SSD
    too, so that both disks run the same commands.
    """
    method = y.magick_method(parallel, SIZES)
    build = method.build

    def piped(ctx: h.RunContext) -> h.Invocation:
        inv = build(ctx)
        source = f"{ctx.corpus}/{{}}.jpg"
        if "convert" not in inv.argv or source not in inv.argv:
            raise RuntimeError(f"unexpected ImageMagick command line: {inv.argv}")
        i, j = inv.argv.index("convert"), inv.argv.index(source)
        inv.argv = [
            *inv.argv[:i],
            *("sh", "-c", 'cat "$0" | exec "$@"', source),
            *inv.argv[i:j],
            "jpg:-",
            *inv.argv[j + 1 :],
        ]
        return inv

    label = method.label.split(", jpeg:size")[0]
    return dataclasses.replace(method, label=f"{label}, input through cat", build=piped)


@dataclasses.dataclass
class Plan:
    """One method of the set: what it is, where it runs."""

    key: str
    where: str  # "hdd" (sorted layout), "shuffled" or "ssd"
    base: str  # the key of the same method without the place (to pair HDD with SSD)
    label: str
    photoscand: bool
    method: h.Method | None = None  # None when only re-rendering saved results


BASES: list[tuple[str, Callable[[bool], h.Method], bool]] = [
    # (base key, factory(profile), photoscand?)
    ("direct2", lambda p: scan_method("direct2", "direct", 2, p), True),
    ("direct4", lambda p: scan_method("direct4", "direct", 4, p), True),
    ("prefetch2", lambda p: scan_method("prefetch2", "prefetch", 2, p), True),
    ("prefetch1", lambda p: scan_method("prefetch1", "prefetch", 1, p), True),
    ("im_threads", lambda _p: magick_through_cat(False), False),
    ("im_parallel", lambda _p: magick_through_cat(True), False),
]
SHUFFLED_BASES = ("direct2", "prefetch2")
WHERE_LABEL = {
    "hdd": "simulated disk, files in name order",
    "shuffled": "simulated disk, shuffled layout",
    "ssd": "SSD",
}


def make_plans(
    bases: list[str], layouts: list[str], corpus: Path | None = None, disks: dict | None = None
) -> list[Plan]:
    """Every method on every disk, each method's places next to each other.

    The harness runs them in this order (rotated each rep), so the runs that a ratio pairs
    (a method on the simulated disk and on the SSD) follow each other and see the same
    machine. Without `disks` (re-rendering saved results) the plans carry no method.
    """
    plans = []
    for base, factory, is_scan in BASES:
        if base not in bases:
            continue
        for where in ("hdd", "ssd", "shuffled"):
            if where != "ssd" and where not in layouts:
                continue
            if where == "shuffled" and base not in SHUFFLED_BASES:
                continue
            inner = factory(False)
            plan = Plan(f"{where}_{base}", where, base, inner.label, is_scan)
            if disks is not None and corpus is not None:
                disk = disks.get(where)
                folder = disk.mountpoint if disk is not None else corpus
                method = on_folder(factory(True), folder, disk)
                plan.method = dataclasses.replace(method, key=plan.key, label=plan.label)
            plans.append(plan)
    return plans


# --------------------------------------------------------------------------- report


def _median_extra(s: h.Summary, section: str, name: str) -> float:
    values = [e[section][name] for e in s.extra if name in e.get(section, {})]
    return h.median(values) if values else float("nan")


def per_file(s: h.Summary, files: int, section: str, name: str) -> float:
    return _median_extra(s, section, name) / files


def render_table(
    plans: list[Plan], summaries: dict[str, h.Summary], files: int
) -> tuple[str, dict[str, float]]:
    headers = [
        "method",
        "files/s (median)",
        "range",
        "× same on SSD",
        "× direct, 2 workers",
        "seeks/image",
        "disk busy",
        "CPU use",
        "CPU ms/file",
    ]
    rows: list[list[str]] = []
    facts: dict[str, float] = {}
    for where in ("hdd", "ssd", "shuffled"):
        group = [p for p in plans if p.where == where]
        if not group:
            continue
        rows.append([f"*{WHERE_LABEL[where]}*", *[""] * (len(headers) - 1)])
        for plan in group:
            s = summaries.get(plan.key)
            if s is None or s.runs == 0:
                why = (s.error if s else None) or "no run"
                rows.append([plan.label, f"failed ({why})", *[""] * (len(headers) - 2)])
                continue
            ssd_ratio = s.ratios.get(f"ssd_{plan.base}", float("nan")) if where != "ssd" else None
            direct = s.ratios.get(f"{where}_direct2", float("nan"))
            seeks = per_file(s, files, "disk", "seeks") if where != "ssd" else float("nan")
            busy = _median_extra(s, "disk", "busy_seconds") / s.wall_s
            cpu_use = s.cpu_ms_per_file * files / 1000 / (s.wall_s * h.NCPU)
            noisy = f" ({s.noisy_runs} noisy)" if s.noisy_runs else ""
            rows.append(
                [
                    plan.label,
                    h.fmt(s.files_per_s) + noisy,
                    f"{h.fmt(s.files_per_s_min)}–{h.fmt(s.files_per_s_max)}",
                    "" if ssd_ratio is None else h.fmt(ssd_ratio, 2),
                    h.fmt(direct, 2),
                    h.fmt(seeks, 2),
                    "" if where == "ssd" else f"{h.fmt(100 * busy, 0)} %",
                    f"{h.fmt(100 * cpu_use, 0)} %",
                    h.fmt(s.cpu_ms_per_file),
                ]
            )
            facts[f"{plan.key}.ssd_ratio"] = ssd_ratio if ssd_ratio is not None else float("nan")
            facts[f"{plan.key}.seeks"] = seeks
            for other in ("direct2", "direct4"):
                facts[f"{plan.key}.vs_{other}"] = s.ratios.get(f"{where}_{other}", float("nan"))
    return h.md_table(headers, rows, right=range(1, len(headers))), facts


def render_targets(facts: dict[str, float]) -> str:
    def get(name: str) -> float:
        return facts.get(name, float("nan"))

    def verdict(value: float, ok: bool, digits: int = 2, unit: str = "×") -> str:
        if value != value:
            return "not measured"
        return f"{value:.{digits}f}{unit} ({'met' if ok else '**missed**'})"

    lines = []
    ssd = get("hdd_prefetch2.ssd_ratio")
    lines.append(
        f"- Prefetch, 2 workers, on the simulated disk vs the same scan on the SSD: "
        f"≥ {TARGETS_TEXT['ssd_ratio']:.2f}× — {verdict(ssd, ssd >= TARGETS_TEXT['ssd_ratio'])}"
    )
    seeks = get("hdd_prefetch2.seeks")
    lines.append(
        f"- Seeks per image, prefetch, 2 workers, simulated disk: ≤ {TARGETS_TEXT['seeks']:g} — "
        f"{verdict(seeks, seeks <= TARGETS_TEXT['seeks'], unit='')}"
    )
    for other in ("direct2", "direct4"):
        r = get(f"hdd_prefetch2.vs_{other}")
        lines.append(
            f"- Prefetch, 2 workers, vs direct, {other[-1]} workers, simulated disk: clearly ahead "
            f"(≥ {CLEARLY_AHEAD:g}×) — {verdict(r, r >= CLEARLY_AHEAD)}"
        )
    cost = get("ssd_prefetch2.vs_direct2")
    lines.append(
        f"- Prefetch vs direct, 2 workers, on the SSD: ≥ {TARGETS_TEXT['ssd_cost']:.2f}× — "
        f"{verdict(cost, cost >= TARGETS_TEXT['ssd_cost'])}"
    )
    shuffled = get("shuffled_prefetch2.seeks")
    if shuffled == shuffled:
        lines.append(
            f"- Seeks per image, prefetch, 2 workers, shuffled layout: ≤ "
            f"{TARGETS_TEXT['seeks']:g} — {verdict(shuffled, shuffled <= 1.2, unit='')}"
        )
        r = get("shuffled_prefetch2.vs_direct2")
        lines.append(
            f"- Prefetch vs direct, 2 workers, shuffled layout: clearly ahead "
            f"(≥ {CLEARLY_AHEAD:g}×) — {verdict(r, r >= CLEARLY_AHEAD)}"
        )
    info = []
    for other in ("direct2", "direct4"):
        r = get(f"hdd_prefetch1.vs_{other}")
        if r == r:
            info.append(f"{r:.2f}× direct with {other[-1]} workers")
    text = "Targets (speed ratios are same-rep medians):\n\n" + "\n".join(lines)
    if info:
        text += (
            "\n\nNot a target: prefetch with 1 worker (cores − 1 here) on the simulated disk is "
            + " and ".join(info)
            + "."
        )
    return text


def render_profile(plans: list[Plan], summaries: dict[str, h.Summary], files: int) -> str:
    headers = [
        "photoscand run",
        "worker idle waiting for input, s",
        "worker busy, s",
        "worker read, ms/image",
        "reader waiting for window room, s",
        "reader reading, s",
        "reader MB/s while reading",
    ]
    rows = []
    for plan in plans:
        s = summaries.get(plan.key)
        if not plan.photoscand or s is None or s.runs == 0:
            continue
        if not any(e.get("metrics") for e in s.extra):
            continue
        read_s = _median_extra(s, "metrics", "reader_read_s")
        read_b = _median_extra(s, "metrics", "reader_bytes")
        rate = read_b / read_s / 1e6 if read_s == read_s and read_s > 0 else float("nan")
        rows.append(
            [
                f"{plan.label.replace('**', '')} — {WHERE_LABEL[plan.where]}",
                h.fmt(_median_extra(s, "metrics", "worker_wait_s"), 2),
                h.fmt(_median_extra(s, "metrics", "worker_busy_s"), 2),
                h.fmt(1000 * per_file(s, files, "metrics", "worker_read_s"), 1),
                h.fmt(_median_extra(s, "metrics", "reader_wait_s"), 2),
                h.fmt(read_s, 2),
                h.fmt(rate, 0),
            ]
        )
    if not rows:
        return ""
    return (
        "Where photoscand waits (the daemon's own counters at exit, `--metrics-file`; medians "
        "over runs):\n\n" + h.md_table(headers, rows, right=range(1, 7))
    )


def render_notes(
    model: dict[str, Any], sizes: list[int], summaries: dict[str, h.Summary]
) -> list[str]:
    total = sum(sizes)
    sim_cpu = [
        e["disk"]["sim_cpu"] / len(sizes) * 1000
        for s in summaries.values()
        for e in s.extra
        if "disk" in e
    ]
    late = sum(
        e["disk"]["late_requests"] for s in summaries.values() for e in s.extra if "disk" in e
    )
    notes = [
        f"Photos: {len(sizes)} 12 MP JPEGs (q90) of the perf corpus, {total / len(sizes) / 1e6:.2f}"
        f" MB on average, {total / 1e6:.0f} MB in all; thumbnails {SIZES[0]} and {SIZES[1]} px "
        "(photoscand's default sizes), JPEG q80. Each run: fresh config, catalog and thumbnail "
        "folder; the page cache of the SSD copy is warm.",
        "Simulated disk (bench/hddsim.py, docs/hddsim.md): one 7200 rpm head, "
        f"{model.get('rate_mbs', 150):g} MB/s media rate, seeks {model.get('settle_ms', 1):g}–"
        f"{model.get('full_stroke_ms', 15):g} ms over {model.get('capacity_gb', 2000):g} GB plus "
        "half a rotation (4.17 ms), no page cache, 128 KiB requests. Layout: the photos in name "
        f"order, a gap of {GAP_MB:g} MB × U(0.5, 1.5) before each (seed {LAYOUT_SEED}), so every "
        "new file costs a short seek (~5.2 ms), as on a filesystem that placed one folder's "
        "files near each other but not back to back; the shuffled variant puts the same files "
        "in a seeded random order (disk order ≠ name order; inode numbers follow the disk). "
        "Counters are reset and the head parked before every run.",
        "Seeks/image: the simulator's seeks (every repositioning that is not a short skip "
        "forward) divided by the photos; disk busy: time the head was serving requests, as a "
        "share of the run's wall time. CPU use: CPU of the run's processes over wall time × "
        f"{h.NCPU} CPUs. The simulator's own CPU (the FUSE process, "
        f"median {h.fmt(h.median(sim_cpu), 1)} ms per photo) is neither in CPU use nor in foreign "
        f"load. Requests the simulator served late (its source read alone outlasted the modelled "
        f"time, which happens when the machine is busy): {late} in all runs.",
        "ImageMagick reads its input through `cat FILE | convert jpg:- …` on both disks: "
        "convert maps its input, and without a page cache every 4 KiB page fault would be a "
        "request of its own (measured: ~190 seeks per photo for two converts at a time), where "
        "a real kernel reads ahead 128 KiB at a time, as cat does. Otherwise the commands are "
        "those of the thumbnails section (jpeg:size hint, -thumbnail, -auto-orient, -strip, q80).",
        "× same on SSD: files/s on the simulated disk over files/s of the same method on the "
        "SSD in the same rep; × direct: over photoscand direct with 2 workers on the same disk "
        "in the same rep; medians over reps.",
    ]
    return notes


# --------------------------------------------------------------------------- main


@contextlib.contextmanager
def simulated_disks(
    hddsim: Any, source: Path, layouts: list[str], model: dict[str, Any]
) -> Iterator[dict[str, Disk]]:
    """Mount `source` once per layout under a temporary folder; unmount and remove on exit."""
    with contextlib.ExitStack() as stack:
        disks: dict[str, Disk] = {}
        for layout in layouts:
            mountpoint = Path(tempfile.mkdtemp(prefix=f"photoscand-hdd-{layout}-"))
            # Registered first so it runs last, after the unmount below.
            stack.callback(_rmdir_quietly, mountpoint)
            order = "shuffled" if layout == "shuffled" else "sorted"
            sim = stack.enter_context(
                hddsim.mounted(source, mountpoint, order=order, gap_mb=GAP_MB, seed=LAYOUT_SEED)
            )
            h.KEEP_PIDS.add(sim.proc.pid)  # the harness must not reap it as a run's leftover
            stack.callback(h.KEEP_PIDS.discard, sim.proc.pid)
            disks[layout] = Disk(layout, sim, {**model, "order": order})
            h.log(f"simulated disk ({layout}) mounted at {mountpoint}")
        yield disks


def _rmdir_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__ + "\nWrites its section of docs/benchmarks.md (full runs).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--files", type=int, default=150, help="12 MP photos in the run [%(default)s]")
    ap.add_argument("--reps", type=int, default=3, help="interleaved repetitions [%(default)s]")
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: 20 files, 1 rep, no doc update by default"
    )
    ap.add_argument(
        "--methods",
        default=",".join(b for b, _, _ in BASES),
        help="which methods, comma-separated [%(default)s]",
    )
    ap.add_argument(
        "--shuffled",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run on a shuffled layout (disk order ≠ name order) [%(default)s]",
    )
    ap.add_argument(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the daemon's wait and read counters of each photoscand run [%(default)s]",
    )
    ap.add_argument(
        "--doc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md (default: yes, except with --quick)",
    )
    ap.add_argument(
        "--rerender",
        metavar="RAW_JSON",
        type=Path,
        help="run nothing: render the section again from a bench/out/hdd-*.json",
    )
    h.add_gate_args(ap)
    args = ap.parse_args(argv)
    if args.rerender:
        return rerender(args.rerender, args.doc)
    if args.quick:
        args.files, args.reps = min(args.files, 20), 1
    write_doc = args.doc if args.doc is not None else not args.quick
    bases = [b for b in args.methods.split(",") if b]
    unknown = set(bases) - {b for b, _, _ in BASES}
    if unknown:
        ap.error(f"unknown methods: {', '.join(sorted(unknown))}")
    if "direct2" not in bases:
        ap.error("direct2 is the reference of every ratio; keep it")
    gate = SimGate(**dataclasses.asdict(h.gate_from_args(args)))
    h.install_signal_handlers()
    # Started in the background by a shell, SIGINT arrives ignored; Ctrl-C must still clean up.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return run(args, bases, gate, write_doc)
    except KeyboardInterrupt as exc:
        h.log(f"interrupted ({exc or 'Ctrl-C'}); mounts, processes and run folders removed")
        return 130


def run(args: argparse.Namespace, bases: list[str], gate: h.Gate, write_doc: bool) -> int:
    hddsim = _load_hddsim()
    corpus = h.subset_folder(h.perf_corpus(count=max(150, args.files)), args.files)
    files = h.photos_in(corpus)
    h.log(f"{len(files)} photos in {corpus}")
    layouts = ["hdd", "shuffled"] if args.shuffled else ["hdd"]
    model = dataclasses.asdict(hddsim.DiskModel())
    facts = h.machine_facts()
    with simulated_disks(hddsim, corpus, layouts, model) as disks:
        plans = make_plans(bases, layouts, corpus, disks)
        methods = [p.method for p in plans if p.method is not None]
        h.log(f"{len(methods)} methods, {args.reps} reps: {', '.join(p.key for p in plans)}")
        result = h.run_set("hdd", methods, files, corpus, args.reps, gate, warm=files)
    sizes = [p.stat().st_size for p in files]
    payload = {"args": vars(args), "facts": facts, "set": result, "model": model, "sizes": sizes}
    raw = h.save_raw("hdd", payload)
    body = report(plans, result, facts, model, sizes, args.reps)
    h.log(f"raw results: {raw}")
    h.publish(SECTION, body, write_doc)
    return 0


def rerender(raw: Path, doc: bool | None) -> int:
    """Render the section again from a bench/out/hdd-*.json, running nothing."""
    payload = json.loads(raw.read_text())
    saved = payload["args"]
    layouts = ["hdd", "shuffled"] if saved["shuffled"] else ["hdd"]
    bases = [b for b in saved["methods"].split(",") if b]
    plans = [
        p
        for p in make_plans(bases, layouts)
        if p.key in {r["method"] for r in payload["set"]["records"]}
    ]
    sizes = payload.get("sizes") or [
        p.stat().st_size
        for p in h.photos_in(
            h.subset_folder(h.perf_corpus(max(150, saved["files"])), saved["files"])
        )
    ]
    result = h.load_set(payload["set"])
    body = report(plans, result, payload["facts"], payload["model"], sizes, saved["reps"])
    h.publish(SECTION, body, doc if doc is not None else not saved["quick"])
    return 0


def report(
    plans: list[Plan],
    result: h.SetResult,
    facts: dict[str, str],
    model: dict[str, Any],
    sizes: list[int],
    reps: int,
) -> str:
    """The markdown section: the table, the targets, where photoscand waits, the facts."""
    refs = [p.key for p in plans if p.where == "ssd"]
    refs += [f"{w}_{b}" for w in ("hdd", "shuffled") for b in ("direct2", "direct4")]
    keyed = [h.Method(p.key, p.label, lambda _ctx: None) for p in plans]
    summaries = h.summarize(result, keyed, refs)
    table, ratios = render_table(plans, summaries, len(sizes))
    heading = (
        f"### 12 MP JPEG → {SIZES[0]} + {SIZES[1]} px on a simulated 7200 rpm disk and on the SSD "
        f"({len(sizes)} files, {reps} reps)"
    )
    usage = (
        "`.venv/bin/python bench/hdd.py` (150 files, 5 reps; `--quick`: 20 files, 1 rep; "
        "`--no-shuffled`, `--methods`, `--rerender RAW_JSON`). It mounts the simulated disk "
        "with FUSE (fuse3 and libfuse2, as root); docs/prefetch.md explains the mode."
    )
    blocks = [heading, usage, table, render_targets(ratios)]
    profile = render_profile(plans, summaries, len(sizes))
    if profile:
        blocks.append(profile)
    notes = render_notes(model, sizes, summaries)
    notes.append("Foreign load: " + h.gating_outcome([result]) + ".")
    blocks.append(h.facts_markdown(facts, reps, notes))
    return "\n\n".join(blocks)


if __name__ == "__main__":
    sys.exit(main())
