"""A real Prometheus server scrapes a real daemon: every PromQL expression of the Grafana
dashboard returns data through the HTTP API, and every alert rule is valid, evaluates
without error and selects series that exist (promtool's rule tests show each one firing)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import CORPUS, REPO, DaemonProcess, wait_for
from tests.scrape import free_port

DASHBOARD = REPO / "deploy" / "grafana" / "photoscand.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
PHOTOS = [CORPUS / "cameras" / name for name in (
    "exif-org_canon-ixus.jpg", "exif-org_kodak-dc210.jpg", "exif-org_nikon-e950.jpg",
)] + [CORPUS / "bad" / "derived_bomb_jpeg_65500x65500.jpg"]  # fmt: skip

# Grafana's variables as a dashboard user with every instance selected would send them;
# 1 s scrapes make 30 s hold many samples.
GRAFANA_VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "1m",
                     "$instance": ".*"}  # fmt: skip
SELECTOR = re.compile(r"\b(photoscand_[a-z_]+|up)\b(\{[^}]*\})?")


class Prometheus:
    """The Debian `prometheus` server on loopback, with its own storage under tmp_path."""

    def __init__(self, root: Path, target_port: int) -> None:
        root.mkdir()
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{
                "job_name": "photoscand", "scrape_interval": "1s", "scrape_timeout": "1s",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }],
        }  # fmt: skip
        (root / "prometheus.yml").write_text(yaml.safe_dump(config))
        binary = shutil.which("prometheus")
        assert binary, "the Debian package prometheus is not installed (apt-get install prometheus)"
        self.log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, f"--config.file={root / 'prometheus.yml'}",
             f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def get(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=10) as resp:
            return json.loads(resp.read())

    def query(self, expr: str) -> dict[str, Any]:
        try:
            return self.get("/api/v1/query", query=expr)
        except urllib.error.HTTPError as exc:  # 400: the expression does not parse
            return json.loads(exc.read())

    def ready(self) -> bool:
        assert self.proc.poll() is None, "prometheus exited; see prometheus.log"
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    """A daemon that cataloged, converted and failed a few photos, scraped for a while."""
    root = tmp_path_factory.mktemp("prometheus")
    metrics_port = free_port()
    daemon = DaemonProcess(root / "daemon", {"metrics": {"listen": f"127.0.0.1:{metrics_port}"}})
    prometheus: Prometheus | None = None
    try:
        daemon.start()
        daemon.wait_ready()
        for photo in PHOTOS:
            shutil.copy(photo, daemon.photos / photo.name)
        daemon.wait_settled(len(PHOTOS), timeout=60)
        prometheus = Prometheus(root / "prometheus", metrics_port)
        wait_for(prometheus.ready, 30, message="prometheus ready")

        def scraped_enough() -> bool:
            # Enough samples for rate() over 30 s, and every alert rule evaluated once.
            samples = prometheus.query('count_over_time(up{job="photoscand"}[1m])')
            result = samples["data"]["result"]
            rules = prometheus.get("/api/v1/rules")["data"]["groups"]
            evaluated = all(r.get("lastEvaluation", "").startswith("2") for g in rules
                            for r in g["rules"])  # fmt: skip
            return bool(result) and float(result[0]["value"][1]) >= 6 and evaluated

        wait_for(scraped_enough, 45, interval=0.5, message="six scrapes and a rule evaluation")
        # The batch happened before Prometheus started; one more photo moves the counters
        # while it watches.
        shutil.copy(PHOTOS[0], daemon.photos / "late.jpg")
        daemon.wait_settled(len(PHOTOS) + 1, timeout=30)
        up = prometheus.query('up{job="photoscand"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"
        yield prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        daemon.kill()


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expression) for every query of the dashboard."""
    found = []

    def visit(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                found.append((panel["title"], target["expr"]))
            visit(panel.get("panels", []))

    visit(json.loads(DASHBOARD.read_text())["panels"])
    return found


def grafana_expand(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown Grafana variable in {expr}"
    return expr


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS.read_text())["groups"]
            for rule in group["rules"]]  # fmt: skip


def test_every_dashboard_query_returns_data(scraped: Prometheus) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 30
    empty = []
    for title, expr in queries:
        answer = scraped.query(grafana_expand(expr))
        assert answer["status"] == "success", f"{title}: {expr}: {answer.get('error')}"
        if not answer["data"]["result"]:
            empty.append(f"{title}: {expr}")
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_the_instance_variable_lists_the_daemon(scraped: Prometheus) -> None:
    variable = next(v for v in json.loads(DASHBOARD.read_text())["templating"]["list"]
                    if v["name"] == "instance")  # fmt: skip
    metric = re.fullmatch(r"label_values\((\w+), instance\)", variable["definition"]).group(1)
    values = scraped.get("/api/v1/label/instance/values", **{"match[]": metric})["data"]
    assert len(values) == 1 and values[0].startswith("127.0.0.1:")


def test_every_alert_rule_is_valid_and_its_series_exist(scraped: Prometheus) -> None:
    rules = alert_rules()
    loaded = {r["name"]: r for g in scraped.get("/api/v1/rules")["data"]["groups"]
              for r in g["rules"]}  # fmt: skip
    assert set(loaded) == {r["alert"] for r in rules}
    for rule in rules:
        name = rule["alert"]
        assert loaded[name]["health"] == "ok", f"{name}: {loaded[name].get('lastError')}"
        answer = scraped.query(rule["expr"])
        assert answer["status"] == "success", f"{name}: {answer.get('error')}"
        selectors = {m.group(0) for m in SELECTOR.finditer(rule["expr"])}
        assert selectors, name
        for selector in selectors:
            result = scraped.query(selector)["data"]["result"]
            assert result, f"{name}: {selector} selects no series of the running daemon"


def test_nothing_fires_while_nothing_is_wrong(scraped: Prometheus) -> None:
    # One photo failed on purpose (a decompression bomb): too few for PhotoscandFailuresRising.
    firing = [a for a in scraped.get("/api/v1/alerts")["data"]["alerts"]
              if a["state"] in ("firing", "pending")]  # fmt: skip
    assert firing == [], firing
