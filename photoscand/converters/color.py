"""Pixel modes and colour: make any decoded picture resizable, then sRGB (8-bit, alpha kept).

Hazards: a broken embedded ICC profile must not fail the image (it is ignored, the pixels are
taken as sRGB); building an LCMS transform costs milliseconds, so transforms are cached per
profile in this (long-lived, single-threaded) worker process.
"""

from __future__ import annotations

import io
from functools import lru_cache

from PIL import Image, ImageCms

# Modes Pillow can resample and that need no conversion before resizing. CMYK and LAB are
# resized as they are and converted to sRGB afterwards, on the small image.
_RESIZABLE = frozenset({"L", "RGB", "RGBA", "CMYK", "LAB"})
_SIXTEEN_BIT = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

_SRGB = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
_LAB = ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB"))
# ICC colour space signatures (header bytes 16..19) that an image mode can be converted from.
_SPACE_FOR_MODE = {"RGB": "RGB ", "RGBA": "RGB ", "CMYK": "CMYK"}


def has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (
        im.mode in ("P", "L", "RGB") and "transparency" in im.info
    )


def resizable(im: Image.Image) -> Image.Image:
    """The picture in a mode Pillow can resample (L, RGB, RGBA, CMYK or LAB)."""
    mode = im.mode
    if mode in _RESIZABLE and "transparency" not in im.info:
        return im
    if mode == "1":
        return im.convert("L")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return _to_eight_bit(im)
    if has_alpha(im):
        return im.convert("RGBA")
    if mode == "P":
        # A grey palette still becomes RGB: cheap, and the output encoders take either.
        return im.convert("RGB")
    return im.convert("RGB")  # YCbCr, HSV, RGBX, anything else Pillow knows


def _to_eight_bit(im: Image.Image) -> Image.Image:
    """16-bit or 32-bit grey to 8 bits, as other decoders show it (high byte of 16-bit data)."""
    if im.mode in _SIXTEEN_BIT:
        im = im.convert("I")
        divisor = 256.0
    else:
        low, high = im.getextrema()
        # Integer or float samples: 8-bit range shown as is, 16-bit range by its high byte,
        # anything wider stretched so its maximum is white.
        divisor = 1.0 if high <= 255 else 256.0 if high <= 65535 else high / 255.0
        if im.mode == "F" and high <= 1.0 and low >= 0.0:
            divisor = 1.0 / 255.0  # float data in 0..1
    if divisor != 1.0:
        im = im.point(lambda v: v / divisor)
    return im.convert("L")


def premultiplied(im: Image.Image) -> Image.Image:
    """RGBA as RGBa for resampling, so transparent pixels' colours do not bleed into edges."""
    return im.convert("RGBa") if im.mode == "RGBA" else im


def straight(im: Image.Image) -> Image.Image:
    return im.convert("RGBA") if im.mode == "RGBa" else im


def to_srgb(im: Image.Image, icc: bytes | None) -> Image.Image:
    """Convert a resized picture to sRGB: L, RGB or RGBA out (L stays grey)."""
    mode = im.mode
    if mode == "LAB":
        return ImageCms.applyTransform(im, _lab_transform())
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    if icc and mode in _SPACE_FOR_MODE:
        transform = _transform(bytes(icc), mode, out_mode)
        if transform is not None:
            return ImageCms.applyTransform(im, transform)
    if mode == "CMYK":
        return im.convert("RGB")
    return im


def needs_conversion(icc: bytes | None, mode: str) -> bool:
    """True when a picture of this mode has a usable embedded profile that is not sRGB."""
    if not icc or mode not in _SPACE_FOR_MODE:
        return False
    out_mode = "RGBA" if mode == "RGBA" else "RGB"
    return _transform(bytes(icc), mode, out_mode) is not None


def flatten(im: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Alpha composited over an opaque background (for JPEG, which has no alpha)."""
    if im.mode == "RGBA":
        base = Image.new("RGB", im.size, background)
        base.paste(im, mask=im.getchannel("A"))
        return base
    if im.mode == "LA":
        return flatten(im.convert("RGBA"), background)
    return im


@lru_cache(maxsize=1)
def _lab_transform() -> ImageCms.ImageCmsTransform:
    return ImageCms.buildTransform(_LAB, _SRGB, "LAB", "RGB")


@lru_cache(maxsize=32)
def _transform(icc: bytes, in_mode: str, out_mode: str) -> ImageCms.ImageCmsTransform | None:
    """The transform from an embedded profile to sRGB, or None when there is nothing to do
    (already sRGB, or a profile that cannot be used: unreadable, or for another colour space)."""
    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        return None
    if icc[16:20].decode("latin-1") != _SPACE_FOR_MODE[in_mode]:
        return None
    if in_mode != "CMYK":
        description = (profile.profile.profile_description or "").lower()
        if "srgb" in description or "iec61966-2" in description:
            return None
    try:
        return ImageCms.buildTransform(
            profile, _SRGB, in_mode, out_mode, ImageCms.Intent.PERCEPTUAL
        )
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        return None
