"""Tests of photoscand.config: defaults, precedence, path resolution, every kind of error."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from pathlib import Path

import pytest
import yaml

from photoscand import config as cfg
from photoscand.config import (
    KEYS,
    Config,
    ConfigError,
    default_config_path,
    describe,
    load_config,
    mount_of,
    network_mount,
    parse_listen,
    parse_mountinfo,
    to_dict,
)

REPO = Path(__file__).resolve().parents[1]
PATH_KEYS = ("watch.paths", "catalog.path", "thumbnails.dir")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Run in an empty folder so ./config.yaml of the repository is never picked up by accident.
    monkeypatch.chdir(tmp_path)


def write(folder: Path, text: str, name: str = "config.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def value(config: Config, name: str) -> object:
    section, key = name.split(".")
    return getattr(getattr(config, section), key)


def errors_of(*args: object, **kwargs: object) -> str:
    kwargs.setdefault("env", {})
    kwargs.setdefault("check_paths", False)
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return str(info.value)


# --- defaults and the shipped example --------------------------------------------------------


def test_defaults_without_a_file(tmp_path: Path) -> None:
    config = load_config(env={}, check_paths=False)
    assert config.file is None
    assert config.watch.paths == (str(tmp_path / "photos"),)
    assert config.catalog.path == str(tmp_path / "var" / "photoscand.db")
    assert config.thumbnails.dir == str(tmp_path / "var" / "thumbnails")
    assert config.thumbnails.sizes == (256, 1440)
    assert config.thumbnails.format == "jpeg"
    assert config.thumbnails.quality == 80
    assert config.watch.settle_seconds == 2.0
    assert config.watch.metadata_timeout_seconds == 10.0
    assert config.watch.rescan_interval_seconds == 3600.0
    assert config.watch.polling is False
    assert config.workers == cfg.WorkersConfig(
        count=2,
        backend="pillow",
        timeout_seconds=120.0,
        max_attempts=3,
        retry_backoff_seconds=30.0,
        stop_timeout_seconds=10.0,
        max_pixels=100_000_000,
        memory_limit_mb=2048,
    )
    assert config.io == cfg.IoConfig(mode="direct", prefetch_window_mb=256)
    assert config.metrics.listen == "127.0.0.1:9897"
    assert config.logging == cfg.LoggingConfig(format="auto", level="info")
    assert dict(config.sources) == {name: "default" for name in KEYS}
    assert isinstance(config.watch.settle_seconds, float)
    assert isinstance(config.workers.count, int)


def test_defaults_check_paths_wants_the_photos_folder(tmp_path: Path) -> None:
    message = errors_of(check_paths=True)
    assert f'watch.paths: "{tmp_path / "photos"}" (default) does not exist' in message
    (tmp_path / "photos").mkdir()
    assert load_config(env={}).watch.paths == (str(tmp_path / "photos"),)


def test_shipped_config_sets_every_key_and_equals_the_defaults(tmp_path: Path) -> None:
    shipped = REPO / "config.yaml"
    document = yaml.safe_load(shipped.read_text(encoding="utf-8"))
    assert {f"{s}.{k}" for s, body in document.items() for k in body} == set(KEYS)

    from_file = load_config(str(shipped), env={}, check_paths=False)
    defaults = load_config(env={}, check_paths=False)
    assert from_file.file == str(shipped)
    assert set(from_file.sources.values()) == {f"file {shipped}"}
    # The same values, except that the file's relative paths hang off the repository while
    # the defaults' hang off the current directory.
    file_data, default_data = to_dict(from_file), to_dict(defaults)
    for name in KEYS:
        section, key = name.split(".")
        a, b = file_data[section][key], default_data[section][key]
        if name in PATH_KEYS:
            a = (
                [os.path.relpath(p, REPO) for p in a]
                if isinstance(a, list)
                else [os.path.relpath(a, REPO)]
            )
            b = (
                [os.path.relpath(p, tmp_path) for p in b]
                if isinstance(b, list)
                else [os.path.relpath(b, tmp_path)]
            )
        assert a == b, name
        assert type(a) is type(b), name


def test_default_config_path(tmp_path: Path) -> None:
    assert default_config_path() is None
    assert default_config_path(str(tmp_path)) is None
    path = write(tmp_path, "workers: {count: 7}\n")
    assert default_config_path() == str(path)
    assert default_config_path(str(tmp_path / "elsewhere")) is None
    config = load_config(env={}, check_paths=False)
    assert config.file == str(path)
    assert config.workers.count == 7
    assert config.sources["workers.count"] == f"file {path}"


def test_keys_table_matches_the_dataclasses() -> None:
    fields = {
        f"{section}.{f.name}"
        for section, cls in cfg.SECTIONS.items()
        for f in dataclasses.fields(cls)
    }
    assert set(KEYS) == fields
    assert KEYS["workers.count"].env == "PHOTOSCAND_WORKERS_COUNT"
    assert KEYS["watch.rescan_interval_seconds"].env == "PHOTOSCAND_WATCH_RESCAN_INTERVAL_SECONDS"
    assert KEYS["io.prefetch_window_mb"].env == "PHOTOSCAND_IO_PREFETCH_WINDOW_MB"
    for key in KEYS.values():
        assert key.description and key.allowed


def test_empty_file_and_empty_sections_keep_defaults(tmp_path: Path) -> None:
    empty = write(tmp_path / "a", "# nothing set\n")
    assert load_config(str(empty), env={}, check_paths=False).workers.count == 2
    sections = write(tmp_path / "b", "workers:\n  # count: 9\nio:\n")
    config = load_config(str(sections), env={}, check_paths=False)
    assert config.workers.count == 2
    assert config.sources["workers.count"] == "default"


# --- precedence and sources ------------------------------------------------------------------


def test_precedence_file_env_flag(tmp_path: Path) -> None:
    path = write(tmp_path, "workers:\n  count: 3\nlogging:\n  level: warning\n")
    file_source = f"file {path}"

    config = load_config(str(path), env={}, check_paths=False)
    assert (config.workers.count, config.sources["workers.count"]) == (3, file_source)

    env = {"PHOTOSCAND_WORKERS_COUNT": "4"}
    config = load_config(str(path), env=env, check_paths=False)
    assert (config.workers.count, config.sources["workers.count"]) == (
        4,
        "env PHOTOSCAND_WORKERS_COUNT",
    )
    assert config.logging.level == "warning"
    assert config.sources["logging.level"] == file_source

    overrides = {"workers.count": (5, "--workers"), "logging.level": ("DEBUG", "--log-level")}
    config = load_config(str(path), env=env, overrides=overrides, check_paths=False)
    assert (config.workers.count, config.sources["workers.count"]) == (5, "flag --workers")
    assert (config.logging.level, config.sources["logging.level"]) == ("debug", "flag --log-level")
    assert config.sources["workers.backend"] == "default"


def test_flag_not_given_is_skipped_and_strings_are_parsed() -> None:
    config = load_config(
        env={"PHOTOSCAND_WORKERS_COUNT": "6"},
        overrides={"workers.count": (None, "--workers"), "thumbnails.sizes": ("64,128", "--x")},
        check_paths=False,
    )
    assert config.workers.count == 6
    assert config.sources["workers.count"] == "env PHOTOSCAND_WORKERS_COUNT"
    assert config.thumbnails.sizes == (64, 128)
    message = errors_of(overrides={"workers.count": ("0", "--workers")})
    assert message == (
        "workers.count: 0 (from --workers) is out of range; allowed: an integer from 1 to 256"
    )


def test_image_worker_concurrency_alias() -> None:
    config = load_config(env={"IMAGE_WORKER_CONCURRENCY": "7"}, check_paths=False)
    assert config.workers.count == 7
    assert config.sources["workers.count"] == "env IMAGE_WORKER_CONCURRENCY"

    both = {"IMAGE_WORKER_CONCURRENCY": "7", "PHOTOSCAND_WORKERS_COUNT": "3"}
    config = load_config(env=both, check_paths=False)
    assert config.workers.count == 3
    assert config.sources["workers.count"] == "env PHOTOSCAND_WORKERS_COUNT"

    # The alias is not read at all when the real name is set, so a value meant for some other
    # tool cannot stop the daemon.
    masked = {"IMAGE_WORKER_CONCURRENCY": "auto", "PHOTOSCAND_WORKERS_COUNT": "3"}
    assert load_config(env=masked, check_paths=False).workers.count == 3

    message = errors_of(env={"IMAGE_WORKER_CONCURRENCY": "auto"})
    assert message == (
        'workers.count: "auto" (from IMAGE_WORKER_CONCURRENCY) is not an integer;'
        " allowed: an integer from 1 to 256"
    )

    config = load_config(
        env={"IMAGE_WORKER_CONCURRENCY": "7"},
        overrides={"workers.count": (2, "--workers")},
        check_paths=False,
    )
    assert (config.workers.count, config.sources["workers.count"]) == (2, "flag --workers")


def test_every_key_has_a_working_environment_variable(tmp_path: Path) -> None:
    env = {
        "PHOTOSCAND_WATCH_PATHS": "/srv/a,/srv/b",
        "PHOTOSCAND_WATCH_SETTLE_SECONDS": "0.5",
        "PHOTOSCAND_WATCH_METADATA_TIMEOUT_SECONDS": "3",
        "PHOTOSCAND_WATCH_RESCAN_INTERVAL_SECONDS": "0",
        "PHOTOSCAND_WATCH_POLLING": "yes",
        "PHOTOSCAND_CATALOG_PATH": "state/catalog.db",
        "PHOTOSCAND_THUMBNAILS_DIR": "/cache/thumbs",
        "PHOTOSCAND_THUMBNAILS_SIZES": "128, 512 ,2048",
        "PHOTOSCAND_THUMBNAILS_FORMAT": "webp",
        "PHOTOSCAND_THUMBNAILS_QUALITY": "90",
        "PHOTOSCAND_WORKERS_COUNT": "8",
        "PHOTOSCAND_WORKERS_BACKEND": "magick",
        "PHOTOSCAND_WORKERS_TIMEOUT_SECONDS": "60",
        "PHOTOSCAND_WORKERS_MAX_ATTEMPTS": "5",
        "PHOTOSCAND_WORKERS_RETRY_BACKOFF_SECONDS": "0",
        "PHOTOSCAND_WORKERS_STOP_TIMEOUT_SECONDS": "2.5",
        "PHOTOSCAND_WORKERS_MAX_PIXELS": "1e8",
        "PHOTOSCAND_WORKERS_MEMORY_LIMIT_MB": "512",
        "PHOTOSCAND_IO_MODE": "prefetch",
        "PHOTOSCAND_IO_PREFETCH_WINDOW_MB": "64",
        "PHOTOSCAND_METRICS_LISTEN": "",
        "PHOTOSCAND_LOGGING_FORMAT": "json",
        "PHOTOSCAND_LOGGING_LEVEL": "Warning",
        "PSCD_TEST_CORPUS": "/not/a/setting",  # not photoscand's prefix: not looked at
    }
    assert {k.env for k in KEYS.values()} <= set(env)
    config = load_config(env=env, check_paths=False)
    assert config.watch == cfg.WatchConfig(("/srv/a", "/srv/b"), 0.5, 3.0, 0.0, True)
    assert config.catalog.path == str(tmp_path / "state" / "catalog.db")  # against the cwd
    assert config.thumbnails == cfg.ThumbnailsConfig("/cache/thumbs", (128, 512, 2048), "webp", 90)
    assert config.workers == cfg.WorkersConfig(8, "magick", 60.0, 5, 0.0, 2.5, 100_000_000, 512)
    assert config.io == cfg.IoConfig("prefetch", 64)
    assert config.metrics.listen == ""
    assert config.logging == cfg.LoggingConfig("json", "warning")
    assert all(source.startswith("env PHOTOSCAND_") for source in config.sources.values())


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("true", True),
        ("1", True),
        ("YES", True),
        ("on", True),
        (" false ", False),
        ("0", False),
        ("no", False),
        ("Off", False),
    ],
)
def test_environment_booleans(text: str, expected: bool) -> None:
    config = load_config(env={"PHOTOSCAND_WATCH_POLLING": text}, check_paths=False)
    assert config.watch.polling is expected


def test_yaml_numbers_in_other_spellings(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "workers:\n  max_pixels: 1.0e+8\n  memory_limit_mb: 4_096\n  timeout_seconds: 30\n",
    )
    config = load_config(str(path), env={}, check_paths=False)
    assert config.workers.max_pixels == 100_000_000
    assert isinstance(config.workers.max_pixels, int)
    assert config.workers.memory_limit_mb == 4096
    assert config.workers.timeout_seconds == 30.0
    assert isinstance(config.workers.timeout_seconds, float)


# --- paths -------------------------------------------------------------------------------------


def test_relative_paths_in_a_file_follow_the_file(tmp_path: Path, monkeypatch) -> None:
    etc = tmp_path / "etc" / "photoscand"
    path = write(
        etc,
        "watch:\n  paths: [../../photos, ./more/../scans/]\n"
        "catalog:\n  path: state/cat.db\nthumbnails:\n  dir: /abs/thumbs\n",
    )
    elsewhere = tmp_path / "run"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(str(path), env={}, check_paths=False)
    assert config.watch.paths == (str(tmp_path / "photos"), str(etc / "scans"))
    assert config.catalog.path == str(etc / "state" / "cat.db")
    assert config.thumbnails.dir == "/abs/thumbs"
    # Defaults not set by the file stay relative to the current directory.
    config = load_config(
        str(write(etc, "io: {mode: direct}\n", "min.yaml")), env={}, check_paths=False
    )
    assert config.catalog.path == str(elsewhere / "var" / "photoscand.db")


def test_relative_config_file_path_and_flags_follow_the_cwd(tmp_path: Path) -> None:
    write(tmp_path / "conf", "catalog:\n  path: cat.db\n")
    config = load_config(
        "conf/config.yaml",
        env={"PHOTOSCAND_WATCH_PATHS": "in,  /abs/out"},
        overrides={"thumbnails.dir": ("t", "--thumbnails")},
        check_paths=False,
    )
    assert config.file == str(tmp_path / "conf" / "config.yaml")
    assert config.catalog.path == str(tmp_path / "conf" / "cat.db")
    assert config.watch.paths == (str(tmp_path / "in"), "/abs/out")
    assert config.thumbnails.dir == str(tmp_path / "t")


def test_home_is_expanded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    path = write(tmp_path, "watch:\n  paths: [~/Pictures]\n")
    config = load_config(str(path), env={}, check_paths=False)
    assert config.watch.paths == (str(tmp_path / "home" / "Pictures"),)


def test_watch_symlink_is_kept_as_named(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    config = load_config(env={"PHOTOSCAND_WATCH_PATHS": "link"})
    assert config.watch.paths == (str(tmp_path / "link"),)


def test_missing_and_non_folder_watch_paths(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "file.jpg").write_bytes(b"x")
    env = {"PHOTOSCAND_WATCH_PATHS": "photos,gone,file.jpg"}
    message = errors_of(env=env, check_paths=True)
    lines = message.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f'watch.paths: "{tmp_path / "gone"}" (from PHOTOSCAND_WATCH_PATHS)')
    assert "does not exist; allowed: existing folders" in lines[0]
    assert lines[1].startswith(f'watch.paths: "{tmp_path / "file.jpg"}"')
    assert "is not a folder" in lines[1]
    # status loads the same config without looking at the filesystem.
    config = load_config(env=env, check_paths=False)
    assert len(config.watch.paths) == 3


def test_catalog_and_thumbnails_inside_a_watched_path(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    path = write(
        tmp_path,
        "watch:\n  paths: [photos]\ncatalog:\n  path: photos/.db/cat.db\n"
        "thumbnails:\n  dir: photos/thumbs\n",
    )
    message = errors_of(str(path), check_paths=True)
    lines = message.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(
        f'catalog.path: "{tmp_path / "photos" / ".db" / "cat.db"}" (from {path}, line 4)'
        f' lies inside the watched folder "{tmp_path / "photos"}"'
    )
    assert "allowed: a path outside every watched folder" in lines[0]
    assert lines[1].startswith(
        f'thumbnails.dir: "{tmp_path / "photos" / "thumbs"}" (from {path}, line 6)'
    )
    # Also a pure path check, done without touching the filesystem.
    assert errors_of(str(path), check_paths=False) == message


def test_inside_check_sees_through_symlinks(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "photos")
    env = {"PHOTOSCAND_WATCH_PATHS": "photos", "PHOTOSCAND_CATALOG_PATH": "alias/cat.db"}
    message = errors_of(env=env, check_paths=True)
    assert message.startswith(f'catalog.path: "{tmp_path / "alias" / "cat.db"}"')
    assert "lies inside the watched folder" in message
    # A sibling whose name starts with the root's name is not inside it.
    ok = {"PHOTOSCAND_WATCH_PATHS": "photos", "PHOTOSCAND_CATALOG_PATH": "photos2/cat.db"}
    assert load_config(env=ok).catalog.path == str(tmp_path / "photos2" / "cat.db")


def test_catalog_inside_thumbnails_and_catalog_a_folder(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    message = errors_of(
        env={"PHOTOSCAND_THUMBNAILS_DIR": "var", "PHOTOSCAND_CATALOG_PATH": "var/db"}
    )
    assert message.startswith(f'catalog.path: "{tmp_path / "var" / "db"}" (from ')
    assert "lies inside thumbnails.dir" in message
    (tmp_path / "adir").mkdir()
    (tmp_path / "afile").write_bytes(b"")
    message = errors_of(
        env={"PHOTOSCAND_CATALOG_PATH": "adir", "PHOTOSCAND_THUMBNAILS_DIR": "afile"},
        check_paths=True,
    )
    assert f'catalog.path: "{tmp_path / "adir"}" (from PHOTOSCAND_CATALOG_PATH) is a folder' in (
        message
    )
    assert f'thumbnails.dir: "{tmp_path / "afile"}" (from PHOTOSCAND_THUMBNAILS_DIR) is not a' in (
        message
    )


# --- errors in values --------------------------------------------------------------------------

BAD_FILE_VALUES = [
    ("workers:\n  count: 0\n", "workers.count: 0", "out of range", "an integer from 1 to 256"),
    ("workers:\n  count: 257\n", "workers.count: 257", "out of range", "from 1 to 256"),
    ("workers:\n  count: many\n", 'workers.count: "many"', "not an integer", "from 1 to 256"),
    ("workers:\n  count: true\n", "workers.count: true", "not an integer", "from 1 to 256"),
    ("workers:\n  count: 2.5\n", "workers.count: 2.5", "not an integer", "from 1 to 256"),
    ("workers:\n  count: [2]\n", "workers.count: [2]", "not an integer", "from 1 to 256"),
    ("workers:\n  count:\n", "workers.count: null", "not an integer", "from 1 to 256"),
    ("workers:\n  backend: vips\n", 'workers.backend: "vips"', "not one of", "pillow or magick"),
    (
        "workers:\n  timeout_seconds: 0\n",
        "workers.timeout_seconds: 0",
        "out of range",
        "greater than 0",
    ),
    (
        "workers:\n  timeout_seconds: -5\n",
        "workers.timeout_seconds: -5",
        "out of range",
        "greater than 0",
    ),
    (
        "workers:\n  timeout_seconds: .inf\n",
        "workers.timeout_seconds: Infinity",
        "not a finite number",
        "greater than 0",
    ),
    (
        "workers:\n  timeout_seconds: .nan\n",
        "workers.timeout_seconds: NaN",
        "not a finite number",
        "greater than 0",
    ),
    (
        "workers:\n  timeout_seconds: '10s'\n",
        'workers.timeout_seconds: "10s"',
        "not a number",
        "seconds",
    ),
    (
        "workers:\n  stop_timeout_seconds: 0\n",
        "workers.stop_timeout_seconds: 0",
        "out of range",
        "greater than 0",
    ),
    (
        "workers:\n  retry_backoff_seconds: -1\n",
        "workers.retry_backoff_seconds: -1",
        "out of range",
        "from 0 to",
    ),
    (
        "workers:\n  max_attempts: 0\n",
        "workers.max_attempts: 0",
        "out of range",
        "an integer from 1 to 100",
    ),
    ("workers:\n  max_pixels: 0\n", "workers.max_pixels: 0", "out of range", "at least 1"),
    (
        "workers:\n  memory_limit_mb: 63\n",
        "workers.memory_limit_mb: 63",
        "out of range",
        "at least 64",
    ),
    ("watch:\n  settle_seconds: 0\n", "watch.settle_seconds: 0", "out of range", "greater than 0"),
    (
        "watch:\n  metadata_timeout_seconds: 0\n",
        "watch.metadata_timeout_seconds: 0",
        "out of range",
        "greater than 0",
    ),
    (
        "watch:\n  rescan_interval_seconds: -1\n",
        "watch.rescan_interval_seconds: -1",
        "out of range",
        "0 (off)",
    ),
    ("watch:\n  polling: 'yes'\n", 'watch.polling: "yes"', "not a boolean", "true or false"),
    ("watch:\n  polling: 1\n", "watch.polling: 1", "not a boolean", "true or false"),
    ("watch:\n  paths: []\n", "watch.paths: []", "is empty", "a non-empty list of folders"),
    (
        "watch:\n  paths: /srv/photos\n",
        'watch.paths: "/srv/photos"',
        "is not a list",
        "a non-empty list of folders",
    ),
    (
        "watch:\n  paths: [/a, '']\n",
        'watch.paths: ["/a", ""]',
        'has an item "" that is an empty',
        "a non-empty list of folders",
    ),
    (
        "watch:\n  paths: [2024]\n",
        "watch.paths: [2024]",
        "has an item 2024 that is not a string",
        "list of folders",
    ),
    (
        "watch:\n  paths: [/a, /b/../a/]\n",
        'watch.paths: ["/a", "/a"]',
        'lists "/a" twice',
        "list of folders",
    ),
    (
        "watch:\n  paths: [/a/b, /a]\n",
        'watch.paths: ["/a/b", "/a"]',
        'lists "/a/b" inside "/a"',
        "none inside another",
    ),
    ("catalog:\n  path: ''\n", 'catalog.path: ""', "is an empty path", "a file path"),
    ("catalog:\n  path: 42\n", "catalog.path: 42", "is not a string", "a file path"),
    (
        "thumbnails:\n  sizes: []\n",
        "thumbnails.sizes: []",
        "is empty",
        "a non-empty list of distinct integers from 16 to 10000",
    ),
    (
        "thumbnails:\n  sizes: [15, 256]\n",
        "thumbnails.sizes: [15, 256]",
        "has an item 15 that is out of range",
        "from 16 to 10000",
    ),
    (
        "thumbnails:\n  sizes: [256, 10001]\n",
        "thumbnails.sizes: [256, 10001]",
        "has an item 10001 that is out of range",
        "from 16 to 10000",
    ),
    (
        "thumbnails:\n  sizes: [256, 256]\n",
        "thumbnails.sizes: [256, 256]",
        "lists 256 twice",
        "distinct",
    ),
    (
        "thumbnails:\n  sizes: [big]\n",
        'thumbnails.sizes: ["big"]',
        'has an item "big" that is not an integer',
        "distinct integers",
    ),
    ("thumbnails:\n  sizes: 256\n", "thumbnails.sizes: 256", "is not a list", "distinct"),
    (
        "thumbnails:\n  quality: 0\n",
        "thumbnails.quality: 0",
        "out of range",
        "an integer from 1 to 100",
    ),
    (
        "thumbnails:\n  quality: 101\n",
        "thumbnails.quality: 101",
        "out of range",
        "an integer from 1 to 100",
    ),
    (
        "thumbnails:\n  format: jpg\n",
        'thumbnails.format: "jpg"',
        "is not one of the allowed values (did you mean jpeg?)",
        "allowed: jpeg or webp",
    ),
    (
        "thumbnails:\n  format: gif\n",
        'thumbnails.format: "gif"',
        "is not one of the allowed",
        "allowed: jpeg or webp",
    ),
    ("io:\n  mode: fast\n", 'io.mode: "fast"', "not one of", "direct or prefetch"),
    ("io:\n  prefetch_window_mb: 0\n", "io.prefetch_window_mb: 0", "out of range", "at least 1"),
    (
        "logging:\n  format: jsn\n",
        'logging.format: "jsn"',
        "(did you mean json?)",
        "auto, json or console",
    ),
    (
        "logging:\n  level: trace\n",
        'logging.level: "trace"',
        "not one of",
        "debug, info, warning or error",
    ),
    ("metrics:\n  listen: 9897\n", "metrics.listen: 9897", "is not a string", "HOST:PORT"),
    (
        "metrics:\n  listen: localhost\n",
        'metrics.listen: "localhost"',
        "has no port",
        "HOST:PORT with a port from 1 to 65535",
    ),
    ("metrics:\n  listen: ':9897'\n", 'metrics.listen: ":9897"', "has no host", "HOST:PORT"),
    (
        "metrics:\n  listen: 'localhost:0'\n",
        'metrics.listen: "localhost:0"',
        "port 0 is out of range",
        "HOST:PORT",
    ),
    (
        "metrics:\n  listen: 'localhost:65536'\n",
        'metrics.listen: "localhost:65536"',
        "port 65536 is out of range",
        "HOST:PORT",
    ),
    (
        "metrics:\n  listen: 'localhost:http'\n",
        'metrics.listen: "localhost:http"',
        "port 'http' is not a number",
        "HOST:PORT",
    ),
    (
        "metrics:\n  listen: '::1:9897'\n",
        'metrics.listen: "::1:9897"',
        "must be in brackets",
        "[::1]:9897",
    ),
    ("metrics:\n  listen: '[::1]'\n", 'metrics.listen: "[::1]"', "[ADDRESS]:PORT", "HOST:PORT"),
    (
        "metrics:\n  listen: '[nope]:80'\n",
        'metrics.listen: "[nope]:80"',
        "'nope' is not an IPv6 address",
        "HOST:PORT",
    ),
]


@pytest.mark.parametrize(("text", "head", "problem", "allowed"), BAD_FILE_VALUES)
def test_bad_values_in_a_file(
    tmp_path: Path, text: str, head: str, problem: str, allowed: str
) -> None:
    path = write(tmp_path, text)
    message = errors_of(str(path))
    assert len(message.splitlines()) == 1, message
    assert message.startswith(f"{head} (from {path}, line 2) "), message
    before, _, after = message.partition("; allowed: ")
    assert problem in before, message
    assert allowed in after or allowed in message, message


@pytest.mark.parametrize(
    ("name", "text", "expected"),
    [
        (
            "PHOTOSCAND_WORKERS_COUNT",
            "0",
            "workers.count: 0 (from PHOTOSCAND_WORKERS_COUNT) is out of range;"
            " allowed: an integer from 1 to 256",
        ),
        (
            "PHOTOSCAND_WORKERS_COUNT",
            "two",
            'workers.count: "two" (from PHOTOSCAND_WORKERS_COUNT) is not an integer;'
            " allowed: an integer from 1 to 256",
        ),
        (
            "PHOTOSCAND_WORKERS_COUNT",
            "",
            'workers.count: "" (from PHOTOSCAND_WORKERS_COUNT) is not an integer;'
            " allowed: an integer from 1 to 256",
        ),
        (
            "PHOTOSCAND_WATCH_POLLING",
            "maybe",
            'watch.polling: "maybe" (from PHOTOSCAND_WATCH_POLLING) is not a boolean;'
            " allowed: true or false (environment: true/false, 1/0, yes/no, on/off)",
        ),
        (
            "PHOTOSCAND_WATCH_PATHS",
            " , ",
            'watch.paths: " , " (from PHOTOSCAND_WATCH_PATHS) is empty: at least one folder'
            " must be watched; allowed: a non-empty list of folders, none inside another"
            " (environment: comma-separated)",
        ),
        (
            "PHOTOSCAND_THUMBNAILS_SIZES",
            "256,x",
            'thumbnails.sizes: "256,x" (from PHOTOSCAND_THUMBNAILS_SIZES) has an item "x" that'
            " is not an integer; allowed: a non-empty list of distinct integers from 16 to 10000"
            " (environment: comma-separated)",
        ),
        (
            "PHOTOSCAND_WORKERS_TIMEOUT_SECONDS",
            "inf",
            "workers.timeout_seconds: Infinity (from PHOTOSCAND_WORKERS_TIMEOUT_SECONDS) is not"
            " a finite number; allowed: a number of seconds greater than 0 and at most 86400",
        ),
        (
            "PHOTOSCAND_METRICS_LISTEN",
            "0.0.0.0:99999",
            'metrics.listen: "0.0.0.0:99999" (from PHOTOSCAND_METRICS_LISTEN) is not a valid'
            " address (port 99999 is out of range); allowed: HOST:PORT with a port from 1 to"
            ' 65535 (127.0.0.1:9897, [::1]:9897), or "" for off',
        ),
    ],
)
def test_bad_values_in_the_environment(name: str, text: str, expected: str) -> None:
    assert errors_of(env={name: text}) == expected


def test_unknown_section_and_keys_suggest_the_closest(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "wokers:\n  count: 2\nworkers:\n  cont: 3\n  count: 4\n  colour: red\nzzz: 1\n",
    )
    lines = errors_of(str(path)).splitlines()
    assert lines[0] == (
        f"wokers (from {path}, line 1) is not a known section (did you mean workers?);"
        " allowed sections: watch, catalog, thumbnails, workers, io, metrics, logging"
    )
    assert lines[1].startswith(
        f"workers.cont (from {path}, line 4) is not a known key (did you mean count?);"
        " allowed keys in workers: count, backend, timeout_seconds,"
    )
    assert lines[2].startswith(f"workers.colour (from {path}, line 6) is not a known key;")
    assert "(did you mean" not in lines[2]
    assert lines[3].startswith(f"zzz (from {path}, line 7) is not a known section;")
    assert len(lines) == 4


def test_unknown_environment_settings_and_flags() -> None:
    message = errors_of(env={"PHOTOSCAND_WORKERS_CONUT": "3", "PHOTOSCAND_SOMETHING": "x"})
    first, second = message.splitlines()
    assert first.startswith(
        "PHOTOSCAND_WORKERS_CONUT (environment) is not a known setting"
        " (did you mean PHOTOSCAND_WORKERS_COUNT?); allowed: PHOTOSCAND_WORKERS_COUNT,"
    )
    # A name outside every section is a typo all the same (other tools' knobs have their own
    # prefix); PHOTOSCAND_CONFIG is the one variable that is not a setting.
    assert second.startswith("PHOTOSCAND_SOMETHING (environment) is not a known setting")
    assert "PHOTOSCAND_CONFIG" in second
    message = errors_of(overrides={"worker.count": (3, "--workers")})
    assert message.startswith(
        "worker.count (from --workers) is not a known key (did you mean workers.count?)"
    )


def test_section_that_is_not_a_mapping(tmp_path: Path) -> None:
    path = write(tmp_path, "workers: 4\n")
    assert errors_of(str(path)) == (
        f"workers: 4 (from {path}, line 1) is a number, not a mapping; allowed: a mapping with"
        " keys count, backend, timeout_seconds, max_attempts, retry_backoff_seconds,"
        " stop_timeout_seconds, max_pixels, memory_limit_mb"
    )


@pytest.mark.parametrize(
    ("text", "what"), [("- watch\n- workers\n", "a list"), ("just words\n", "a string")]
)
def test_top_level_not_a_mapping(tmp_path: Path, text: str, what: str) -> None:
    path = write(tmp_path, text)
    assert errors_of(str(path)) == (
        f"config file {path}: the top level is {what}, not a mapping; allowed: a mapping of"
        " sections (watch, catalog, thumbnails, workers, io, metrics, logging)"
    )


def test_unreadable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    assert errors_of(str(missing)) == f"config file {missing} does not exist"
    folder = tmp_path / "folder.yaml"
    folder.mkdir()
    assert errors_of(str(folder)) == f"config file {folder} is a folder, not a file"
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("watch:\n  paths: [/Fotos/K\xfcche]\n".encode("latin-1"))
    assert errors_of(str(latin1)) == (
        f"config file {latin1} is not UTF-8 text (invalid byte at offset 25)"
    )


def test_default_config_path_that_is_a_folder_is_reported(tmp_path: Path) -> None:
    (tmp_path / "config.yaml").mkdir()
    assert errors_of() == f"config file {tmp_path / 'config.yaml'} is a folder, not a file"


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("workers:\n  count: [1, 2\n", "at line 3, column 1"),
        ("workers:\n\tcount: 2\n", "found character '\\t' that cannot start any token at line 2"),
        ("a: 1\n---\nb: 2\n", "expected a single document in the stream: but found"),
        ("workers: !!python/object/apply:os.system ['touch pwned']\n", "could not determine"),
    ],
)
def test_invalid_yaml(tmp_path: Path, text: str, fragment: str) -> None:
    path = write(tmp_path, text)
    message = errors_of(str(path))
    assert message.startswith(f"config file {path} is not valid YAML: "), message
    assert fragment in message, message
    assert not (tmp_path / "pwned").exists()


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    path = write(tmp_path, "workers:\n  count: 2\nio: {}\nworkers:\n  count: 3\n  count: 4\n")
    lines = errors_of(str(path)).splitlines()
    assert lines == [
        f"workers (in {path}) is set twice, at lines 1 and 4; allowed: each key once",
        f"workers.count (in {path}) is set twice, at lines 2 and 5; allowed: each key once",
        f"workers.count (in {path}) is set twice, at lines 2 and 6; allowed: each key once",
    ]


def test_several_errors_are_reported_together(tmp_path: Path) -> None:
    path = write(tmp_path, "workers:\n  count: 0\nthumbnails:\n  quality: 500\n")
    env = {"PHOTOSCAND_IO_MODE": "turbo", "PHOTOSCAND_WORKERS_COUNT": "4"}
    with pytest.raises(ConfigError) as info:
        load_config(str(path), env=env, check_paths=False)
    problems = info.value.problems
    # The file's bad count is reported although the environment overrides it.
    assert [p.split(":")[0] for p in problems] == ["workers.count", "thumbnails.quality", "io.mode"]
    assert str(info.value) == "\n".join(problems)
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.problems == problems and str(copy) == str(info.value)


def test_undecodable_path_bytes_print_safely() -> None:
    raw = os.fsdecode(b"/srv/K\xfcche")
    config = load_config(env={"PHOTOSCAND_WATCH_PATHS": raw}, check_paths=False)
    assert config.watch.paths == (raw,)
    text = describe(config)
    text.encode("utf-8")  # would raise on a lone surrogate
    assert '"/srv/K\\udcfcche"' in text


# --- parse_listen ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("listen", "expected"),
    [
        ("127.0.0.1:9897", ("127.0.0.1", 9897)),
        ("0.0.0.0:1", ("0.0.0.0", 1)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:9897", ("::1", 9897)),
        ("[::]:80", ("::", 80)),
        ("", None),
    ],
)
def test_parse_listen(listen: str, expected: tuple[str, int] | None) -> None:
    assert parse_listen(listen) == expected


def test_ipv6_listen_from_a_file(tmp_path: Path) -> None:
    path = write(tmp_path, "metrics:\n  listen: '[::1]:9000'\n")
    config = load_config(str(path), env={}, check_paths=False)
    assert parse_listen(config.metrics.listen) == ("::1", 9000)
    off = write(tmp_path / "off", 'metrics:\n  listen: ""\n')
    assert parse_listen(load_config(str(off), env={}, check_paths=False).metrics.listen) is None


# --- network filesystems -------------------------------------------------------------------

MOUNTINFO = """\
22 27 0:21 / /proc rw,relatime - proc proc rw
27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
40 27 0:40 / /mnt/nas rw,relatime shared:7 master:2 - nfs4 nas:/export rw,vers=4.2
41 40 8:17 / /mnt/nas/local rw,relatime - ext4 /dev/sdb1 rw
42 27 0:42 / /mnt/my\\040share rw - cifs //srv/share rw
43 27 0:43 / /srv rw - ext4 /dev/sdc1 rw
44 27 0:44 / /srv rw - fuse.sshfs me@host:/data rw
45 27 0:45 / /mnt/nasbackup rw - xfs /dev/sdd1 rw
this line is not a mount
"""


def test_parse_mountinfo() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    assert [(m.mount_point, m.fstype) for m in mounts] == [
        ("/proc", "proc"),
        ("/", "ext4"),
        ("/mnt/nas", "nfs4"),
        ("/mnt/nas/local", "ext4"),
        ("/mnt/my share", "cifs"),
        ("/srv", "ext4"),
        ("/srv", "fuse.sshfs"),
        ("/mnt/nasbackup", "xfs"),
    ]
    assert mounts[2].source == "nas:/export"


@pytest.mark.parametrize(
    ("path", "fstype"),
    [
        ("/var/lib/photoscand", "ext4"),
        ("/mnt/nas", "nfs4"),
        ("/mnt/nas/photoscand", "nfs4"),
        ("/mnt/nas/local/photoscand", "ext4"),  # a local disk mounted below the share
        ("/mnt/nasbackup/photoscand", "xfs"),  # a prefix of the name is not a parent
        ("/mnt/my share/db", "cifs"),
        ("/srv/db", "fuse.sshfs"),  # the later of two mounts on one point is on top
    ],
)
def test_mount_of_uses_the_longest_prefix(path: str, fstype: str) -> None:
    mount = mount_of(path, parse_mountinfo(MOUNTINFO))
    assert mount is not None and mount.fstype == fstype


def test_network_mount_walks_up_to_an_existing_folder(tmp_path: Path) -> None:
    share = tmp_path / "share"
    share.mkdir()
    real = os.path.realpath(share)
    text = f"27 1 254:0 / / rw - ext4 /dev/vda rw\n50 27 0:50 / {real} rw - nfs nas:/x rw\n"
    mount = network_mount(str(share / "not" / "yet" / "catalog.db"), text)
    assert mount is not None and mount.fstype == "nfs" and mount.mount_point == real
    assert network_mount(str(tmp_path / "local.db"), text) is None


def test_catalog_on_a_network_filesystem_is_refused(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "net").mkdir()
    real = os.path.realpath(tmp_path / "net")
    sample = tmp_path / "mountinfo"
    sample.write_text(
        f"27 1 254:0 / / rw - ext4 /dev/vda rw\n60 27 0:60 / {real} rw - smb3 //nas/x rw\n"
    )
    monkeypatch.setattr(cfg, "MOUNTINFO_PATH", str(sample))
    env = {"PHOTOSCAND_CATALOG_PATH": "net/state/cat.db"}
    assert errors_of(env=env, check_paths=True) == (
        f'catalog.path: "{tmp_path / "net" / "state" / "cat.db"}" (from PHOTOSCAND_CATALOG_PATH)'
        f" is on a network filesystem (smb3 mounted at {real}); allowed: a local filesystem"
        " (SQLite's WAL mode needs local locks)"
    )
    assert load_config(env=env, check_paths=False).catalog.path.endswith("cat.db")
    # Thumbnails may live on a share; only the catalog needs local locks.
    assert load_config(env={"PHOTOSCAND_THUMBNAILS_DIR": "net/t"}).thumbnails.dir == str(
        tmp_path / "net" / "t"
    )
    # Without a readable mount table (not Linux, /proc hidden) the check is skipped.
    monkeypatch.setattr(cfg, "MOUNTINFO_PATH", str(tmp_path / "absent"))
    assert load_config(env=env).catalog.path == str(tmp_path / "net" / "state" / "cat.db")


def test_this_machines_temporary_folder_is_local(tmp_path: Path) -> None:
    # The real /proc/self/mountinfo parses, and the test's own folder is found on a mount.
    with open("/proc/self/mountinfo", "rb") as fh:
        mounts = parse_mountinfo(os.fsdecode(fh.read()))
    assert mount_of(os.path.realpath(tmp_path), mounts) is not None
    assert network_mount(str(tmp_path / "cat.db")) is None


# --- describe / to_dict --------------------------------------------------------------------


def test_describe_lists_every_key_with_its_source(tmp_path: Path) -> None:
    path = write(tmp_path, "workers:\n  count: 3\n", "site.yaml")
    config = load_config(
        str(path),
        env={"PHOTOSCAND_METRICS_LISTEN": ""},
        overrides={"logging.level": ("debug", "--log-level")},
        check_paths=False,
    )
    lines = describe(config).splitlines()
    assert lines[0] == f"# config file: {path}"
    body = lines[1:]
    assert [line.split(" = ")[0] for line in body] == list(KEYS)
    by_key = {line.split(" = ")[0]: line for line in body}
    assert by_key["workers.count"].split() == ["workers.count", "=", "3", "(file", f"{path})"]
    assert by_key["metrics.listen"].split() == [
        "metrics.listen",
        "=",
        '""',
        "(env",
        "PHOTOSCAND_METRICS_LISTEN)",
    ]
    assert by_key["logging.level"].endswith("(flag --log-level)")
    assert by_key["thumbnails.sizes"].startswith("thumbnails.sizes = [256, 1440] ")
    assert by_key["watch.polling"].endswith("(default)")
    # The sources line up in one column.
    assert len({line.index("    (") for line in body}) == 1
    assert describe(load_config(env={}, check_paths=False)).splitlines()[0] == "# config file: none"


def test_to_dict_is_plain_data_and_the_config_pickles(tmp_path: Path) -> None:
    config = load_config(
        env={"PHOTOSCAND_WATCH_PATHS": "/a,/b", "PHOTOSCAND_WORKERS_COUNT": "4"},
        check_paths=False,
    )
    data = to_dict(config)
    assert json.loads(json.dumps(data)) == data
    assert data["watch"]["paths"] == ["/a", "/b"]
    assert data["workers"]["count"] == 4
    assert data["sources"]["workers.count"] == "env PHOTOSCAND_WORKERS_COUNT"
    assert data["file"] is None
    copy = pickle.loads(pickle.dumps(config))
    assert copy == config and copy.sources == config.sources


def test_config_is_frozen() -> None:
    config = load_config(env={}, check_paths=False)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.workers.count = 9  # type: ignore[misc]
