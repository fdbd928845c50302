"""The one-line summary of progress that the terminal, systemd's STATUS and ``status`` share."""

from __future__ import annotations

from collections.abc import Mapping


def progress_line(counts: Mapping[str, int]) -> str:
    """ "Phase 1: 1000 images found. Phase 2: 840/996 converted, 3 failed, 4 missing, 2
    converting now": what is true at the moment, counted against the images present (the
    missing are not)."""
    found = sum(counts.values())
    missing = counts.get("missing", 0)
    present = found - missing
    if present == 0:
        phase2 = "nothing to convert"
    else:
        phase2 = f"{counts.get('done', 0)}/{present} converted, {counts.get('failed', 0)} failed"
    if missing:
        phase2 += f", {missing} missing"
    if counts.get("converting"):
        phase2 += f", {counts['converting']} converting now"
    return f"Phase 1: {found} images found. Phase 2: {phase2}"
