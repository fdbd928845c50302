"""Every Prometheus metric the daemon exports, and the HTTP endpoint that serves them.

Only the main process touches the registry: workers return their timings in their
results and the daemon observes them here, so prometheus_client stays in plain
single-process mode. Labels are bounded enums, pre-set to zero at start-up so that
``rate()`` and alerts see every series from the first scrape; no label ever carries a
path. Metric names follow Prometheus conventions (base units, ``_total`` counters,
timestamps rather than ages), and docs/operations.md says what each one means.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import threading

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from photoscand import __version__
from photoscand.config import ConfigError, parse_listen
from photoscand.log import get_logger
from photoscand.outcomes import DISK_FULL, REASONS, STATUSES, VANISHED

DISCOVERY_SOURCES = ("event", "walk")
CONVERSION_RESULTS = ("done", "failed", "retried", "vanished", "released")
WORKER_RESTART_REASONS = ("crashed", "timeout", "reload")
WATCH_EVENT_TYPES = ("created", "closed", "moved", "deleted", "dir_moved", "dir_deleted")
STAGES = ("read", "hash", "decode", "resize", "encode", "write")
QUEUES = ("events", "walk", "settle", "metadata")
DISK_FULL_LOCATIONS = ("thumbnails", "catalog")
METADATA_PROBLEMS = ("timeout", "crashed", "unreadable_exif")
# How the roots are watched: inotify, polling (network filesystems), or none (`scan`).
WATCH_MODES = ("inotify", "polling", "none")
# Why a walk ran: at start-up, on its interval, after lost events, a root back, the observer
# restarted, or a reload changed the roots.
WALK_REASONS = ("start", "periodic", "overflow", "root", "restart", "reload")
# Reasons a row can be `failed` with (vanished rows become `missing`, never failed);
# "other" keeps the label bounded if a row ever carries an unexpected word.
FAILED_REASONS = (*(r for r in REASONS if r != VANISHED), "other")

# Photo work spans 10 ms (a drafted JPEG) to minutes (a 100 MP TIFF or a hung RAW): the
# buckets reach workers.timeout_seconds' default (120 s), and one edge sits at 5 s so a
# "95 % under 5 s" objective is read without interpolation error.
CONVERSION_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# A header parse is usually 0.5-5 ms; a hostile file runs into the metadata timeout
# (10 s by default, longer if configured), so the range goes on to 2 minutes.
METADATA_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5, 10, 30, 120)
# Phase 1 as a user sees it: from "file complete" to "row committed".
DELAY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    """The daemon's metrics in their own registry (tests make as many as they like)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        # The `_created` series (one more per counter and histogram) answer nothing an
        # operator asks here; process_start_time_seconds tells when counters began.
        disable_created_metrics()
        self.registry = registry or CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        p = "photoscand_"

        self.build_info = Gauge(
            p + "build_info",
            "Version of the running daemon (always 1).",
            ["version", "python"],
            registry=r,
        )
        self.build_info.labels(__version__, platform.python_version()).set(1)

        # -- phase 1 ----------------------------------------------------------------
        self.files_discovered = Counter(
            p + "files_discovered",
            "Photos that got a new or refreshed catalog row, by what found them.",
            ["source"],
            registry=r,
        )
        self.walk_unannounced_files = Counter(
            p + "walk_unannounced_files",
            "Photos a periodic walk found that no filesystem event had announced"
            " (lost events: queue overflow, watch limit, network filesystems).",
            registry=r,
        )
        self.files_ignored = Counter(
            p + "files_ignored", "Files seen that are not photos (no row).", registry=r
        )
        self.metadata_duration = Histogram(
            p + "metadata_duration_seconds",
            "Phase 1: time to parse one file's metadata in the metadata process.",
            buckets=METADATA_BUCKETS,
            registry=r,
        )
        self.ingest_delay = Histogram(
            p + "ingest_delay_seconds",
            "Phase 1: from a file being complete (closed, moved in, settled or walked)"
            " to its row being committed.",
            buckets=DELAY_BUCKETS,
            registry=r,
        )
        self.metadata_problems = Counter(
            p + "metadata_problems",
            "Phase 1 problems that still gave a row: parser timeouts, parser crashes,"
            " unreadable EXIF.",
            ["problem"],
            registry=r,
        )
        self.queue_depth = Gauge(
            p + "queue_depth",
            "Items waiting between the daemon's stages.",
            ["queue"],
            registry=r,
        )

        # -- catalog ----------------------------------------------------------------
        self.images = Gauge(p + "images", "Catalog rows per status.", ["status"], registry=r)
        self.failed_images = Gauge(
            p + "failed_images",
            "Catalog rows in status failed, by reason (what `photoscand status` lists).",
            ["reason"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            p + "oldest_pending_age_seconds",
            "Age of the longest-waiting image not yet converted (0 when none).",
            registry=r,
        )
        self.catalog_commits = Counter(
            p + "catalog_commits", "Catalog transactions committed.", registry=r
        )
        self.catalog_commit_duration = Histogram(
            p + "catalog_commit_duration_seconds",
            "Time to commit one catalog batch.",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
            registry=r,
        )
        self.catalog_wal_bytes = Gauge(
            p + "catalog_wal_bytes", "Size of the catalog's write-ahead log.", registry=r
        )
        self.disk_full = Gauge(
            p + "disk_full",
            "1 while a full disk pauses work (thumbnails: phase 2; catalog: all writes).",
            ["location"],
            registry=r,
        )

        # -- phase 2 ----------------------------------------------------------------
        self.conversions = Counter(
            p + "conversions", "Conversion outcomes.", ["result"], registry=r
        )
        self.conversion_failures = Counter(
            p + "conversion_failures",
            "Conversion failures by reason (transient ones count each attempt).",
            ["reason"],
            registry=r,
        )
        self.conversion_duration = Histogram(
            p + "conversion_duration_seconds",
            "Phase 2: time a worker spent on one image (read, decode, resize, encode).",
            buckets=CONVERSION_BUCKETS,
            registry=r,
        )
        self.conversion_stage_seconds = Counter(
            p + "conversion_stage_seconds",
            "Worker time per conversion stage (where phase 2's time goes).",
            ["stage"],
            registry=r,
        )
        self.workers = Gauge(p + "workers", "Worker processes alive.", registry=r)
        self.workers_busy = Gauge(
            p + "workers_busy", "Workers converting an image now.", registry=r
        )
        self.workers_idle = Gauge(
            p + "workers_idle",
            "Workers started and ready, holding no image (the rest of `workers` are starting).",
            registry=r,
        )
        self.worker_restarts = Counter(
            p + "worker_restarts", "Workers replaced, by why.", ["reason"], registry=r
        )
        self.worker_busy_seconds = Counter(
            p + "worker_busy_seconds", "Time workers spent holding a job.", registry=r
        )

        # -- prefetch (io.mode: prefetch) ------------------------------------------------
        self.prefetch_window_bytes = Gauge(
            p + "prefetch_window_bytes",
            "Bytes of photos held in the prefetch window.",
            registry=r,
        )
        self.prefetch_window_limit_bytes = Gauge(
            p + "prefetch_window_limit_bytes",
            "The prefetch window's size (io.prefetch_window_mb).",
            registry=r,
        )
        self.prefetch_bytes_read = Counter(
            p + "prefetch_bytes_read", "Bytes the prefetcher read from disk.", registry=r
        )
        self.prefetch_read_seconds = Counter(
            p + "prefetch_read_seconds",
            "Time the prefetcher spent reading (bytes_read / this = read throughput).",
            registry=r,
        )
        self.worker_wait_seconds = Counter(
            p + "worker_wait_seconds",
            "Time workers sat idle while images were queued for them (starved: waiting"
            " for the prefetcher or the dispatch), summed over workers.",
            registry=r,
        )
        self.prefetch_reader_wait_seconds = Counter(
            p + "prefetch_reader_wait_seconds",
            "Time the prefetcher waited for space in the window.",
            registry=r,
        )

        # -- watching ---------------------------------------------------------------
        self.watch_events = Counter(
            p + "watch_events", "Filesystem events received, by type.", ["type"], registry=r
        )
        self.watch_events_dropped = Counter(
            p + "watch_events_dropped",
            "Events dropped because the daemon's event queue was full (a walk catches up).",
            registry=r,
        )
        self.watch_overflows = Counter(
            p + "watch_overflows", "Kernel event-queue overflows reported by inotify.", registry=r
        )
        self.watch_mode = Gauge(
            p + "watch_mode",
            "1 for how the roots are watched: inotify, polling, or none (`scan`).",
            ["mode"],
            registry=r,
        )
        self.watches = Gauge(
            p + "watches", "inotify watches registered (one per watched directory).", registry=r
        )
        self.watched_directories = Gauge(
            p + "watched_directories",
            "Directories the last walk found under the roots.",
            registry=r,
        )
        self.watch_limit_reached = Gauge(
            p + "watch_limit_reached",
            "1 while a watched root has no inotify watch because the watch limit"
            " (fs.inotify.max_user_watches) is reached: its files are found by walks only.",
            registry=r,
        )
        self.observer_restarts = Counter(
            p + "observer_restarts",
            "Times the filesystem observer died and was restarted.",
            registry=r,
        )
        self.roots_unavailable = Gauge(
            p + "roots_unavailable",
            "Watched roots that are missing, unreadable or look unmounted.",
            registry=r,
        )
        self.last_walk_completed = Gauge(
            p + "last_walk_completed_timestamp_seconds",
            "When the last full walk of the watched roots finished (unix time).",
            registry=r,
        )
        self.walk_duration = Gauge(
            p + "last_walk_duration_seconds", "How long the last full walk took.", registry=r
        )
        self.walk_interval = Gauge(
            p + "walk_interval_seconds",
            "watch.rescan_interval_seconds: the periodic walk's interval (0 = off).",
            registry=r,
        )
        self.walks = Counter(
            p + "walks",
            "Walks of the watched roots that finished, by why they ran.",
            ["reason"],
            registry=r,
        )

        self._preset()

    def _preset(self) -> None:
        for source in DISCOVERY_SOURCES:
            self.files_discovered.labels(source)
        for status in STATUSES:
            self.images.labels(status)
        for result in CONVERSION_RESULTS:
            self.conversions.labels(result)
        for reason in (*REASONS, DISK_FULL):
            self.conversion_failures.labels(reason)
        for reason in WORKER_RESTART_REASONS:
            self.worker_restarts.labels(reason)
        for event_type in WATCH_EVENT_TYPES:
            self.watch_events.labels(event_type)
        for stage in STAGES:
            self.conversion_stage_seconds.labels(stage)
        for queue in QUEUES:
            self.queue_depth.labels(queue)
        for location in DISK_FULL_LOCATIONS:
            self.disk_full.labels(location)
        for problem in METADATA_PROBLEMS:
            self.metadata_problems.labels(problem)
        for reason in FAILED_REASONS:
            self.failed_images.labels(reason)
        for mode in WATCH_MODES:
            self.watch_mode.labels(mode)
        for reason in WALK_REASONS:
            self.walks.labels(reason)

    def set_counts(self, counts: dict[str, int]) -> None:
        for status in STATUSES:
            self.images.labels(status).set(counts.get(status, 0))

    def set_failure_reasons(self, reasons: dict[str, int]) -> None:
        """Failed rows per reason, from the catalog; unknown words count as "other"."""
        totals = dict.fromkeys(FAILED_REASONS, 0)
        for reason, count in reasons.items():
            key = reason if reason in totals else "other"
            totals[key] += count
        for reason, count in totals.items():
            self.failed_images.labels(reason).set(count)

    def set_watch_mode(self, mode: str) -> None:
        for name in WATCH_MODES:
            self.watch_mode.labels(name).set(1 if name == mode else 0)

    def observe_stages(self, timings: dict[str, float]) -> None:
        for stage, seconds in timings.items():
            if stage in STAGES:
                self.conversion_stage_seconds.labels(stage).inc(max(seconds, 0.0))


def write_textfile(metrics: Metrics, path: str) -> None:
    """Every metric in Prometheus' text format, written atomically (a collector such as
    node_exporter's textfile one never reads half a file). Raises OSError."""
    temp = f"{path}.{os.getpid()}.tmp"
    with open(temp, "wb") as fh:
        fh.write(generate_latest(metrics.registry))
    os.replace(temp, path)


def serve_metrics(metrics: Metrics, listen: str, *, required: bool) -> MetricsServer | None:
    """The endpoint on ``listen`` (None when it is empty). A port that cannot be had is a
    configuration error when ``required`` (``run``), and a warning otherwise (``scan``)."""
    address = parse_listen(listen)
    if address is None:
        return None
    log = get_logger("metrics")
    try:
        server = MetricsServer(metrics, *address)
    except OSError as exc:
        message = f"metrics endpoint {listen} unavailable: {exc.strerror}"
        if required:
            raise ConfigError(f"metrics.listen: {message}") from exc
        log.warning(message)
        return None
    log.info("metrics endpoint listening", address=listen)
    return server


class MetricsServer:
    """The HTTP endpoint: an asyncio server on a thread of its own, so it answers while the
    workers are saturated.

    Hazard: a thread per connection (the standard library's threading server) lets idle or
    slow clients pin one thread each for as long as they like, and starve Prometheus. Here
    connections cost no thread: each waits in the event loop, gets IDLE_SECONDS to send its
    request (and to take the answer), and at most MAX_CONNECTIONS are open at once; the rest
    are closed as they arrive.
    """

    IDLE_SECONDS = 10.0
    MAX_CONNECTIONS = 256
    BACKLOG = 128
    MAX_REQUEST_BYTES = 16 << 10

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._registry = metrics.registry
        self._open = 0
        self._loop = asyncio.new_event_loop()
        try:
            # Bound here, in the caller's thread: a port in use raises OSError to it.
            self._server = self._loop.run_until_complete(
                asyncio.start_server(
                    self._serve, host, port, backlog=self.BACKLOG, limit=self.MAX_REQUEST_BYTES
                )
            )
        except BaseException:
            self._loop.close()
            raise
        self.address = self._server.sockets[0].getsockname()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="photoscand-metrics", daemon=True
        )
        self._thread.start()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= self.MAX_CONNECTIONS:
            writer.close()
            return
        self._open += 1
        try:
            while await self._answer(reader, writer):
                pass
        except (TimeoutError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that is silent, slow, gone or sends too much is let go
        finally:
            self._open -= 1
            writer.close()

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; True when the connection stays open for another."""
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.IDLE_SECONDS)
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = [*lines[0].split(" "), "", "", ""][:3]
        fields = (line.partition(":") for line in lines[1:])
        headers = {name.strip().lower(): value.strip() for name, _, value in fields}
        keep = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        if method not in ("GET", "HEAD"):
            status, body, kind = "405 Method Not Allowed", b"GET or HEAD only\n", "text/plain"
        elif target.split("?", 1)[0] not in ("/", "/metrics"):
            status, body, kind = "404 Not Found", b"the metrics are at /metrics\n", "text/plain"
        else:
            status, body, kind = "200 OK", generate_latest(self._registry), CONTENT_TYPE_LATEST
        response = (
            f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {len(body)}\r\n"
            f"Connection: {'keep-alive' if keep else 'close'}\r\n\r\n"
        ).encode("latin-1")
        writer.write(response if method == "HEAD" else response + body)
        await asyncio.wait_for(writer.drain(), self.IDLE_SECONDS)
        return keep

    def close(self) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        self._loop.close()
