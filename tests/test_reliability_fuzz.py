"""The fuzz harness (bench/fuzz.py) and its oracle, kept working: the corpus's hostile files
and the synthetic bombs replayed through both targets in children with a timeout and an
address-space limit must give only allowed outcomes (the parser raises nothing but OSError,
a conversion nothing but ConversionError; no crash, hang or runaway memory). Crashers the
fuzzer finds go to tests/regressions/<target>/ and are replayed here too. A short real
atheris run is marked slow."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import CORPUS, REPO
from tests.test_reliability_content import exif_bombs

FUZZ = REPO / "bench" / "fuzz.py"
REGRESSIONS = REPO / "tests" / "regressions"
REGRESSION_SECONDS = 5.0


def _fuzz_module():
    spec = importlib.util.spec_from_file_location("photoscand_bench_fuzz", FUZZ)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("target", ["metadata", "convert"])
def test_hostile_files_give_only_allowed_outcomes(target: str, tmp_path: Path) -> None:
    fuzz = _fuzz_module()
    for name, data in exif_bombs().items():
        (tmp_path / name).write_bytes(data)
    raw = sorted((CORPUS / "bad").iterdir()) + sorted(tmp_path.iterdir())
    results = fuzz.replay_all(target, raw, timeout=30, memory_mb=2048, raw=True)
    found = sorted(REGRESSIONS.glob(f"{target}/*"))
    for path in found:
        # One child each, with a tight deadline: some findings were hangs (a 4 KB file that
        # took seconds), and a few seconds is all a start-up and a small file need.
        results[path] = fuzz.replay_one(target, path, timeout=REGRESSION_SECONDS, memory_mb=2048)
    bad = {str(p): r for p, r in results.items() if r[0] != "ok"}
    assert not bad, bad
    assert len(results) == len(raw) + len(found)
    outcomes = sorted({detail for _, detail in results.values()})
    # The oracle sees real outcomes, not one blanket answer.
    assert len(outcomes) >= 2, outcomes


def test_a_child_that_cannot_finish_is_never_ok(tmp_path: Path) -> None:
    """The replay's verdicts are real: a child that fails is reported, not passed."""
    fuzz = _fuzz_module()
    victim = tmp_path / "x.jpg"
    victim.write_bytes(b"\xff\xd8")
    # A memory limit too small to start Python at all: the child fails, never "ok".
    verdict, _ = fuzz.replay_one("convert", victim, timeout=30, memory_mb=16, raw=True)
    assert verdict != "ok"


@pytest.mark.slow
@pytest.mark.parametrize("target", ["metadata", "convert"])
def test_a_short_atheris_run(target: str, tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(FUZZ), "run", target, "--seconds", "20", "--out", str(tmp_path)],
        capture_output=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / target / "summary.json").read_text())
    assert summary["executions"] > 0 and summary["coverage"] > 0, summary
    assert summary["findings"] == {}, summary
