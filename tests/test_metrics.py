"""The metrics: names and labels as the contract (docs/operations.md) and Prometheus
conventions want them, every
label pre-set, the endpoint on the configured address; and a real daemon's counters moving
as a batch is cataloged, converted and failed, agreeing with the catalog and with
`photoscand status`."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from photoscand import __version__
from photoscand.config import KEYS, parse_listen
from photoscand.metrics import (
    CONVERSION_BUCKETS,
    FAILED_REASONS,
    METADATA_BUCKETS,
    Metrics,
    MetricsServer,
)
from photoscand.outcomes import DISK_FULL, REASONS
from tests.conftest import CORPUS, DaemonProcess, photoscand, wait_for
from tests.scrape import free_port, samples, scrape, timed_scrape, value

# The metrics other tools rely on (at least these): name -> its label, or None.
CONTRACT_METRICS = {
    "photoscand_files_discovered_total": "source",
    "photoscand_images": "status",
    "photoscand_metadata_duration_seconds": None,
    "photoscand_conversions_total": "result",
    "photoscand_conversion_failures_total": "reason",
    "photoscand_conversion_duration_seconds": None,
    "photoscand_workers_busy": None,
    "photoscand_workers": None,
    "photoscand_worker_restarts_total": "reason",
    "photoscand_oldest_pending_age_seconds": None,
    "photoscand_prefetch_window_bytes": None,
    "photoscand_prefetch_bytes_read_total": None,
    "photoscand_worker_wait_seconds_total": None,
    "photoscand_watch_events_total": "type",
    "photoscand_build_info": "version",
}
# Every label the daemon uses: each is a small, fixed set of words (never a path).
BOUNDED_LABELS = {"source", "status", "result", "reason", "type", "queue", "stage", "location",
                  "problem", "mode", "version", "python", "le"}  # fmt: skip

GOOD = [CORPUS / "cameras" / name for name in (
    "exif-org_canon-ixus.jpg", "exif-org_kodak-dc210.jpg", "exif-org_nikon-e950.jpg",
    "exif-org_olympus-c960.jpg", "exif-org_fujifilm-mx1700.jpg", "Canon_40D.jpg",
)]  # fmt: skip
TRUNCATED = CORPUS / "bad" / "pillow_truncated_jpeg.jpg"
BOMB = CORPUS / "bad" / "derived_bomb_jpeg_65500x65500.jpg"


def exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def photoscand_samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {k: v for k, v in samples(text).items() if k[0].startswith("photoscand_")}


# -- names and labels --------------------------------------------------------------------


def test_every_design_metric_is_exported_with_its_label() -> None:
    found = photoscand_samples(exposition(Metrics()))
    for name, label in CONTRACT_METRICS.items():
        series = [dict(labels) for (sample, labels) in found
                  if sample in (name, name + "_count")]  # fmt: skip
        assert series, f"{name} is not exported"
        if label is not None:
            assert all(label in s for s in series), f"{name} lacks its {label} label"


def test_names_follow_prometheus_conventions() -> None:
    families = list(text_string_to_metric_families(exposition(Metrics())))
    ours = [f for f in families if f.name.startswith("photoscand_")]
    assert len(ours) >= 40
    for family in ours:
        assert family.documentation, family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
            # Base units only: seconds and bytes, never milli-, kilo- or mega-.
            assert not any(unit in sample.name for unit in ("_ms", "_milli", "_kb", "_mb")), (
                sample.name
            )
            assert not sample.name.endswith("_created"), "the _created series are switched off"
            assert set(sample.labels) <= BOUNDED_LABELS, (sample.name, sample.labels)


def test_every_known_label_value_is_exported_at_zero_from_the_start() -> None:
    text = exposition(Metrics())
    expected = {
        "photoscand_files_discovered_total": ("source", {"event", "walk"}),
        "photoscand_images": ("status", {"pending", "converting", "done", "failed", "missing"}),
        "photoscand_conversion_failures_total": ("reason", {*REASONS, DISK_FULL}),
        "photoscand_failed_images": ("reason", set(FAILED_REASONS)),
        "photoscand_worker_restarts_total": ("reason", {"crashed", "timeout", "reload"}),
        "photoscand_disk_full": ("location", {"thumbnails", "catalog"}),
        "photoscand_watch_mode": ("mode", {"inotify", "polling", "none"}),
    }
    found = photoscand_samples(text)
    for name, (label, values) in expected.items():
        present = {dict(labels)[label]: v for (sample, labels), v in found.items()
                   if sample == name}  # fmt: skip
        assert set(present) == values, name
        assert set(present.values()) == {0.0}, name
    assert value(text, "photoscand_build_info",
                 {"version": __version__, "python": sys.version.split()[0]}) == 1  # fmt: skip


def test_histogram_buckets_fit_photo_work() -> None:
    # 10 ms (a drafted JPEG) to 2 minutes (a huge TIFF, the default conversion timeout).
    for buckets in (CONVERSION_BUCKETS, METADATA_BUCKETS):
        assert 0.01 in buckets and max(buckets) == 120
        assert len(buckets) <= 15  # each bucket is a series
    assert 5 in CONVERSION_BUCKETS  # an edge at the 5 s objective
    text = exposition(Metrics())
    edges = {dict(labels)["le"] for (name, labels) in samples(text)
             if name == "photoscand_ingest_delay_seconds_bucket"}  # fmt: skip
    assert {"0.01", "120.0", "+Inf"} <= edges


def test_failed_rows_by_reason_keep_the_label_bounded() -> None:
    metrics = Metrics()
    metrics.set_failure_reasons({"corrupt": 3, "too_large": 1, "something new": 2, "": 1})
    text = exposition(metrics)
    assert value(text, "photoscand_failed_images", {"reason": "corrupt"}) == 3
    assert value(text, "photoscand_failed_images", {"reason": "too_large"}) == 1
    assert value(text, "photoscand_failed_images", {"reason": "other"}) == 3
    assert value(text, "photoscand_failed_images", {"reason": "timeout"}) == 0


def test_endpoint_listens_on_loopback_by_default() -> None:
    assert parse_listen(str(KEYS["metrics.listen"].default))[0] == "127.0.0.1"
    port = free_port()
    server = MetricsServer(Metrics(), "127.0.0.1", port)
    try:
        assert server.address[:2] == ("127.0.0.1", port)
        assert "photoscand_images" in scrape(port)
    finally:
        server.close()
    with pytest.raises(OSError):
        scrape(port, timeout=1)


# -- a real daemon during a batch -----------------------------------------------------------

COUNTERS = ("photoscand_files_discovered_total", "photoscand_conversions_total",
            "photoscand_conversion_failures_total", "photoscand_metadata_duration_seconds_count",
            "photoscand_conversion_duration_seconds_count", "photoscand_worker_busy_seconds_total",
            "photoscand_watch_events_total")  # fmt: skip


def test_counters_move_as_a_batch_is_cataloged_converted_and_failed(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    port = free_port()
    daemon = daemon_factory({"metrics": {"listen": f"127.0.0.1:{port}"}})
    daemon.start()
    daemon.wait_ready()
    before = scrape(port)
    assert value(before, "photoscand_files_discovered_total", {"source": "event"}) == 0
    assert value(before, "photoscand_conversions_total", {"result": "done"}) == 0
    assert value(before, "photoscand_watch_mode", {"mode": "inotify"}) == 1

    batch = [*GOOD, TRUNCATED, BOMB]
    for photo in batch:
        if photo is TRUNCATED:
            # Landed as a copy tool that keeps times lands it (rsync -t): it has held still
            # for an hour, so its truncation fails it at once instead of it being presumed
            # still arriving.
            temp = daemon.photos / f".{photo.name}.part"
            shutil.copy(photo, temp)
            hour_ago = time.time() - 3600
            os.utime(temp, (hour_ago, hour_ago))
            os.rename(temp, daemon.photos / photo.name)
        else:
            shutil.copy(photo, daemon.photos / photo.name)
    scrapes: list[str] = []
    latencies: list[float] = []

    def batch_done() -> bool:
        took, body = timed_scrape(port)
        latencies.append(took)
        scrapes.append(body)
        done = value(body, "photoscand_conversions_total", {"result": "done"})
        failed = value(body, "photoscand_conversions_total", {"result": "failed"})
        return done == len(GOOD) and failed == 2 and value(body, "photoscand_images",
                                                           {"status": "failed"}) == 2  # fmt: skip

    wait_for(batch_done, 60, interval=0.1, message="the batch converted and failed")
    final = scrapes[-1]

    # Counters only ever grow, scrape after scrape.
    for name in COUNTERS:
        series = [{k: v for k, v in samples(body).items() if k[0] == name} for body in scrapes]
        for earlier, later in itertools.pairwise(series):
            assert all(later[key] >= count for key, count in earlier.items()), name
    assert max(latencies) < 1.0, f"slow scrape during the batch: {max(latencies):.3f}s"

    n = len(batch)
    assert value(final, "photoscand_files_discovered_total", {"source": "event"}) == n
    assert value(final, "photoscand_files_discovered_total", {"source": "walk"}) == 0
    assert value(final, "photoscand_watch_events_total", {"type": "closed"}) >= n
    assert value(final, "photoscand_metadata_duration_seconds_count") == n
    assert value(final, "photoscand_ingest_delay_seconds_count") == n
    assert value(final, "photoscand_conversion_duration_seconds_count") == n
    assert value(final, "photoscand_conversion_failures_total", {"reason": "truncated"}) == 1
    assert value(final, "photoscand_conversion_failures_total", {"reason": "too_large"}) == 1
    assert value(final, "photoscand_conversion_failures_total", {"reason": "corrupt"}) == 0
    assert value(final, "photoscand_failed_images", {"reason": "truncated"}) == 1
    assert value(final, "photoscand_failed_images", {"reason": "too_large"}) == 1
    assert value(final, "photoscand_worker_busy_seconds_total") > 0
    stages = sum(v for (name, _), v in samples(final).items()
                 if name == "photoscand_conversion_stage_seconds_total")  # fmt: skip
    assert stages > 0
    assert value(final, "photoscand_workers") == 2
    assert value(final, "photoscand_workers_busy") == 0
    assert value(final, "photoscand_workers_idle") == 2
    assert value(final, "photoscand_oldest_pending_age_seconds") == 0
    assert value(final, "photoscand_watches") >= 1
    assert value(final, "photoscand_watched_directories") == 1
    assert value(final, "photoscand_last_walk_completed_timestamp_seconds") > time.time() - 120
    assert value(final, "photoscand_walk_interval_seconds") == 0  # rescan off in this config

    # The gauges from the catalog agree with it.
    counts = dict(daemon.query("SELECT status, count(*) FROM images GROUP BY status"))
    assert counts == {"done": len(GOOD), "failed": 2}
    for status in ("pending", "converting", "done", "failed", "missing"):
        assert value(final, "photoscand_images", {"status": status}) == counts.get(status, 0)

    # promtool reads the exposition without a complaint.
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (Debian package prometheus)"
    lint = subprocess.run([promtool, "check", "metrics"], input=final, capture_output=True,
                          text=True, timeout=30)  # fmt: skip
    assert (lint.returncode, lint.stdout + lint.stderr) == (0, "")

    # `photoscand status` prints the dashboard's figures.
    status = photoscand("status", "--json", "--config", str(daemon.config_path), cwd=tmp_path,
                        timeout=30)  # fmt: skip
    assert status.returncode == 0, status.stderr
    data = json.loads(status.stdout)
    body = scrape(port)
    for state, count in data["counts"].items():
        assert value(body, "photoscand_images", {"status": state}) == count
    failed = {dict(labels)["reason"]: v for (name, labels), v in samples(body).items()
              if name == "photoscand_failed_images" and v}  # fmt: skip
    assert failed == data["failures_by_reason"]
    assert data["converted"]["last_hour"] == value(
        body, "photoscand_conversions_total", {"result": "done"}
    )
    assert data["oldest_pending_age_seconds"] == value(
        body, "photoscand_oldest_pending_age_seconds"
    )
    assert data["daemon_pid"] == daemon.proc.pid
