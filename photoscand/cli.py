"""The command line: ``run``, ``scan``, ``status``, ``retry`` and ``check-config``.

Exit codes: 0 success; 1 images failed (``scan``) or a forced stop; 2 a usage,
configuration or catalog error; 3 the catalog is locked by another photoscand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from photoscand import __version__, exitcodes
from photoscand.catalog import Catalog, CatalogError
from photoscand.children import start_fork_server
from photoscand.config import Config, ConfigError, describe, load_config
from photoscand.lock import CatalogLocked, daemon_pid
from photoscand.outcomes import split_error
from photoscand.progress import progress_line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="photoscand",
        description="Catalogs photos into SQLite as they land and makes thumbnails.",
        epilog="Exit codes: 0 ok; 1 images failed (scan) or forced stop; 2 usage, configuration"
        " or catalog error; 3 catalog locked by another photoscand.",
    )
    parser.add_argument("--version", action="version", version=f"photoscand {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", help="config file (default ./config.yaml)")
    common.add_argument("--workers", type=int, metavar="N", help="workers.count")
    common.add_argument(
        "--log-level", choices=("debug", "info", "warning", "error"), help="logging.level"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, text in (
        ("run", "the daemon, in the foreground"),
        ("scan", "ingest and convert everything, then exit"),
    ):
        command = sub.add_parser(name, parents=[common], help=text)
        command.add_argument(
            "--metrics-file",
            metavar="FILE",
            help="on exit, write the final metrics there (Prometheus text format, e.g. for"
            " node_exporter's textfile collector)",
        )
    status = sub.add_parser("status", parents=[common], help="counts, progress and failures")
    status.add_argument("--json", action="store_true", help="machine-readable output")
    status.add_argument(
        "--failures",
        type=int,
        default=10,
        metavar="N",
        help="how many recent failures to list (default 10)",
    )
    retry = sub.add_parser("retry", parents=[common], help="put failed images back to pending")
    retry.add_argument("paths", nargs="*", metavar="PATH", help="files or folders (default all)")
    retry.add_argument(
        "--all",
        action="store_true",
        help="also reconvert images that are done (after changing sizes or format)",
    )
    sub.add_parser("check-config", parents=[common], help="validate and print the config")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, tuple[object, str]]:
    """The settings given as flags (they win over the file and the environment)."""
    flags = {
        "workers.count": (args.workers, "--workers"),
        "logging.level": (args.log_level, "--log-level"),
    }
    return {k: v for k, v in flags.items() if v[0] is not None}


def _load(args: argparse.Namespace, *, check_paths: bool = True) -> Config:
    return load_config(args.config, overrides=_overrides(args), check_paths=check_paths)


def _error(message: str) -> None:
    print(f"photoscand: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("run", "scan"):
        # The fork server imports the worker code while this process imports the daemon.
        start_fork_server()
    try:
        if args.command in ("run", "scan"):
            return _run(args)
        if args.command == "status":
            return _status(args)
        if args.command == "retry":
            return _retry(args)
        return _check_config(args)
    except ConfigError as exc:
        _error("configuration error:\n  " + str(exc).replace("\n", "\n  "))
        return exitcodes.USAGE
    except CatalogError as exc:
        _error(str(exc))
        return exitcodes.USAGE
    except CatalogLocked as exc:
        _error(str(exc))
        return exitcodes.LOCKED
    except KeyboardInterrupt:
        return 130


def _run(args: argparse.Namespace) -> int:
    # Imported here: the fork server was started first, so its imports overlap these.
    from photoscand import log as log_module
    from photoscand.daemon import Daemon

    config = _load(args)
    log_module.configure(config.logging.level, config.logging.format)
    progress = None
    if args.command == "scan" and sys.stderr.isatty():
        progress = sys.stderr
    daemon = Daemon(
        config,
        mode=args.command,
        progress=progress,
        metrics_file=args.metrics_file,
        overrides=_overrides(args),
    )
    return daemon.run()


def status_data(
    catalog: Catalog, roots: Sequence[str], failures: int, pid: int | None
) -> dict[str, Any]:
    """What ``photoscand status`` reports, as plain data.

    Every figure is one the Grafana dashboard shows, computed the same way (see
    docs/operations.md): counts per state (photoscand_images), phase 2 progress, the
    conversion rate over 5 minutes, the oldest waiting image and failed rows by reason.
    """
    counts = catalog.counts()
    now = time.time()
    rates = catalog.converted_since(
        {"last_minute": now - 60, "last_5_minutes": now - 300, "last_hour": now - 3600}
    )
    oldest = catalog.oldest_pending_since()
    present = sum(counts.values()) - counts["missing"]
    return {
        "catalog": catalog.path,
        "roots": list(roots),
        "daemon_pid": pid,
        "counts": counts,
        "progress": progress_line(counts),
        "phase2_done_ratio": round(counts["done"] / present, 4) if present else 1.0,
        "converted": rates,
        "rate_per_minute": round(rates["last_5_minutes"] / 5, 1),
        "oldest_pending_age_seconds": round(now - oldest, 1) if oldest else 0,
        "failures_by_reason": catalog.failure_reasons(),
        # What the running daemon reports (a folder unmounted, the watch limit reached).
        "conditions": [
            {"kind": kind, "subject": subject, "message": message, "since": since}
            for kind, subject, message, since in (catalog.conditions() if pid is not None else [])
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


def _status(args: argparse.Namespace) -> int:
    config = _load(args, check_paths=False)
    if not os.path.exists(config.catalog.path):
        _error(f"no catalog yet at {config.catalog.path} (has `photoscand run` been started?)")
        return exitcodes.USAGE
    # Asked before the catalog is opened here (see photoscand.lock).
    pid = daemon_pid(config.catalog.path)
    catalog = Catalog(config.catalog.path, readonly=True)
    try:
        data = status_data(catalog, config.watch.paths, args.failures, pid)
    finally:
        catalog.close()
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    counts = data["counts"]
    pid = data["daemon_pid"]
    print(data["progress"])
    print("  " + "  ".join(f"{status}: {count}" for status, count in counts.items()))
    print(
        f"  phase 2: {data['phase2_done_ratio']:.1%} converted;"
        f" {data['rate_per_minute']:g}/min over the last 5 minutes,"
        f" {data['converted']['last_hour']} in the last hour;"
        f" oldest waiting: {_duration(data['oldest_pending_age_seconds'])}"
    )
    print("  daemon: " + ("not running" if pid is None else f"running (pid {pid})"))
    for condition in data["conditions"]:
        subject = f" {condition['subject']}:" if condition["subject"] else ""
        print(f"  attention:{subject} {condition['message']} (since {condition['since']})")
    if data["failures_by_reason"]:
        reasons = ", ".join(f"{r}: {n}" for r, n in sorted(data["failures_by_reason"].items()))
        print(f"  failures by reason: {reasons}")
    if data["recent_failures"]:
        print("Recent failures:")
        for failure in data["recent_failures"]:
            print(f"  [{failure['reason']}] {failure['path']}: {failure['message']}")
    return 0


def _duration(seconds: float) -> str:
    """``75`` -> ``1m 15s``, like Grafana's duration unit."""
    whole = int(seconds)
    if whole < 60:
        return f"{seconds:g}s"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes}m" if hours else f"{minutes}m {secs}s"


def _retry(args: argparse.Namespace) -> int:
    config = _load(args, check_paths=False)
    catalog = Catalog(config.catalog.path)
    try:
        paths = [os.fsencode(os.path.abspath(p)) for p in args.paths] or None
        count = catalog.retry(paths, include_done=args.all)
    finally:
        catalog.close()
    what = "failed or done" if args.all else "failed"
    print(f"{count} {what} images queued again")
    return 0


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(describe(config))
    try:
        from photoscand.converters import available_formats

        formats = available_formats()
        readable = sorted(name for name, missing in formats.items() if missing is None)
        missing = sorted(f"{name} (needs {need})" for name, need in formats.items() if need)
        print(f"formats: {' '.join(readable)}")
        if missing:
            print(f"formats not readable here: {', '.join(missing)}")
    except ImportError as exc:
        print(f"formats: unknown ({exc})")
    return 0
