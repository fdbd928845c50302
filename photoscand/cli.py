"""The command line: ``run``, ``scan``, ``status``, ``retry`` and ``check-config``.

Exit codes (photoscand/exitcodes.py): 0 success; 1 images failed (``scan``), a forced stop, or
nothing to retry; 2 a usage, configuration or catalog error; 3 the catalog is locked by
another photoscand.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from photoscand import __version__, exitcodes
from photoscand.catalog import Catalog, CatalogError
from photoscand.children import start_fork_server
from photoscand.config import Config, ConfigError, describe, load_catalog_config, load_config
from photoscand.lock import CatalogLocked
from photoscand.status import status_data, status_lines


def _common_options(parser: argparse.ArgumentParser, *, default: Any) -> None:
    """The options every command takes, before or after the command's name. The copy on each
    command defaults to SUPPRESS, so that it does not overwrite the one given before."""
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=default,
        help="config file (default: $PHOTOSCAND_CONFIG, else ./config.yaml, else"
        " /etc/photoscand/config.yaml, else the built-in defaults)",
    )
    parser.add_argument("--workers", type=int, metavar="N", default=default, help="workers.count")
    parser.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        default=default,
        help="logging.level",
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="photoscand",
        description="Catalogs photos into SQLite as they land and makes thumbnails.",
        epilog="Exit codes: 0 ok; 1 images failed (scan), a forced stop, or nothing to retry;"
        " 2 usage, configuration or catalog error; 3 catalog locked by another photoscand.",
    )
    parser.add_argument("--version", action="version", version=f"photoscand {__version__}")
    _common_options(parser, default=None)
    common = argparse.ArgumentParser(add_help=False)
    _common_options(common, default=argparse.SUPPRESS)
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


def _catalog_config(args: argparse.Namespace) -> Config:
    """The config of a command that needs only the catalog's location: problems elsewhere in
    it are warnings (the daemon may run on an older, valid version of the file)."""
    config, problems = load_catalog_config(args.config, overrides=_overrides(args))
    _error(f"config: {config.file or 'none (built-in defaults)'}")
    if problems:
        _error(
            "warning: the configuration has problems (this command needs only catalog.path,"
            " and uses the defaults for the rest):\n  " + "\n  ".join(problems)
        )
    return config


def _status(args: argparse.Namespace) -> int:
    config = _catalog_config(args)
    data = status_data(config.catalog.path, config.watch.paths, args.failures)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
    else:
        print("\n".join(status_lines(data)))
    return exitcodes.OK


def _retry(args: argparse.Namespace) -> int:
    config = _catalog_config(args)
    if not os.path.exists(config.catalog.path):
        _error(f"no catalog at {config.catalog.path}: nothing to retry")
        return exitcodes.NOTHING_DONE
    paths = [os.fsencode(os.path.abspath(p)) for p in args.paths]
    catalog = Catalog(config.catalog.path)
    try:
        unknown = [p for p in paths if not catalog.count_at_or_under(p)]
        count = catalog.retry(paths or None, include_done=args.all)
    finally:
        catalog.close()
    for path in unknown:
        _error(f"no image in the catalog at or under {os.fsdecode(path)}")
    what = "failed or done" if args.all else "failed"
    print(f"{count} {what} images queued again")
    # A path that names nothing is most likely a typo: say so in the exit code too.
    return exitcodes.NOTHING_DONE if unknown else exitcodes.OK


# Folders the systemd unit hides from the daemon (ProtectHome=yes).
HIDDEN_BY_THE_UNIT = ("/home", "/root", "/run/user")


def hidden_interpreter() -> str | None:
    """Where this Python lives, when the unit would hide it: a venv made from a pyenv or
    user-installed Python under /home or /root cannot start under ProtectHome=yes."""
    for place in (sys.base_prefix, os.path.realpath(sys.executable), sys.prefix):
        if any(place == h or place.startswith(h + "/") for h in HIDDEN_BY_THE_UNIT):
            return place
    return None


def _check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    print(describe(config))
    hidden = hidden_interpreter()
    if hidden is not None:
        _error(
            f"warning: this Python lives under {hidden}, which the systemd unit hides"
            " (ProtectHome=yes): a service installed with it would not start. Make the"
            " service's venv with the system Python: /usr/bin/python3 -m venv /opt/photoscand"
            " (docs/operations.md)"
        )
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
