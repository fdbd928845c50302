"""Shared machinery for the benchmarks: corpus, timing, foreign-load gating, statistics, report.

The hazard is measurement on a shared, noisy 2-core machine: every run is timed as whole
processes (wall on a monotonic clock, CPU of all waited-for descendants), the CPU used by
*other* processes during the run is measured and gated, and no child process or temporary
folder may outlive a run, whatever happens to the benchmark itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import fcntl
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
OUT_DIR = BENCH_DIR / "out"
DOC = REPO / "docs" / "benchmarks.md"
CORPUS_SCRIPT = BENCH_DIR / "make_perf_corpus.py"
VENV_BIN = REPO / ".venv" / "bin"
PHOTOSCAND = VENV_BIN / "photoscand"

NCPU = os.cpu_count() or 1
CLK_TCK = os.sysconf("SC_CLK_TCK")
# /proc/stat counts in ticks per CPU, so each reading is off by up to one tick per CPU; a
# reading pair therefore allows 2 * NCPU ticks of slack before calling a run noisy.
STAT_SLACK_S = 2 * NCPU / CLK_TCK


def log(msg: str) -> None:
    """Progress goes to stderr, so stdout stays free for the final table."""
    print(msg, file=sys.stderr, flush=True)


def venv_python() -> str:
    """The project's interpreter (the one the daemon runs on), or this one without a venv."""
    candidate = VENV_BIN / "python"
    return str(candidate) if candidate.exists() else sys.executable


# --------------------------------------------------------------------------- corpus


def perf_corpus(
    count: int = 150, megapixels: float = 12.0, quality: int = 90, seed: int = 1
) -> Path:
    """Return the folder of a generated perf corpus, generating it once into bench/out/.

    bench/make_perf_corpus.py makes it from the photos in tests/corpus. It is deterministic,
    so its arguments name the cache. It writes into a temporary folder that is renamed into
    place, so an interrupted run never leaves a half corpus that a later run would mistake
    for a complete one.
    """
    name = f"corpus-n{count}-mp{megapixels:g}-q{quality}-seed{seed}"
    dest = OUT_DIR / name
    if (dest / "perf-manifest.csv").is_file():
        return dest
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    tmp = OUT_DIR / f"{name}.tmp-{os.getpid()}"
    log(f"generating the perf corpus {name} (once; cached in {OUT_DIR})")
    try:
        subprocess.run(
            [
                venv_python(),
                str(CORPUS_SCRIPT),
                str(tmp),
                *("-n", str(count), "--megapixels", f"{megapixels:g}"),
                *("--quality", str(quality), "--seed", str(seed), "--jobs", str(NCPU)),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        try:
            os.rename(tmp, dest)
        except OSError:
            # Another benchmark finished the same corpus first; its copy is identical.
            if not (dest / "perf-manifest.csv").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def photos_in(folder: Path) -> list[Path]:
    """The JPEG files of a corpus folder, in a stable order."""
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))


def subset_folder(corpus: Path, count: int) -> Path:
    """A cached folder holding hard links to the first `count` photos of a corpus, same names.

    Methods that take a folder (photoscand, exiftool) then see exactly the files that the
    others get in their list. The manifest rows of those files come along.
    """
    files = photos_in(corpus)
    if count >= len(files):
        return corpus
    dest = OUT_DIR / f"{corpus.name}-first{count}"
    if (dest / "perf-manifest.csv").is_file():
        return dest
    tmp = OUT_DIR / f"{dest.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        for p in files[:count]:
            os.link(p, tmp / p.name)
        keep = {p.name for p in files[:count]}
        lines = (corpus / "perf-manifest.csv").read_text().splitlines(keepends=True)
        rows = [ln for ln in lines[1:] if ln.split(",", 1)[0] in keep]
        # Written last: its presence marks the folder complete.
        (tmp / "perf-manifest.csv").write_text("".join([lines[0], *rows]))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "perf-manifest.csv").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def linked_folder(files: Sequence[Path], count: int, tag: str) -> Path:
    """A cached folder of `count` hard links cycling over `files` (distinct names, one inode each).

    Phase 1 reads only the headers, so a large folder of links behaves like a large folder of
    photos without costing the disk space; a hard link is still its own catalog row.
    """
    dest = OUT_DIR / f"links-{tag}-n{count}"
    marker = dest / ".complete"
    if marker.is_file():
        return dest
    tmp = OUT_DIR / f"links-{tag}-n{count}.tmp-{os.getpid()}"
    try:
        tmp.mkdir(parents=True)
        for i in range(count):
            os.link(files[i % len(files)], tmp / f"p{i:06d}.jpg")
        # The marker is a dot file so that no tool counts it as a photo.
        marker_tmp = tmp / ".complete"
        marker_tmp.write_text(f"{count} links\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def warm_cache(files: Sequence[Path]) -> float:
    """Read every file once so that each run starts with the same (warm) page cache."""
    t0 = time.monotonic()
    buf = bytearray(1 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.monotonic() - t0


# --------------------------------------------------------------------------- CPU accounting


def proc_stat_busy() -> float:
    """Busy CPU seconds of the whole machine since boot, all CPUs summed.

    Steal counts as busy: time the hypervisor gave to another guest slows a run as much
    as a local process does.
    """
    with open("/proc/stat") as fh:
        fields = fh.readline().split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[1:9])
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


def self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def foreign_load_sample(window: float) -> float:
    """Share of all CPUs used by other processes during `window` seconds of sleep."""
    b0, s0, t0 = proc_stat_busy(), self_cpu(), time.monotonic()
    time.sleep(window)
    b1, s1, t1 = proc_stat_busy(), self_cpu(), time.monotonic()
    return max(0.0, (b1 - b0) - (s1 - s0)) / ((t1 - t0) * NCPU)


@dataclass
class Gate:
    """Foreign-load gating: wait for a quiet machine, redo noisy runs, never loop forever."""

    threshold: float = 0.08  # share of all CPUs used by others (0.08 of 2 CPUs = 0.16 CPU)
    quiet_deadline: float = 120.0  # seconds to wait for a quiet machine before a run
    quiet_window: float = 0.5  # length of each idle sample
    max_redo: int = 3  # redos of a noisy run before it is kept with the noisy flag
    # Seconds that waiting and redone runs may cost in one benchmark invocation. A machine
    # that stays busy (a long job next door) would otherwise multiply the run time by
    # (max_redo + 1) x quiet_deadline per run; once spent, runs go ahead and are flagged.
    budget: float = 2400.0
    spent: float = 0.0

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget

    def wait_quiet(self) -> tuple[float, float, bool]:
        """Wait until a sample is below the threshold or the deadline (or budget) runs out.

        Returns (seconds waited, last foreign load, whether it was quiet).
        """
        t0 = time.monotonic()
        while True:
            load = foreign_load_sample(self.quiet_window)
            waited = time.monotonic() - t0
            if load < self.threshold:
                self.spent += waited
                return waited, load, True
            if waited >= self.quiet_deadline or self.spent + waited >= self.budget:
                self.spent += waited
                return waited, load, False

    def may_redo(self, attempts: int) -> bool:
        return attempts <= self.max_redo and not self.exhausted

    def is_noisy(self, m: Measurement) -> bool:
        return m.foreign_cpu > self.threshold * m.window * NCPU + STAT_SLACK_S


def add_gate_args(ap) -> None:
    ap.add_argument(
        "--threshold",
        type=float,
        default=0.08,
        help="foreign-load limit, share of all CPUs [%(default)s]",
    )
    ap.add_argument(
        "--quiet-deadline",
        type=float,
        default=120.0,
        help="max seconds to wait for a quiet machine before each run [%(default)s]",
    )
    ap.add_argument(
        "--noise-budget",
        type=float,
        default=2400.0,
        help="seconds of waiting and redone runs allowed in total; then runs go ahead, flagged "
        "[%(default)s]",
    )
    ap.add_argument(
        "--max-redo",
        type=int,
        default=3,
        help="redos of a noisy run before keeping it flagged noisy [%(default)s]",
    )


def gate_from_args(args) -> Gate:
    return Gate(
        threshold=args.threshold,
        quiet_deadline=args.quiet_deadline,
        max_redo=args.max_redo,
        budget=args.noise_budget,
    )


# --------------------------------------------------------------------------- child processes

_PR_SET_CHILD_SUBREAPER = 36
_subreaper_set = False


def become_subreaper() -> None:
    """Make orphaned descendants (a daemon's leaked workers) our children, so we can reap them.

    Without it an orphan is re-parented to init, keeps burning CPU as "foreign load"
    in the next run, and survives the benchmark.
    """
    global _subreaper_set
    if _subreaper_set:
        return
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    _subreaper_set = True


def _our_children() -> list[int]:
    me = os.getpid()
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        # The command name may contain spaces and parentheses: parse after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == me and int(entry) not in KEEP_PIDS:
            kids.append(int(entry))
    return kids


# Children that a benchmark keeps running on purpose (a file writer, a simulated disk),
# never reaped as orphans.
KEEP_PIDS: set[int] = set()


# Children that a benchmark keeps running on purpose across runs (a FUSE server, a file
# writer): never reaped or killed as a run's leftovers.
KEEP_PIDS: set[int] = set()


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap_leftovers(pgid: int | None, grace: float = 2.0) -> tuple[bool, float]:
    """Wait for what is left of a run to exit, kill it after `grace` seconds, reap all of it.

    "What is left" is the run's process group plus every orphan re-parented to us: a
    daemon's multiprocessing forkserver, for instance, outlives the daemon briefly, and
    the workers it reaped are accounted to it, not to the daemon. wait4 on each orphan
    recovers that CPU, which would otherwise count as foreign load. Each child is reaped
    by pid, never with waitpid(-1), which could steal a status someone else waits for.

    Returns (whether something had to be killed, CPU seconds of everything reaped here).
    """
    killed = False
    cpu = 0.0
    deadline = time.monotonic() + grace
    hard_deadline = deadline + 10.0
    while True:
        for pid in _our_children():
            if pid in KEEP_PIDS:
                continue
            with contextlib.suppress(ChildProcessError):
                done, _status, ru = os.wait4(pid, os.WNOHANG)
                if done:
                    cpu += ru.ru_utime + ru.ru_stime
        alive = [pid for pid in _our_children() if pid not in KEEP_PIDS]
        if not alive and (pgid is None or not _group_exists(pgid)):
            return killed, cpu
        now = time.monotonic()
        if now >= hard_deadline:
            return True, cpu
        if now >= deadline and not killed:
            killed = True
            if pgid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pgid, signal.SIGKILL)
            for pid in alive:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        time.sleep(0.005)


@dataclass
class Invocation:
    """One process to run and time; `until` turns a daemon into a batch (stop once it holds)."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    cwd: Path | None = None
    stdout: Path | None = None  # None: discarded
    until: Callable[[], bool] | None = None  # polled while running; when true the run is done
    poll_interval: float = 0.01
    stop_signal: int = signal.SIGTERM
    stop_grace: float = 30.0  # after stop_signal, SIGKILL the group after this long
    timeout: float = 900.0


@dataclass
class Measurement:
    wall: float  # seconds to the end of the work (exit, or `until` first true)
    wall_exit: float  # seconds until the process was gone
    window: float  # seconds over which foreign load was measured (until leftovers were reaped)
    user: float  # CPU of the process and its waited-for descendants
    sys: float
    orphan_cpu: float  # CPU of descendants it did not wait for (reaped by us afterwards)
    foreign_cpu: float  # CPU seconds others used during the run
    foreign: float  # foreign_cpu as a share of all CPUs over the run
    returncode: int
    leftovers: bool = False
    timed_out: bool = False
    stderr_tail: str = ""

    @property
    def cpu(self) -> float:
        return self.user + self.sys + self.orphan_cpu


def measure(inv: Invocation) -> Measurement:
    """Run one process, timed as a whole, and account for the CPU others used meanwhile.

    The child gets its own session (so its whole group can be killed) and is waited on
    with a pidfd (exact wake-up, no polling error on wall time); wait4 gives the rusage of
    the child and every descendant it waited for.
    """
    become_subreaper()
    env = os.environ.copy()
    env.update(inv.env)
    stdout = open(inv.stdout, "wb") if inv.stdout else subprocess.DEVNULL  # noqa: SIM115
    stderr = tempfile.TemporaryFile()  # noqa: SIM115
    proc: subprocess.Popen | None = None
    pidfd = -1
    try:
        busy0, self0 = proc_stat_busy(), self_cpu()
        t0 = time.monotonic()
        proc = subprocess.Popen(
            inv.argv,
            env=env,
            cwd=inv.cwd,
            stdin=subprocess.DEVNULL,
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        pidfd = os.pidfd_open(proc.pid)
        deadline = t0 + inv.timeout
        done_at: float | None = None
        stop_at: float | None = None  # when to escalate to SIGKILL after the stop signal
        killed = timed_out = False
        while True:
            now = time.monotonic()
            if killed:
                wait = None  # SIGKILL sent: only its exit is left to wait for
            elif stop_at is not None:
                wait = max(0.0, stop_at - now)
            elif inv.until is not None:
                wait = min(inv.poll_interval, max(0.0, deadline - now))
            else:
                wait = max(0.0, deadline - now)
            ready, _, _ = select.select([pidfd], [], [], wait)
            if ready:
                break
            now = time.monotonic()
            if stop_at is not None:
                if now >= stop_at:
                    os.killpg(proc.pid, signal.SIGKILL)
                    killed = True
            elif now >= deadline:
                os.killpg(proc.pid, signal.SIGKILL)
                killed = timed_out = True
            elif inv.until is not None and inv.until():
                done_at = now
                stop_at = now + inv.stop_grace
                # os.kill, not Popen.send_signal: its poll() could reap the child first,
                # and the wait4 below would lose the exit status and the rusage.
                os.kill(proc.pid, inv.stop_signal)
        _, status, ru = os.wait4(proc.pid, 0)
        t_exit = time.monotonic()
        proc.returncode = os.waitstatus_to_exitcode(status)
        leftovers, orphan_cpu = reap_leftovers(proc.pid)
        busy1, self1, t_end = proc_stat_busy(), self_cpu(), time.monotonic()
        own = ru.ru_utime + ru.ru_stime + orphan_cpu + (self1 - self0)
        foreign_cpu = max(0.0, (busy1 - busy0) - own)
        stderr.seek(0)
        tail = stderr.read()[-3000:].decode("utf-8", "replace")
        return Measurement(
            wall=(done_at if done_at is not None else t_exit) - t0,
            wall_exit=t_exit - t0,
            window=t_end - t0,
            user=ru.ru_utime,
            sys=ru.ru_stime,
            orphan_cpu=orphan_cpu,
            foreign_cpu=foreign_cpu,
            foreign=foreign_cpu / ((t_end - t0) * NCPU),
            returncode=proc.returncode,
            leftovers=leftovers,
            timed_out=timed_out,
            stderr_tail=tail,
        )
    finally:
        if proc is not None and proc.returncode is None:
            # Interrupted (Ctrl-C, an exception): nothing of the run may survive us.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(proc.pid, 0)
            proc.returncode = -signal.SIGKILL
            reap_leftovers(proc.pid, grace=0)
        if pidfd >= 0:
            os.close(pidfd)
        if stdout is not subprocess.DEVNULL:
            stdout.close()
        stderr.close()


_NO_RUSAGE = resource.struct_rusage((0.0, 0.0) + (0,) * 14)


def wait_rusage(proc: subprocess.Popen, timeout: float | None) -> resource.struct_rusage | None:
    """Wait for a child started with Popen and return its rusage; None if it is still running.

    wait4 is called directly (not Popen.wait) because only it returns the CPU of the child
    and of every descendant that child waited for. A child that someone else has reaped
    already gives an empty rusage.
    """
    try:
        pidfd = os.pidfd_open(proc.pid)
    except ProcessLookupError:
        if proc.returncode is None:
            proc.returncode = -signal.SIGKILL
        return _NO_RUSAGE
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        if not ready:
            return None
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        except ChildProcessError:
            return _NO_RUSAGE
        proc.returncode = os.waitstatus_to_exitcode(status)
        return ru
    finally:
        os.close(pidfd)


def stop_process(proc: subprocess.Popen, grace: float = 30.0) -> resource.struct_rusage | None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL the whole group; always reaps it."""
    if proc.returncode is not None:
        return None
    # os.kill, not Popen.send_signal, whose poll() could reap the child and lose its rusage.
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGTERM)
    ru = wait_rusage(proc, grace)
    if ru is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        ru = wait_rusage(proc, None)
    return ru


def install_signal_handlers() -> None:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so every `finally` runs and cleans up."""

    def _raise(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _raise)
    signal.signal(signal.SIGHUP, _raise)


@contextlib.contextmanager
def temp_dir(prefix: str) -> Iterator[Path]:
    """A scratch folder under bench/out/runs (same disk as the corpus), always removed."""
    base = OUT_DIR / "runs"
    base.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=base))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- methods and runs


@dataclass
class RunContext:
    """What a method needs to build its command for one run."""

    files: list[Path]  # inputs, in a stable order
    corpus: Path  # the folder that holds them
    list_file: Path  # one absolute input path per line
    stems_file: Path  # one input name without extension per line
    run_dir: Path  # fresh, empty, removed after the run
    out_dir: Path  # run_dir/out, created empty


@dataclass
class Method:
    key: str
    label: str
    build: Callable[[RunContext], Invocation]
    # Returns an error text when the outputs are wrong (checked after the first good run).
    check: Callable[[RunContext, Measurement], str | None] | None = None
    # Collects extra facts from the run folder before it is removed (e.g. a catalog).
    collect: Callable[[RunContext, Measurement], dict] | None = None
    # Cheap checks that run after every run (output count), after the exit code check.
    check_every_run: Callable[[RunContext, Measurement], str | None] | None = None
    ok_returncodes: tuple[int, ...] = (0,)


@dataclass
class RunRecord:
    method: str
    rep: int
    position: int
    files: int
    m: Measurement
    attempts: int
    noisy: bool
    quiet_waited: float
    quiet_reached: bool
    error: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def files_per_s(self) -> float:
        return self.files / self.m.wall


@dataclass
class SetResult:
    name: str
    files: int
    reps: int
    records: list[RunRecord]
    gate: Gate
    started: str
    finished: str = ""


def _write_lists(files: Sequence[Path], where: Path) -> tuple[Path, Path]:
    list_file = where / "inputs.list"
    stems_file = where / "inputs.stems"
    list_file.write_text("".join(f"{p.resolve()}\n" for p in files))
    stems_file.write_text("".join(f"{p.stem}\n" for p in files))
    return list_file, stems_file


def run_set(
    name: str,
    methods: Sequence[Method],
    files: Sequence[Path],
    corpus: Path,
    reps: int,
    gate: Gate,
    warm: Sequence[Path] | None = None,
) -> SetResult:
    """Run every method `reps` times, interleaved, rotating the order each rep.

    Before each run: warm the page cache, wait for a quiet machine. After each run:
    redo it if others used more than the threshold, up to gate.max_redo times, then keep
    it flagged noisy. A method that fails is not run again (its error is reported).
    """
    files = list(files)
    result = SetResult(name, len(files), reps, [], gate, _now_iso())
    failed: dict[str, str] = {}
    checked: set[str] = set()
    with temp_dir(f"{name}-") as set_dir:
        list_file, stems_file = _write_lists(files, set_dir)
        for rep in range(reps):
            shift = rep % len(methods)
            order = list(methods[shift:]) + list(methods[:shift])
            for position, method in enumerate(order):
                if method.key in failed:
                    continue
                rec = _run_one(
                    method,
                    rep,
                    position,
                    files,
                    corpus,
                    list_file,
                    stems_file,
                    gate,
                    warm,
                    method.key not in checked,
                )
                result.records.append(rec)
                if rec.error:
                    failed[method.key] = rec.error
                    log(f"  {method.key}: FAILED: {rec.error}")
                    continue
                checked.add(method.key)
                flag = " NOISY" if rec.noisy else ""
                log(
                    f"  rep {rep + 1}/{reps} {method.key:<24} {rec.files_per_s:8.2f} files/s  "
                    f"cpu {1000 * rec.m.cpu / rec.files:7.2f} ms/file  "
                    f"foreign {100 * rec.m.foreign:4.1f} %"
                    f"  attempts {rec.attempts}{flag}"
                )
    result.finished = _now_iso()
    return result


def _run_one(
    method, rep, position, files, corpus, list_file, stems_file, gate, warm, full_check
) -> RunRecord:
    attempts = 0
    waited_total = 0.0
    reached = True
    while True:
        attempts += 1
        warm_cache(warm if warm is not None else files)
        waited, _load, quiet = gate.wait_quiet()
        waited_total += waited
        reached = reached and quiet
        with temp_dir(f"{method.key}-") as run_dir:
            out_dir = run_dir / "out"
            out_dir.mkdir()
            ctx = RunContext(list(files), corpus, list_file, stems_file, run_dir, out_dir)
            inv = method.build(ctx)
            m = measure(inv)
            noisy = gate.is_noisy(m)
            if noisy and gate.may_redo(attempts):
                gate.spent += m.window
                log(f"  {method.key}: foreign load {100 * m.foreign:.1f} %, redoing")
                continue
            error = None
            if m.timed_out:
                error = f"timed out after {inv.timeout:.0f} s"
            elif m.returncode not in method.ok_returncodes:
                error = f"exit code {m.returncode}: {last_lines(m.stderr_tail)}"
            elif method.check_every_run is not None:
                error = method.check_every_run(ctx, m)
            if error is None and full_check and method.check is not None:
                error = method.check(ctx, m)
            extra = {}
            if error is None and method.collect is not None:
                extra = method.collect(ctx, m)
            if m.leftovers:
                extra["leftover_processes"] = True
            return RunRecord(
                method.key,
                rep,
                position,
                len(files),
                m,
                attempts,
                noisy,
                waited_total,
                reached,
                error,
                extra,
            )


def last_lines(text: str, n: int = 3) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return " | ".join(lines[-n:])[-400:] or "(no stderr)"


# --------------------------------------------------------------------------- statistics


def median(xs: Sequence[float]) -> float:
    s = sorted(xs)
    n = len(s)
    if n == 0:
        return float("nan")
    mid = n // 2
    return s[mid] if n % 2 else (s[mid - 1] + s[mid]) / 2


def percentile(xs: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): an observed value, never an interpolation."""
    s = sorted(xs)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


@dataclass
class Summary:
    key: str
    label: str
    runs: int
    files_per_s: float  # median
    files_per_s_min: float
    files_per_s_max: float
    cpu_ms_per_file: float  # median
    wall_s: float  # median
    ratios: dict[str, float]  # speed relative to a reference, median of per-rep ratios
    noisy_runs: int
    noisy_used: bool  # whether the medians include noisy runs (too few clean ones)
    redos: int
    error: str | None
    extra: list[dict]


def min_clean_runs(reps: int) -> int:
    """Clean runs needed before noisy ones are left out of a median (3 of 5, 1 of 1)."""
    return max(1, min(3, (reps + 1) // 2))


def summarize(
    result: SetResult, methods: Sequence[Method], refs: Sequence[str]
) -> dict[str, Summary]:
    """Medians per method, and for each reference the median over reps of the same-rep speed ratio.

    A ratio is (method files/s) / (reference files/s) in one rep; above 1 means faster than
    the reference. Pairing within a rep cancels most slow drifts of the machine. Runs kept
    with the noisy flag are left out when enough clean ones exist (min_clean_runs): for a
    ratio, a rep counts as clean when both of its runs are.
    """
    need = min_clean_runs(result.reps)
    by_key: dict[str, list[RunRecord]] = {}
    for rec in result.records:
        by_key.setdefault(rec.method, []).append(rec)
    out: dict[str, Summary] = {}
    for method in methods:
        recs = by_key.get(method.key, [])
        ok = [r for r in recs if r.error is None]
        clean = [r for r in ok if not r.noisy]
        use = clean if len(clean) >= need else ok
        error = next((r.error for r in recs if r.error), None)
        ratios: dict[str, float] = {}
        for ref in refs:
            ref_by_rep = {r.rep: r for r in by_key.get(ref, []) if r.error is None}
            pairs = [(r, ref_by_rep[r.rep]) for r in ok if r.rep in ref_by_rep]
            clean_pairs = [(a, b) for a, b in pairs if not a.noisy and not b.noisy]
            if len(clean_pairs) >= need:
                pairs = clean_pairs
            per_rep = [a.files_per_s / b.files_per_s for a, b in pairs]
            ratios[ref] = median(per_rep) if per_rep else float("nan")
        fps = [r.files_per_s for r in use]
        out[method.key] = Summary(
            key=method.key,
            label=method.label,
            runs=len(ok),
            files_per_s=median(fps),
            files_per_s_min=min(fps) if fps else float("nan"),
            files_per_s_max=max(fps) if fps else float("nan"),
            cpu_ms_per_file=median([1000 * r.m.cpu / r.files for r in use]),
            wall_s=median([r.m.wall for r in use]),
            ratios=ratios,
            noisy_runs=len(ok) - len(clean),
            noisy_used=use is ok and len(clean) < len(ok),
            redos=sum(r.attempts - 1 for r in recs),
            error=error,
            extra=[r.extra for r in ok if r.extra],
        )
    return out


def noisy_note(s: Summary) -> str:
    """What a files/s cell says about the noisy runs of a method."""
    if not s.noisy_runs:
        return ""
    verb = "included" if s.noisy_used else "left out"
    return f" ({s.noisy_runs} noisy {verb})"


def leftover_note(s: Summary) -> str:
    """Flags a method whose runs left processes behind (they were killed after the run)."""
    n = sum(1 for e in s.extra if e.get("leftover_processes"))
    return f" (left processes behind in {n} runs)" if n else ""


def load_set(d: dict) -> SetResult:
    """A SetResult back from the JSON that save_raw wrote, to re-render a table from it."""
    # Files written before a field existed get its neutral value.
    records = [
        RunRecord(
            **{
                **r,
                "m": Measurement(**{"window": r["m"]["wall_exit"], "orphan_cpu": 0.0, **r["m"]}),
            }
        )
        for r in d["records"]
    ]
    return SetResult(
        d["name"], d["files"], d["reps"], records, Gate(**d["gate"]), d["started"], d["finished"]
    )


def gating_outcome(results: Sequence[SetResult]) -> str:
    """One sentence on how noisy the runs were, for the facts under a table."""
    recs = [r for res in results for r in res.records]
    if not recs:
        return "no runs"
    gate = results[0].gate
    redos = sum(r.attempts - 1 for r in recs)
    noisy = sum(r.noisy for r in recs)
    unquiet = sum(not r.quiet_reached for r in recs)
    loads = [r.m.foreign for r in recs]
    return (
        f"{len(recs)} runs kept; threshold {100 * gate.threshold:g} % of {NCPU} CPUs; "
        f"{redos} redone for foreign load (up to {gate.max_redo} times each); "
        f"{noisy} kept with the noisy flag; "
        f"{unquiet} started without a quiet machine ({gate.quiet_deadline:g} s deadline); "
        f"foreign load per kept run median {100 * median(loads):.1f} %, "
        f"max {100 * max(loads):.1f} %"
        + (
            f"; the noise budget ({gate.budget:g} s of waiting and redos) ran out, so later "
            "runs went ahead without waiting"
            if gate.exhausted
            else ""
        )
    )


def save_raw(name: str, payload: dict) -> Path:
    """Keep every measurement as JSON in bench/out for later analysis."""
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = OUT_DIR / f"{name}-{stamp}.json"
    path.write_text(json.dumps(payload, indent=1, default=_json_default))
    return path


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return str(obj)


# --------------------------------------------------------------------------- facts


def _cmd_version(argv: list[str], pick: Callable[[str], str]) -> str:
    try:
        cp = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "missing"
    text = (cp.stdout + cp.stderr).strip()
    try:
        return pick(text)
    except (IndexError, ValueError):
        return text.splitlines()[0] if text else "?"


def _cpu_model() -> str:
    model, family, mod = "?", "?", "?"
    with open("/proc/cpuinfo") as fh:
        for line in fh:
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name":
                model = value
            elif key == "cpu family":
                family = value
            elif key == "model" and mod == "?":
                mod = value
    return f"{model} (family {family}, model {mod})"


def machine_facts() -> dict[str, str]:
    """CPU, cores, date, kernel and the versions of every tool the benchmarks run."""
    py_probe = (
        "import json, importlib.metadata as md, PIL.features as f\n"
        "v = {}\n"
        "for d in ('Pillow', 'pyvips', 'ExifRead', 'photoscand', 'watchdog'):\n"
        "    try: v[d] = md.version(d)\n"
        "    except md.PackageNotFoundError: v[d] = 'missing'\n"
        "v['libjpeg-turbo (Pillow)'] = f.version('libjpeg_turbo') or '?'\n"
        "print(json.dumps(v))\n"
    )
    try:
        cp = subprocess.run(
            [venv_python(), "-c", py_probe], capture_output=True, text=True, timeout=60
        )
        py_versions = json.loads(cp.stdout)
    except (OSError, ValueError, subprocess.TimeoutExpired):
        py_versions = {}
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        commit = "?"
    facts = {
        "cpu": _cpu_model(),
        "cpus": str(NCPU),
        "date": _now_iso(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "commit": commit or "?",
        "ImageMagick": _cmd_version(["convert", "-version"], lambda t: t.split()[2]),
        "vips": _cmd_version(["vipsthumbnail", "--vips-version"], lambda t: t.split()[1]),
        "djpeg (libjpeg-turbo)": _cmd_version(["djpeg", "-version"], lambda t: t.split()[2]),
        "exiftool": _cmd_version(["exiftool", "-ver"], lambda t: t.split()[0]),
    }
    facts.update(py_versions)
    return facts


def facts_markdown(facts: dict[str, str], reps: int, extra: Sequence[str] = ()) -> str:
    """The facts line(s) recorded under each table."""
    tools = ", ".join(
        f"{k} {facts[k]}"
        for k in (
            "ImageMagick",
            "vips",
            "djpeg (libjpeg-turbo)",
            "exiftool",
            "Pillow",
            "libjpeg-turbo (Pillow)",
            "pyvips",
            "ExifRead",
            "watchdog",
            "photoscand",
            "sqlite",
            "python",
        )
        if k in facts
    )
    lines = [
        f"- Machine: {facts['cpu']}, {facts['cpus']} CPUs, Linux {facts['kernel']}; "
        f"measured {facts['date']} at commit {facts['commit']}; {reps} reps.",
        f"- Tools: {tools}.",
    ]
    lines += [f"- {e}" for e in extra]
    return "\n".join(lines)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


# --------------------------------------------------------------------------- markdown


def md_table(
    headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()
) -> str:
    """A GitHub table; columns whose index is in `right` are right-aligned."""
    sep = ["---:" if i in right else "---" for i in range(len(headers))]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(sep) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def fmt(x: float, digits: int = 1) -> str:
    return "—" if x != x else f"{x:,.{digits}f}"  # x != x: NaN, no data


def write_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace the text between this benchmark's markers in docs/benchmarks.md.

    Only this section changes; everything else in the document is kept. A missing section
    is appended. A lock serialises benchmarks that finish at the same time, and the file
    is replaced atomically so a reader never sees half a document.
    """
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    with open(OUT_DIR / ".benchmarks-md.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = doc.read_text() if doc.exists() else "# Benchmarks\n"
        block = f"{start}\n{body.strip()}\n{end}"
        i, j = text.find(start), text.find(end)
        if i >= 0 and j > i:
            text = text[:i] + block + text[j + len(end) :]
        else:
            text = text.rstrip("\n") + "\n\n" + block + "\n"
        tmp = doc.with_name(f".{doc.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, doc)


def publish(name: str, body: str, write_doc: bool) -> None:
    """Print a benchmark's section, and put it into docs/benchmarks.md when asked."""
    print(body)
    if write_doc:
        write_section(name, body)
        log(f"updated the {name} section of {DOC}")


# --------------------------------------------------------------------------- photoscand


_bytecode_ready = False


def compile_photoscand() -> None:
    """Compile photoscand's modules to bytecode once, as installing a package does.

    The project is installed editable, and where PYTHONDONTWRITEBYTECODE is set (as on the
    benchmark machines) no .pyc is ever written: each daemon start, its fork server included,
    would compile every module again (~0.15 s per process), which no installed copy pays.
    """
    global _bytecode_ready
    if not _bytecode_ready:
        subprocess.run(
            [venv_python(), "-m", "compileall", "-q", str(REPO / "photoscand")],
            check=True,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": ""},
        )
        _bytecode_ready = True


def metric_samples(text: str) -> dict[str, float]:
    """Prometheus text format (the daemon's --metrics-file) → {"name{labels}": value}, without
    comments and histogram buckets."""
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#") or "_bucket{" in line:
            continue
        name, _, value = line.rpartition(" ")
        try:
            samples[name] = float(value)
        except ValueError:
            continue
    return samples


def write_photoscand_config(
    run_dir: Path,
    watch_paths: Sequence[Path],
    sizes: Sequence[int] = (1440, 256),
    worker_count: int = 2,
    overrides: dict[str, dict] | None = None,
) -> Path:
    """Write a config for one photoscand run: fresh catalog and thumbnails in run_dir.

    `overrides` adds or replaces keys per section (e.g. {"workers": {"max_pixels": 1000}}).
    Metrics are off so that concurrent runs never fight over the port.
    """
    compile_photoscand()
    cfg: dict[str, dict] = {
        "watch": {"paths": [str(p.resolve()) for p in watch_paths], "rescan_interval_seconds": 0},
        "catalog": {"path": str(run_dir / "catalog.db")},
        "thumbnails": {
            "dir": str(run_dir / "thumbnails"),
            "sizes": list(sizes),
            "format": "jpeg",
            "quality": 80,
        },
        "workers": {"count": worker_count, "backend": "pillow"},
        "metrics": {"listen": ""},
        "logging": {"format": "json", "level": "warning"},
    }
    for section, keys in (overrides or {}).items():
        cfg.setdefault(section, {}).update(keys)
    path = run_dir / "photoscand.yaml"
    # JSON is valid YAML, so no YAML library is needed here.
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def catalog_count(catalog: Path) -> int:
    """Rows in the catalog's images table; 0 while the catalog or its schema does not exist yet."""
    if not catalog.exists():
        return 0
    try:
        con = sqlite3.connect(f"file:{catalog}?mode=ro", uri=True, timeout=0.05)
        try:
            return con.execute("SELECT count(*) FROM images").fetchone()[0]
        finally:
            con.close()
    except sqlite3.Error:
        return 0


class NotifySocket:
    """An sd_notify socket like systemd's for a Type=notify service: says when a daemon is READY."""

    def __init__(self, where: Path):
        self.path = where / "notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))

    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": str(self.path)}

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            ready, _, _ = select.select([self.sock], [], [], left)
            if ready:
                msg = self.sock.recv(4096).decode("utf-8", "replace")
                if "READY=1" in msg.split("\n"):
                    return True
        return False

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
