"""JPEG shrink-on-load: have libjpeg decode at the smallest DCT scale that still covers the target.

Pillow's draft() offers 1/8, 1/4, 1/2 and 1/1. libjpeg-turbo also decodes at 3/8, which is the
right scale for a 12 MP photo and a 1440 px thumbnail (1512 px instead of 2016 px), and makes
the following resample ~30 % cheaper. Pillow passes its decoder a denominator, and
libjpeg-turbo answers 1/3 with 3/8 (jdmaster.c rounds any 1/N up to the next M/8). Hazard:
Pillow sizes its line buffer from the tile and does not check libjpeg's output width, so a
library that answered 1/3 with a wider scale (IJG libjpeg 6b answers 1/2) would overrun it.
The 3/8 path is therefore used only when Pillow reports libjpeg-turbo, after a one-time probe
of a small in-memory JPEG, and only on the single-tile layout it was written for.
"""

from __future__ import annotations

import io
import math

from PIL import Image, ImageFile, features

_probe_result: bool | None = None


def fitted(width: int, height: int, edge: int) -> tuple[int, int]:
    """The size with the longest side scaled to edge, aspect kept; never larger than the input."""
    if max(width, height) <= edge:
        return width, height
    if width >= height:
        return edge, max(1, round(height * edge / width))
    return max(1, round(width * edge / height)), edge


def draft(im: Image.Image, target: tuple[int, int]) -> str:
    """Configure a JPEG (or MPO) loader to decode at the smallest scale >= target; return it
    as text ("3/8", "1/2", ...) for the timings report."""
    width, height = im.size
    pillow_scale = _pillow_denominator(width, height, target)
    three_eighths = (math.ceil(width * 3 / 8), math.ceil(height * 3 / 8))
    if (
        pillow_scale == 2
        and three_eighths[0] >= target[0]
        and three_eighths[1] >= target[1]
        and _three_eighths_supported()
        and _set_scale_three(im)
    ):
        return "3/8"
    im.draft("RGB", target)
    return f"1/{pillow_scale}"


def _pillow_denominator(width: int, height: int, target: tuple[int, int]) -> int:
    """The denominator Pillow's own draft() picks for target (its rule, reproduced)."""
    scale = min(width // max(1, target[0]), height // max(1, target[1]))
    for denominator in (8, 4, 2, 1):
        if scale >= denominator:
            return denominator
    return 1


def _set_scale_three(im: Image.Image) -> bool:
    """Point the loader's single tile at a 3/8-size output and ask the decoder for 1/3."""
    if not isinstance(im, ImageFile.ImageFile) or im.decoderconfig or len(im.tile) != 1:
        return False
    tile = im.tile[0]
    width, height = im.size
    if tile[0] != "jpeg" or tuple(tile[1] or ()) != (0, 0, width, height):
        return False
    size = (math.ceil(width * 3 / 8), math.ceil(height * 3 / 8))
    im.tile = [type(tile)(tile[0], (0, 0, *size), tile[2], tile[3])]
    im._size = size
    # (scale denominator, draft flag): full-quality IDCT and upsampling, like draft() asks for.
    im.decoderconfig = (3, 0)
    return True


def _three_eighths_supported() -> bool:
    global _probe_result
    if _probe_result is None:
        _probe_result = bool(features.check_feature("libjpeg_turbo")) and _probe()
    return _probe_result


def _probe() -> bool:
    """Decode a known 80x48 picture at 3/8: the output must be 30x18 with the same colours."""
    source = Image.new("RGB", (80, 48), (200, 40, 90))
    source.paste((20, 160, 220), (40, 0, 80, 48))
    buffer = io.BytesIO()
    source.save(buffer, "JPEG", quality=95)
    try:
        with Image.open(buffer, formats=["JPEG"]) as im:
            if not _set_scale_three(im):
                return False
            im.load()
            if im.size != (30, 18):
                return False
            left, right = im.getpixel((5, 9)), im.getpixel((25, 9))
    except (OSError, ValueError):
        return False
    close = all(abs(a - b) <= 12 for a, b in zip(left, (200, 40, 90), strict=True))
    return close and all(abs(a - b) <= 12 for a, b in zip(right, (20, 160, 220), strict=True))
