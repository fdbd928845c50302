"""The ImageMagick backend: one `magick`/`convert` child per image writes every size.

Hazards: ImageMagick reads hostile bytes with many coders, so it runs under the restrictive
policy.xml beside this file (MAGICK_CONFIGURE_PATH), with resource limits on the command line,
and the input goes to it on stdin behind an explicit coder (``jpeg:-``), never as a name, so
nothing in a photo's name can become an option, a coder or a path. The child must not outlive
the worker: it gets its own process group and PR_SET_PDEATHSIG, and is killed (group and all)
whenever the worker stops waiting for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import subprocess
import time

from PIL import Image

from photoscand import outcomes
from photoscand.converters import jpegdraft
from photoscand.converters.model import ConversionError
from photoscand.converters.output import commit_file, discard, make_folder, temp_name
from photoscand.protocol import ThumbnailFile, ThumbnailSettings

HERE = os.path.dirname(os.path.abspath(__file__))
POLICY_DIR = HERE  # policy.xml
SRGB_PROFILE = os.path.join(HERE, "srgb.icc")

# ImageMagick's own limits: the wall-clock fence of last resort (the daemon's per-image
# timeout normally kills the worker, and with it this child, long before).
TIME_LIMIT_SECONDS = 300
MEMORY_LIMIT = "256MiB"  # pixel cache in memory; beyond it the cache is memory-mapped
MAP_LIMIT = "512MiB"
DISK_LIMIT = "1GiB"

# Sniffed format -> ImageMagick coder; reading stops after the first frame/page ([0]).
CODERS: dict[str, str] = {
    "jpeg": "jpeg",
    "png": "png",
    "gif": "gif",
    "webp": "webp",
    "tiff": "tiff",
    "heif": "heic",
    "avif": "avif",
}
_OUTPUT_CODERS = {"jpeg": "jpeg", "webp": "webp"}

_PR_SET_PDEATHSIG = 1
_libc: ctypes.CDLL | None = None

_TOO_LARGE = (
    "exceeds limit",
    "resource limit",
    "cache resources exhausted",
    "memory allocation failed",
    "too large",
    "pixel cache allocation failed",
)
_TRUNCATED = (
    "premature end of jpeg file",
    "insufficient image data",
    "unexpected end-of-file",
    "unexpected end of file",
    "read error",
    "truncated",
    "end of data",
)
_UNSUPPORTED = (
    "no decode delegate",
    "not authorized",
    "not allowed by the security policy",
    "delegate library support not built-in",
    "compression not supported",
    "is not supported",
)
_TIMEOUT = ("time limit exceeded",)
_TEMP_COPY = re.compile(r"/\S*magick-[\w-]+:\s*")
_DISK_FULL = ("out of disk space", "no space left on device", "disk quota exceeded")
# ImageMagick's words when writing its output failed; often without the errno's text.
_WRITE_FAILED = ("unable to write file", "unable to flush")
# Less free space than this in the thumbnail folder after a failed write means it is full.
_NEARLY_FULL_BYTES = 1 << 20


@functools.lru_cache(maxsize=1)
def program() -> str | None:
    """The ImageMagick command: `magick` (IM7), else `convert` (IM6); None if neither works."""
    for name in ("magick", "convert"):
        path = shutil.which(name)
        if path is None:
            continue
        try:
            done = subprocess.run(
                [path, "-version"], capture_output=True, timeout=30, check=False, text=True
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and "ImageMagick" in done.stdout:
            return path
    return None


def missing() -> str | None:
    return None if program() is not None else "ImageMagick"


@functools.lru_cache(maxsize=1)
def readable_coders() -> frozenset[str]:
    """The coders this ImageMagick can read (`-list format`, mode column starting with r)."""
    exe = program()
    if exe is None:
        return frozenset()
    try:
        done = subprocess.run(
            [exe, "-list", "format"],
            capture_output=True,
            timeout=30,
            check=False,
            text=True,
            env=child_environment(),
        )
    except (OSError, subprocess.SubprocessError):
        return frozenset()
    found = set()
    for line in done.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 3 and fields[2].startswith("r"):
            found.add(fields[0].rstrip("*").lower())
    return frozenset(found)


def format_missing(fmt: str) -> str | None:
    """None when ImageMagick reads fmt here, else what is missing."""
    if program() is None:
        return "ImageMagick"
    return None if CODERS[fmt] in readable_coders() else f"ImageMagick with the {CODERS[fmt]} coder"


def child_environment() -> dict[str, str]:
    """The child's environment: our policy first on the configuration path, one thread."""
    env = dict(os.environ)
    env["MAGICK_CONFIGURE_PATH"] = POLICY_DIR
    env["MAGICK_THREAD_LIMIT"] = "1"
    env["OMP_NUM_THREADS"] = "1"
    return env


def command(
    fmt: str,
    spec: ThumbnailSettings,
    size_hint: tuple[int, int],
    outputs: list[tuple[int, str]],
    *,
    convert_profile: bool = False,
) -> list[str]:
    """The argument list (never a shell string). outputs: (size, relative temp name), largest
    first; each size is made from the previous, already oriented and converted one.
    convert_profile: the picture has a usable embedded profile that is not sRGB."""
    exe = program()
    if exe is None:
        raise ConversionError(outcomes.UNSUPPORTED, "ImageMagick is not installed")
    coder = CODERS[fmt]
    out_coder = _OUTPUT_CODERS[spec.format]
    argv = [exe]
    for name, value in (
        ("thread", "1"),
        ("memory", MEMORY_LIMIT),
        ("map", MAP_LIMIT),
        ("disk", DISK_LIMIT),
        ("area", str(spec.max_pixels)),
        ("time", str(TIME_LIMIT_SECONDS)),
    ):
        argv += ["-limit", name, value]
    if fmt == "jpeg":
        # Shrink-on-load: libjpeg decodes at the smallest DCT scale that covers this size.
        argv += ["-define", f"jpeg:size={size_hint[0]}x{size_hint[1]}"]
    argv.append(f"{coder}:-[0]")
    for i, (size, name) in enumerate(outputs):
        # '>' only ever shrinks; -thumbnail keeps the colour profile until -profile uses it.
        argv += ["-thumbnail", f"{size}x{size}>"]
        if i == 0:
            # Colour and orientation once, on the largest thumbnail (never the full picture).
            if convert_profile:
                argv += ["-profile", SRGB_PROFILE]
            argv += ["-colorspace", "sRGB", "-auto-orient"]
            if spec.format == "jpeg":
                argv += ["-background", "white", "-alpha", "remove", "-alpha", "off"]
            argv += ["-strip", "-quality", str(spec.quality)]
        target = f"{out_coder}:{name}"
        argv += ["-write", target] if i < len(outputs) - 1 else [target]
    return argv


def convert(
    data: bytes | memoryview,
    fmt: str,
    spec: ThumbnailSettings,
    full_size: tuple[int, int] | None,
    paths: dict[int, str],
    timings: dict[str, float],
    *,
    convert_profile: bool = False,
) -> dict[int, ThumbnailFile]:
    """Run ImageMagick once for every size; full_size (from the header, if known) sizes the
    shrink-on-load hint; convert_profile as for command()."""
    sizes = sorted(paths, reverse=True)
    folder = make_folder(paths[sizes[0]])
    temps = {size: temp_name(paths[size]) for size in sizes}
    largest = sizes[0]
    hint = jpegdraft.fitted(*full_size, largest) if full_size else (largest, largest)
    names = [(s, os.path.basename(temps[s])) for s in sizes]
    argv = command(fmt, spec, hint, names, convert_profile=convert_profile)
    clock = time.perf_counter()
    try:
        stderr = run(argv, data, cwd=folder)
        timings["magick"] = time.perf_counter() - clock
        clock = time.perf_counter()
        written: dict[int, ThumbnailFile] = {}
        for size in sizes:
            try:
                with Image.open(temps[size]) as im:
                    width, height = im.size
            except (OSError, ValueError, SyntaxError) as exc:
                detail = f" ({stderr})" if stderr else ""
                raise ConversionError(
                    outcomes.CORRUPT, f"ImageMagick wrote no readable {spec.format}{detail}"
                ) from exc
            commit_file(temps[size], paths[size])
            written[size] = ThumbnailFile(size, paths[size], width, height)
        timings["write"] = time.perf_counter() - clock
        return written
    finally:
        for tmp in temps.values():
            discard(tmp)


def run(
    argv: list[str],
    data: bytes | memoryview,
    cwd: str,
    timeout: float = TIME_LIMIT_SECONDS + 10,
) -> str:
    """Run one ImageMagick child on data (stdin); return its warnings or raise for its errors."""
    global _libc
    if _libc is None:
        # Loaded here, in the worker, so the forked child only has to call it.
        _libc = ctypes.CDLL(None, use_errno=True)
    try:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            cwd=cwd,
            env=child_environment(),
            close_fds=True,
            process_group=0,
            preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        )
    except OSError as exc:
        raise ConversionError(
            outcomes.UNSUPPORTED, f"cannot start ImageMagick ({argv[0]}): {exc.strerror}"
        ) from exc
    try:
        try:
            _out, err = proc.communicate(bytes(data), timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ConversionError(
                outcomes.TIMEOUT, f"ImageMagick ran longer than {timeout:g} s"
            ) from None
    finally:
        if proc.returncode is None:
            _kill_group(proc)
    text = err.decode("utf-8", "replace")
    if proc.returncode != 0:
        raise error_for(proc.returncode, text, cwd)
    lowered = text.lower()
    if "premature end of jpeg file" in lowered:
        # ImageMagick "succeeds" on a truncated JPEG, filling the rest with grey.
        raise ConversionError(
            outcomes.TRUNCATED, "jpeg data ends early (ImageMagick: Premature end of JPEG file)"
        )
    return _summary(text)


def _die_with_parent(parent_pid: int) -> None:
    """preexec_fn, in the forked child before exec: die with the worker.

    preexec_fn is unsafe in a multi-threaded parent (a lock held by another thread at fork
    stays locked forever in the child); the converter worker is single-threaded, so it is safe
    here. PR_SET_PDEATHSIG fires when the forking thread dies: the worker's only thread.
    """
    assert _libc is not None
    if _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)
    if os.getppid() != parent_pid:  # the worker died before prctl took effect
        os._exit(126)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the child's whole process group (its own delegates included) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def error_for(returncode: int, stderr: str, folder: str = "") -> ConversionError:
    """Map a failed ImageMagick run (writing into folder) to a reason by its messages."""
    lowered = stderr.lower()
    summary = _summary(stderr) or f"no picture could be read (exit status {returncode})"
    if any(word in lowered for word in _DISK_FULL):
        return ConversionError(outcomes.DISK_FULL, f"no space left in thumbnail folder {folder}")
    if folder and (
        any(word in lowered for word in _WRITE_FAILED)
        or ("unable to open image" in lowered and folder in stderr)
    ):
        # A full disk often shows only as "unable to write file": the folder's problem,
        # never the image's (it must not fail as corrupt).
        return _write_failed(folder, summary)
    if returncode < 0:
        return ConversionError(
            outcomes.CRASHED, f"ImageMagick died of signal {-returncode}: {summary}"
        )
    if any(word in lowered for word in _TIMEOUT):
        return ConversionError(outcomes.TIMEOUT, f"ImageMagick: {summary}")
    if any(word in lowered for word in _TOO_LARGE):
        return ConversionError(outcomes.TOO_LARGE, f"ImageMagick: {summary}")
    if any(word in lowered for word in _UNSUPPORTED):
        return ConversionError(outcomes.UNSUPPORTED, f"ImageMagick: {summary}")
    if any(word in lowered for word in _TRUNCATED):
        return ConversionError(outcomes.TRUNCATED, f"ImageMagick: {summary}")
    return ConversionError(outcomes.CORRUPT, f"ImageMagick: {summary}")


def _write_failed(folder: str, summary: str) -> ConversionError:
    try:
        st = os.statvfs(folder)
        full = st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES
    except OSError:
        full = False
    if full:
        return ConversionError(outcomes.DISK_FULL, f"no space left in thumbnail folder {folder}")
    return ConversionError(outcomes.IO_ERROR, f"writing to thumbnail folder {folder}: {summary}")


def _summary(stderr: str) -> str:
    """ImageMagick's first error (else its first warning), without its source location and
    without the name of its temporary copy of stdin."""
    messages = []
    for line in stderr.splitlines():
        line = line.strip()
        if not line or "no images defined" in line:
            continue
        message, _, where = line.partition(" @ ")
        if message.startswith(("convert: ", "magick: ")):
            message = message.split(": ", 1)[1]
        message = _TEMP_COPY.sub("", message.split(" `", 1)[0]).strip()
        messages.append((not where.startswith(("error/", "fatal/")), message[:300]))
    errors = [message for is_warning, message in messages if not is_warning]
    return (errors or [message for _, message in messages] or [""])[0]
