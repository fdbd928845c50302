"""The command line as people use it: check-config, scan, status, retry, exit codes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from tests.conftest import CORPUS, named_descendants, photoscand, wait_for

GOOD = CORPUS / "cameras" / "Canon_40D.jpg"
CORRUPT = CORPUS / "bad" / "pillow_truncated_jpeg.jpg"


def test_check_config_prints_every_key_its_source_and_the_formats(daemon_factory) -> None:
    daemon = daemon_factory()
    done = photoscand("check-config", "--config", str(daemon.config_path), "--workers", "3",
                      cwd=daemon.root, env={"PHOTOSCAND_THUMBNAILS_QUALITY": "70"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for key in ("watch.paths", "catalog.path", "thumbnails.sizes", "workers.count", "io.mode",
                "metrics.listen", "logging.level"):  # fmt: skip
        assert key in out
    assert "--workers" in out and "PHOTOSCAND_THUMBNAILS_QUALITY" in out
    assert "formats:" in out and "jpeg" in out and "heif" in out


def test_a_bad_config_names_the_key_the_value_and_what_is_allowed(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "config.yaml").write_text("workers:\n  count: 0\n  backnd: pillow\n")
    done = photoscand("run", cwd=tmp_path)
    assert done.returncode == 2
    assert "workers.count" in done.stderr and "0" in done.stderr and "1 to" in done.stderr
    assert "backnd" in done.stderr and "backend" in done.stderr


def test_scan_converts_and_exits_with_the_outcome(daemon_factory) -> None:
    daemon = daemon_factory()
    shutil.copy(GOOD, daemon.photos / "good.jpg")
    metrics_file = daemon.root / "scan.prom"
    done = photoscand("scan", "--config", str(daemon.config_path), "--metrics-file",
                      str(metrics_file), cwd=daemon.root)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 done, 0 failed" in done.stdout
    # The final metrics, for node_exporter's textfile collector (and the benchmarks).
    final = metrics_file.read_text()
    assert 'photoscand_conversions_total{result="done"} 1.0' in final
    assert 'photoscand_images{status="done"} 1.0' in final
    assert 'photoscand_conversion_stage_seconds_total{stage="decode"}' in final

    shutil.copy(CORRUPT, daemon.photos / "broken.jpg")
    done = photoscand("scan", "--config", str(daemon.config_path), cwd=daemon.root)
    assert done.returncode == 1
    assert "1 done, 1 failed" in done.stdout

    # status: the progress line's words, and the same truth as JSON.
    status = photoscand("status", "--config", str(daemon.config_path), cwd=daemon.root)
    assert status.returncode == 0
    assert "Phase 1: 2 images found. Phase 2: 1/2 converted, 1 failed" in status.stdout
    assert "[truncated]" in status.stdout and "broken.jpg" in status.stdout
    data = json.loads(
        photoscand("status", "--json", "--config", str(daemon.config_path), cwd=daemon.root).stdout
    )
    assert data["counts"]["done"] == 1 and data["counts"]["failed"] == 1
    assert data["failures_by_reason"] == {"truncated": 1}
    assert data["recent_failures"][0]["reason"] == "truncated"

    # retry: the failed image goes back to pending; a fixed file then converts.
    shutil.copy(GOOD, daemon.photos / "broken.jpg")
    done = photoscand("retry", str(daemon.photos / "broken.jpg"), "--config",
                      str(daemon.config_path), cwd=daemon.root)  # fmt: skip
    assert done.returncode == 0 and "1 failed images queued again" in done.stdout
    done = photoscand("scan", "--config", str(daemon.config_path), cwd=daemon.root)
    assert done.returncode == 0, done.stdout


def test_a_second_daemon_on_the_same_catalog_exits_3(daemon_factory) -> None:
    daemon = daemon_factory()
    daemon.start().wait_ready()
    done = photoscand("scan", "--config", str(daemon.config_path), cwd=daemon.root)
    assert done.returncode == 3
    assert "already running" in done.stderr
    assert daemon.stop() == 0


def test_a_second_sigterm_stops_at_once_and_returns_the_image_in_hand(daemon_factory) -> None:
    daemon = daemon_factory({"workers": {"count": 1, "stop_timeout_seconds": 60}})
    daemon.start().wait_ready()
    worker = wait_for(lambda: named_descendants(daemon.proc.pid, "photoscand-work"))[0]
    os.kill(worker, signal.SIGSTOP)  # the image in hand will not finish by itself
    shutil.copy(GOOD, daemon.photos / "held.jpg")
    daemon.wait_row(daemon.photos / "held.jpg", status="converting")
    daemon.proc.send_signal(signal.SIGTERM)
    # A graceful stop waits for the image in hand...
    wait_for(lambda: "finishing the images in hand" in daemon.log_text(), message="stopping")
    assert daemon.proc.poll() is None
    started = time.monotonic()
    daemon.proc.send_signal(signal.SIGTERM)  # ...a second signal does not
    assert daemon.proc.wait(timeout=10) == 1
    assert time.monotonic() - started < 5
    assert daemon.query("SELECT status, attempts FROM images") == [("pending", 0)]
    assert not os.path.exists(f"/proc/{worker}") or _is_zombie(worker)


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            return fh.read().rsplit(b")", 1)[1].split()[0] == b"Z"
    except OSError:
        return True


def test_retry_all_reconverts_with_new_settings(daemon_factory) -> None:
    """Thumbnails are named by content; `retry --all` still re-encodes them (new quality)."""
    daemon = daemon_factory({"thumbnails": {"quality": 95, "sizes": [256]}})
    shutil.copy(GOOD, daemon.photos / "good.jpg")
    assert photoscand("scan", "--config", str(daemon.config_path), cwd=daemon.root).returncode == 0
    (thumb,) = daemon.query("SELECT path FROM thumbnails")
    before = os.path.getsize(thumb[0])
    daemon.rewrite_config(thumbnails={"quality": 20})
    done = photoscand("retry", "--all", "--config", str(daemon.config_path), cwd=daemon.root)
    assert "1 failed or done images queued again" in done.stdout
    assert photoscand("scan", "--config", str(daemon.config_path), cwd=daemon.root).returncode == 0
    assert daemon.query("SELECT path FROM thumbnails") == [thumb]  # same name (same content)
    assert os.path.getsize(thumb[0]) < before * 0.7  # re-encoded at the lower quality
