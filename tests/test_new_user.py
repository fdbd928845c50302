"""photoscand tried the way a new user tries it: a phone folder copied in slowly or
all at once, `status` from another folder, options in any order, typos in the environment,
a service installed by the operations guide, `make run` on a fresh clone. One test (or a few)
per point of what a new user stumbled on.

Every command runs as a subprocess in an isolated environment: HOME and the current folder
are temporary folders, and no PHOTOSCAND_* variable of the caller leaks in. Nothing here
writes outside tmp_path (in particular not /etc/photoscand or /proc/sys).
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from photoscand.outcomes import REASONS
from tests.conftest import CORPUS, REPO, DaemonProcess, wait_for
from tests.reliability import LARGE_PHOTO, SMALL_PHOTO, distinct_copies

GOOD = CORPUS / "cameras" / "Canon_40D.jpg"
# Fails as corrupt from its header on (a GIF whose screen is 0 pixels wide): nothing about it
# says "still arriving", so it fails at once also after point 1.
CORRUPT = CORPUS / "bad" / "pillow_zero_width.gif"
EMPTY = CORPUS / "bad" / "derived_zero_bytes.jpg"
# LibRaw prints "unknown file: data corrupted at 1378" on the worker's stderr for it.
NOISY_RAW = CORPUS / "raw" / "Nikon.nef"
DEPLOY = REPO / "deploy"
OPERATIONS = REPO / "docs" / "operations.md"
SYSTEMD = DEPLOY / "systemd"
HOUR = 3600


# -- helpers -------------------------------------------------------------------------------


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The caller's environment without photoscand's variables, with HOME in tmp_path."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("PHOTOSCAND_")
        and k not in ("IMAGE_WORKER_CONCURRENCY", "JOURNAL_STREAM", "NOTIFY_SOCKET")
    }
    home.mkdir(parents=True, exist_ok=True)
    env["HOME"] = str(home)
    env.update(extra)
    return env


def cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A one-shot command exactly as a user types it, in a given folder and environment."""
    return subprocess.run(
        [sys.executable, "-m", "photoscand", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def both(done: subprocess.CompletedProcess[str]) -> str:
    return done.stdout + done.stderr


def aged(path: Path, seconds: float = HOUR) -> Path:
    """Give a file an mtime in the past: it has held still for long, by any clock."""
    then = time.time() - seconds
    os.utime(path, (then, then))
    return path


def scan(daemon: DaemonProcess, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    done = cli("scan", "--config", str(daemon.config_path), cwd=daemon.root, env=env)
    assert done.returncode in (0, 1), both(done)
    return done


def json_lines(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(the JSON objects, the lines that are not JSON) of a log; an sd-daemon ``<N>`` prefix
    is allowed in front of a JSON line."""
    events, other = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        body = re.sub(r"^<\d>", "", line)
        try:
            event = json.loads(body)
        except ValueError:
            other.append(line)
            continue
        if isinstance(event, dict):
            events.append(event)
        else:
            other.append(line)
    return events, other


def mentions(event: dict[str, Any], needle: str) -> bool:
    return any(needle in str(v) for v in event.values())


def problems_for(daemon: DaemonProcess, name: str, start: int = 0) -> list[dict[str, Any]]:
    """Warning and error events of the daemon's log (from a character offset) naming a file."""
    events, _ = json_lines(daemon.log_text()[start:])
    return [e for e in events if e.get("level") in ("warning", "error") and mentions(e, name)]


def observe(daemon: DaemonProcess, path: Path, seconds: float) -> list[tuple[Any, ...]]:
    """The row of ``path`` (status, attempts, error), sampled for ``seconds``: what anyone
    looking at the catalog (`status`, a dashboard) sees while a writer pauses."""
    key = os.fsencode(str(path))
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen += daemon.query("SELECT status, attempts, error FROM images WHERE path = ?", (key,))
        time.sleep(0.05)
    return seen


def write_config(path: Path, catalog: Path, photos: Path, **sections: dict[str, Any]) -> Path:
    photos.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "watch": {"paths": [str(photos)], "settle_seconds": 0.2, "rescan_interval_seconds": 0},
        "catalog": {"path": str(catalog)},
        "thumbnails": {"dir": str(catalog.parent / "thumbnails"), "sizes": [64]},
        "metrics": {"listen": ""},
        "logging": {"format": "json", "level": "info"},
    }
    for section, values in sections.items():
        config.setdefault(section, {}).update(values)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


# -- 1. false failures during slow copies -------------------------------------------------------


def test_a_writer_that_pauses_longer_than_settle_seconds_keeps_its_file_pending(
    daemon_factory,
) -> None:
    """A slow card reader: the writer keeps the file open and stops for 15 × settle_seconds
    in the middle. The daemon may look at the file while it holds still, but it must see a
    file still arriving: pending, no attempt, no warning, never failed; done once complete.
    (Failing after max(30 s, 10 × settle_seconds) of stillness is not waited for here.)"""
    daemon = daemon_factory({"watch": {"settle_seconds": 0.2}, "workers": {"count": 1}})
    daemon.start().wait_ready()
    data = LARGE_PHOTO.read_bytes()
    path = daemon.photos / "DCIM" / "IMG_0001.JPG"
    path.parent.mkdir()
    with open(path, "wb") as fh:
        fh.write(data[: len(data) * 2 // 5])
        fh.flush()
        seen = observe(daemon, path, 3.0)  # the writer pauses
        fh.write(data[len(data) * 2 // 5 :])
    daemon.wait_row(path, status="done", timeout=20)
    statuses = [s for s, _, _ in seen]
    assert "failed" not in statuses, f"failed while its writer paused: {sorted(set(seen))}"
    assert all(attempts == 0 for _, attempts, _ in seen), sorted(set(seen))
    assert problems_for(daemon, "IMG_0001.JPG") == []


def test_a_writer_that_reopens_and_appends_logs_no_warning_per_append(daemon_factory) -> None:
    """A network share that writes a file in pieces, closing it after each: every close is a
    'complete' file to the watcher, every piece but the last a truncated photo. None of them
    is a failure or a warning; the last one converts."""
    daemon = daemon_factory({"watch": {"settle_seconds": 0.2}, "workers": {"count": 1}})
    daemon.start().wait_ready()
    offset = len(daemon.log_text())
    data = LARGE_PHOTO.read_bytes()
    path = daemon.photos / "share" / "IMG_0002.JPG"
    path.parent.mkdir()
    pieces = 4
    step = len(data) // pieces + 1
    seen: list[tuple[Any, ...]] = []
    for i in range(pieces):
        with open(path, "ab") as fh:
            fh.write(data[i * step : (i + 1) * step])
        if i < pieces - 1:
            seen += observe(daemon, path, 0.8)  # the share pauses between pieces
    daemon.wait_row(path, status="done", timeout=20)
    warnings = problems_for(daemon, "IMG_0002.JPG", offset)
    assert warnings == [], f"{len(warnings)} warnings for one slow copy: {warnings[:2]}"
    assert "failed" not in [s for s, _, _ in seen], sorted(set(seen))
    assert all(attempts == 0 for _, attempts, _ in seen), sorted(set(seen))


# -- 2. decoder messages break the JSON log ---------------------------------------------------


def test_every_line_of_the_json_log_is_json_and_a_decoder_message_is_an_event(
    daemon_factory,
) -> None:
    daemon = daemon_factory({"workers": {"count": 1}})
    daemon.start().wait_ready()
    raw = aged(Path(shutil.copy(NOISY_RAW, daemon.photos / "DSC_0042.NEF")))
    daemon.wait_row(raw, timeout=20)
    daemon.wait_settled(1, timeout=30)
    (image_id,) = daemon.query("SELECT id FROM images")[0]
    # The message reaches the log one way or the other (today: as bare text).
    wait_for(lambda: "data corrupted" in daemon.log_text(), timeout=10,
             message="LibRaw's message in the log")  # fmt: skip
    assert daemon.stop() == 0
    events, other = json_lines(daemon.log_text())
    assert other == [], f"lines of the JSON log that are not JSON: {other[:5]}"
    libraw = [e for e in events if mentions(e, "data corrupted")]
    assert libraw, "LibRaw's message is not in any JSON event"
    assert any(mentions(e, "DSC_0042.NEF") or e.get("id") == image_id for e in libraw), (
        f"LibRaw's message is not tied to its image: {libraw}"
    )


# -- 3. reload does not apply logging ---------------------------------------------------------


def test_sighup_applies_logging_level_and_format_at_once(daemon_factory) -> None:
    daemon = daemon_factory({"logging": {"level": "info", "format": "json"},
                             "workers": {"count": 1}})  # fmt: skip
    daemon.start().wait_ready()
    first = distinct_copies(daemon.photos, 3, base=SMALL_PHOTO)
    daemon.wait_row(first[0], status="done")
    assert '"ingested"' not in daemon.log_text()  # debug lines are off at info

    daemon.rewrite_config(logging={"level": "debug"})
    offset = len(daemon.log_text())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log_text()[offset:],
             message="the reload")  # fmt: skip
    shutil.move(first[1], daemon.photos / "after_debug.jpg")
    shutil.copy(first[2], daemon.photos / "copied_after_debug.jpg")
    daemon.wait_row(daemon.photos / "copied_after_debug.jpg", status="done")
    wait_for(
        lambda: any(e.get("level") == "debug" for e in json_lines(daemon.log_text()[offset:])[0]),
        timeout=10,
        message="a debug line after SIGHUP set logging.level: debug",
    )

    daemon.rewrite_config(logging={"format": "console"})
    offset = len(daemon.log_text())
    daemon.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "configuration reloaded" in daemon.log_text()[offset:],
             message="the second reload")  # fmt: skip
    later = distinct_copies(daemon.photos, 1, base=SMALL_PHOTO, prefix="console", start=9)
    daemon.wait_row(later[0], status="done")
    wait_for(
        lambda: any("console00009.jpg" in line and not re.sub(r"^<\d>", "", line).startswith("{")
                    for line in daemon.log_text()[offset:].splitlines()),
        timeout=10,
        message="a console-format line after SIGHUP set logging.format: console",
    )  # fmt: skip
    assert daemon.stop() == 0


# -- 4. `status` depends on where you stand -----------------------------------------------------


def test_status_finds_the_config_by_flag_then_photoscand_config_then_cwd(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    work = tmp_path / "work"
    in_cwd = write_config(work / "config.yaml", tmp_path / "a" / "a.db", tmp_path / "pa")
    by_env = write_config(tmp_path / "etc" / "b.yaml", tmp_path / "b" / "b.db", tmp_path / "pb")
    by_flag = write_config(tmp_path / "c.yaml", tmp_path / "c" / "c.db", tmp_path / "pc")
    for config in (in_cwd, by_env, by_flag):
        done = cli("scan", "--config", str(config), cwd=tmp_path, env=env)
        assert done.returncode == 0, both(done)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    def catalog_of(*args: str, cwd: Path, **extra: str) -> str:
        done = cli("status", "--json", *args, cwd=cwd, env={**env, **extra})
        assert done.returncode == 0, both(done)
        return json.loads(done.stdout)["catalog"]

    # From another folder, the service's variable finds the catalog (not ./var there)...
    done = cli("status", cwd=elsewhere, env={**env, "PHOTOSCAND_CONFIG": str(by_env)})
    assert done.returncode == 0, both(done)
    assert done.stdout.startswith("Phase 1: 0 images found. Phase 2:"), done.stdout
    assert str(by_env) in both(done), f"status does not say which config it used:\n{both(done)}"
    assert not (elsewhere / "var").exists()
    # ...and the order is --config, $PHOTOSCAND_CONFIG, ./config.yaml.
    assert catalog_of(cwd=work) == str(tmp_path / "a" / "a.db")
    assert catalog_of(cwd=work, PHOTOSCAND_CONFIG=str(by_env)) == str(tmp_path / "b" / "b.db")
    assert catalog_of("--config", str(by_flag), cwd=work, PHOTOSCAND_CONFIG=str(by_env)) == str(
        tmp_path / "c" / "c.db"
    )
    done = cli("status", cwd=work, env=env)
    assert str(in_cwd) in both(done), f"status does not say which config it used:\n{both(done)}"


def test_status_and_retry_need_only_the_catalog_location(daemon_factory, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    daemon = daemon_factory()
    shutil.copy(GOOD, daemon.photos / "good.jpg")
    scan(daemon, env)
    # An edit that would stop the next start, while the daemon (say) runs happily on.
    config = yaml.safe_load(daemon.config_path.read_text())
    config["workers"]["count"] = 0
    config["thumbnails"]["qualty"] = 50
    daemon.config_path.write_text(yaml.safe_dump(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    status = cli("status", "--config", str(daemon.config_path), cwd=elsewhere, env=env)
    assert status.returncode == 0, both(status)
    assert status.stdout.startswith("Phase 1: 1 images found. Phase 2:"), status.stdout
    assert "workers.count" in both(status) and "qualty" in both(status)  # a warning, named
    retry = cli("retry", "--all", "--config", str(daemon.config_path), cwd=elsewhere, env=env)
    assert retry.returncode == 0, both(retry)
    assert "1 failed or done images queued again" in retry.stdout
    # check-config and run still refuse the file.
    check = cli("check-config", "--config", str(daemon.config_path), cwd=elsewhere, env=env)
    assert check.returncode == 2 and "workers.count" in check.stderr


def test_status_before_the_first_run_shows_zero_counts_and_exits_0(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    catalog = tmp_path / "state" / "photoscand.db"
    config = write_config(tmp_path / "config.yaml", catalog, tmp_path / "photos")
    done = cli("status", "--config", str(config), cwd=tmp_path, env=env)
    assert done.returncode == 0, both(done)
    assert done.stdout.startswith("Phase 1: 0 images found. Phase 2:"), done.stdout
    assert re.search(r"not (yet )?(been )?run|never (been )?run|has(n't| not) (yet )?run",
                     both(done), re.IGNORECASE), both(done)  # fmt: skip
    assert not catalog.exists(), "status created the catalog"


def test_the_service_sets_photoscand_config() -> None:
    """What the unit and its environment file give the daemon: PHOTOSCAND_CONFIG naming the
    service's config (the one an operator's `photoscand status` falls back to)."""
    found = []
    for path in (SYSTEMD / "photoscand.service", SYSTEMD / "photoscand.env.example"):
        for line in path.read_text().splitlines():
            line = line.strip()
            if line.startswith("#"):
                continue
            found += re.findall(r"(?:^|[\s=\"'])PHOTOSCAND_CONFIG=([^\s\"']+)", line)
    assert set(found) == {"/etc/photoscand/config.yaml"}, found


# -- 5. options before the command ------------------------------------------------------------


def test_common_options_work_before_and_after_the_command(tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    config = write_config(tmp_path / "config.yaml", tmp_path / "var" / "p.db", tmp_path / "ph")
    assert cli("scan", "--config", str(config), cwd=tmp_path, env=env).returncode == 0
    after = cli("status", "--config", str(config), "--log-level", "debug", cwd=tmp_path, env=env)
    assert after.returncode == 0, both(after)
    before = cli("--log-level", "debug", "--config", str(config), "status", cwd=tmp_path, env=env)
    assert before.returncode == 0, both(before)
    assert before.stdout.startswith("Phase 1: 0 images found. Phase 2:"), before.stdout
    check = cli("--workers", "3", "check-config", "--config", str(config), cwd=tmp_path, env=env)
    assert check.returncode == 0, both(check)
    assert re.search(r"^workers\.count = 3\s+\(flag --workers\)", check.stdout, re.MULTILINE)


# -- 6. typos that pass in silence --------------------------------------------------------------


def test_an_unknown_photoscand_variable_is_an_error_naming_the_nearest_key(
    tmp_path: Path,
) -> None:
    env = clean_env(tmp_path / "home")
    config = write_config(tmp_path / "config.yaml", tmp_path / "var" / "p.db", tmp_path / "ph")
    typo = {**env, "PHOTOSCAND_WORKER_COUNT": "4"}
    done = cli("check-config", "--config", str(config), cwd=tmp_path, env=typo)
    assert done.returncode == 2, both(done)
    assert "PHOTOSCAND_WORKER_COUNT" in done.stderr
    assert "PHOTOSCAND_WORKERS_COUNT" in done.stderr  # the nearest key
    done = cli("scan", "--config", str(config), cwd=tmp_path, env=typo)  # the daemon refuses too
    assert done.returncode == 2 and "PHOTOSCAND_WORKER_COUNT" in done.stderr, both(done)
    # The documented variable besides the keys is not a typo.
    done = cli("check-config", "--config", str(config), cwd=tmp_path,
               env={**env, "PHOTOSCAND_CONFIG": str(config)})  # fmt: skip
    assert done.returncode == 0, both(done)


def test_retry_of_a_path_with_no_image_names_it_and_exits_nonzero(
    daemon_factory, tmp_path: Path
) -> None:
    env = clean_env(tmp_path / "home")
    daemon = daemon_factory()
    shutil.copy(GOOD, daemon.photos / "good.jpg")
    scan(daemon, env)
    done = cli("retry", "/no/such/path", "--config", str(daemon.config_path),
               cwd=daemon.root, env=env)  # fmt: skip
    assert done.returncode != 0, both(done)
    assert "/no/such/path" in both(done), both(done)
    # A path that holds an image still works as before.
    done = cli("retry", "--all", str(daemon.photos), "--config", str(daemon.config_path),
               cwd=daemon.root, env=env)  # fmt: skip
    assert done.returncode == 0 and "1 failed or done images queued again" in done.stdout


# -- 7. `status` wording ------------------------------------------------------------------------


def test_status_says_converted_of_present_converting_failed_and_missing(
    daemon_factory, tmp_path: Path
) -> None:
    env = clean_env(tmp_path / "home")
    daemon = daemon_factory()
    for name in ("kept.jpg", "deleted.jpg"):
        distinct_copies(daemon.photos, 1, base=GOOD, prefix=name[:-4])
    aged(Path(shutil.copy(CORRUPT, daemon.photos / "broken.gif")))
    scan(daemon, env)
    (daemon.photos / "deleted00000.jpg").unlink()
    scan(daemon, env)
    counts = dict(daemon.query("SELECT status, count(*) FROM images GROUP BY status"))
    assert counts == {"done": 1, "failed": 1, "missing": 1}, counts

    done = cli("status", "--config", str(daemon.config_path), cwd=daemon.root, env=env)
    assert done.returncode == 0, both(done)
    out = done.stdout
    first = out.splitlines()[0]
    assert re.match(r"Phase 1: [23] images found\. Phase 2:", first), first
    # Nothing is converting now: no "converting N/M" with N > 0 anywhere.
    busy = [int(n) for n in re.findall(r"converting\D{0,3}(\d+)", out)]
    assert all(n == 0 for n in busy), f"status says something is converting:\n{out}"
    # 1 converted of the 2 present (the missing one is not present), 1 failed, 1 missing.
    assert re.search(r"(converted\D{0,12}\b1\s*(/|of)\s*2\b|\b1\s*(/|of)\s*2\b\D{0,12}converted)",
                     out), out  # fmt: skip
    assert re.search(r"\b1 failed\b", out), out
    assert re.search(r"\b1 missing\b", out), out


def test_status_of_an_empty_catalog_shows_no_percentage(daemon_factory, tmp_path: Path) -> None:
    env = clean_env(tmp_path / "home")
    daemon = daemon_factory()
    scan(daemon, env)
    done = cli("status", "--config", str(daemon.config_path), cwd=daemon.root, env=env)
    assert done.returncode == 0, both(done)
    assert done.stdout.startswith("Phase 1: 0 images found. Phase 2:"), done.stdout
    assert "%" not in done.stdout, done.stdout


# -- 8. one reason per outcome ----------------------------------------------------------------


def test_an_empty_file_gets_the_same_reason_word_everywhere(daemon_factory, tmp_path: Path) -> None:
    """Phase 1's problem, phase 2's failure, the log and `status` name one reason. The file's
    mtime is an hour old, so that also after point 1 (a truncated file is presumed still
    arriving until it has held still for 30 s) it fails at once, whichever word is chosen."""
    env = clean_env(tmp_path / "home")
    daemon = daemon_factory()
    aged(Path(shutil.copy(EMPTY, daemon.photos / "empty.jpg")))  # held still for an hour
    done = scan(daemon, env)
    ((status, error, metadata_error),) = daemon.query(
        "SELECT status, error, metadata_error FROM images"
    )
    assert status == "failed", (status, error, metadata_error)
    words = {"row error": error.partition(":")[0]}
    if metadata_error:
        words["row metadata_error"] = metadata_error.partition(":")[0]
    events, _ = json_lines(done.stderr + done.stdout)
    for event in events:
        if not mentions(event, "empty.jpg"):
            continue
        for key, text in event.items():
            if key == "reason":
                words[f"log {event.get('event')} reason"] = str(text)
            elif isinstance(text, str) and text.partition(":")[0] in REASONS:
                words[f"log {event.get('event')} {key}"] = text.partition(":")[0]
    data = json.loads(cli("status", "--json", "--config", str(daemon.config_path),
                          cwd=daemon.root, env=env).stdout)  # fmt: skip
    for reason in data["failures_by_reason"]:
        words[f"status failures_by_reason {reason}"] = reason
    assert len(set(words.values())) == 1, words
    assert set(words.values()) <= set(REASONS), words


# -- 9. a silent terminal -----------------------------------------------------------------------


def _figure(event: dict[str, Any], stem: str) -> int | None:
    """A count in a summary event: a field whose name contains ``stem`` (cataloged=5), or a
    number next to a word with that stem in its text ("5 cataloged", "failed: 1")."""
    for key, val in event.items():
        if stem in key.lower() and isinstance(val, int) and not isinstance(val, bool):
            return val
    text = " ".join(str(v) for v in event.values())
    match = re.search(rf"(\d+)\s+(?:images?\s+)?{stem}\w*|{stem}\w*\W{{1,3}}(\d+)", text, re.I)
    if match:
        return int(match.group(1) or match.group(2))
    return None


def test_one_info_line_when_a_burst_of_work_drains(daemon_factory, tmp_path: Path) -> None:
    daemon = daemon_factory({"logging": {"level": "info"}})
    daemon.start().wait_ready()
    # A phone folder, prepared elsewhere on the same filesystem and moved in with one `mv`.
    card = tmp_path / "card"
    names = [p.name for p in distinct_copies(card, 4, base=SMALL_PHOTO, prefix="IMG_")]
    shutil.copy(CORRUPT, card / "broken.gif")
    names.append("broken.gif")
    for name in names:
        aged(card / name)
    offset = len(daemon.log_text())
    os.rename(card, daemon.photos / "phone")
    daemon.wait_settled(5, timeout=30)
    assert dict(daemon.query("SELECT status, count(*) FROM images GROUP BY status")) == {
        "done": 4,
        "failed": 1,
    }

    def summaries() -> list[dict[str, Any]]:
        events, _ = json_lines(daemon.log_text()[offset:])
        return [
            e
            for e in events
            if e.get("level") == "info"
            and all(_figure(e, stem) is not None for stem in ("catalog", "convert", "fail"))
        ]

    wait_for(summaries, timeout=10, message="an info line summing up the burst")
    assert daemon.stop() == 0
    (summary,) = summaries()
    assert (_figure(summary, "catalog"), _figure(summary, "convert"),
            _figure(summary, "fail")) == (5, 4, 1), summary  # fmt: skip
    text = json.dumps(summary)
    assert re.search(r"second|duration|took|elapsed|\d\s*s\b", text, re.I), summary
    events, _ = json_lines(daemon.log_text()[offset:])
    per_file = [e for e in events if e.get("level") == "info" and
                any(mentions(e, name) for name in names)]  # fmt: skip
    assert per_file == [], f"info lines per file: {per_file[:3]}"


# -- 10. the service guide ----------------------------------------------------------------------


def install_section() -> str:
    text = OPERATIONS.read_text()
    start = text.index("## Install as a systemd service")
    return text[start : text.index("### Adapting the unit", start)]


def test_the_service_guide_makes_the_venv_with_the_system_python_and_says_why() -> None:
    section = install_section()
    venvs = re.findall(r"^\s*(\S+) -m venv /opt/photoscand\b", section, re.MULTILINE)
    assert venvs, "the guide makes no venv at /opt/photoscand"
    assert all(re.fullmatch(r"/usr/bin/python3(\.\d+)?", v) for v in venvs), venvs
    # ...and why: the unit hides /home and /root (ProtectHome=yes), where pyenv lives.
    assert re.search(r"ProtectHome|/home|/root|pyenv", section), "the guide does not say why"


def test_the_service_guide_creates_the_watched_folder() -> None:
    section = install_section()
    roots = yaml.safe_load((DEPLOY / "config.yaml").read_text())["watch"]["paths"]
    for root in roots:
        made = re.search(rf"^\s*(mkdir\b|install\b.*\s-d\b).*\s{re.escape(root)}/?(\s|$)",
                         section, re.MULTILINE)  # fmt: skip
        assert made, f"the guide does not create the watched folder {root}"


def test_the_sysusers_comment_and_the_install_step_name_the_same_path() -> None:
    sysusers = DEPLOY / "sysusers.d" / "photoscand.conf"
    comments = "\n".join(
        line for line in sysusers.read_text().splitlines() if line.lstrip().startswith("#")
    )
    named = set(re.findall(r"(/[\w./-]*sysusers\.d/photoscand\.conf)", comments))
    installed = re.findall(
        r"^\s*install\b.*deploy/sysusers\.d/photoscand\.conf\s+(\S+)", install_section(), re.M
    )
    assert len(installed) == 1, installed
    assert named == set(installed), (named, installed)


_FAKE_PYTHON = """
import os, sys
interpreter, prefix, base = sys.argv[1:4]
sys.executable = interpreter
sys._base_executable = os.path.realpath(interpreter)
sys.prefix = sys.exec_prefix = prefix
sys.base_prefix = sys.base_exec_prefix = base
from photoscand.cli import main
sys.exit(main(sys.argv[4:]))
"""


def test_check_config_warns_when_the_interpreter_lives_where_the_unit_hides_it(
    tmp_path: Path,
) -> None:
    """The interpreter is faked at every place Python tells it (sys.executable, a venv's
    bin/python3 symlink to its base, sys.prefix, sys.base_prefix): a venv at /opt/photoscand
    made by a pyenv Python under /home, or by a uv Python under /root; and one made by the
    system Python, which must not warn."""
    env = clean_env(tmp_path / "home")
    config = write_config(tmp_path / "config.yaml", tmp_path / "var" / "p.db", tmp_path / "ph")

    def check_config(python: Path | str, prefix: Path | str, base: str) -> str:
        done = subprocess.run(
            [sys.executable, "-c", _FAKE_PYTHON, str(python), str(prefix), base,
             "check-config", "--config", str(config)],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, both(done)  # a warning, not a refusal
        return both(done)

    for hidden in ("/home/alice/.pyenv/versions/3.11.9", "/root/.local/share/uv/python/3.11"):
        venv = tmp_path / hidden.strip("/").replace("/", "_") / "opt" / "photoscand"
        (venv / "bin").mkdir(parents=True)
        python = venv / "bin" / "python3"
        python.symlink_to(f"{hidden}/bin/python3.11")  # dangling: only its target matters
        out = check_config(python, venv, hidden)
        assert hidden in out, f"no warning naming {hidden}:\n{out}"
        assert re.search(r"ProtectHome|hid", out, re.IGNORECASE), out
    out = check_config("/usr/bin/python3", "/usr", "/usr")  # the system Python
    assert "ProtectHome" not in out, out


# -- 11. set-up does only what it needs -----------------------------------------------------------


def make_dry_run(*args: str) -> list[str]:
    """The commands `make` would run, every target considered out of date (-B), none run."""
    done = subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


DEV_ONLY = ("[test", "test]", ",test", "bench", "pytest", "ruff", "pyvips", "fusepy", "atheris")


def test_make_run_installs_only_the_runtime_dependencies() -> None:
    run = [line for line in make_dry_run("run") if re.search(r"\binstall\b", line)]
    assert any("pip" in line or "uv" in line for line in run), "make run installs nothing"
    extra = [line for line in run if any(word in line for word in DEV_ONLY)]
    assert extra == [], f"make run installs development tools: {extra}"
    test = [line for line in make_dry_run("test") if re.search(r"\binstall\b", line)]
    assert any("test" in line or "pytest" in line for line in test), test


def test_make_run_takes_another_config(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    lines = make_dry_run("run", f"CONFIG={other}")
    runs = [line for line in lines if re.search(r"photoscand\S*\s+run\b", line)]
    assert runs, lines
    assert any(str(other) in line or f"'{other}'" in line for line in runs), runs


def test_building_the_package_prints_no_license_deprecation(tmp_path: Path) -> None:
    """The metadata build pip does on `make run` (an isolated, current setuptools), on a copy
    of the project's metadata (nothing is written into the checkout)."""
    project = tmp_path / "project"
    (project / "photoscand").mkdir(parents=True)
    shutil.copy(REPO / "pyproject.toml", project)
    shutil.copy(REPO / "README.md", project)
    shutil.copy(REPO / "photoscand" / "__init__.py", project / "photoscand")
    # Only what the build reads: the data files named in package-data may be absent.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--no-deps", "--quiet", str(project)],
        capture_output=True, text=True, timeout=180, cwd=tmp_path,
    )  # fmt: skip
    if done.returncode != 0 and "No matching distribution found for setuptools" in done.stderr:
        pytest.skip("no setuptools to build with (offline, no wheel cache)")
    assert done.returncode == 0, done.stderr
    assert "project.license" not in done.stderr, done.stderr[-1500:]


# -- 12. a test that changes the machine -------------------------------------------------------


def _tests_writing_sysctls() -> list[str]:
    """Test functions that call tests.reliability.sysctl (which writes /proc/sys) without
    the slow marker."""
    found = []
    for path in sorted((REPO / "tests").glob("test_*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if not isinstance(node, ast.FunctionDef) or not node.name.startswith("test_"):
                continue
            slow = any("slow" in ast.unparse(d) for d in node.decorator_list)
            calls = _called_names(node, tree)
            if "sysctl" in calls and not slow:
                found.append(f"{path.name}::{node.name}")
    return found


def _called_names(function, tree) -> set[str]:
    """Names the function calls, and those called by module functions it calls (one level:
    a test that calls a helper that changes the machine changes it too)."""
    helpers = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}

    def direct(node) -> set[str]:
        return {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call)
                and isinstance(c.func, ast.Name)}  # fmt: skip

    names = direct(function)
    for name in list(names):
        if name in helpers and name != function.name:
            names |= direct(helpers[name])
    # Arguments that name a helper (start=..., make_storm=...) are called by the callee.
    names |= {n.id for n in ast.walk(function) if isinstance(n, ast.Name) and n.id in helpers}
    for name in list(names):
        if name in helpers and name != function.name:
            names |= direct(helpers[name])
    return names


def test_the_default_suite_changes_no_machine_wide_setting() -> None:
    """The overflow of the default storm test comes from a daemon stopped while the events
    pile up (tests/test_reliability_storms.py), not from lowering the machine's
    fs.inotify.max_queued_events; the machine-level variant is slow, root only, and
    restores the setting."""
    assert _tests_writing_sysctls() == []
