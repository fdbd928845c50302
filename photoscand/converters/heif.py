"""HEIF and AVIF decoding through Pillow: pillow-heif registered once, both single-threaded.

Hazards: libheif and libavif start their own decode threads by default (the daemon's workers
must use one core each); and orientation must be applied exactly once. libheif applies the
container's irot/imir transforms while decoding and pillow-heif then resets the EXIF
Orientation to 1, so the picture that comes out is upright and its EXIF says so. Pillow's own
AVIF plugin does the opposite: libavif does not rotate, and Pillow turns irot/imir into the
EXIF Orientation, which the converter applies after shrinking like any other.
"""

from __future__ import annotations

from PIL import AvifImagePlugin, features

_state: dict[str, str | None] = {}


def register() -> str | None:
    """Register pillow-heif's HEIF opener (once); None on success, else the missing package."""
    if "heif" not in _state:
        try:
            import pillow_heif
        except ImportError:
            _state["heif"] = "pillow-heif"
        else:
            # depth and auxiliary images are never shown; embedded thumbnails are, via draft().
            pillow_heif.register_heif_opener(
                decode_threads=1, thumbnails=True, depth_images=False, aux_images=False
            )
            _state["heif"] = None
        # One libavif thread per worker (Pillow's default is one per CPU).
        AvifImagePlugin.DEFAULT_MAX_THREADS = 1
    return _state["heif"]


def avif_missing() -> str | None:
    """None when Pillow can decode AVIF, else what is missing."""
    return None if features.check("avif") else "Pillow built with libavif"
