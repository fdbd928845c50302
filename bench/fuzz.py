"""Coverage-guided fuzzing (atheris/libFuzzer) of phase 1's parser and phase 2's converters.

Targets: ``metadata`` (``photoscand.metadata.read_metadata`` on bytes) and ``convert``
(``photoscand.converters.convert`` with the Pillow backend). Seeds come from tests/corpus:
every small file whole, and prefixes of the larger ones (truncation is the commonest damage).
The oracle follows Pillow's fuzzers: a finding is an exception outside the contract (the parser
may only raise OSError; a conversion may only raise ConversionError), a crash of the process,
a hang past ``--timeout`` or memory past ``--rss-limit-mb``. libFuzzer runs in fork mode so a
finding is saved and the run goes on.

Hazard: the decoders are C code; a crash there takes the fuzzing process down, which is why
fork mode is used and why the replay (``replay``, and tests/regressions/) runs each input in a
child with a timeout and an address-space limit.

    python bench/fuzz.py run metadata --seconds 450
    python bench/fuzz.py run convert --seconds 450
    python bench/fuzz.py replay convert FILE...          (fuzzer inputs: first byte = extension)
    python bench/fuzz.py replay convert --raw PHOTO...   (plain files)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CORPUS = REPO / "tests" / "corpus"
OUT = REPO / "bench" / "out" / "fuzz"
TARGETS = ("metadata", "convert")

# The first byte of every input picks the file name's extension (phase 1 and the converters
# use it as a hint: TIFF-based RAW, RAW without a signature); the rest is the file.
EXTENSIONS = (
    "jpg png tif webp gif heic avif dng cr2 cr3 crw nef orf rw2 raf arw pef srw x3f bin".split()
)
MAX_LEN = 96 * 1024
MAX_PIXELS = 24_000_000


def extension_byte(path: Path) -> int:
    ext = path.suffix.lower().lstrip(".")
    ext = {"jpeg": "jpg", "jpe": "jpg", "tiff": "tif", "heif": "heic", "hif": "heic"}.get(ext, ext)
    return EXTENSIONS.index(ext) if ext in EXTENSIONS else EXTENSIONS.index("bin")


def split_input(data: bytes) -> tuple[str, bytes]:
    if not data:
        return "bin", b""
    return EXTENSIONS[data[0] % len(EXTENSIONS)], data[1:]


# -- the targets (run inside the fuzzing or the replaying process) ------------------------


def check_metadata(data: bytes) -> str:
    """Parse as phase 1 does. Returns a short outcome; raises on a contract violation."""
    from photoscand.metadata import read_metadata

    ext, payload = split_input(data)
    try:
        meta = read_metadata(f"/fuzz/input.{ext}".encode(), payload)
    except OSError as exc:
        return f"oserror {exc.errno}"
    if meta is None:
        return "not a photo"
    json.loads(meta.exif)  # the exif column must be valid JSON text
    for name in ("width", "height", "orientation", "iso"):
        value = getattr(meta, name)
        if value is not None and not isinstance(value, int):
            raise TypeError(f"{name} is {type(value).__name__}, not int")
    return "error" if meta.metadata_error else "ok"


class _Converter:
    """One thumbnail folder for the whole run, emptied after every input."""

    def __init__(self) -> None:
        self.out_dir = tempfile.mkdtemp(prefix="photoscand-fuzz-")

    def __call__(self, data: bytes) -> str:
        from photoscand import converters

        ext, payload = split_input(data)
        hint = {"jpg": "jpeg", "tif": "tiff", "heic": "heif", "bin": None}.get(ext, ext)
        spec = converters.ThumbnailSettings(
            sizes=(128,), format="jpeg", quality=70, out_dir=self.out_dir, max_pixels=MAX_PIXELS
        )
        try:
            result = converters.convert(payload, spec, format_hint=hint, reuse_existing=False)
        except converters.ConversionError as exc:
            return exc.reason
        finally:
            for entry in os.scandir(self.out_dir):
                shutil.rmtree(entry.path, ignore_errors=True)
        for thumb in result.thumbnails:
            if max(thumb.width, thumb.height) > 128 or min(thumb.width, thumb.height) < 1:
                raise AssertionError(f"thumbnail of {thumb.width}x{thumb.height} for size 128")
        return "done"


def target_function(name: str):
    if name == "metadata":
        return check_metadata
    if name == "convert":
        return _Converter()
    raise SystemExit(f"unknown target {name!r}; choose from {TARGETS}")


# -- seeds ---------------------------------------------------------------------------------


def make_seeds(target: str, folder: Path) -> int:
    """Every corpus file up to MAX_LEN whole, the larger ones cut at MAX_LEN, and a few
    truncations of each, each prefixed with its extension byte."""
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for path in sorted(CORPUS.rglob("*")):
        if not path.is_file() or path.name in ("MANIFEST.csv", "README.md"):
            continue
        data = path.read_bytes()
        prefix = bytes([extension_byte(path)])
        cuts = {min(len(data), MAX_LEN - 1)}
        if len(data) > 64:
            cuts |= {len(data) // 2, min(len(data) - 1, 4096), 200}
        for cut in sorted(cuts):
            if cut <= 0:
                continue
            (folder / f"{path.parent.name}_{path.name}_{cut}").write_bytes(prefix + data[:cut])
            count += 1
    return count


# -- run -------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) / args.target
    seeds = out / "seeds"
    work = out / "corpus"
    findings = out / "findings"
    for folder in (work, findings):
        folder.mkdir(parents=True, exist_ok=True)
    if not seeds.exists():
        print(f"seeds: {make_seeds(args.target, seeds)} files from {CORPUS}", flush=True)
    log_path = out / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    # libFuzzer's fork mode re-runs argv[0] with its own flags: argv[0] must be one
    # executable that starts this target.
    launcher = out / "launch"
    launcher.write_text(
        f'#!/bin/sh\nexec "{sys.executable}" "{__file__}" _atheris {args.target} "$@"\n'
    )
    launcher.chmod(0o755)
    command = [
        str(launcher),
        f"-max_total_time={args.seconds}", f"-timeout={args.timeout}",
        f"-rss_limit_mb={args.rss_limit_mb}", f"-max_len={MAX_LEN}",
        f"-fork={args.jobs}", "-ignore_crashes=1", "-ignore_timeouts=1", "-ignore_ooms=1",
        f"-artifact_prefix={findings}/", f"-seed={args.seed}", "-print_final_stats=1",
        str(work), str(seeds),
    ]  # fmt: skip
    started = time.monotonic()
    with open(log_path, "wb") as log:
        env = {**os.environ, "PSCD_BENCH_FUZZ_LAUNCHER": str(launcher)}
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=out, env=env)
    elapsed = time.monotonic() - started
    summary = summarize(log_path, findings, elapsed, args)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    return code


def summarize(log_path: Path, findings: Path, elapsed: float, args: argparse.Namespace) -> dict:
    text = log_path.read_text(errors="replace")
    execs = [int(m) for m in re.findall(r"#(\d+):? ", text)]
    coverage = [int(m) for m in re.findall(r"\bcov: (\d+)", text)]
    kinds: dict[str, int] = {}
    for item in findings.iterdir():
        kind = item.name.split("-", 1)[0]
        kinds[kind] = kinds.get(kind, 0) + 1
    return {
        "target": args.target,
        "seconds": round(elapsed),
        "executions": max(execs) if execs else 0,
        "coverage": max(coverage) if coverage else 0,
        "findings": kinds,
        "log": str(log_path),
    }


def atheris_main(target: str, argv: list[str]) -> None:
    import atheris

    with atheris.instrument_imports(include=["photoscand", "exifread"]):
        import photoscand.converters
        import photoscand.metadata  # noqa: F401
    function = target_function(target)

    def one(data: bytes) -> None:
        function(data)

    # argv[0] is the launcher (see run()), for fork mode's children.
    atheris.Setup([os.environ.get("PSCD_BENCH_FUZZ_LAUNCHER", sys.argv[0]), *argv], one)
    atheris.Fuzz()


# -- replay ------------------------------------------------------------------------------------


def _limited(memory_mb: int):
    def limit() -> None:
        size = memory_mb << 20
        resource.setrlimit(resource.RLIMIT_AS, (size, size))

    return limit


def replay_one(
    target: str, path: Path, timeout: float, memory_mb: int, raw: bool = False
) -> tuple[str, str]:
    """Run one input in a child with a timeout and an address-space limit.

    Returns (verdict, detail): verdict "ok" (an allowed outcome), "exception", "crash",
    "timeout" or "memory".
    """
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "_one", target, _kind(raw), str(path)],
            capture_output=True, timeout=timeout, preexec_fn=_limited(memory_mb), cwd=REPO,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return "timeout", f"no outcome within {timeout:g}s"
    out = proc.stdout.decode(errors="replace").strip()
    err = proc.stderr.decode(errors="replace").strip()
    if proc.returncode == 0:
        return "ok", out
    if proc.returncode < 0:
        return "crash", f"killed by signal {-proc.returncode}"
    if "MemoryError" in err:
        return "memory", err.splitlines()[-1]
    return "exception", err.splitlines()[-1] if err else f"exit code {proc.returncode}"


def _kind(raw: bool) -> str:
    return "raw" if raw else "fuzz"


def replay_all(
    target: str, paths: list[Path], timeout: float, memory_mb: int, raw: bool = False
) -> dict[Path, tuple[str, str]]:
    """Replay many inputs: all in one child first (fast); when that child fails, each input
    in its own child, to say which one it was. ``raw`` inputs are plain files (their
    extension is the hint); the others are fuzzer inputs (first byte = extension)."""
    try:
        proc = subprocess.run(
            [sys.executable, __file__, "_one", target, _kind(raw), *map(str, paths)],
            capture_output=True, timeout=timeout * len(paths),
            preexec_fn=_limited(memory_mb), cwd=REPO,
        )  # fmt: skip
        lines = proc.stdout.decode(errors="replace").splitlines()
        if proc.returncode == 0 and len(lines) == len(paths):
            return {path: ("ok", line) for path, line in zip(paths, lines, strict=True)}
    except subprocess.TimeoutExpired:
        pass
    return {path: replay_one(target, path, timeout, memory_mb, raw) for path in paths}


def replay(args: argparse.Namespace) -> int:
    results = replay_all(args.target, [Path(f) for f in args.files], args.timeout,
                         args.rss_limit_mb, args.raw)  # fmt: skip
    for path, (verdict, detail) in results.items():
        print(f"{verdict:9} {path}: {detail}")
    return 0 if all(v == "ok" for v, _ in results.values()) else 1


def one_main(target: str, kind: str, paths: list[str]) -> None:
    function = target_function(target)
    for name in paths:
        path = Path(name)
        data = path.read_bytes()
        if kind == "raw":
            data = bytes([extension_byte(path)]) + data
        print(function(data), flush=True)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "_atheris":
        atheris_main(sys.argv[2], sys.argv[3:])
        return 0
    if len(sys.argv) > 4 and sys.argv[1] == "_one":
        one_main(sys.argv[2], sys.argv[3], sys.argv[4:])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("run", "replay"):
        p = sub.add_parser(name)
        p.add_argument("target", choices=TARGETS)
        p.add_argument("--timeout", type=int, default=20, help="seconds per input")
        p.add_argument("--rss-limit-mb", type=int, default=2048)
        if name == "run":
            p.add_argument("--seconds", type=int, default=300, help="total fuzzing time")
            p.add_argument("--jobs", type=int, default=1, help="libFuzzer fork workers")
            p.add_argument("--seed", type=int, default=1)
            p.add_argument("--out", default=str(OUT))
        else:
            p.add_argument("--raw", action="store_true",
                           help="plain files (extension = hint), not fuzzer inputs")  # fmt: skip
            p.add_argument("files", nargs="+")
    args = parser.parse_args()
    return run(args) if args.command == "run" else replay(args)


if __name__ == "__main__":
    sys.exit(main())
