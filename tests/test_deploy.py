"""The deployment files, checked by the tools that will read them: systemd-analyze (verify,
security), systemd-sysusers, promtool (config, rules, rule tests), the config loader; and the
catalog permissions that let the photoscand group run `photoscand status` without root."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from photoscand.config import KEYS, WORKERS_COUNT_ALIAS, load_config
from tests.conftest import CORPUS, REPO, DaemonProcess

DEPLOY = REPO / "deploy"
UNIT = DEPLOY / "systemd" / "photoscand.service"
ENV_EXAMPLE = DEPLOY / "systemd" / "photoscand.env.example"
PROMETHEUS = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "photoscand.json"
OPERATIONS = REPO / "docs" / "operations.md"
INSTALLED_BINARY = "/opt/photoscand/bin/photoscand"
MAX_EXPOSURE = 2.0


def tool(name: str) -> str:
    """The path of a Debian tool the CI installs; a missing one fails the test loudly."""
    path = shutil.which(name)
    assert path, f"{name} is not installed (see the package list in .ci/run)"
    return path


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, timeout=60)


def unit_settings(text: str) -> dict[str, list[str]]:
    """Section.Key -> values, in order (systemd allows a key more than once)."""
    settings: dict[str, list[str]] = {}
    section = ""
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, val = line.partition("=")
        settings.setdefault(f"{section}.{key}", []).append(val)
    return settings


def seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(min|s)", value)
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) == "min" else 1)


@pytest.fixture
def testable_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointed at this checkout's photoscand: verify checks that the
    binary exists, and /opt/photoscand is only there on an installed machine."""
    binary = Path(sys.executable).parent / "photoscand"
    assert binary.is_file(), f"{binary} missing: install the package (pip install -e .)"
    text = UNIT.read_text()
    assert text.count(f"ExecStart={INSTALLED_BINARY} ") == 1
    copy = tmp_path / "photoscand.service"
    copy.write_text(text.replace(f"ExecStart={INSTALLED_BINARY} ", f"ExecStart={binary} "))
    return copy


# -- systemd ---------------------------------------------------------------------------


def test_unit_passes_systemd_analyze_verify_without_a_word(testable_unit: Path) -> None:
    # verify exits 0 even on unknown keys; any output at all is a finding.
    done = run(tool("systemd-analyze"), "verify", str(testable_unit))
    assert (done.returncode, done.stdout + done.stderr) == (0, "")


def test_unit_exposure_is_at_most_two(testable_unit: Path) -> None:
    done = run(tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
               f"--threshold={int(MAX_EXPOSURE * 10)}", str(testable_unit))  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Unknown key" not in done.stderr
    score = re.search(r"Overall exposure level for photoscand\.service: (\d+\.\d+)", done.stdout)
    assert score, done.stdout[-2000:]
    assert float(score.group(1)) <= MAX_EXPOSURE


def test_unit_settings_fit_the_daemon() -> None:
    unit = unit_settings(UNIT.read_text())

    def one(key: str) -> str:
        assert len(unit.get(key, [])) == 1, f"{key}: {unit.get(key)}"
        return unit[key][0]

    assert one("Service.Type") == "notify"
    assert one("Service.NotifyAccess") == "main"
    assert one("Service.Restart") == "on-failure"
    assert one("Service.KillMode") == "mixed"
    assert one("Service.ExecReload") == "/bin/kill -HUP $MAINPID"
    assert seconds(one("Service.WatchdogSec")) >= 10
    # The graceful stop (images in hand, then the commit) must end before systemd's SIGKILL.
    config = load_config(str(DEPLOY / "config.yaml"), env={}, check_paths=False)
    stop_bound = config.workers.stop_timeout_seconds
    assert seconds(one("Service.TimeoutStopSec")) >= 2 * stop_bound + 10
    for key, expected in {"NoNewPrivileges": "yes", "ProtectSystem": "strict",
                          "PrivateTmp": "yes", "UMask": "0027",
                          "StateDirectoryMode": "0750"}.items():  # fmt: skip
        assert one(f"Service.{key}") == expected, key
    assert one("Service.MemoryHigh") and one("Service.MemoryMax")
    assert int(one("Service.CPUWeight")) < 100 and int(one("Service.IOWeight")) < 100
    assert "AF_UNIX" in one("Service.RestrictAddressFamilies").split()  # sd_notify

    # ExecStart runs the daemon on the production config, whose paths match the unit's.
    exec_start = one("Service.ExecStart").split()
    assert exec_start == [INSTALLED_BINARY, "run", "--config", "/etc/photoscand/config.yaml"]
    assert one("Service.ConfigurationDirectory") == "photoscand"
    state = Path("/var/lib") / one("Service.StateDirectory")
    cache = Path("/var/cache") / one("Service.CacheDirectory")
    assert Path(config.catalog.path).parent == state
    assert Path(config.thumbnails.dir).is_relative_to(cache)
    assert list(config.watch.paths) == one("Service.ReadOnlyPaths").lstrip("-").split()
    assert list(config.watch.paths) == one("Unit.RequiresMountsFor").split()
    assert config.metrics.listen.startswith("127.0.0.1:")
    assert one("Service.IPAddressAllow") == "localhost"


def test_sysusers_creates_the_unit_user_and_group(tmp_path: Path) -> None:
    unit = unit_settings(UNIT.read_text())
    conf = DEPLOY / "sysusers.d" / "photoscand.conf"
    (tmp_path / "etc").mkdir()
    done = run(tool("systemd-sysusers"), f"--root={tmp_path}", str(conf))
    assert done.returncode == 0, done.stderr
    users = {line.split(":")[0]: line.split(":") for line in
             (tmp_path / "etc" / "passwd").read_text().splitlines()}  # fmt: skip
    groups = {line.split(":")[0]: line.split(":") for line in
              (tmp_path / "etc" / "group").read_text().splitlines()}  # fmt: skip
    user, group = unit["Service.User"][0], unit["Service.Group"][0]
    assert user in users and group in groups
    assert users[user][3] == groups[group][2]  # the user's primary group is that group
    assert users[user][6].endswith("nologin")


def test_sysctl_dropin_raises_existing_inotify_limits() -> None:
    lines = [line for line in (DEPLOY / "sysctl.d" / "60-photoscand.conf").read_text().splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    assert len(lines) == 2
    for line in lines:
        key, _, val = (part.strip() for part in line.partition("="))
        proc = Path("/proc/sys") / key.replace(".", "/")
        assert proc.exists(), key
        assert int(val) >= 65536


def test_environment_example_holds_only_valid_settings() -> None:
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?([A-Z][A-Z0-9_]*)=(.*)", line)
        if match:
            env[match.group(1)] = match.group(2)
    known = {key.env for key in KEYS.values()} | {WORKERS_COUNT_ALIAS}
    assert WORKERS_COUNT_ALIAS in env and len(env) >= 6
    assert set(env) <= known, set(env) - known
    load_config(None, env=env, check_paths=False)  # raises ConfigError naming a bad value


# -- Prometheus ------------------------------------------------------------------------


def test_scrape_config_is_valid() -> None:
    done = run(tool("promtool"), "check", "config", "prometheus.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    done = run(tool("promtool"), "check", "rules", "alerts.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    done = run(tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def _alerts() -> list[dict[str, object]]:
    groups = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_every_alert_is_shown_firing_by_a_rule_test() -> None:
    tests = yaml.safe_load((PROMETHEUS / "alerts_test.yml").read_text())["tests"]
    fired = {case["alertname"] for test in tests for case in test["alert_rule_test"]
             if case.get("exp_alerts")}  # fmt: skip
    assert fired == {rule["alert"] for rule in _alerts()}


def test_every_alert_has_severity_text_and_a_runbook_section() -> None:
    headings = {
        re.sub(r"[^a-z0-9 -]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        for line in OPERATIONS.read_text().splitlines()
        if line.startswith("#")
    }
    for rule in _alerts():
        name = rule["alert"]
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], name
        path, _, anchor = notes["runbook"].partition("#")
        assert path == "docs/operations.md" and anchor in headings, name


# -- Grafana ---------------------------------------------------------------------------


def _panels() -> list[dict[str, object]]:
    found = []

    def visit(panels: list[dict[str, object]]) -> None:
        for panel in panels:
            found.append(panel)
            visit(panel.get("panels", []))

    visit(json.loads(DASHBOARD.read_text())["panels"])
    return found


def test_dashboard_uses_its_datasource_variable_everywhere() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert dashboard["uid"] == "photoscand"
    panels = [p for p in _panels() if p["type"] != "row"]
    ids = [p["id"] for p in _panels()]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            assert 'instance=~"$instance"' in target["expr"], target["expr"]


def test_dashboard_covers_what_operators_ask() -> None:
    exprs = " ".join(t["expr"] for p in _panels() for t in p.get("targets", []))
    heatmaps = [p for p in _panels() if p["type"] == "heatmap"]
    assert {t["format"] for p in heatmaps for t in p["targets"]} == {"heatmap"}
    heat = " ".join(t["expr"] for p in heatmaps for t in p["targets"])
    for metric in ("photoscand_metadata_duration_seconds_bucket",
                   "photoscand_conversion_duration_seconds_bucket"):  # fmt: skip
        assert metric in heat
    for metric in (
        "photoscand_images",  # phase 1 and phase 2 progress
        "photoscand_files_discovered_total",  # phase 1 throughput
        "photoscand_conversions_total",  # phase 2 throughput
        "photoscand_conversion_failures_total",  # failures by reason
        "photoscand_failed_images",
        "photoscand_oldest_pending_age_seconds",  # queue age
        "photoscand_worker_busy_seconds_total",  # utilisation
        "photoscand_prefetch_window_bytes",
        "photoscand_watches",
    ):
        assert metric in exprs, metric


def test_grafana_provisioning_files_load() -> None:
    provisioning = DEPLOY / "grafana" / "provisioning"
    dashboards = yaml.safe_load((provisioning / "dashboards" / "photoscand.yml").read_text())
    assert dashboards["apiVersion"] == 1
    assert dashboards["providers"][0]["type"] == "file"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert sources["datasources"][0]["type"] == "prometheus"


# -- who can read the catalog --------------------------------------------------------------


@pytest.fixture
def shared_root() -> Iterator[Path]:
    """A folder another user can reach (pytest's own temporary folders are private)."""
    root = Path(tempfile.mkdtemp(prefix="photoscand-group-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _status_as(uid: int, gid: int, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("setpriv"), f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
         sys.executable, "-m", "photoscand", "status", "--json", "--config", str(config)],
        capture_output=True, text=True, timeout=60, cwd="/",
    )  # fmt: skip


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
def test_the_catalog_group_reads_status_under_umask_0027(shared_root: Path) -> None:
    """UMask=0027 as in the unit: the catalog, its -wal and -shm files are 0640 and their
    folder 0750, so a member of the daemon's group can run `photoscand status` while the
    daemon writes, and nobody else can."""
    daemon = DaemonProcess(shared_root / "d")
    shutil.copy(CORPUS / "cameras" / "exif-org_canon-ixus.jpg", daemon.photos / "a.jpg")
    old = os.umask(0o027)
    try:
        daemon.start()
    finally:
        os.umask(old)
    try:
        daemon.wait_settled(1, timeout=60)
        catalog = daemon.catalog_path
        modes = {p.name: p.stat().st_mode & 0o777 for p in catalog.parent.glob(catalog.name + "*")
                 if not p.name.endswith(".lock")}  # fmt: skip
        assert modes == {catalog.name: 0o640, catalog.name + "-wal": 0o640,
                         catalog.name + "-shm": 0o640}  # fmt: skip
        assert catalog.parent.stat().st_mode & 0o777 == 0o750

        member = _status_as(65534, catalog.stat().st_gid, daemon.config_path)
        assert member.returncode == 0, member.stderr
        assert json.loads(member.stdout)["counts"]["done"] == 1
        stranger = _status_as(65534, 65534, daemon.config_path)
        assert stranger.returncode != 0
    finally:
        daemon.stop()


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs root (CI runs as root)")
def test_the_catalog_group_reads_status_while_the_daemon_is_stopped(shared_root: Path) -> None:
    daemon = DaemonProcess(shared_root / "d")
    shutil.copy(CORPUS / "cameras" / "exif-org_canon-ixus.jpg", daemon.photos / "a.jpg")
    old = os.umask(0o027)
    try:
        daemon.start()
    finally:
        os.umask(old)
    daemon.wait_settled(1, timeout=60)
    assert daemon.stop() == 0
    assert not Path(str(daemon.catalog_path) + "-shm").exists()
    member = _status_as(65534, daemon.catalog_path.stat().st_gid, daemon.config_path)
    assert member.returncode == 0, member.stderr
    assert json.loads(member.stdout)["counts"]["done"] == 1
