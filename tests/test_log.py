"""Logging: one JSON object per line off a terminal, paths escaped, journald priorities."""

from __future__ import annotations

import io
import json
import logging

import structlog

from photoscand import log


def test_display_path_escapes_what_a_terminal_or_a_log_line_cannot_show() -> None:
    assert log.display_path(b"/photos/caf\xc3\xa9.jpg") == "/photos/café.jpg"
    assert log.display_path(b"/photos/bad\xff.jpg") == "/photos/bad\\xff.jpg"
    assert "\n" not in log.display_path(b"/photos/two\nlines.jpg")
    assert log.display_path(b"/photos/two\nlines.jpg") == "/photos/two\\nlines.jpg"


def test_json_lines_with_escaped_paths_and_library_warnings(monkeypatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    stream = io.StringIO()
    log.configure("debug", "json", stream=stream)
    log.get_logger("ingest").warning("conversion failed", path=log.display_path(b"/p/\xff\n.jpg"))
    logging.getLogger("watchdog.observers.inotify").warning("Inotify queue overflowed")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["event"] == "conversion failed" and first["level"] == "warning"
    assert first["path"] == "/p/\\xff\\n.jpg" and "timestamp" in first
    assert second["event"] == "Inotify queue overflowed" and second["logger"].startswith("watchdog")
    structlog.reset_defaults()


def test_under_journald_lines_carry_the_priority_and_no_timestamp(monkeypatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    stream = io.StringIO()
    log.configure("info", "auto", stream=stream)
    log.get_logger("daemon").error("catalog disk is full")
    log.get_logger("daemon").debug("not shown at info")
    (line,) = stream.getvalue().splitlines()
    assert line.startswith("<3>{")
    assert "timestamp" not in json.loads(line[3:])
    structlog.reset_defaults()


def test_a_logger_made_before_a_reconfigure_follows_its_level_and_format(monkeypatch) -> None:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    first, second = io.StringIO(), io.StringIO()
    log.configure("warning", "json", stream=first)
    component = log.get_logger("supervisor")
    component.info("not shown at warning")
    component.warning("shown")
    log.configure("debug", "console", stream=second)
    component.debug("shown at debug, as console text")
    (line,) = first.getvalue().splitlines()
    assert json.loads(line)["event"] == "shown" and json.loads(line)["component"] == "supervisor"
    (text,) = second.getvalue().splitlines()
    assert "shown at debug, as console text" in text and "component=supervisor" in text
    assert not text.startswith("{")
    structlog.reset_defaults()
