"""Helpers for the operations tests: a free loopback port, scraping a daemon's /metrics,
and reading samples out of the exposition text."""

from __future__ import annotations

import socket
import time
import urllib.request
from collections.abc import Mapping

from prometheus_client.parser import text_string_to_metric_families


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the caller binds it soon after)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int, timeout: float = 5.0) -> str:
    """GET /metrics from a daemon on 127.0.0.1:port."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as resp:
        assert resp.status == 200
        return resp.read().decode()


def try_scrape(port: int) -> str | None:
    try:
        return scrape(port, timeout=2.0)
    except OSError:
        return None


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition: (name, sorted labels) -> value."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(text: str, name: str, labels: Mapping[str, str] | None = None) -> float:
    """One sample's value; fails when the series is not exported."""
    key = (name, tuple(sorted((labels or {}).items())))
    found = samples(text)
    assert key in found, f"{name}{dict(labels or {})} is not exported"
    return found[key]


def timed_scrape(port: int) -> tuple[float, str]:
    """(seconds the scrape took, body)."""
    started = time.perf_counter()
    body = scrape(port)
    return time.perf_counter() - started, body
