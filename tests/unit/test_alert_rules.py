"""The alerting rules and both scrape configs load in Prometheus (promtool check), and each alert fires
when it should and stays silent when it should not (promtool's rule tests in alert_rules_test.yaml);
a real server runs the local config with them.
promtool comes from PATH or Debian's `prometheus` package, installed once per session when missing."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.prometheus_tools import PrometheusServer, local_config, prometheus_tools

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "cluster_configs" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
RULE_TESTS = Path(__file__).with_name("alert_rules_test.yaml")


@pytest.fixture(scope="module")
def promtool() -> str:
    return prometheus_tools().promtool


def _promtool(promtool: str, *args: str | Path) -> str:
    done = subprocess.run([promtool, *map(str, args)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def _alert_names() -> list[str]:
    return [r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]]


def test_alert_rules_pass_promtool_check(promtool):
    out = _promtool(promtool, "check", "rules", ALERTS)
    assert f"SUCCESS: {len(_alert_names())} rules found" in out


def test_local_scrape_config_passes_promtool_check_with_its_rules(promtool):
    out = _promtool(promtool, "check", "config", MONITORING / "prometheus-local.yaml")
    assert "SUCCESS: 1 rule files found" in out and f"SUCCESS: {len(_alert_names())} rules found" in out


def test_kubernetes_scrape_config_passes_promtool_check_with_its_rules(promtool, tmp_path):
    """Debian's Prometheus is built without Kubernetes service discovery; there, every part of the config
    but its kubernetes_sd_configs block is checked (the KubeRay tests check that block's namespace)."""
    config = MONITORING / "prometheus.yaml"
    done = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True, timeout=60)
    if "field kubernetes_sd_configs not found" in done.stdout + done.stderr:
        raw = yaml.safe_load(config.read_text())
        for job in raw["scrape_configs"]:
            del job["kubernetes_sd_configs"]
            job["static_configs"] = [{"targets": ["127.0.0.1:8080"]}]
        config = tmp_path / "prometheus.yaml"
        config.write_text(yaml.safe_dump(raw))
        for rules in raw["rule_files"]:
            shutil.copy(MONITORING / rules, tmp_path / rules)
    out = _promtool(promtool, "check", "config", config)
    assert "SUCCESS: 1 rule files found" in out and f"SUCCESS: {len(_alert_names())} rules found" in out


def test_every_alert_fires_when_it_should_and_stays_silent_when_it_should_not(promtool):
    _promtool(promtool, "test", "rules", RULE_TESTS)


def test_every_alert_has_a_firing_case_and_a_silent_case():
    cases = [c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]]
    firing = {c["alertname"] for c in cases if c["exp_alerts"]}
    silent = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert firing == silent == set(_alert_names())


def test_local_prometheus_serves_the_alert_rules_and_fires_none_with_nothing_to_scrape(tmp_path):
    """The server helpers the integration tests use, on prometheus-local.yaml with an empty Ray service
    discovery file: ready, every alert loaded and evaluated without error, none firing, queries answered,
    and a clean exit on stop."""
    discovery = tmp_path / "prom_metrics_service_discovery.json"
    discovery.write_text("[]")
    server = PrometheusServer(local_config(tmp_path, discovery, interval="1s"), tmp_path / "tsdb",
                              prometheus_tools().prometheus)
    with server as prom:
        deadline = time.monotonic() + 15
        while {r["health"] for r in prom.rules()} != {"ok"} and time.monotonic() < deadline:
            time.sleep(0.2)  # each rule reports "unknown" until its first evaluation
        rules = prom.rules()
        assert sorted(r["name"] for r in rules) == sorted(_alert_names())
        assert {r["health"] for r in rules} == {"ok"}, [r.get("lastError") for r in rules]
        assert prom.alerts() == []
        assert prom.targets() == [] and prom.query("up") == []
        assert prom.query("vector(1)")[0]["value"][1] == "1"
    assert server.process.returncode == 0, server.log.read_text()[-2000:]
