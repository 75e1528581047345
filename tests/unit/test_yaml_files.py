"""Every YAML file the repo ships is validated by the schema of what reads it; a new kind of YAML
without a validator here fails the suite instead of going unchecked."""

from __future__ import annotations

import logging.config
import subprocess
from pathlib import Path

import pytest
import yaml

from trainers.config import load_job

REPO = Path(__file__).resolve().parents[2]


def _tracked_yaml() -> list[Path]:
    out = subprocess.run(["git", "ls-files", "*.yaml", "*.yml"], cwd=REPO, capture_output=True, text=True)
    files = [REPO / line for line in out.stdout.split()]
    return files or [p for p in REPO.rglob("*.y*ml") if ".venv" not in p.parts and "runs" not in p.parts]


def _validate_train_job(path: Path) -> None:
    load_job(path)


def _validate_runtime_env(path: Path) -> None:
    from ray.runtime_env import RuntimeEnv

    raw = yaml.safe_load(path.read_text())
    RuntimeEnv(**raw)  # raises on unknown or malformed fields
    assert ".venv/" in raw["excludes"], "the upload must never include the virtualenv"


def _validate_logging_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    logging.config.dictConfig(raw | {"disable_existing_loggers": False, "loggers": {}})  # builds every handler
    assert raw["handlers"]["console"]["level"] == "WARNING"
    logging.getLogger().handlers.clear()


def _validate_serve_config(path: Path) -> None:
    from ray.serve.schema import ServeDeploySchema

    from ray_apps.manifests import MODEL_BUILDER, load_serve_config
    from serve_deployments.config import Batching, ModelArgs

    raw = load_serve_config(path)  # Ray Serve's schema, then each app's args by its builder's own model
    assert ServeDeploySchema.model_validate(raw).http_options.host == "127.0.0.1", \
        "Serve binds loopback unless a config says otherwise"
    for app in raw["applications"]:
        for deployment in app.get("deployments", []) if app["import_path"] == MODEL_BUILDER else []:
            live = Batching.model_validate(deployment["user_config"])
            assert live == ModelArgs.model_validate(app["args"]).batching, f"{app['name']}: user_config != args.batching"


def _validate_tune_job(path: Path) -> None:
    from tuning.config import load_tune

    load_tune(path)  # the sweep, its base TrainJob and every bound of its search space


def _validate_launcher_config(path: Path) -> None:
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(yaml.safe_load(path.read_text())))  # what `ray up` checks first


def _validate_cluster_spec(path: Path) -> None:
    from ray_apps.manifests import load_spec

    load_spec(path)


def _validate_kuberay_manifest(path: Path) -> None:
    from tests.unit.test_cluster_configs import SCHEMAS, _crd_errors

    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("apiVersion") == "ray.io/v1" and SCHEMAS.is_dir():
            assert _crd_errors(doc) == [], f"{path.name}: {doc['kind']} does not match its KubeRay CRD"


def _validate_prometheus_config(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())
    assert raw["scrape_configs"] and all(c["job_name"] for c in raw["scrape_configs"])
    for rules in raw.get("rule_files", []):  # Prometheus resolves them against the config's folder
        assert (path.parent / rules).is_file(), f"{path.name}: rule file {rules} not beside it"


def _validate_alert_rules(path: Path) -> None:
    """promtool checks the rules (test_alert_rules.py); here, what every alert carries for whoever it pages."""
    for group in yaml.safe_load(path.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("info", "warning", "critical"), rule["alert"]
            assert rule["annotations"].keys() >= {"summary", "description", "runbook"}, rule["alert"]


def _validate_alert_rule_tests(path: Path) -> None:
    raw = yaml.safe_load(path.read_text())  # promtool runs them in test_alert_rules.py
    assert [(path.parent / f).resolve() for f in raw["rule_files"]] == [REPO / "cluster_configs/monitoring/alerts.yaml"]


VALIDATORS = {  # the first matching prefix wins
    "cluster_configs/aws-gpu.yaml": _validate_launcher_config,
    "cluster_configs/gcp-gpu.yaml": _validate_launcher_config,
    "cluster_configs/onprem.yaml": _validate_launcher_config,
    "cluster_configs/cluster.yaml": _validate_cluster_spec,
    "cluster_configs/kuberay/": _validate_kuberay_manifest,
    "cluster_configs/monitoring/prometheus": _validate_prometheus_config,
    "cluster_configs/monitoring/alerts.yaml": _validate_alert_rules,
    "tests/unit/alert_rules_test.yaml": _validate_alert_rule_tests,
    "ray_apps/configs/tune_": _validate_tune_job,
    "ray_apps/configs/": _validate_train_job,
    "cluster_configs/runtime_env.yaml": _validate_runtime_env,
    "rayfoundry/ray_data_logging.yaml": _validate_logging_config,
    "cluster_configs/serve/": _validate_serve_config,
}


@pytest.mark.parametrize("path", _tracked_yaml(), ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_has_a_validator_and_passes_it(path):
    rel = str(path.relative_to(REPO))
    matches = [fn for prefix, fn in VALIDATORS.items() if rel.startswith(prefix)]
    assert matches, f"{rel}: no validator; add one to VALIDATORS in {Path(__file__).name}"
    matches[0](path)


def test_grafana_dashboard_plots_only_metrics_the_service_exports():
    """Every series the dashboard queries is one serve_deployments defines (Ray adds the ray_ prefix
    and Prometheus the histogram suffixes), so a renamed metric cannot leave a panel silently empty."""
    import json
    import re

    dashboard = json.loads((REPO / "cluster_configs" / "monitoring" / "rayfoundry-serving.json").read_text())
    source = "".join(p.read_text() for p in (REPO / "serve_deployments").glob("*.py"))
    defined = set(re.findall(r'metrics\.(?:Counter|Histogram|Gauge)\(\s*"(\w+)"', source))
    assert len(defined) >= 5, defined
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {re.sub(r"_(bucket|sum|count)$", "", m) for e in exprs for m in re.findall(r"\bray_(rayfoundry_\w+)", e)}
    assert used and used <= defined, used - defined
    assert defined <= used | {"rayfoundry_requests"}, f"metrics without a panel: {defined - used}"
