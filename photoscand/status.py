"""What ``photoscand status`` reports: the same figures as the Grafana dashboard, from the
catalog alone (it works whether the daemon runs or not, and before it ever ran).

Every figure is computed the way the dashboard computes it (see docs/operations.md): counts
per state (``photoscand_images``), phase 2 progress, the conversion rate over 5 minutes, the
oldest waiting image, failed rows by reason, and what the running daemon reports (an
unavailable folder, the watch limit reached).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

from photoscand.catalog import Catalog, CatalogError
from photoscand.lock import daemon_pid
from photoscand.outcomes import STATUSES, split_error
from photoscand.progress import progress_line


def status_data(catalog_path: str, roots: Sequence[str], failures: int) -> dict[str, Any]:
    """The report as plain data (``status --json`` prints it as it is)."""
    # Asked before the catalog is opened here (see photoscand.lock).
    pid = daemon_pid(catalog_path)
    try:
        os.stat(catalog_path)
    except FileNotFoundError:
        return _never_ran(catalog_path, roots)
    except OSError as exc:  # a folder this user may not enter: not "never ran"
        raise CatalogError(f"cannot read the catalog {catalog_path}: {exc.strerror}") from exc
    catalog = Catalog(catalog_path, readonly=True)
    try:
        return _report(catalog, roots, failures, pid)
    finally:
        catalog.close()


def _never_ran(catalog_path: str, roots: Sequence[str]) -> dict[str, Any]:
    counts = dict.fromkeys(STATUSES, 0)
    return {
        "catalog": catalog_path,
        "catalog_exists": False,
        "roots": list(roots),
        "daemon_pid": None,
        "counts": counts,
        "progress": progress_line(counts),
        "phase2_done_ratio": None,
        "converted": {"last_minute": 0, "last_5_minutes": 0, "last_hour": 0},
        "rate_per_minute": 0.0,
        "oldest_pending_age_seconds": 0,
        "failures_by_reason": {},
        "conditions": [],
        "recent_failures": [],
    }


def _report(
    catalog: Catalog, roots: Sequence[str], failures: int, pid: int | None
) -> dict[str, Any]:
    counts = catalog.counts()
    now = time.time()
    rates = catalog.converted_since(
        {"last_minute": now - 60, "last_5_minutes": now - 300, "last_hour": now - 3600}
    )
    oldest = catalog.oldest_pending_since()
    present = sum(counts.values()) - counts["missing"]
    conditions = catalog.conditions() if pid is not None else []
    return {
        "catalog": catalog.path,
        "catalog_exists": True,
        "roots": list(roots),
        "daemon_pid": pid,
        "counts": counts,
        "progress": progress_line(counts),
        # Nothing to convert is no progress to give: null, not 100 %.
        "phase2_done_ratio": round(counts["done"] / present, 4) if present else None,
        "converted": rates,
        "rate_per_minute": round(rates["last_5_minutes"] / 5, 1),
        "oldest_pending_age_seconds": round(now - oldest, 1) if oldest else 0,
        "failures_by_reason": catalog.failure_reasons(),
        "conditions": [
            {"kind": kind, "subject": subject, "message": message, "since": since}
            for kind, subject, message, since in conditions
        ],
        "recent_failures": [
            {
                "id": f.id,
                "path": f.display_path,
                "reason": split_error(f.error)[0],
                "message": split_error(f.error)[1],
                "attempts": f.attempts,
            }
            for f in catalog.recent_failures(failures)
        ],
    }


def status_lines(data: dict[str, Any]) -> list[str]:
    """The report for people; the first line is the progress line."""
    counts = data["counts"]
    lines = [data["progress"]]
    lines.append("  " + "  ".join(f"{status}: {count}" for status, count in counts.items()))
    ratio = data["phase2_done_ratio"]
    done = "nothing to convert" if ratio is None else f"{ratio:.1%} converted"
    lines.append(
        f"  phase 2: {done}; {data['rate_per_minute']:g}/min over the last 5 minutes,"
        f" {data['converted']['last_hour']} in the last hour;"
        f" oldest waiting: {_duration(data['oldest_pending_age_seconds'])}"
    )
    pid = data["daemon_pid"]
    if not data["catalog_exists"]:
        lines.append(f"  daemon: has not run yet (no catalog at {data['catalog']})")
    else:
        lines.append("  daemon: " + ("not running" if pid is None else f"running (pid {pid})"))
    for condition in data["conditions"]:
        subject = f" {condition['subject']}:" if condition["subject"] else ""
        lines.append(f"  attention:{subject} {condition['message']} (since {condition['since']})")
    if data["failures_by_reason"]:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(data["failures_by_reason"].items()))
        lines.append(f"  failures by reason: {reasons}")
    if data["recent_failures"]:
        lines.append("Recent failures:")
        for failure in data["recent_failures"]:
            lines.append(f"  [{failure['reason']}] {failure['path']}: {failure['message']}")
    return lines


def _duration(seconds: float) -> str:
    """``75`` -> ``1m 15s``, like Grafana's duration unit."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"
