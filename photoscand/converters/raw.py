"""Camera RAW through LibRaw (rawpy): the embedded preview when it is big enough, else a decode.

Hazards: many RAW files carry no usable pixels (pruned samples, unknown compressions), and
LibRaw's errors say little, so every failure here ends as ``unsupported`` with a message
that says whether any pixels were found. LibRaw's postprocess() applies the RAW's own
rotation; an embedded preview does not, so its orientation comes from the RAW's metadata.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from photoscand import outcomes
from photoscand.converters.model import ConversionError
from photoscand.protocol import ThumbnailSettings

# LibRaw's flip (dcraw bits: 1 mirror horizontally, 2 mirror vertically, 4 transpose) -> EXIF.
_FLIP_TO_EXIF = {0: 1, 1: 2, 2: 4, 3: 3, 4: 5, 5: 8, 6: 6, 7: 7}


@dataclass(slots=True)
class RawPixels:
    """What the RAW gave: a JPEG preview's bytes (decoded by the Pillow path) or pixels."""

    jpeg: bytes | None
    image: Image.Image | None
    orientation: int  # to apply to jpeg/image; 1 for postprocess() output (already rotated)
    source: str


def missing() -> str | None:
    """None when rawpy can be imported, else the package to install."""
    try:
        import rawpy  # noqa: F401
    except ImportError:
        return "rawpy"
    return None


def extract(
    data: bytes | memoryview, fmt: str, spec: ThumbnailSettings, orientation_hint: int | None
) -> RawPixels:
    """The best pixels for spec's largest size: a large enough preview, else a (half) decode,
    else the largest preview there is."""
    try:
        import rawpy
    except ImportError:
        raise ConversionError(
            outcomes.UNSUPPORTED, f"{fmt} needs the rawpy package, which is not installed"
        ) from None
    try:
        raw = rawpy.imread(io.BytesIO(bytes(data)))
    except rawpy.LibRawFileUnsupportedError:
        raise ConversionError(
            outcomes.UNSUPPORTED, f"LibRaw cannot read this {fmt} file: no usable pixels"
        ) from None
    except (rawpy.LibRawError, OSError, ValueError) as exc:
        raise ConversionError(
            outcomes.UNSUPPORTED, f"{fmt} file has no usable pixels (LibRaw: {_text(exc)})"
        ) from None
    with raw:
        sizes = raw.sizes
        width, height = sizes.width, sizes.height
        flip = _FLIP_TO_EXIF.get(sizes.flip, 1)
        preview, preview_size, preview_orientation = _preview(raw, rawpy)
        wanted = min(spec.largest, max(width, height)) if width and height else spec.largest
        orientation = flip if flip != 1 else preview_orientation or orientation_hint or 1
        if preview is not None and max(preview_size) >= wanted:
            return _from_preview(preview, orientation)
        if width * height > spec.max_pixels:
            raise ConversionError(
                outcomes.TOO_LARGE,
                f"{width}x{height} is {width * height:,} pixels, "
                f"over workers.max_pixels ({spec.max_pixels:,})",
            )
        half = width and height and max(width, height) // 2 >= spec.largest
        try:
            pixels = raw.postprocess(half_size=bool(half), use_camera_wb=True, output_bps=8)
        except MemoryError:
            raise
        except (rawpy.LibRawError, OSError, ValueError) as exc:
            if preview is not None:
                # The sensor data is unreadable, but the camera's own rendering is there.
                return _from_preview(preview, orientation)
            raise ConversionError(
                outcomes.UNSUPPORTED,
                f"{fmt} file has no usable pixels: no preview, and LibRaw cannot decode "
                f"the sensor data ({_text(exc)})",
            ) from None
    image = Image.fromarray(pixels)
    return RawPixels(None, image, 1, "libraw half" if half else "libraw full")


def _preview(raw, rawpy) -> tuple[bytes | Image.Image | None, tuple[int, int], int | None]:
    """The embedded preview (JPEG bytes or a bitmap), its size, and its own EXIF orientation."""
    try:
        thumb = raw.extract_thumb()
    except (rawpy.LibRawError, OSError, ValueError):
        return None, (0, 0), None
    if thumb.format == rawpy.ThumbFormat.JPEG:
        try:
            with Image.open(io.BytesIO(thumb.data), formats=["JPEG"]) as im:
                size = im.size
                try:
                    value = im.getexif().get(0x0112)
                except Exception:  # a preview's broken EXIF only loses its orientation
                    value = None
        except (OSError, ValueError, SyntaxError):
            return None, (0, 0), None
        orientation = value if isinstance(value, int) and 2 <= value <= 8 else None
        return bytes(thumb.data), size, orientation
    try:
        image = Image.fromarray(thumb.data)
    except (TypeError, ValueError):
        return None, (0, 0), None
    return image, image.size, None


def _from_preview(preview: bytes | Image.Image, orientation: int) -> RawPixels:
    if isinstance(preview, bytes):
        return RawPixels(preview, None, orientation, "embedded preview")
    return RawPixels(None, preview, orientation, "embedded bitmap preview")


def _text(exc: BaseException) -> str:
    text = exc.args[0] if exc.args else type(exc).__name__
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    return str(text).strip() or type(exc).__name__
