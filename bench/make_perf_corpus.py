"""Make the benchmarks' perf corpus: many camera-sized JPEGs grown from a few real photos.

The benchmarks time photoscand and its yardsticks on photos as a current camera writes them
(12 MP, baseline JPEG, full EXIF, a third of them stored rotated), and they need hundreds of
them. The repository cannot carry that many, so this script makes them from the largest real
camera photos in tests/corpus: every output is a fresh crop of one of them, so the pixels stay
photographic (JPEG decoding time depends on content), and its EXIF block is the one a camera
would write, with the source's exposure settings.

The output depends on nothing but the inputs and the Pillow build: every file draws its
choices from its own random generator, seeded with the seed and the file's index, so the
order in which the worker processes finish does not matter and the same arguments always
give byte-identical files. That is what lets the benchmarks cache a corpus under the name
of its arguments.

    .venv/bin/python bench/make_perf_corpus.py OUTDIR                 # 200 files, 12 MP, q90
    .venv/bin/python bench/make_perf_corpus.py OUTDIR -n 20 --verify  # read every file back
"""

from __future__ import annotations

import argparse
import csv
import datetime
import functools
import hashlib
import io
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps
from PIL.ExifTags import IFD, Base
from PIL.TiffImagePlugin import IFDRational

REPO = Path(__file__).resolve().parent.parent
CORPUS = REPO / "tests" / "corpus"
MANIFEST_NAME = "perf-manifest.csv"
MANIFEST_FIELDS = (
    "file",
    "source",
    "Make",
    "Model",
    "DateTimeOriginal",
    "Orientation",
    "stored_size",
    "display_size",
    "bytes",
    "sha256",
)
EXIF_DATE = "%Y:%m:%d %H:%M:%S"
# Consecutive files are 7 minutes apart plus up to 419 s: dates stay distinct and in order.
MINUTES_PER_FILE = 7
JITTER_SECONDS = 7 * 60
CROP_SHARE = (0.55, 1.0)  # each side of a crop, as a share of the largest crop of the aspect
# The settings of the shot, copied from the source so that every field a catalog reads is
# realistic; the maker notes and GPS are left behind.
EXPOSURE_TAGS = (
    Base.ExposureTime,
    Base.FNumber,
    Base.ExposureProgram,
    Base.ISOSpeedRatings,
    Base.ShutterSpeedValue,
    Base.ApertureValue,
    Base.ExposureBiasValue,
    Base.MeteringMode,
    Base.Flash,
    Base.FocalLength,
    Base.ExposureMode,
    Base.WhiteBalance,
    Base.FocalLengthIn35mmFilm,
    Base.SceneCaptureType,
    Base.LensMake,
    Base.LensModel,
)


@dataclass(frozen=True)
class Layout:
    """How a shot is held and stored: the EXIF Orientation and the transpose that stores it.

    `store` turns the upright picture into the pixels a camera writes with that tag, the
    inverse of what a viewer applies (Orientation 6: stored turned a quarter to the left,
    shown turned a quarter to the right).
    """

    share: float
    orientation: int
    portrait: bool  # the upright picture is taller than wide
    store: Image.Transpose | None


LAYOUTS = (
    Layout(0.52, 1, False, None),  # landscape
    Layout(0.14, 1, True, None),  # portrait, turned upright in the camera (phones)
    Layout(0.16, 6, True, Image.Transpose.ROTATE_90),  # camera turned a quarter to the right
    Layout(0.08, 8, True, Image.Transpose.ROTATE_270),  # camera turned a quarter to the left
    Layout(0.10, 3, False, Image.Transpose.ROTATE_180),  # camera upside down
)


@dataclass(frozen=True)
class Source:
    """One real photo that outputs are cut from, with the identity it lends them."""

    rel: str  # path under tests/corpus, as in its MANIFEST.csv
    make: str
    model: str
    taken: datetime.datetime


@dataclass(frozen=True)
class Plan:
    """Every random choice of one output file, drawn before any pixel is touched."""

    index: int
    source: Source
    layout: Layout
    crop_share: float
    crop_x: float  # where the crop sits in the slack left by it, 0 (left) to 1 (right)
    crop_y: float
    mirrored: bool
    taken: datetime.datetime

    @property
    def name(self) -> str:
        return f"perf_{self.index:05d}.jpg"


@dataclass(frozen=True)
class Settings:
    """What every file shares: where it goes and how big and how compressed it is."""

    outdir: Path
    width: int  # of the landscape picture; portraits swap the two
    height: int
    quality: int


# --------------------------------------------------------------------------- choices


def pick_sources(manifest: Path, count: int) -> list[Source]:
    """The largest real camera JPEGs that Pillow decodes and that say who took them and when.

    One per make, so the corpus mixes the EXIF layouts of several makers; largest first, so
    outputs are mostly cut down rather than blown up. Ties go by path, for a stable choice.
    """
    with manifest.open(encoding="utf-8", newline="") as fh:
        rows = list(csv.DictReader(fh))
    candidates = []
    for row in rows:
        taken = _exif_date(row["DateTimeOriginal"])
        usable = (
            row["MIMEType"] == "image/jpeg"
            and row["pillow"].startswith("ok:JPEG")
            and row["Make"].strip()
            and taken is not None
            and row["ImageWidth"].isdigit()
            and row["ImageHeight"].isdigit()
        )
        if usable:
            pixels = int(row["ImageWidth"]) * int(row["ImageHeight"])
            source = Source(row["path"], row["Make"].strip(), row["Model"].strip(), taken)
            candidates.append((-pixels, row["path"], source))
    chosen: dict[str, Source] = {}
    for _, _, source in sorted(candidates, key=lambda c: c[:2]):
        if source.make.lower() not in chosen and len(chosen) < count:
            chosen[source.make.lower()] = source
    return list(chosen.values())


def _exif_date(text: str) -> datetime.datetime | None:
    """An EXIF date (`YYYY:MM:DD HH:MM:SS`, maybe followed by more), or None if it is not one."""
    try:
        return datetime.datetime.strptime(text.strip()[:19], EXIF_DATE)
    except ValueError:
        return None


def target_size(megapixels: float) -> tuple[int, int]:
    """The 4:3 landscape size of about `megapixels`, its width a multiple of 16 as cameras do."""
    width = round(math.sqrt(megapixels * 1e6 * 4 / 3) / 16) * 16
    return width, round(width * 3 / 4)


def plan_file(index: int, seed: int, sources: Sequence[Source]) -> Plan:
    """Draw one file's choices from a generator of its own, so no other file can shift them."""
    rng = random.Random(f"{seed}/{index}")
    source = rng.choice(sources)
    layout = rng.choices(LAYOUTS, weights=[lay.share for lay in LAYOUTS])[0]
    crop_share = rng.uniform(*CROP_SHARE)
    crop_x, crop_y = rng.random(), rng.random()
    mirrored = rng.random() < 0.5
    offset = datetime.timedelta(
        minutes=MINUTES_PER_FILE * index, seconds=rng.randrange(JITTER_SECONDS)
    )
    return Plan(index, source, layout, crop_share, crop_x, crop_y, mirrored, source.taken + offset)


# --------------------------------------------------------------------------- pixels and EXIF


@functools.cache
def load_source(path: Path) -> tuple[Image.Image, dict[int, object]]:
    """A source's upright RGB pixels and its exposure tags, decoded once per process.

    Made upright first so that a crop shows the scene the right way up, whatever the
    source's own Orientation; the output's tag then describes only the output's storage.
    """
    with Image.open(path) as im:
        exif_ifd = im.getexif().get_ifd(IFD.Exif)
        upright = ImageOps.exif_transpose(im).convert("RGB")
    exposure = {}
    for tag in EXPOSURE_TAGS:
        value = _clean_value(exif_ifd.get(tag))
        if value is not None:
            exposure[int(tag)] = value
    return upright, exposure


def _clean_value(value: object) -> object | None:
    """A tag value Pillow can write again, or None for one that is missing or unusable.

    Camera strings are often padded with spaces or NULs, and a rational may have a zero
    denominator; neither is worth carrying into files that a benchmark reads.
    """
    if isinstance(value, str):
        return value.strip(" \x00") or None
    if isinstance(value, IFDRational):
        return value if value.denominator else None
    if isinstance(value, int):
        return value
    if isinstance(value, tuple) and value:
        cleaned = tuple(_clean_value(v) for v in value)
        return cleaned if None not in cleaned else None
    return None


def crop_box(size: tuple[int, int], aspect: float, plan: Plan) -> tuple[float, ...]:
    """The plan's crop of a picture of `size`: a share of the largest crop of `aspect`."""
    width, height = size
    full_w, full_h = (
        (height * aspect, height) if width / height > aspect else (width, width / aspect)
    )
    crop_w, crop_h = full_w * plan.crop_share, full_h * plan.crop_share
    left = (width - crop_w) * plan.crop_x
    top = (height - crop_h) * plan.crop_y
    return left, top, left + crop_w, top + crop_h


def build_exif(plan: Plan, stored: tuple[int, int], exposure: dict[int, object]) -> bytes:
    """The EXIF block of one file: who took it and when, how it is stored, how it was shot."""
    stamp = plan.taken.strftime(EXIF_DATE)
    exif = Image.Exif()
    exif[Base.Make] = plan.source.make
    if plan.source.model:
        exif[Base.Model] = plan.source.model
    exif[Base.Orientation] = plan.layout.orientation
    exif[Base.XResolution] = IFDRational(72)
    exif[Base.YResolution] = IFDRational(72)
    exif[Base.ResolutionUnit] = 2  # inches
    exif[Base.DateTime] = stamp
    exif[IFD.Exif] = {
        **exposure,
        Base.DateTimeOriginal: stamp,
        Base.DateTimeDigitized: stamp,
        Base.ColorSpace: 1,  # sRGB
        Base.ExifImageWidth: stored[0],
        Base.ExifImageHeight: stored[1],
    }
    return exif.tobytes()


def render(plan: Plan, settings: Settings) -> dict[str, str]:
    """Make, write and describe one file; returns its row of the perf manifest."""
    upright, exposure = load_source(CORPUS / plan.source.rel)
    display = (settings.width, settings.height)
    if plan.layout.portrait:
        display = (settings.height, settings.width)
    box = crop_box(upright.size, display[0] / display[1], plan)
    picture = upright.resize(display, Image.Resampling.BICUBIC, box=box)
    if plan.mirrored:
        picture = picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    stored = picture.transpose(plan.layout.store) if plan.layout.store else picture
    buf = io.BytesIO()
    stored.save(
        buf,
        "JPEG",
        quality=settings.quality,
        subsampling="4:2:0",
        progressive=False,
        optimize=False,
        dpi=(72, 72),  # the JFIF header then agrees with the EXIF resolution
        exif=build_exif(plan, stored.size, exposure),
    )
    data = buf.getvalue()
    (settings.outdir / plan.name).write_bytes(data)
    return {
        "file": plan.name,
        "source": plan.source.rel,
        "Make": plan.source.make,
        "Model": plan.source.model,
        "DateTimeOriginal": plan.taken.strftime(EXIF_DATE),
        "Orientation": str(plan.layout.orientation),
        "stored_size": "{}x{}".format(*stored.size),
        "display_size": "{}x{}".format(*display),
        "bytes": str(len(data)),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _render_job(job: tuple[Plan, Settings]) -> dict[str, str]:
    return render(*job)


# --------------------------------------------------------------------------- the corpus


def make_corpus(plans: Sequence[Plan], settings: Settings, jobs: int) -> list[dict[str, str]]:
    """Render every plan, in `jobs` processes when there is more than one; rows in file order."""
    work = [(plan, settings) for plan in plans]
    if jobs <= 1:
        return _with_progress(map(_render_job, work), len(work))
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        return _with_progress(pool.map(_render_job, work), len(work))


def _with_progress(rows: Iterable[dict[str, str]], total: int) -> list[dict[str, str]]:
    """Collect the rows, saying on stderr how far it got (a large corpus takes minutes)."""
    done: list[dict[str, str]] = []
    step = max(1, total // 10)
    for row in rows:
        done.append(row)
        if len(done) % step == 0 or len(done) == total:
            print(f"  {len(done)}/{total} files", file=sys.stderr, flush=True)
    return done


def write_manifest(outdir: Path, rows: Sequence[dict[str, str]]) -> None:
    """Written last and replaced atomically: a folder with a manifest holds a whole corpus."""
    tmp = outdir / f".{MANIFEST_NAME}.tmp"
    with tmp.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=MANIFEST_FIELDS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, outdir / MANIFEST_NAME)


def verify(outdir: Path, rows: Sequence[dict[str, str]]) -> list[str]:
    """Read every file back with Pillow and list each way it differs from its manifest row.

    What the benchmarks rely on: the identity and date a catalog reads, the Orientation
    that thumbnailers must apply, the stored and upright sizes, baseline coding, the bytes.
    """
    problems = []
    for row in rows:
        path = outdir / row["file"]
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as im:
            exif = im.getexif()
            orientation = exif.get(Base.Orientation, 1)
            width, height = im.size
            display = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
            found = {
                "Make": exif.get(Base.Make, ""),
                "Model": exif.get(Base.Model, ""),
                "DateTimeOriginal": exif.get_ifd(IFD.Exif).get(Base.DateTimeOriginal, ""),
                "Orientation": str(orientation),
                "stored_size": f"{width}x{height}",
                "display_size": "{}x{}".format(*display),
                "bytes": str(len(data)),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
            if im.format != "JPEG" or im.info.get("progressive"):
                problems.append(f"{row['file']}: not a baseline JPEG")
        problems += [
            f"{row['file']}: {key} is {value!r}, the manifest says {row[key]!r}"
            for key, value in found.items()
            if value != row[key]
        ]
    return problems


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description="Make a deterministic corpus of camera-sized JPEGs from tests/corpus.",
    )
    ap.add_argument("outdir", type=Path, help="folder for the files and perf-manifest.csv")
    ap.add_argument("-n", "--count", type=int, default=200, help="files [%(default)s]")
    ap.add_argument(
        "--megapixels", type=float, default=12.0, help="size of each file [%(default)s]"
    )
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality [%(default)s]")
    ap.add_argument(
        "--sources", type=int, default=4, help="real photos to cut from, one per make [%(default)s]"
    )
    ap.add_argument("--seed", type=int, default=1, help="names the corpus [%(default)s]")
    ap.add_argument(
        "--jobs",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="worker processes; the output does not depend on it [%(default)s]",
    )
    ap.add_argument(
        "--verify", action="store_true", help="read every file back; exit 1 on a mismatch"
    )
    args = ap.parse_args(argv)
    for name, low in (("count", 1), ("sources", 1), ("jobs", 1)):
        if getattr(args, name) < low:
            ap.error(f"--{name} must be at least {low}")
    if not 1 <= args.quality <= 100:
        ap.error("--quality must be between 1 and 100")
    if not args.megapixels > 0:
        ap.error("--megapixels must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    sources = pick_sources(CORPUS / "MANIFEST.csv", args.sources)
    if not sources:
        print(f"no usable source photo in {CORPUS / 'MANIFEST.csv'}", file=sys.stderr)
        return 2
    width, height = target_size(args.megapixels)
    args.outdir.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.outdir, width, height, args.quality)
    plans = [plan_file(i, args.seed, sources) for i in range(args.count)]
    print(
        f"making {args.count} photos of {width}x{height} at quality {args.quality} from "
        + ", ".join(s.rel for s in sources),
        file=sys.stderr,
        flush=True,
    )
    started = time.monotonic()
    rows = make_corpus(plans, settings, args.jobs)
    write_manifest(args.outdir, rows)
    elapsed = time.monotonic() - started
    total_mb = sum(int(r["bytes"]) for r in rows) / 1e6
    print(f"wrote {len(rows)} files ({total_mb:.0f} MB) to {args.outdir} in {elapsed:.1f} s")
    if args.verify:
        problems = verify(args.outdir, rows)
        for problem in problems:
            print(problem, file=sys.stderr)
        if problems:
            return 1
        print(f"verified {len(rows)} files")
    return 0


if __name__ == "__main__":
    sys.exit(main())
