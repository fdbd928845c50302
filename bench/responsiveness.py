"""Metrics endpoint responsiveness: /metrics latency while 2 workers are saturated with 12 MP
photos, next to the same daemon idle.

Each rep starts `photoscand run` on a fresh catalog watching a folder of 12 MP photos. The
start-up walk queues every photo, so both workers convert back to back; meanwhile /metrics is
scraped over a fresh connection every `--interval` seconds, and a scrape counts as "busy"
only if the exposition it returned says both workers were busy. Once every photo is done the
same daemon is scraped as often again, idle. Hazard: the scraper shares 2 cores with the
workers by design (that is the question), so the foreign-load gate only waits for a quiet
machine before each rep; the load other processes added during the rep is reported.
"""

from __future__ import annotations

import argparse
import http.client
import re
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import harness as h

SECTION = "responsiveness"
TARGET_P99_MS = 50.0
BUSY = re.compile(rb"^photoscand_workers_busy (\S+)$", re.M)
DONE = re.compile(rb'^photoscand_images\{status="done"\} (\S+)$', re.M)


@dataclass
class Phase:
    """The scrapes of one state of one rep."""

    latencies_ms: list[float] = field(default_factory=list)
    bytes: int = 0
    discarded: int = 0  # busy phase: scrapes taken while fewer than all workers were busy
    foreign: float = 0.0  # share of all CPUs used by other processes meanwhile


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> tuple[float, bytes]:
    """One scrape over a new connection (as after a Prometheus restart): (ms, body)."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read()
    finally:
        conn.close()
    return (time.perf_counter() - started) * 1000, body


def gauge(pattern: re.Pattern[bytes], body: bytes) -> float:
    match = pattern.search(body)
    return float(match.group(1)) if match else float("nan")


def wait_answering(port: int, proc: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"photoscand exited with {proc.returncode}")
        try:
            scrape(port)
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("the metrics endpoint did not answer")


class ForeignMeter:
    """CPU other processes used between start() and stop(), as a share of all CPUs.

    The daemon's own CPU is the run's process tree; it is read from /proc while it runs
    (children it has not reaped yet count through their own entries)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid

    def _tree_cpu(self) -> float:
        pids = [self.pid, *descendants(self.pid)]
        total = 0.0
        for pid in pids:
            try:
                with open(f"/proc/{pid}/stat") as fh:
                    fields = fh.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(x) for x in fields[11:15]) / h.CLK_TCK  # utime stime cutime cstime
        return total

    def start(self) -> None:
        self._t, self._busy, self._own = time.monotonic(), h.proc_stat_busy(), self._own_cpu()

    def _own_cpu(self) -> float:
        return self._tree_cpu() + h.self_cpu()

    def stop(self) -> float:
        elapsed = time.monotonic() - self._t
        foreign = (h.proc_stat_busy() - self._busy) - (self._own_cpu() - self._own)
        return max(0.0, foreign) / (elapsed * h.NCPU) if elapsed > 0 else 0.0


def descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def one_rep(folder: Path, count: int, args: argparse.Namespace) -> tuple[Phase, Phase]:
    port = free_port()
    with h.temp_dir("responsiveness-") as run_dir:
        config = h.write_photoscand_config(
            run_dir,
            [folder],
            sizes=(1440, 256),
            worker_count=args.workers,
            overrides={"metrics": {"listen": f"127.0.0.1:{port}"}},
        )
        log = open(run_dir / "daemon.log", "wb")  # noqa: SIM115 - closed below
        proc = subprocess.Popen(
            [str(h.PHOTOSCAND), "run", "--config", str(config)],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        busy, idle = Phase(), Phase()
        try:
            wait_answering(port, proc, 60)
            meter = ForeignMeter(proc.pid)
            meter.start()
            deadline = time.monotonic() + args.timeout
            while len(busy.latencies_ms) < args.scrapes and time.monotonic() < deadline:
                ms, body = scrape(port)
                if gauge(BUSY, body) >= args.workers:
                    busy.latencies_ms.append(ms)
                    busy.bytes = len(body)
                else:
                    busy.discarded += 1
                    if gauge(DONE, body) >= count:
                        break  # the batch ended before enough busy scrapes
                time.sleep(args.interval)
            busy.foreign = meter.stop()
            while gauge(DONE, scrape(port)[1]) < count:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the batch did not finish; see " + str(run_dir))
                time.sleep(0.2)
            time.sleep(2.5)  # the catalog gauges settle (refreshed every 2 s)
            meter.start()
            for _ in range(args.scrapes):
                ms, body = scrape(port)
                idle.latencies_ms.append(ms)
                idle.bytes = len(body)
                time.sleep(args.interval)
            idle.foreign = meter.stop()
        finally:
            h.stop_process(proc)
            h.reap_leftovers(proc.pid)
            log.close()
    return busy, idle


def render(phases: dict[str, list[Phase]], facts: dict[str, str], args: argparse.Namespace,
           count: int, unquiet: int) -> str:  # fmt: skip
    rows = []
    for label, runs in phases.items():
        pooled = [ms for p in runs for ms in p.latencies_ms]
        per_rep = ", ".join(h.fmt(h.percentile(p.latencies_ms, 99)) for p in runs)
        p99 = h.percentile(pooled, 99)
        rows.append([
            label, str(len(pooled)), h.fmt(h.percentile(pooled, 50)),
            h.fmt(h.percentile(pooled, 90)), f"**{h.fmt(p99)}**", per_rep,
            h.fmt(max(pooled) if pooled else float("nan")),
            "yes" if p99 < TARGET_P99_MS else "**no**",
            h.fmt(100 * h.median([p.foreign for p in runs])),
        ])  # fmt: skip
    table = h.md_table(
        ["daemon", "scrapes", "p50 ms", "p90 ms", "p99 ms", "p99 per rep", "max ms",
         f"p99 < {TARGET_P99_MS:g} ms", "foreign load %"],
        rows, right=(1, 2, 3, 4, 6, 8),
    )  # fmt: skip
    busy = phases["2 workers saturated"]
    discarded = sum(p.discarded for p in busy)
    size = max(p.bytes for runs in phases.values() for p in runs)
    extra = [
        f"{count} photos of 12 MP (`{h.perf_corpus().name}`), thumbnails 1440 + 256 px, "
        f"{args.workers} workers, metrics on 127.0.0.1; one scrape every {args.interval:g} s "
        f"over a new HTTP connection, {size:,} bytes each.",
        f"Busy scrapes count only when the exposition says all {args.workers} workers were "
        f"busy ({discarded} others discarded); idle scrapes follow once every photo is done.",
        "Percentiles are nearest-rank over all reps' scrapes pooled; foreign load is the CPU "
        "other processes used during the scrapes, as a share of all CPUs "
        f"({unquiet} of {args.reps} reps started without a quiet machine after "
        f"{args.quiet_deadline:g} s of waiting).",
    ]
    return (
        "## Metrics endpoint responsiveness\n\n"
        "`bench/responsiveness.py`: how long a Prometheus scrape of `/metrics` takes while the "
        "workers use every core, next to the same daemon idle. Target: p99 under "
        f"{TARGET_P99_MS:g} ms.\n\n{table}\n\n{h.facts_markdown(facts, args.reps, extra)}"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--files", type=int, default=150, help="12 MP photos per rep [%(default)s]")
    ap.add_argument("--scrapes", type=int, default=200, help="scrapes per state [%(default)s]")
    ap.add_argument("--reps", type=int, default=3, help="repetitions [%(default)s]")
    ap.add_argument("--workers", type=int, default=2, help="workers.count [%(default)s]")
    ap.add_argument("--interval", type=float, default=0.02,
                    help="seconds between scrapes [%(default)s]")  # fmt: skip
    ap.add_argument("--timeout", type=float, default=600, help="per rep [%(default)s]")
    ap.add_argument("--quick", action="store_true", help="smoke run: 40 photos, 50 scrapes, 1 rep")
    ap.add_argument(
        "--doc",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update docs/benchmarks.md (default: yes, except with --quick)",
    )
    h.add_gate_args(ap)
    args = ap.parse_args(argv)
    if args.quick:
        args.files, args.scrapes, args.reps = 40, 50, 1
    write_doc = args.doc if args.doc is not None else not args.quick
    gate = h.gate_from_args(args)
    h.install_signal_handlers()
    h.become_subreaper()
    if not h.PHOTOSCAND.exists():
        sys.exit(f"{h.PHOTOSCAND} not found: run `make` first")

    corpus = h.perf_corpus()
    folder = h.subset_folder(corpus, args.files)
    files = h.photos_in(folder)
    facts = h.machine_facts()
    phases: dict[str, list[Phase]] = {"2 workers saturated": [], "idle": []}
    unquiet = 0
    for rep in range(args.reps):
        waited, load, quiet = gate.wait_quiet()
        unquiet += not quiet
        h.log(f"rep {rep + 1}/{args.reps}: foreign load {100 * load:.1f} % after {waited:.0f} s"
              f"{'' if quiet else ' (not quiet)'}")  # fmt: skip
        h.warm_cache(files)
        busy, idle = one_rep(folder, len(files), args)
        phases["2 workers saturated"].append(busy)
        phases["idle"].append(idle)
        for label, phase in (("busy", busy), ("idle", idle)):
            h.log(f"  {label}: {len(phase.latencies_ms)} scrapes, p99 "
                  f"{h.fmt(h.percentile(phase.latencies_ms, 99))} ms, max "
                  f"{h.fmt(max(phase.latencies_ms, default=float('nan')))} ms")  # fmt: skip
    body = render(phases, facts, args, len(files), unquiet)
    raw = h.save_raw(SECTION, {"args": vars(args), "facts": facts, "phases": phases})
    h.log(f"raw measurements: {raw}")
    h.publish(SECTION, body, write_doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
