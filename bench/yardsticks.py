"""The yardsticks photoscand is measured against: best-practice tools doing the same job.

Run as a script it is also the bare pools themselves (`pil-pool`, `pyvips-pool`,
`exifread-loop`, `watch-ref`), so that each is timed as a whole process, start-up included,
like the daemon. Hazard: those entry points must stay lean and must not import the harness
or a second image stack (pyvips loaded next to Pillow changes which libheif each binds to).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

# EXIF orientation -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_TRANSPOSE_NAMES = {
    2: "FLIP_LEFT_RIGHT",
    3: "ROTATE_180",
    4: "FLIP_TOP_BOTTOM",
    5: "TRANSPOSE",
    6: "ROTATE_270",
    7: "TRANSVERSE",
    8: "ROTATE_90",
}


def fit(width: int, height: int, edge: int) -> tuple[int, int]:
    """The size of an image scaled so that its longest edge is `edge` (never enlarged)."""
    if max(width, height) <= edge:
        return width, height
    if width >= height:
        return edge, max(1, round(height * edge / width))
    return max(1, round(width * edge / height)), edge


# --------------------------------------------------------------------------- bare pools (children)


def _pil_job(job: tuple[str, str, tuple[int, ...], int]) -> int:
    """Pillow, decode once: draft to the largest size, shrink, orient, save; smaller from that."""
    from PIL import Image

    path, out, sizes, quality = job
    stem = Path(path).stem
    with Image.open(path) as im:
        orientation = im.getexif().get(0x0112, 1)
        # draft() picks the DCT scale (1/2 for 1440 px, 1/8 for 256 px) so the decoder never
        # produces the full 12 MP; thumbnail() then only resamples the drafted image.
        im.draft("RGB", fit(*im.size, sizes[0]))
        im.thumbnail((sizes[0], sizes[0]))
        # Orientation after shrinking: transposing the full image first would cost a full decode.
        name = _TRANSPOSE_NAMES.get(orientation)
        img = im.transpose(Image.Transpose[name]) if name else im
        img.save(f"{out}/{stem}-{sizes[0]}.jpg", "JPEG", quality=quality)
        for size in sizes[1:]:
            small = img.resize(fit(*img.size, size), Image.Resampling.BICUBIC, reducing_gap=2.0)
            small.save(f"{out}/{stem}-{size}.jpg", "JPEG", quality=quality)
    return 1


def _vips_init() -> None:
    import pyvips

    # No operation cache: each photo is seen once, and the cache would only hold memory.
    pyvips.cache_set_max(0)


def _vips_job(job: tuple[str, str, tuple[int, ...], int]) -> int:
    """pyvips, one decode: thumbnail (shrink-on-load, auto-rotate) to the largest size, kept."""
    import pyvips

    path, out, sizes, quality = job
    stem = Path(path).stem
    img = pyvips.Image.thumbnail(path, sizes[0])
    if len(sizes) > 1:
        # Materialise once; otherwise each further size would re-run the decode pipeline.
        img = img.copy_memory()
    img.write_to_file(f"{out}/{stem}-{sizes[0]}.jpg[Q={quality},strip]")
    for size in sizes[1:]:
        img.thumbnail_image(size).write_to_file(f"{out}/{stem}-{size}.jpg[Q={quality},strip]")
    return 1


def pool_main(
    kind: str, list_file: str, out: str, sizes: tuple[int, ...], quality: int, procs: int
) -> None:
    """A bare pool of `procs` single-threaded workers over the files in list_file."""
    import multiprocessing

    paths = Path(list_file).read_text().split("\n")
    jobs = [(p, out, sizes, quality) for p in paths if p]
    if kind == "pil":
        # Imported before the fork so the workers inherit it; Pillow starts no threads.
        import PIL.Image  # noqa: F401

        fn, init = _pil_job, None
    else:
        # libvips starts threads, so it is imported in each worker, never before the fork.
        os.environ.setdefault("VIPS_CONCURRENCY", "1")
        fn, init = _vips_job, _vips_init
    pool = multiprocessing.get_context("fork").Pool(procs, initializer=init)
    try:
        done = sum(pool.imap_unordered(fn, jobs, chunksize=1))
        pool.close()
    finally:
        # join() waits for the workers, so their CPU shows up in our parent's rusage.
        pool.terminate()
        pool.join()
    print(json.dumps({"files": done}))


def exifread_loop_main(folder: str) -> None:
    """Phase 1 yardstick: exifread on every photo of a folder, one process, nothing stored."""
    import exifread

    files = sorted(e.path for e in os.scandir(folder) if e.name.lower().endswith((".jpg", ".jpeg")))
    with_date = 0
    for path in files:
        with open(path, "rb") as fh:
            tags = exifread.process_file(fh, details=False)
        with_date += "EXIF DateTimeOriginal" in tags
    print(json.dumps({"files": len(files), "with_date": with_date}))


def watch_ref_main(folder: str, catalog: str) -> None:
    """Delay yardstick: watchdog close/move event -> exifread -> one SQLite commit per row.

    The smallest honest pipeline with photoscand's phase 1 shape; it says READY=1 on
    $NOTIFY_SOCKET once the watch is in place, and exits on SIGTERM.
    """
    import datetime
    import queue
    import signal
    import socket
    import sqlite3

    import exifread
    from watchdog.events import FileSystemEventHandler
    from watchdog.observers import Observer

    con = sqlite3.connect(catalog, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.execute("PRAGMA synchronous=NORMAL")
    con.execute(
        "CREATE TABLE IF NOT EXISTS images (id INTEGER PRIMARY KEY, path BLOB UNIQUE,"
        " discovered_at TEXT, taken_at TEXT)"
    )
    events: queue.Queue[str] = queue.Queue()

    class Handler(FileSystemEventHandler):
        # Only enqueue: an exception in a handler would kill watchdog's thread for good.
        def on_closed(self, event):
            events.put(os.fsdecode(event.src_path))

        def on_moved(self, event):
            events.put(os.fsdecode(event.dest_path))

    stop = False

    def on_term(_signum, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    observer = Observer()
    observer.schedule(Handler(), folder, recursive=True)
    observer.start()
    if sock_path := os.environ.get("NOTIFY_SOCKET"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.sendto(b"READY=1", sock_path)
    try:
        while not stop:
            try:
                path = events.get(timeout=0.1)
            except queue.Empty:
                continue
            name = os.path.basename(path)
            if name.startswith(".") or name.endswith((".part", ".tmp")):
                continue
            discovered = datetime.datetime.now(datetime.UTC).isoformat()
            with open(path, "rb") as fh:
                tags = exifread.process_file(fh, details=False)
            con.execute(
                "INSERT OR IGNORE INTO images (path, discovered_at, taken_at) VALUES (?, ?, ?)",
                (os.fsencode(path), discovered, str(tags.get("EXIF DateTimeOriginal", ""))),
            )
    finally:
        observer.stop()
        observer.join()
        con.close()


# --------------------------------------------------------------------------- methods (parent side)
# The harness is imported inside these functions, not at the top: the pools above run this
# file as a script and must start without the harness's imports.


def _self_argv(*args: str) -> list[str]:
    import harness

    return [harness.venv_python(), str(HERE / "yardsticks.py"), *args]


def _sizes_arg(sizes: tuple[int, ...]) -> str:
    return ",".join(str(s) for s in sizes)


def load_display_sizes(corpus: Path) -> dict[str, tuple[int, int]]:
    """Stem -> upright (displayed) size, from the corpus manifest."""
    out = {}
    with open(corpus / "perf-manifest.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            w, h = row["display_size"].split("x")
            out[Path(row["file"]).stem] = (int(w), int(h))
    return out


def check_thumbnail(path: Path, size: int, upright: tuple[int, int] | None) -> str | None:
    """One output: longest edge `size` (±1), upright like the photo, no metadata."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            has_exif = bool(im.info.get("exif")) or bool(im.getexif())
    except OSError as exc:
        return f"{path.name}: unreadable ({exc})"
    if abs(max(w, h) - size) > 1:
        return f"{path.name}: {w}x{h}, longest edge should be {size}"
    if upright is not None and (w > h) != (upright[0] > upright[1]):
        return f"{path.name}: {w}x{h} is not upright (photo displays as {upright[0]}x{upright[1]})"
    if has_exif:
        return f"{path.name}: metadata not stripped"
    return None


def thumbnails_checker(sizes: tuple[int, ...]):
    """Full check of the outputs `<stem>-<size>.jpg`: every file, size, orientation, no EXIF."""

    def check(ctx, _m) -> str | None:
        upright = load_display_sizes(ctx.corpus)
        for p in ctx.files:
            for size in sizes:
                err = check_thumbnail(
                    ctx.out_dir / f"{p.stem}-{size}.jpg", size, upright.get(p.stem)
                )
                if err:
                    return err
        return None

    return check


def count_checker(expected_per_file: int):
    def check(ctx, _m) -> str | None:
        n = sum(1 for _ in ctx.out_dir.iterdir())
        want = expected_per_file * len(ctx.files)
        return None if n == want else f"{n} outputs, expected {want}"

    return check


def json_checker(key: str, *also: str):
    """For the scripts that print a JSON summary: `key` (and `also`) must equal the file count."""

    def check(ctx, _m) -> str | None:
        try:
            got = json.loads((ctx.run_dir / "stdout").read_text())
        except (OSError, ValueError) as exc:
            return f"no summary on stdout ({exc})"
        for k in (key, *also):
            if got.get(k) != len(ctx.files):
                return f"{k} = {got.get(k)}, expected {len(ctx.files)}"
        return None

    return check


def cat_method():
    from harness import Invocation, Method

    return Method(
        "cat",
        "cat (raw read, warm cache)",
        lambda ctx: Invocation(["xargs", "-a", str(ctx.list_file), "cat"]),
    )


def djpeg_method(denominator: int, procs: int = 2):
    """The decode floor: djpeg at DCT scale 1/denominator, one process per file, `procs` at once."""
    from harness import Invocation, Method

    floor_of = {8: "floor for 256 px", 2: "floor for 1440 px"}.get(denominator, "decode only")
    return Method(
        f"djpeg_1_{denominator}",
        f"djpeg -scale 1/{denominator}, {procs} procs ({floor_of})",
        lambda ctx: Invocation(
            [
                *("xargs", "-a", str(ctx.list_file), f"-P{procs}", "-n1"),
                *("djpeg", "-scale", f"1/{denominator}", "-outfile", "/dev/null"),
            ]
        ),
    )


def magick_method(parallel: bool, sizes: tuple[int, ...], quality: int = 80):
    """ImageMagick 6 `convert`: two single-threaded converts at a time (``parallel``, as
    photoscand's pool runs), or one at a time with two threads.

    One decode per photo (jpeg:size shrink-on-load hint for the largest size, -thumbnail,
    -auto-orient after shrinking, -strip), every further size made from the previous with -write.
    """
    from harness import Invocation, Method

    procs, threads = (2, 1) if parallel else (1, 2)
    hint = sizes[0] if sizes[0] >= 1000 else 2 * sizes[0]

    def build(ctx):
        argv = ["xargs", "-a", str(ctx.stems_file), f"-P{procs}", "-I{}", "convert"]
        argv += ["-limit", "thread", str(threads), "-define", f"jpeg:size={hint}x{hint}"]
        argv += [f"{ctx.corpus}/{{}}.jpg", "-thumbnail", f"{sizes[0]}x{sizes[0]}", "-auto-orient"]
        argv += ["-strip", "-quality", str(quality)]
        for i, size in enumerate(sizes):
            if i:
                argv += ["-thumbnail", f"{size}x{size}"]
            target = f"{ctx.out_dir}/{{}}-{size}.jpg"
            argv += [target] if i == len(sizes) - 1 else ["-write", target]
        return Invocation(argv)

    label = f"ImageMagick ({procs} at a time, {threads} thread{'s' * (threads > 1)})"
    label += f", jpeg:size={hint}, -thumbnail"
    return Method(
        "im_parallel" if parallel else "im_threads",
        label,
        build,
        check=thumbnails_checker(sizes),
        check_every_run=count_checker(len(sizes)),
    )


def vipsthumbnail_method(sizes: tuple[int, ...], quality: int = 80, batch: int = 10):
    """vipsthumbnail in 2 parallel processes of `batch` files; it makes one size per call,
    so a user making two sizes runs it twice over the originals (two decodes per photo)."""
    from harness import Invocation, Method

    def build(ctx):
        calls = [
            f'xargs -a "$1" -P2 -n{batch} vipsthumbnail -s {s}'
            f' -o "$2/%s-{s}.jpg[Q={quality},strip]"'
            for s in sizes
        ]
        script = "set -e; " + "; ".join(calls)
        return Invocation(
            ["sh", "-c", script, "sh", str(ctx.list_file), str(ctx.out_dir)],
            env={"VIPS_CONCURRENCY": "1"},
        )

    calls = (
        f"{len(sizes)} calls ({', then '.join(map(str, sizes))}), each from the original"
        if len(sizes) > 1
        else "1 call"
    )
    return Method(
        "vipsthumbnail",
        f"vipsthumbnail, 2 procs × {batch} files, {calls}",
        build,
        check=thumbnails_checker(sizes),
        check_every_run=count_checker(len(sizes)),
    )


def pool_method(kind: str, sizes: tuple[int, ...], quality: int = 80, procs: int = 2):
    """A bare pool script (Pillow draft-to-target or pyvips), one decode per photo."""
    from harness import Invocation, Method

    label = {
        "pil": "bare Pillow pool, draft to target",
        "vips": "bare pyvips pool (thumbnail, then smaller from memory)",
    }[kind]
    if len(sizes) > 1:
        label += f", {' → '.join(map(str, sizes))}"
    label += f", {procs} workers"

    def build(ctx):
        return Invocation(
            _self_argv(
                f"{'pil' if kind == 'pil' else 'pyvips'}-pool",
                *(str(ctx.list_file), str(ctx.out_dir), "--sizes", _sizes_arg(sizes)),
                *("--quality", str(quality), "--procs", str(procs)),
            ),
            env={"VIPS_CONCURRENCY": "1"} if kind == "vips" else {},
            stdout=ctx.run_dir / "stdout",
        )

    key = {"pil": "pil_pool", "vips": "pyvips_pool"}[kind]
    return Method(
        key,
        label,
        build,
        check=thumbnails_checker(sizes),
        check_every_run=count_checker(len(sizes)),
    )


def thumbnail_yardsticks(sizes: tuple[int, ...] = (1440, 256), quality: int = 80) -> list:
    """Every thumbnail yardstick for photos made at `sizes` (largest first)."""
    sizes = tuple(sorted(sizes, reverse=True))
    methods = [cat_method(), djpeg_method(8)]
    if sizes[0] > 256:
        methods.append(djpeg_method(2))
    methods += [
        pool_method("pil", sizes, quality),
        pool_method("vips", sizes, quality),
        vipsthumbnail_method(sizes, quality),
        magick_method(True, sizes, quality),
        magick_method(False, sizes, quality),
    ]
    return methods


def exiftool_method():
    from harness import Invocation, Method

    def check(ctx, _m):
        try:
            rows = json.loads((ctx.run_dir / "stdout").read_text())
        except (OSError, ValueError) as exc:
            return f"unreadable exiftool output ({exc})"
        with_date = sum(1 for r in rows if "DateTimeOriginal" in r)
        if len(rows) != len(ctx.files) or with_date != len(rows):
            return (
                f"{len(rows)} files, {with_date} with DateTimeOriginal, expected {len(ctx.files)}"
            )
        return None

    return Method(
        "exiftool",
        "exiftool -fast2 -json DIR (1 process)",
        lambda ctx: Invocation(
            ["exiftool", "-fast2", "-json", str(ctx.corpus)], stdout=ctx.run_dir / "stdout"
        ),
        check_every_run=check,
    )


def exifread_loop_method():
    from harness import Invocation, Method

    return Method(
        "exifread_loop",
        "bare exifread loop, process_file(details=False), 1 process",
        lambda ctx: Invocation(
            _self_argv("exifread-loop", str(ctx.corpus)), stdout=ctx.run_dir / "stdout"
        ),
        check_every_run=json_checker("files", "with_date"),
    )


def watch_ref_argv(folder: Path, catalog: Path) -> list[str]:
    """Command line of the bare watchdog + exifread + SQLite delay reference."""
    return _self_argv("watch-ref", str(folder), str(catalog))


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description="The bare yardstick programs, run by bench/thumbnails.py and bench/phase1.py "
        "as whole processes. Not a benchmark by itself."
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    for kind, what in (("pil", "Pillow, draft to target"), ("pyvips", "pyvips thumbnail")):
        p = sub.add_parser(f"{kind}-pool", help=f"thumbnails with a bare pool ({what})")
        p.add_argument("list_file", help="file with one photo path per line")
        p.add_argument("out", help="folder for <stem>-<size>.jpg")
        p.add_argument(
            "--sizes", default="1440,256", help="longest edges, largest first [%(default)s]"
        )
        p.add_argument("--quality", type=int, default=80, help="JPEG quality [%(default)s]")
        p.add_argument("--procs", type=int, default=2, help="worker processes [%(default)s]")
    p = sub.add_parser("exifread-loop", help="exifread over every photo of a folder")
    p.add_argument("folder")
    p = sub.add_parser(
        "watch-ref", help="bare watchdog + exifread + SQLite reference for the delay"
    )
    p.add_argument("folder")
    p.add_argument("catalog")
    args = ap.parse_args(argv)
    if args.cmd in ("pil-pool", "pyvips-pool"):
        sizes = tuple(sorted((int(s) for s in args.sizes.split(",")), reverse=True))
        kind = "pil" if args.cmd == "pil-pool" else "vips"
        pool_main(kind, args.list_file, args.out, sizes, args.quality, args.procs)
    elif args.cmd == "exifread-loop":
        exifread_loop_main(args.folder)
    else:
        watch_ref_main(args.folder, args.catalog)


if __name__ == "__main__":
    sys.exit(main())
