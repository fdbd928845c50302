"""The one-line summary of progress that the terminal, systemd's STATUS and ``status`` share."""

from __future__ import annotations

from collections.abc import Mapping


def progress_line(counts: Mapping[str, int]) -> str:
    """ "Phase 1: 1000 images found. Phase 2: converting 150/1000, 3 failed"."""
    found = sum(counts.values())
    present = found - counts.get("missing", 0)
    line = (
        f"Phase 1: {found} images found. Phase 2: converting {counts.get('done', 0)}/{present},"
        f" {counts.get('failed', 0)} failed"
    )
    if counts.get("missing"):
        line += f", {counts['missing']} missing"
    return line
