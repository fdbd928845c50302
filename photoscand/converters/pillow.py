"""The Pillow backend: one decode per image (shrunk on load), every size derived from it.

Hazards: hostile bytes reach decoders, so only an allowlist of Pillow plugins may open them,
the pixel count is checked from the header before any pixel is decoded (Pillow's own bomb
limit set to the same value, its warning made an error), and truncated data fails instead of
decoding to a grey half. Orientation is applied once, after shrinking (rotating a full-size
picture costs more than decoding it).
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from dataclasses import dataclass

from PIL import Image, ImageFile, UnidentifiedImageError

from photoscand import outcomes
from photoscand.converters import color, heif, jpegdraft
from photoscand.converters.model import ConversionError
from photoscand.converters.output import write_file
from photoscand.protocol import ThumbnailFile, ThumbnailSettings

# Sniffed format -> the Pillow plugins allowed to open it (nothing else is ever tried).
PLUGINS: dict[str, list[str]] = {
    "jpeg": ["JPEG"],  # MPO files open through the JPEG plugin (there is no "MPO" opener)
    "png": ["PNG"],
    "gif": ["GIF"],
    "webp": ["WEBP"],
    "tiff": ["TIFF"],
    "heif": ["HEIF"],
    "avif": ["AVIF"],
}

_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ORIENTATION_TAG = 0x0112
_DNG_VERSION_TAG = 50706

# Exceptions Pillow's plugins raise on malformed input (Pillow's fuzzers allow exactly these,
# plus struct/Index/Key errors from hand-written parsers and RuntimeError from pillow-heif).
_DECODER_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    EOFError,
    IndexError,
    KeyError,
    struct.error,
    ZeroDivisionError,
    OverflowError,
    NotImplementedError,
    RuntimeError,
)
_MISSING_CODEC = (
    "not configured",
    "not available",
    "not supported",
    "unsupported",
    "cannot handle",
)
_TRUNCATED = ("truncated", "end of file", "end of data", "premature end", "unexpected end")
# HEIF/AVIF metadata ('meta' with its 'ispe' boxes) comes first in every file we have seen.
_HEIF_HEADER_BYTES = 1 << 16
# TIFF compressions that libtiff only decodes when built with an extra library.
_OPTIONAL_TIFF_CODECS = frozenset({"webp", "zstd", "lzma", "tiff_sgilog", "tiff_sgilog24"})
_RESAMPLE = Image.Resampling.BICUBIC
# resize() first box-reduces by whole factors while the rest stays >= 2x the target: nearly
# free in quality, and it makes deriving 256 px from 1440 px ~2x cheaper.
_REDUCING_GAP = 2.0


class RawInTiff(Exception):
    """The TIFF is a DNG (it has a DNGVersion tag): the camera RAW path must take it."""


@dataclass(slots=True)
class Decoded:
    """A decoded picture and what rendering still has to do with it."""

    image: Image.Image
    full_size: tuple[int, int]  # the picture's size before shrink-on-load (same orientation)
    orientation: int  # EXIF orientation still to apply, 1 when upright
    icc: bytes | None
    source: str  # how the pixels were obtained ("jpeg 3/8", "heif thumbnail 320x240", ...)


def configure(max_pixels: int) -> None:
    """Process-wide Pillow settings for a worker (cheap; called for every conversion)."""
    Image.MAX_IMAGE_PIXELS = max_pixels
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    heif.register()


def bomb_error(exc: Exception, max_pixels: int) -> ConversionError:
    """Pillow's decompression-bomb check, in the words of the other too_large failures."""
    match = re.search(r"\((\d+) pixels\)", str(exc))
    count = f"{int(match.group(1)):,} pixels" if match else "too many pixels"
    return ConversionError(outcomes.TOO_LARGE, f"{count}, over workers.max_pixels ({max_pixels:,})")


def declared_heif_size(data: bytes | memoryview) -> tuple[int, int] | None:
    """The largest picture an ISO-BMFF (HEIF/AVIF) file declares in its 'ispe' boxes.

    Read from the raw bytes, because libavif refuses very large pictures with a parse error
    instead of saying how large they are. The primary picture (or its grid) is the largest
    one declared; thumbnails and tiles are smaller.
    """
    head = bytes(data[:_HEIF_HEADER_BYTES])
    best: tuple[int, int] | None = None
    start = 0
    while (at := head.find(b"ispe", start)) != -1:
        start = at + 4
        # An ispe box is exactly 20 bytes: size, 'ispe', version/flags (0), width, height.
        box = head[at - 4 : at + 16]
        if at < 4 or len(box) < 20 or box[:4] != b"\x00\x00\x00\x14" or box[8:12] != bytes(4):
            continue
        width, height = struct.unpack(">II", box[12:20])
        if best is None or width * height > best[0] * best[1]:
            best = (width, height)
    return best


def heif_data_end(data: bytes | memoryview) -> int | None:
    """Where the data of an ISO-BMFF (HEIF/AVIF) file's items ends, from its 'iloc' box.

    Only extents given as file offsets (construction method 0) with a length count; None when
    there is no readable 'iloc' in the header (the decoder then decides).
    """
    head = bytes(data[:_HEIF_HEADER_BYTES])
    at = head.find(b"iloc")
    if at < 4:
        return None
    box = head[at + 4 : at - 4 + int.from_bytes(head[at - 4 : at], "big")]
    pos = 0

    def read(size: int) -> int:
        nonlocal pos
        if size not in (0, 2, 4, 8) or pos + size > len(box):
            raise ValueError("not an iloc box")
        value = int.from_bytes(box[pos : pos + size], "big")
        pos += size
        return value

    try:
        version = box[0]
        if version > 2:
            return None
        pos = 4
        offset_size, length_size = box[pos] >> 4, box[pos] & 15
        base_size = box[pos + 1] >> 4
        index_size = (box[pos + 1] & 15) if version else 0
        pos += 2
        end = 0
        for _ in range(read(2 if version < 2 else 4)):
            read(2 if version < 2 else 4)  # item_ID
            method = read(2) & 15 if version else 0
            read(2)  # data_reference_index
            base = read(base_size)
            extents, extent_size = read(2), index_size + offset_size + length_size
            # Every extent must take bytes of the box: a hostile box of empty extents with
            # huge counts would otherwise loop for seconds (found by bench/fuzz.py).
            if extents * extent_size > len(box) - pos or (extents and not extent_size):
                return None
            for _ in range(extents):
                read(index_size)
                offset, length = read(offset_size), read(length_size)
                if method == 0 and length:
                    end = max(end, base + offset + length)
    except (ValueError, IndexError):
        return None
    return end or None


def missing_codec(im: Image.Image) -> str | None:
    """The TIFF compression this Pillow's libtiff may have been built without, if im uses one."""
    if im.format != "TIFF":
        return None
    compression = im.info.get("compression")
    return compression if compression in _OPTIONAL_TIFF_CODECS else None


def too_large(width: int, height: int, max_pixels: int) -> ConversionError:
    return ConversionError(
        outcomes.TOO_LARGE,
        f"{width}x{height} is {width * height:,} pixels, over workers.max_pixels ({max_pixels:,})",
    )


def open_image(data: bytes | memoryview, fmt: str, max_pixels: int) -> Image.Image:
    """Open (headers only) with the plugins allowed for fmt, and refuse too many pixels."""
    plugins = PLUGINS[fmt]
    if fmt in ("heif", "avif"):
        declared = declared_heif_size(data)
        if declared is not None and declared[0] * declared[1] > max_pixels:
            raise too_large(*declared, max_pixels)
        # libheif decodes a grid whose tiles are cut off without an error, filling the
        # missing tiles: a truncated file must fail as truncated instead.
        end = heif_data_end(data)
        if end is not None and end > len(data):
            raise ConversionError(
                outcomes.TRUNCATED,
                f"the file ends at byte {len(data):,} but its image data runs to byte {end:,}",
            )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        # Pillow says why each plugin refused a file only as warnings, and only when asked.
        previous, Image.WARN_POSSIBLE_FORMATS = Image.WARN_POSSIBLE_FORMATS, True
        try:
            im = Image.open(io.BytesIO(data), formats=plugins)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise bomb_error(exc, max_pixels) from exc
        except UnidentifiedImageError as exc:
            detail = "; ".join(_first_line(w.message) for w in caught if "failed" in str(w.message))
            raise identify_error(fmt, detail) from exc
        except _DECODER_ERRORS as exc:
            raise decoder_error(exc, fmt) from exc
        finally:
            Image.WARN_POSSIBLE_FORMATS = previous
    width, height = im.size
    if width < 1 or height < 1:
        raise ConversionError(outcomes.CORRUPT, f"{fmt} header says {width}x{height} pixels")
    if width * height > max_pixels:
        raise too_large(width, height, max_pixels)
    return im


def decode(
    data: bytes | memoryview,
    fmt: str,
    spec: ThumbnailSettings,
    *,
    orientation: int | None = None,
) -> Decoded:
    """Decode once, at the smallest scale that still covers the largest thumbnail.

    orientation, when given, overrides what the file says (embedded RAW previews).
    """
    im = open_image(data, fmt, spec.max_pixels)
    if fmt == "tiff" and is_dng(im):
        raise RawInTiff()
    full_size = im.size
    target = jpegdraft.fitted(*full_size, spec.largest)
    scale = f"{fmt} 1/1"
    if im.format in ("JPEG", "MPO"):
        scale = f"{fmt} {jpegdraft.draft(im, target)}"
    elif im.format == "HEIF" and _heif_thumbnail(im, target):
        scale = f"heif thumbnail {im.size[0]}x{im.size[1]}"
    load(im, fmt, spec.max_pixels)
    if orientation is None:
        orientation = read_orientation(im)
    icc = im.info.get("icc_profile") or None
    return Decoded(im, full_size, orientation, icc, scale)


def _heif_thumbnail(im: Image.Image, target: tuple[int, int]) -> bool:
    """Have pillow-heif decode an embedded thumbnail at least as large as target instead of the
    picture (iPhones embed 320x240); a broken thumbnail just means the picture is decoded."""
    try:
        return im.draft(None, target) is not None
    except _DECODER_ERRORS:
        return False


def is_dng(im: Image.Image) -> bool:
    """A TIFF that is a DNG (it has a DNGVersion tag): the RAW path decodes it."""
    return _DNG_VERSION_TAG in getattr(im, "tag_v2", {})


def load(im: Image.Image, fmt: str, max_pixels: int) -> None:
    """Decode the pixels (the first frame of an animation, the first page of a TIFF)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            im.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise bomb_error(exc, max_pixels) from exc
        except MemoryError:
            raise
        except _DECODER_ERRORS as exc:
            raise decoder_error(exc, fmt, missing_codec(im)) from exc
    width, height = im.size
    if width * height > max_pixels:  # a TIFF page or GIF frame larger than its header said
        raise too_large(width, height, max_pixels)


def read_orientation(im: Image.Image) -> int:
    """EXIF (or XMP) orientation of a loaded image, 1 when absent or unreadable.

    Read after load(): PNG keeps eXIf after the pixels, Pillow's TIFF loader has already
    applied the tag (and removed it), pillow-heif has reset it to 1 after libheif's transforms.
    """
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF of any kind: the picture itself is fine, show it as stored
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def render(
    decoded: Decoded,
    spec: ThumbnailSettings,
    paths: dict[int, str],
    timings: dict[str, float],
) -> dict[int, ThumbnailFile]:
    """Resize, convert to sRGB, orient, encode and write every size, largest first; each
    smaller size is made from the previous (already oriented) one."""
    clock = time.perf_counter()
    im = color.resizable(decoded.image)
    full_w, full_h = decoded.full_size
    target = jpegdraft.fitted(full_w, full_h, spec.largest)
    if max(full_w, full_h) <= spec.largest or max(im.size) <= max(target):
        target = im.size  # never enlarge (a small picture, or a RAW preview smaller than asked)
    im = _resize(im, target)
    clock = _lap(timings, "resize", clock)
    im = color.to_srgb(im, decoded.icc)
    if spec.format == "jpeg":
        im = color.flatten(im)
    clock = _lap(timings, "color", clock)
    method = _TRANSPOSE.get(decoded.orientation)
    if method is not None:
        im = im.transpose(method)
    clock = _lap(timings, "orient", clock)
    written: dict[int, ThumbnailFile] = {}
    for i, size in enumerate(spec.descending()):
        if i:
            im = _resize(im, jpegdraft.fitted(*im.size, size))
            clock = _lap(timings, "resize", clock)
        payload = encode(im, spec)
        clock = _lap(timings, "encode", clock)
        write_file(paths[size], payload)
        clock = _lap(timings, "write", clock)
        written[size] = ThumbnailFile(size, paths[size], im.size[0], im.size[1])
    return written


def encode(im: Image.Image, spec: ThumbnailSettings) -> bytes:
    """The thumbnail's bytes, with no metadata (no EXIF, XMP or ICC: the pixels are sRGB)."""
    im.info = {}
    buffer = io.BytesIO()
    if spec.format == "jpeg":
        im.save(buffer, "JPEG", quality=spec.quality)
    else:
        # method 2: 2.3x faster than libwebp's default 4 for ~4 % larger files (1440 px:
        # 55 ms instead of 128 ms, more than the decode). Alpha is kept.
        im.save(buffer, "WEBP", quality=spec.quality, method=2)
    return buffer.getvalue()


def _resize(im: Image.Image, size: tuple[int, int]) -> Image.Image:
    if im.size == size:
        return im
    alpha = im.mode == "RGBA"
    if alpha:
        im = color.premultiplied(im)
    im = im.resize(size, _RESAMPLE, reducing_gap=_REDUCING_GAP)
    return color.straight(im) if alpha else im


def _lap(timings: dict[str, float], stage: str, since: float) -> float:
    now = time.perf_counter()
    timings[stage] = timings.get(stage, 0.0) + (now - since)
    return now


def _first_line(obj: object) -> str:
    text = str(obj).strip()
    return text.splitlines()[0] if text else type(obj).__name__


def identify_error(fmt: str, detail: str) -> ConversionError:
    """No allowed plugin accepted bytes whose signature says fmt."""
    lowered = detail.lower()
    if any(word in lowered for word in _TRUNCATED):
        return ConversionError(outcomes.TRUNCATED, f"{fmt} data ends early: {detail}")
    if any(word in lowered for word in _MISSING_CODEC):
        return ConversionError(outcomes.UNSUPPORTED, f"{fmt} variant not supported: {detail}")
    suffix = f": {detail}" if detail else ""
    return ConversionError(outcomes.CORRUPT, f"not a readable {fmt} file{suffix}")


def decoder_error(exc: BaseException, fmt: str, codec: str | None = None) -> ConversionError:
    """Map an exception a decoder raised to a reason and a one-line message.

    codec names an optional TIFF compression the picture uses (see missing_codec).
    """
    text = _first_line(exc)
    if not isinstance(exc, (OSError, SyntaxError, ValueError, RuntimeError)):
        text = f"{type(exc).__name__}: {text}"
    lowered = text.lower()
    if codec is not None and "decoder error" in lowered:
        return ConversionError(
            outcomes.UNSUPPORTED, f"TIFF with {codec} compression, which this libtiff cannot decode"
        )
    if "memory" in lowered and "allocat" in lowered:
        return ConversionError(
            outcomes.TOO_LARGE,
            f"decoding needs more memory than allowed (workers.memory_limit_mb): {text}",
        )
    if any(word in lowered for word in _TRUNCATED):
        return ConversionError(outcomes.TRUNCATED, f"{fmt} data ends early: {text}")
    if any(word in lowered for word in _MISSING_CODEC):
        return ConversionError(outcomes.UNSUPPORTED, f"{fmt} variant not supported: {text}")
    return ConversionError(outcomes.CORRUPT, f"{fmt} data is corrupt: {text}")
