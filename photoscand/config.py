"""Configuration: built-in defaults < YAML file < environment < command-line flags, merged into
one frozen, validated ``Config``.

Hazard: a bad or misspelt setting must stop start-up with a message that names the key, the
value, where it came from and what is allowed; it is never quietly replaced by a default.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from photoscand.protocol import ThumbnailSettings

ENV_PREFIX = "PHOTOSCAND_"
# Where the config is looked for: --config, then this variable, then ./config.yaml, then the
# service's file.
CONFIG_VARIABLE = "PHOTOSCAND_CONFIG"
SYSTEM_CONFIG = "/etc/photoscand/config.yaml"
# The PHOTOSCAND_* variables that are not settings; every other one is an error (a typo of a
# setting must not pass in silence). The tests' and benchmarks' own knobs have a prefix of
# their own (PSCD_), so that daemons started by them never see them.
DOCUMENTED_VARIABLES = frozenset({CONFIG_VARIABLE})
# Another name for workers.count, shared with other image tools; PHOTOSCAND_WORKERS_COUNT wins.
WORKERS_COUNT_ALIAS = "IMAGE_WORKER_CONCURRENCY"
DEFAULT_FILE_NAME = "config.yaml"

# Filesystem types on which SQLite's WAL mode is unsafe: WAL needs the shared-memory index
# and POSIX locks to be coherent between processes, which network filesystems do not promise.
NETWORK_FILESYSTEMS: frozenset[str] = frozenset(
    "nfs nfs4 cifs smb smb2 smb3 smbfs ncpfs afs coda 9p ceph glusterfs lustre gpfs beegfs "
    "orangefs pvfs2 sshfs fuse.sshfs fuse.glusterfs fuse.ceph fuse.cephfs fuse.s3fs "
    "fuse.rclone fuse.gcsfuse fuse.juicefs fuse.davfs2 davfs".split()
)

# Phase 2 is background work: phase 1 (a row the moment a file lands) should win the CPU
# when both want it.
WORKER_NICENESS = 5

# Read at call time (not import time) so tests can point it at a sample.
MOUNTINFO_PATH = "/proc/self/mountinfo"


class ConfigError(Exception):
    """The configuration cannot be used; ``str(error)`` is the whole message, one problem a line."""

    def __init__(self, problems: str | Iterable[str]) -> None:
        self.problems: tuple[str, ...] = (
            (problems,) if isinstance(problems, str) else tuple(problems)
        )
        super().__init__("\n".join(self.problems))

    def __reduce__(self) -> tuple[Any, ...]:
        # Exception pickles its args (the joined text); rebuild from the list instead.
        return (type(self), (self.problems,))


@dataclass(frozen=True, slots=True)
class WatchConfig:
    paths: tuple[str, ...]
    settle_seconds: float
    metadata_timeout_seconds: float
    rescan_interval_seconds: float
    polling: bool


@dataclass(frozen=True, slots=True)
class CatalogConfig:
    path: str


@dataclass(frozen=True, slots=True)
class ThumbnailsConfig:
    dir: str
    sizes: tuple[int, ...]
    format: str
    quality: int


@dataclass(frozen=True, slots=True)
class WorkersConfig:
    count: int
    backend: str
    timeout_seconds: float
    max_attempts: int
    retry_backoff_seconds: float
    stop_timeout_seconds: float
    max_pixels: int
    memory_limit_mb: int


@dataclass(frozen=True, slots=True)
class IoConfig:
    mode: str
    prefetch_window_mb: int


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    listen: str  # "" = no metrics endpoint


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    format: str
    level: str


@dataclass(frozen=True, slots=True)
class Config:
    """The effective configuration. Equality compares the values only, not where they came from."""

    watch: WatchConfig
    catalog: CatalogConfig
    thumbnails: ThumbnailsConfig
    workers: WorkersConfig
    io: IoConfig
    metrics: MetricsConfig
    logging: LoggingConfig
    file: str | None = field(default=None, compare=False)
    # "workers.count" -> "default" | "file /abs/config.yaml" | "env NAME" | "flag --workers"
    sources: Mapping[str, str] = field(default_factory=dict, compare=False, hash=False)

    def thumbnail_settings(self) -> ThumbnailSettings:
        """What the workers make and how, as the one value that travels to them."""
        return ThumbnailSettings(
            sizes=self.thumbnails.sizes,
            format=self.thumbnails.format,
            quality=self.thumbnails.quality,
            out_dir=self.thumbnails.dir,
            max_pixels=self.workers.max_pixels,
            backend=self.workers.backend,
            memory_limit_mb=self.workers.memory_limit_mb,
            nice=WORKER_NICENESS,
        )


SECTIONS: dict[str, type] = {
    "watch": WatchConfig,
    "catalog": CatalogConfig,
    "thumbnails": ThumbnailsConfig,
    "workers": WorkersConfig,
    "io": IoConfig,
    "metrics": MetricsConfig,
    "logging": LoggingConfig,
}


# --- where a value came from -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Origin:
    source: str  # as recorded in Config.sources
    where: str  # as shown in messages, e.g. "from PHOTOSCAND_WORKERS_COUNT"
    text: bool  # True: a string to parse (environment, flag text); False: a typed value
    base: str  # folder that relative paths are resolved against


_RAW = object()  # _Invalid.shown default: show the value as it was given


class _Invalid(Exception):
    """A value's problem, phrased to follow the value ("is out of range"), and the value to
    show: the parsed number for a range error, so "0" from the environment reads as 0."""

    def __init__(self, problem: str, shown: object = _RAW) -> None:
        super().__init__(problem)
        self.problem = problem
        self.shown = shown


def _show(value: object) -> str:
    """A value as JSON/YAML flow text, safe to print even for undecodable path bytes."""
    if isinstance(value, tuple):
        value = list(value)
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = str(value)
    # Paths from the environment may carry surrogate escapes of non-UTF-8 bytes.
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


# --- value parsers: (value, origin) -> typed value, or raise _Invalid ---------------------

Parser = Callable[[object, _Origin], object]


def _as_int(value: object, text: bool) -> int:
    if text:
        assert isinstance(value, str)
        try:
            return int(value.strip(), 10)
        except ValueError:
            pass
        try:
            value = float(value.strip())
        except ValueError:
            raise _Invalid("is not an integer") from None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Invalid("is not an integer")
    if isinstance(value, float):
        # 1.0e8 is a YAML float; accept whole numbers, refuse 2.5, inf and nan.
        if not value.is_integer():
            raise _Invalid("is not an integer", value)
        return int(value)
    return value


def _int(low: int, high: int | None = None) -> Parser:
    def parse(value: object, origin: _Origin) -> int:
        number = _as_int(value, origin.text)
        if number < low or (high is not None and number > high):
            raise _Invalid("is out of range", number)
        return number

    return parse


def _float(low: float, high: float, *, low_inclusive: bool) -> Parser:
    def parse(value: object, origin: _Origin) -> float:
        if origin.text:
            assert isinstance(value, str)
            try:
                number = float(value.strip())
            except ValueError:
                raise _Invalid("is not a number") from None
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid("is not a number")
        else:
            number = float(value)
        if not math.isfinite(number):
            raise _Invalid("is not a finite number", number)
        if number < low or (number == low and not low_inclusive) or number > high:
            # Show 0 as 0, as it was most likely written, not as 0.0.
            raise _Invalid("is out of range", int(number) if number.is_integer() else number)
        return number

    return parse


_TRUE_WORDS = frozenset({"true", "1", "yes", "on"})
_FALSE_WORDS = frozenset({"false", "0", "no", "off"})


def _bool(value: object, origin: _Origin) -> bool:
    if origin.text:
        assert isinstance(value, str)
        word = value.strip().lower()
        if word in _TRUE_WORDS:
            return True
        if word in _FALSE_WORDS:
            return False
        raise _Invalid("is not a boolean")
    # In YAML, true/false/yes/no are already booleans; a quoted "yes" is a string, refused.
    if not isinstance(value, bool):
        raise _Invalid("is not a boolean")
    return value


def _choice(*choices: str) -> Parser:
    def parse(value: object, origin: _Origin) -> str:
        if not isinstance(value, str):
            raise _Invalid("is not a string")
        word = value.strip().lower()
        if word in choices:
            return word
        close = difflib.get_close_matches(word, choices, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise _Invalid(f"is not one of the allowed values{hint}")

    return parse


def _resolve(value: object, base: str) -> str:
    if not isinstance(value, str):
        raise _Invalid("is not a string (a path)")
    if value == "":
        raise _Invalid("is an empty path")
    if "\0" in value:
        raise _Invalid("contains a NUL byte")
    # abspath normalises ("..", "//", a trailing "/") but keeps symlinks as the operator named
    # them: a watched root that is a symlink stays that root.
    return os.path.abspath(os.path.join(base, os.path.expanduser(value)))


def _path(value: object, origin: _Origin) -> str:
    return _resolve(value, origin.base)


def _inside(child: str, parent: str) -> bool:
    """True when child is parent or lies below it (both absolute and normalised)."""
    return child == parent or child.startswith(parent.rstrip("/") + "/")


def _items(value: object, origin: _Origin) -> list[object]:
    if origin.text:
        assert isinstance(value, str)
        return [item.strip() for item in value.split(",") if item.strip()]
    if not isinstance(value, list | tuple):
        raise _Invalid("is not a list")
    return list(value)


def _paths(value: object, origin: _Origin) -> tuple[str, ...]:
    items = _items(value, origin)
    if not items:
        raise _Invalid("is empty: at least one folder must be watched")
    resolved: list[str] = []
    for item in items:
        try:
            resolved.append(_resolve(item, origin.base))
        except _Invalid as error:
            raise _Invalid(f"has an item {_show(item)} that {error.problem}") from None
    for i, path in enumerate(resolved):
        for other in resolved[:i]:
            if path == other:
                raise _Invalid(f"lists {_show(path)} twice", resolved)
            if _inside(path, other) or _inside(other, path):
                inner, outer = (path, other) if _inside(path, other) else (other, path)
                raise _Invalid(
                    f"lists {_show(inner)} inside {_show(outer)}; watch only the outer one",
                    resolved,
                )
    return tuple(resolved)


SIZE_MIN, SIZE_MAX = 16, 10000


def _sizes(value: object, origin: _Origin) -> tuple[int, ...]:
    items = _items(value, origin)
    if not items:
        raise _Invalid("is empty")
    sizes: list[int] = []
    for item in items:
        try:
            size = _as_int(item, origin.text)
        except _Invalid:
            raise _Invalid(f"has an item {_show(item)} that is not an integer") from None
        if not SIZE_MIN <= size <= SIZE_MAX:
            raise _Invalid(f"has an item {size} that is out of range")
        if size in sizes:
            raise _Invalid(f"lists {size} twice")
        sizes.append(size)
    return tuple(sizes)


def parse_listen(listen: str) -> tuple[str, int] | None:
    """``"127.0.0.1:9897"`` -> ``("127.0.0.1", 9897)``, ``"[::1]:9897"`` -> ``("::1", 9897)``,
    ``""`` -> None (no endpoint). Raises ValueError saying what is wrong."""
    if listen == "":
        return None
    if listen.startswith("["):
        host, sep, port = listen[1:].partition("]:")
        if not sep:
            raise ValueError("an IPv6 address needs the form [ADDRESS]:PORT")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} is not an IPv6 address") from None
    else:
        host, sep, port = listen.rpartition(":")
        if not sep:
            raise ValueError("has no port")
        if ":" in host:
            raise ValueError("an IPv6 address must be in brackets, as in [::1]:9897")
        if not host:
            raise ValueError("has no host (0.0.0.0 listens on every interface)")
        if any(ch.isspace() or ch in "/[]" for ch in host):
            raise ValueError(f"host {host!r} is not a host name or address")
    if not (port.isascii() and port.isdigit()):
        raise ValueError(f"port {port!r} is not a number")
    number = int(port)
    if not 1 <= number <= 65535:
        raise ValueError(f"port {number} is out of range")
    return host, number


def _listen(value: object, origin: _Origin) -> str:
    if not isinstance(value, str):
        raise _Invalid("is not a string")
    listen = value.strip()
    try:
        parse_listen(listen)
    except ValueError as error:
        raise _Invalid(f"is not a valid address ({error})") from None
    return listen


# --- the table of keys ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Key:
    """One setting: its dotted name, built-in default, parser, allowed values and meaning."""

    name: str
    default: object  # as it would be written in YAML; relative paths are against the cwd
    parse: Parser
    allowed: str
    description: str

    @property
    def section(self) -> str:
        return self.name.partition(".")[0]

    @property
    def key(self) -> str:
        return self.name.partition(".")[2]

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"


DAY = 86400.0
WEEK = 7 * DAY
MAX_WORKERS = 256


_KEY_LIST: tuple[Key, ...] = (
    Key(
        "watch.paths",
        ["./photos"],
        _paths,
        "a non-empty list of folders, none inside another (environment: comma-separated)",
        "folders to watch, recursively",
    ),
    Key(
        "watch.settle_seconds",
        2.0,
        _float(0.0, DAY, low_inclusive=False),
        f"a number of seconds greater than 0 and at most {DAY:.0f}",
        "a file is complete when closed after writing, or unchanged this long",
    ),
    Key(
        "watch.metadata_timeout_seconds",
        10.0,
        _float(0.0, DAY, low_inclusive=False),
        f"a number of seconds greater than 0 and at most {DAY:.0f}",
        "phase 1: longest parse of one file's metadata before its parser is killed",
    ),
    Key(
        "watch.rescan_interval_seconds",
        3600.0,
        _float(0.0, WEEK, low_inclusive=True),
        f"0 (off) or a number of seconds up to {WEEK:.0f}",
        "periodic reconcile walk of the watched folders; 0 = off",
    ),
    Key(
        "watch.polling",
        False,
        _bool,
        "true or false (environment: true/false, 1/0, yes/no, on/off)",
        "polling observer, for NFS/SMB mounts where inotify sees nothing",
    ),
    Key(
        "catalog.path",
        "./var/photoscand.db",
        _path,
        "a file path on a local filesystem, outside every watched folder",
        "the SQLite catalog",
    ),
    Key(
        "thumbnails.dir",
        "./var/thumbnails",
        _path,
        "a folder path outside every watched folder",
        "where thumbnails are written",
    ),
    Key(
        "thumbnails.sizes",
        [256, 1440],
        _sizes,
        f"a non-empty list of distinct integers from {SIZE_MIN} to {SIZE_MAX}"
        " (environment: comma-separated)",
        "longest edge of each thumbnail, pixels",
    ),
    Key(
        "thumbnails.format",
        "jpeg",
        _choice("jpeg", "webp"),
        "jpeg or webp",
        "thumbnail file format",
    ),
    Key(
        "thumbnails.quality",
        80,
        _int(1, 100),
        "an integer from 1 to 100",
        "encoder quality",
    ),
    Key(
        "workers.count",
        2,
        _int(1, MAX_WORKERS),
        f"an integer from 1 to {MAX_WORKERS}",
        f"conversions at once (also {WORKERS_COUNT_ALIAS})",
    ),
    Key(
        "workers.backend",
        "pillow",
        _choice("pillow", "magick"),
        "pillow or magick",
        "pillow (in-process) or magick (ImageMagick subprocess)",
    ),
    Key(
        "workers.timeout_seconds",
        120.0,
        _float(0.0, DAY, low_inclusive=False),
        f"a number of seconds greater than 0 and at most {DAY:.0f}",
        "longest conversion of one image before its worker is killed",
    ),
    Key(
        "workers.max_attempts",
        3,
        _int(1, 100),
        "an integer from 1 to 100",
        "tries of an image that fails transiently (timeout, crash, I/O error)",
    ),
    Key(
        "workers.retry_backoff_seconds",
        30.0,
        _float(0.0, DAY, low_inclusive=True),
        f"a number of seconds from 0 to {DAY:.0f}",
        "first back-off after a transient failure, doubling",
    ),
    Key(
        "workers.stop_timeout_seconds",
        10.0,
        _float(0.0, DAY, low_inclusive=False),
        f"a number of seconds greater than 0 and at most {DAY:.0f}",
        "graceful stop: wait this long for images in hand",
    ),
    Key(
        "workers.max_pixels",
        100_000_000,
        _int(1),
        "an integer of at least 1",
        "larger images fail as too_large, unread",
    ),
    Key(
        "workers.memory_limit_mb",
        2048,
        _int(64),
        "an integer of at least 64",
        "memory limit per worker, MiB",
    ),
    Key(
        "io.mode",
        "direct",
        _choice("direct", "prefetch"),
        "direct or prefetch",
        "direct: workers read files (SSD); prefetch: one sequential reader (HDD)",
    ),
    Key(
        "io.prefetch_window_mb",
        256,
        _int(1),
        "an integer of at least 1",
        "prefetch mode: most photo bytes held in memory ahead of the workers, MiB",
    ),
    Key(
        "metrics.listen",
        "127.0.0.1:9897",
        _listen,
        'HOST:PORT with a port from 1 to 65535 (127.0.0.1:9897, [::1]:9897), or "" for off',
        'Prometheus endpoint address; "" turns it off',
    ),
    Key(
        "logging.format",
        "auto",
        _choice("auto", "json", "console"),
        "auto, json or console",
        "auto: console on a TTY, JSON otherwise",
    ),
    Key(
        "logging.level",
        "info",
        _choice("debug", "info", "warning", "error"),
        "debug, info, warning or error",
        "least severe level logged",
    ),
)

KEYS: dict[str, Key] = {key.name: key for key in _KEY_LIST}


# --- the YAML file ----------------------------------------------------------------------


def default_config_path(cwd: str | None = None, env: Mapping[str, str] | None = None) -> str | None:
    """The config file used without ``--config``: ``$PHOTOSCAND_CONFIG`` (even when it is
    missing, so that the error says so), else ``./config.yaml``, else
    /etc/photoscand/config.yaml, when they exist; None means the built-in defaults."""
    named = (os.environ if env is None else env).get(CONFIG_VARIABLE)
    if named:
        return os.path.abspath(os.path.join(cwd or os.getcwd(), named))
    here = os.path.abspath(os.path.join(cwd or os.getcwd(), DEFAULT_FILE_NAME))
    for candidate in (here, SYSTEM_CONFIG):
        # exists, not isfile: a config.yaml that is a folder should be reported, not skipped.
        if os.path.exists(candidate):
            return candidate
    return None


def _yaml_problem(error: yaml.YAMLError) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        what = ": ".join(part for part in (error.context, error.problem) if part) or "invalid"
        if mark is not None:
            return f"{what} at line {mark.line + 1}, column {mark.column + 1}"
        return what
    return str(error)


def _line_numbers(text: str, path: str) -> tuple[dict[str, int], list[str]]:
    """Line of each section and key ("workers", "workers.count"), and duplicate-key problems.

    safe_load keeps the last of two equal keys without a word, so the node tree is walked to
    catch that and to give messages a line number. Composing builds no Python objects."""
    lines: dict[str, int] = {}
    problems: list[str] = []
    root = yaml.compose(text, Loader=yaml.SafeLoader)

    def walk(node: yaml.Node | None, prefix: str) -> None:
        if not isinstance(node, yaml.MappingNode):
            return
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                continue
            name = prefix + key_node.value
            line = key_node.start_mark.line + 1
            if name in lines:
                problems.append(
                    f"{name} (in {path}) is set twice, at lines {lines[name]} and {line};"
                    " allowed: each key once"
                )
            else:
                lines[name] = line
            if not prefix:
                walk(value_node, name + ".")

    walk(root, "")
    return lines, problems


def _read_file(path: str) -> tuple[dict[object, object], dict[str, int]]:
    """The file's top-level mapping and line numbers; ConfigError when it cannot be used."""
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a folder, not a file") from None
    except OSError as error:
        raise ConfigError(f"config file {path} cannot be read: {error.strerror}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (invalid byte at offset {error.start})"
        ) from None
    try:
        document = yaml.safe_load(text)
        lines, problems = _line_numbers(text, path)
    except yaml.YAMLError as error:
        raise ConfigError(f"config file {path} is not valid YAML: {_yaml_problem(error)}") from None
    if problems:
        raise ConfigError(problems)
    if document is None:  # an empty file, or one of comments only
        return {}, lines
    if not isinstance(document, dict):
        raise ConfigError(
            f"config file {path}: the top level is {_type_name(document)}, not a mapping;"
            f" allowed: a mapping of sections ({', '.join(SECTIONS)})"
        )
    return document, lines


def _type_name(value: object) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "empty"
    return f"a {type(value).__name__}"


def _suggest(word: str, candidates: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, candidates, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


# --- loading ----------------------------------------------------------------------------

# One value as supplied by one layer: (raw value, origin).
_Supplied = tuple[object, _Origin]


def _file_values(path: str, problems: list[str]) -> dict[str, _Supplied]:
    document, lines = _read_file(path)
    supplied: dict[str, _Supplied] = {}
    base = os.path.dirname(path)

    def origin(name: str) -> _Origin:
        line = lines.get(name)
        where = f"from {path}, line {line}" if line else f"from {path}"
        return _Origin(f"file {path}", where, text=False, base=base)

    for raw_section, body in document.items():
        section = str(raw_section)
        if section not in SECTIONS:
            problems.append(
                f"{section} ({origin(section).where}) is not a known section"
                f"{_suggest(section, list(SECTIONS))}; allowed sections: {', '.join(SECTIONS)}"
            )
            continue
        known = [key.key for key in KEYS.values() if key.section == section]
        if body is None:  # a section whose keys are all commented out
            continue
        if not isinstance(body, dict):
            problems.append(
                f"{section}: {_show(body)} ({origin(section).where}) is {_type_name(body)},"
                f" not a mapping; allowed: a mapping with keys {', '.join(known)}"
            )
            continue
        for raw_key, value in body.items():
            key = str(raw_key)
            name = f"{section}.{key}"
            if name not in KEYS:
                problems.append(
                    f"{name} ({origin(name).where}) is not a known key"
                    f"{_suggest(key, known)}; allowed keys in {section}: {', '.join(known)}"
                )
                continue
            supplied[name] = (value, origin(name))
    return supplied


def _env_values(env: Mapping[str, str], cwd: str, problems: list[str]) -> dict[str, _Supplied]:
    supplied: dict[str, _Supplied] = {}
    by_env = {key.env: key for key in KEYS.values()}
    for name, value in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = by_env.get(name)
        if key is not None:
            supplied[key.name] = (value, _Origin(f"env {name}", f"from {name}", True, cwd))
        elif name not in DOCUMENTED_VARIABLES:
            problems.append(_unknown_variable(name, by_env))
    if "workers.count" not in supplied and WORKERS_COUNT_ALIAS in env:
        supplied["workers.count"] = (
            env[WORKERS_COUNT_ALIAS],
            _Origin(f"env {WORKERS_COUNT_ALIAS}", f"from {WORKERS_COUNT_ALIAS}", True, cwd),
        )
    return supplied


def _unknown_variable(name: str, by_env: Mapping[str, Key]) -> str:
    """The problem of a PHOTOSCAND_* variable that names no setting, with the nearest one."""
    rest = name[len(ENV_PREFIX) :]
    section = next((s for s in SECTIONS if rest.startswith(s.upper() + "_")), None)
    if section is not None:
        allowed = ", ".join(key.env for key in KEYS.values() if key.section == section)
    else:
        allowed = (
            f"PHOTOSCAND_<SECTION>_<KEY> for a setting (`photoscand check-config` lists"
            f" them), or {', '.join(sorted(DOCUMENTED_VARIABLES))}"
        )
    nearest = _suggest(name, [*by_env, *DOCUMENTED_VARIABLES])
    return f"{name} (environment) is not a known setting{nearest}; allowed: {allowed}"


def _flag_values(
    overrides: Mapping[str, tuple[object, str]], cwd: str, problems: list[str]
) -> dict[str, _Supplied]:
    supplied: dict[str, _Supplied] = {}
    for name, (value, flag) in overrides.items():
        if value is None:  # the flag was not given
            continue
        if name not in KEYS:
            problems.append(
                f"{name} (from {flag}) is not a known key{_suggest(name, list(KEYS))};"
                f" allowed: {', '.join(KEYS)}"
            )
            continue
        supplied[name] = (
            value,
            _Origin(f"flag {flag}", f"from {flag}", isinstance(value, str), cwd),
        )
    return supplied


def _problem(key: Key, value: object, origin: _Origin, error: _Invalid) -> str:
    shown = _show(value if error.shown is _RAW else error.shown)
    return f"{key.name}: {shown} ({origin.where}) {error.problem}; allowed: {key.allowed}"


def load_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[object, str]] | None = None,
    check_paths: bool = True,
) -> Config:
    """Merge defaults < file < environment < overrides, validate, and return the Config.

    ``path`` None means the file :func:`default_config_path` finds, if any. ``overrides``
    maps a dotted key to ``(value, flag name)``; a value of None means the flag was not
    given, a string is parsed like an environment value. ``check_paths`` also checks the
    filesystem: watched folders exist, the catalog is not on a network filesystem. Raises
    ConfigError.
    """
    config, problems, _failed = _load(path, env, overrides, check_paths=check_paths, lenient=False)
    if config is None:
        raise ConfigError(problems)
    return config


def load_catalog_config(
    path: str | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, tuple[object, str]] | None = None,
) -> tuple[Config, list[str]]:
    """The config for commands that need only where the catalog is (``status``, ``retry``):
    a problem elsewhere in it is returned as a warning, and that setting keeps its default,
    so that an edit the running daemon has not read yet does not hide its catalog. Raises
    ConfigError when the file cannot be read or ``catalog.path`` itself is wrong."""
    config, problems, failed = _load(path, env, overrides, check_paths=False, lenient=True)
    if config is None or "catalog.path" in failed:
        raise ConfigError([p for p in problems if p.startswith("catalog.path")] or problems)
    return config, problems


def _load(
    path: str | None,
    env: Mapping[str, str] | None,
    overrides: Mapping[str, tuple[object, str]] | None,
    *,
    check_paths: bool,
    lenient: bool,
) -> tuple[Config | None, list[str], set[str]]:
    """The config (None when it has problems and ``lenient`` is off), its problems, and the
    keys whose supplied values were refused (with ``lenient``, they keep the value of the
    layer below)."""
    cwd = os.getcwd()
    env = os.environ if env is None else env
    file = default_config_path(cwd, env) if path is None else os.path.abspath(path)
    problems: list[str] = []
    layers: list[dict[str, _Supplied]] = [
        {key.name: (key.default, _Origin("default", "default", False, cwd)) for key in _KEY_LIST}
    ]
    if file is not None:
        layers.append(_file_values(file, problems))
    layers.append(_env_values(env, cwd, problems))
    layers.append(_flag_values(overrides or {}, cwd, problems))

    # Every supplied value is checked, even one a later layer overrides: a broken file must
    # not go unnoticed just because today's environment happens to mask it.
    values: dict[str, object] = {}
    origins: dict[str, _Origin] = {}
    failed: set[str] = set()
    for layer in layers:
        for name, (raw, origin) in layer.items():
            key = KEYS[name]
            try:
                values[name] = key.parse(raw, origin)
            except _Invalid as error:
                problems.append(_problem(key, raw, origin, error))
                failed.add(name)
                if not lenient:
                    values.pop(name, None)
                continue
            origins[name] = origin

    if not problems and not lenient:
        problems.extend(_placement_problems(values, origins, check_paths=check_paths))
    if problems and not lenient:
        return None, problems, failed
    sections = {
        section: cls(**{key.key: values[key.name] for key in _KEY_LIST if key.section == section})
        for section, cls in SECTIONS.items()
    }
    sources = {name: origins[name].source for name in KEYS}
    return Config(**sections, file=file, sources=sources), problems, failed


def _placement_problems(
    values: Mapping[str, object], origins: Mapping[str, _Origin], *, check_paths: bool
) -> list[str]:
    """Checks that involve more than one key, or the filesystem."""
    problems: list[str] = []
    watch = values["watch.paths"]
    assert isinstance(watch, tuple)
    catalog = values["catalog.path"]
    thumbnails = values["thumbnails.dir"]
    assert isinstance(catalog, str) and isinstance(thumbnails, str)

    def where(name: str) -> str:
        return origins[name].where

    def real(path: str) -> str:
        # With the filesystem at hand, also compare through symlinks: /srv/photos -> /data.
        return os.path.realpath(path) if check_paths else path

    if check_paths:
        for root in watch:
            if not os.path.exists(root):
                problems.append(
                    f"watch.paths: {_show(root)} ({where('watch.paths')}) does not exist;"
                    " allowed: existing folders (create it, or mount it, first)"
                )
            elif not os.path.isdir(root):
                problems.append(
                    f"watch.paths: {_show(root)} ({where('watch.paths')}) is not a folder;"
                    " allowed: existing folders"
                )

    reasons = {
        "catalog.path": "the daemon would catalog its own files",
        "thumbnails.dir": "new thumbnails would be picked up as new photos",
    }
    for name, path in (("catalog.path", catalog), ("thumbnails.dir", thumbnails)):
        for root in watch:
            if _inside(path, root) or _inside(real(path), real(root)):
                problems.append(
                    f"{name}: {_show(path)} ({where(name)}) lies inside the watched folder"
                    f" {_show(root)}; allowed: a path outside every watched folder"
                    f" ({reasons[name]})"
                )
    if _inside(catalog, thumbnails) or _inside(real(catalog), real(thumbnails)):
        problems.append(
            f"catalog.path: {_show(catalog)} ({where('catalog.path')}) lies inside"
            f" thumbnails.dir {_show(thumbnails)}; allowed: a path outside the thumbnail"
            " folder (pruning deletes files there that no row names)"
        )

    if check_paths:
        if os.path.isdir(catalog):
            problems.append(
                f"catalog.path: {_show(catalog)} ({where('catalog.path')}) is a folder;"
                " allowed: a file path (the folder is created if missing)"
            )
        if os.path.exists(thumbnails) and not os.path.isdir(thumbnails):
            problems.append(
                f"thumbnails.dir: {_show(thumbnails)} ({where('thumbnails.dir')}) is not a"
                " folder; allowed: a folder path (created if missing)"
            )
        mount = network_mount(catalog)
        if mount is not None:
            problems.append(
                f"catalog.path: {_show(catalog)} ({where('catalog.path')}) is on a network"
                f" filesystem ({mount.fstype} mounted at {mount.mount_point});"
                " allowed: a local filesystem (SQLite's WAL mode needs local locks)"
            )
    return problems


# --- filesystem type of the catalog -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mount:
    mount_point: str
    fstype: str
    source: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def parse_mountinfo(text: str) -> list[Mount]:
    """The mounts listed in /proc/self/mountinfo text, in mount order (see proc(5)).

    A line reads ``ID PARENT MAJ:MIN ROOT MOUNT-POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE
    SUPER-OPTIONS``; the kernel escapes space, tab, newline and backslash in names as octal."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < separator + 3:
            continue
        mount_point = _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4])
        mounts.append(Mount(mount_point, fields[separator + 1], fields[separator + 2]))
    return mounts


def mount_of(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount holding an absolute, symlink-free path: the longest mount-point prefix, the
    later line winning a tie (a mount stacked over another on the same point hides it)."""
    best: Mount | None = None
    for mount in mounts:
        if _inside(path, mount.mount_point) and (
            best is None or len(mount.mount_point) >= len(best.mount_point)
        ):
            best = mount
    return best


def network_mount(path: str, mountinfo: str | None = None) -> Mount | None:
    """The network filesystem that holds path (by its nearest existing ancestor folder), or
    None when it is local or the mount table cannot be read (not Linux, /proc hidden)."""
    if mountinfo is None:
        try:
            with open(MOUNTINFO_PATH, "rb") as fh:
                mountinfo = os.fsdecode(fh.read())
        except OSError:
            return None
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder) and os.path.dirname(folder) != folder:
        folder = os.path.dirname(folder)
    mount = mount_of(os.path.realpath(folder), parse_mountinfo(mountinfo))
    if mount is not None and mount.fstype in NETWORK_FILESYSTEMS:
        return mount
    return None


# --- presenting -------------------------------------------------------------------------


def _value(config: Config, key: Key) -> object:
    return getattr(getattr(config, key.section), key.key)


def changed_keys(old: Config, new: Config, names: Iterable[str]) -> list[str]:
    """The keys among ``names`` whose values differ between two configs."""
    return [name for name in names if _value(old, KEYS[name]) != _value(new, KEYS[name])]


def describe(config: Config) -> str:
    """The effective config, one ``section.key = value    (source)`` line per key, after a
    comment line naming the file."""
    rows = [(f"{key.name} = {_show(_value(config, key))}", key.name) for key in _KEY_LIST]
    width = max(len(left) for left, _ in rows)
    header = f"# config file: {config.file}" if config.file else "# config file: none"
    lines = [header]
    for left, name in rows:
        lines.append(f"{left.ljust(width)}    ({config.sources.get(name, 'default')})")
    return "\n".join(lines)


def to_dict(config: Config) -> dict[str, Any]:
    """Plain data (lists, not tuples): ``{section: {key: value}, "file": ..., "sources": ...}``."""
    data: dict[str, Any] = {section: {} for section in SECTIONS}
    for key in _KEY_LIST:
        value = _value(config, key)
        data[key.section][key.key] = list(value) if isinstance(value, tuple) else value
    data["file"] = config.file
    data["sources"] = dict(config.sources)
    return data
