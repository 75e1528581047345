"""The cluster configs are checked by the schemas of what reads them, without a Ray cluster: launcher
YAMLs by Ray's cluster schema, KubeRay manifests by the CRDs' openAPIV3 schemas, Serve configs by Ray
Serve and each application's own args model (ModelArgs, ServerArgs); the manifests are the output of
`python -m ray_apps cluster render`, byte for byte.

    .venv/bin/python -m pytest tests/unit/test_cluster_configs.py -q
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

from ray_apps.__main__ import main
from tests.unit.test_yaml_files import _validate_serve_config

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "cluster_configs"
LAUNCHERS = sorted(CONFIGS / name for name in ("aws-gpu.yaml", "gcp-gpu.yaml", "onprem.yaml"))
MANIFESTS = sorted((CONFIGS / "kuberay").glob("*.yaml"))
SCHEMAS = Path(os.environ.get("RAYFOUNDRY_SHARED_SCHEMAS", REPO.parent / "shared" / "schemas")) / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}
CLUSTER_SPEC_KEY = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
ids = lambda p: p.name  # noqa: E731


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def _ray_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in MANIFESTS for d in _docs(p) if d["apiVersion"] == "ray.io/v1"]


def _cluster_spec(doc: dict) -> dict:
    key = CLUSTER_SPEC_KEY[doc["kind"]]
    return doc["spec"][key] if key else doc["spec"]


def _pod_templates(doc: dict) -> list[dict]:
    spec = _cluster_spec(doc)
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def _pyproject_ray() -> tuple[str, str]:
    """The ray requirement as pyproject pins it, and its version."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (pin,) = [d for d in deps if re.match(r"ray\[", d)]
    return pin, pin.split("==")[1]


def _crd_schema(kind: str) -> dict:
    if not SCHEMAS.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found at {SCHEMAS} (set RAYFOUNDRY_SHARED_SCHEMAS)")
    return _load_crd_schema(kind)


@functools.cache
def _load_crd_schema(kind: str) -> dict:
    """The CRDs are 1-1.4 MB of YAML: parse each once (with libyaml when present)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((SCHEMAS / CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    return version["schema"]["openAPIV3Schema"]


@functools.cache
def _validator(kind: str):
    import jsonschema

    return jsonschema.Draft7Validator(_crd_schema(kind))


def _crd_errors(doc: dict) -> list[str]:
    """Schema violations of a ray.io/v1 object; int-or-string fields carry no `type`, so they pass."""
    validator = _validator(doc["kind"])
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


# Launcher YAMLs (ray up)

@pytest.mark.parametrize("path", LAUNCHERS, ids=ids)
def test_launcher_config_passes_rays_cluster_schema(path):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load(path.read_text())
    validate_config(prepare_config(raw))  # what `ray up` does before launching anything
    assert raw["provider"]["type"] in ("aws", "gcp", "local")
    if raw["provider"]["type"] != "local":
        workers = [t for name, t in raw["available_node_types"].items() if name != raw["head_node_type"]]
        assert any(t["resources"].get("GPU") for t in workers), "a GPU worker type"
        assert all(t["min_workers"] < t["max_workers"] for t in workers), "workers autoscale"
        assert raw["idle_timeout_minutes"] > 0
    else:
        assert raw["provider"]["worker_ips"] and raw["provider"]["head_ip"]


def test_rays_cluster_schema_rejects_a_broken_launcher_config():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((CONFIGS / "aws-gpu.yaml").read_text())
    raw["available_node_types"]["gpu_worker"]["max_workers"] = "four"
    with pytest.raises(Exception, match="four"):
        validate_config(prepare_config(raw))


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids)
def test_launcher_installs_the_ray_version_pyproject_pins(path):
    pin, version = _pyproject_ray()
    raw = yaml.safe_load(path.read_text())
    assert any(f'"{pin}"' in cmd for cmd in raw["setup_commands"]), f"setup must install {pin}"
    assert raw["docker"]["image"].startswith(f"rayproject/ray:{version}-py311"), raw["docker"]["image"]
    torch = [d for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
             if d.startswith("torch==")]
    assert any(f'"{torch[0]}"' in cmd for cmd in raw["setup_commands"])
    assert any("pip install -e ~/rayfoundry" in cmd for cmd in raw["setup_commands"])
    assert raw["file_mounts"]["~/rayfoundry"] == "."
    runtime_env = yaml.safe_load((CONFIGS / "runtime_env.yaml").read_text())
    assert set(runtime_env["excludes"]) <= set(raw["rsync_exclude"]), "sync what a job upload would send"


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids)
def test_launcher_turns_token_auth_on_and_binds_the_dashboard_to_loopback(path):
    raw = yaml.safe_load(path.read_text())
    (head,) = [c for c in raw["head_start_ray_commands"] if "ray start" in c]
    (worker,) = [c for c in raw["worker_start_ray_commands"] if "ray start" in c]
    assert "--dashboard-host=127.0.0.1" in head
    assert "--metrics-export-port=8080" in head and "--metrics-export-port=8080" in worker
    assert "export RAY_AUTH_MODE=token;" in head and "export RAY_AUTH_MODE=token;" in worker
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token", "every node gets the token"
    assert "0.0.0.0" not in json.dumps(raw), "nothing binds all interfaces"


# KubeRay manifests

def test_every_target_has_a_committed_manifest():
    kinds = sorted(d["kind"] for _, d in _ray_docs())
    assert kinds == ["RayCluster", "RayJob", "RayService"], kinds


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_manifest_validates_against_the_kuberay_crd(path):
    docs = [d for d in _docs(path) if d["apiVersion"] == "ray.io/v1"]
    assert len(docs) == 1
    for doc in docs:
        assert doc["kind"] in CRD_FILES
        assert _crd_errors(doc) == []


def test_crd_validation_rejects_a_broken_manifest():
    (doc,) = [d for p, d in _ray_docs() if d["kind"] == "RayJob"]
    broken = copy.deepcopy(doc)
    _cluster_spec(broken)["workerGroupSpecs"][0]["maxReplicas"] = "4"
    assert _crd_errors(broken) == ["spec.rayClusterSpec.workerGroupSpecs.0.maxReplicas: '4' is not of type 'integer'"]
    broken = copy.deepcopy(doc)
    _cluster_spec(broken)["authOptions"]["mode"] = "tokens"
    assert len(_crd_errors(broken)) == 1 and "'tokens' is not one of" in _crd_errors(broken)[0]
    assert _crd_errors({**doc, "apiVersion": 1}) == ["apiVersion: 1 is not of type 'string'"]


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_manifest_is_what_cluster_render_writes(path, tmp_path, monkeypatch, capsys):
    """The committed file is the output of the command its header names; edit the sources, not it."""
    (command,) = [line.strip("# ") for line in path.read_text().splitlines()[:5]
                  if line.startswith("#   python -m ray_apps cluster render")]
    monkeypatch.chdir(REPO)
    out = tmp_path / path.name
    assert main(shlex.split(command)[3:] + ["--out", str(out)]) == 0
    assert out.read_bytes() == path.read_bytes(), f"{path.name} is stale; re-run: {command}"


def test_render_output_follows_its_sources(tmp_path, monkeypatch):
    """A changed spec shows up in the manifest, so the stale check above can fail."""
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((CONFIGS / "cluster.yaml").read_text()) | {"storage_path": "gs://elsewhere/runs"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "job.yaml"
    args = ["--target", "rayjob", "--job", "ray_apps/configs/digits_cnn.yaml", "--spec", str(tmp_path / "spec.yaml")]
    assert main(["cluster", "render", *args, "--out", str(out)]) == 0
    (job,) = [d for d in _docs(out) if d["kind"] == "RayJob"]
    assert job["spec"]["entrypoint"] == ("python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml "
                                         "--set run.storage_path=gs://elsewhere/runs")
    assert out.read_bytes() != (CONFIGS / "kuberay" / "rayjob-digits_cnn.yaml").read_bytes()


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_manifest_keeps_token_auth_on_and_services_cluster_internal(path):
    text = path.read_text()
    assert "LoadBalancer" not in text and "NodePort" not in text
    docs = _docs(path)
    (ray,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    spec = _cluster_spec(ray)
    assert spec["authOptions"] == {"mode": "token"}
    assert spec["rayVersion"] == _pyproject_ray()[1]
    assert spec["headGroupSpec"]["serviceType"] == "ClusterIP"
    for template in _pod_templates(ray):
        assert template["spec"]["containers"][0]["image"].startswith(f"rayproject/ray:{spec['rayVersion']}-py311")
    # where a pod overrides the loopback default, the line says why
    for line in text.splitlines():
        if "0.0.0.0" in line:
            assert "#" in line.split("0.0.0.0")[1], line


def _serves(doc: dict) -> bool:
    """Clusters that may run Serve: the RayService's, and the RayCluster `serve deploy` may target."""
    return doc["kind"] in ("RayCluster", "RayService")


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_network_policy_admits_only_labelled_same_namespace_pods(path):
    docs = _docs(path)
    (ray,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["namespace"] == ray["metadata"]["namespace"]
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for template in _pod_templates(ray):
        assert selected.items() <= template["metadata"]["labels"].items(), "the policy covers every Ray pod"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    for rule in policy["spec"]["ingress"]:
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            if "namespaceSelector" in peer:  # the operator and Prometheus: one named namespace, named ports
                assert list(peer["namespaceSelector"]["matchLabels"]) == ["kubernetes.io/metadata.name"]
                assert [p["port"] for p in rule["ports"]] in ([8265], [8080], [8080, 9101])
            else:
                assert peer["podSelector"]["matchLabels"], "same-namespace pods with a label, never all"


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_pods_are_annotated_for_the_committed_prometheus_scrape_config(path):
    (ray,) = [d for d in _docs(path) if d["apiVersion"] == "ray.io/v1"]
    spec = _cluster_spec(ray)
    groups = [spec["headGroupSpec"]] + spec["workerGroupSpecs"]
    for group in groups:
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true"
        assert annotations["prometheus.io/port"] == group["rayStartParams"]["metrics-export-port"] == "8080"
    prometheus = yaml.safe_load((CONFIGS / "monitoring" / "prometheus.yaml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [ray["metadata"]["namespace"]]
    keeps = {tuple(r["source_labels"]): r["regex"] for r in job["relabel_configs"] if r.get("action") == "keep"}
    assert keeps[("__meta_kubernetes_pod_annotation_prometheus_io_scrape",)] == "true"


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_serving_clusters_start_ray_with_the_haproxy_ingress_env_and_training_clusters_without(path):
    from serve_deployments.app import INGRESS_ENV

    (ray,) = [d for d in _docs(path) if d["apiVersion"] == "ray.io/v1"]
    expected = [{"name": k, "value": v} for k, v in INGRESS_ENV["haproxy"].items()] if _serves(ray) else None
    for template in _pod_templates(ray):  # head and workers: HAProxy on one, the replicas' own servers on the other
        (container,) = template["spec"]["containers"]
        assert container.get("env") == expected, f"{path.name}: {container['name']}"
    assert ("RAY_SERVE_ENABLE_HA_PROXY" in path.read_text()) == _serves(ray)


@pytest.mark.parametrize("path", MANIFESTS, ids=ids)
def test_haproxy_ports_are_open_to_the_workloads_own_pods_and_its_exporter_to_prometheus_only(path):
    """Replicas' own servers (30000-31000) and the stats page (8404) bind every interface in a pod; only the
    workload's pods (the rule without ports) reach them. The exporter (9101) is admitted to Prometheus too."""
    from ray.serve._private import constants

    docs = _docs(path)
    (ray,) = [d for d in docs if d["apiVersion"] == "ray.io/v1"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    rules = policy["spec"]["ingress"]
    own = [r for r in rules if "ports" not in r]
    assert own == [{"from": [{"podSelector": {"matchLabels": policy["spec"]["podSelector"]["matchLabels"]}}]}]
    ported = {(p["port"], json.dumps(r["from"], sort_keys=True)) for r in rules if "ports" in r for p in r["ports"]}
    assert all("endPort" not in p for r in rules for p in r.get("ports", []))
    haproxy = {constants.RAY_SERVE_HAPROXY_STATS_PORT, constants.RAY_SERVE_HAPROXY_METRICS_PORT,
               *range(constants.RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, constants.RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT + 1)}
    admitted = {(port, peers) for port, peers in ported if port in haproxy}
    monitoring = json.dumps([{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}])
    assert admitted == ({(constants.RAY_SERVE_HAPROXY_METRICS_PORT, monitoring)} if _serves(ray) else set())


def test_rayservice_ships_the_grafana_dashboard_for_the_sidecar():
    (path,) = [p for p, d in _ray_docs() if d["kind"] == "RayService"]
    (configmap,) = [d for d in _docs(path) if d["kind"] == "ConfigMap"]
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    committed = json.loads((CONFIGS / "monitoring" / "rayfoundry-serving.json").read_text())
    assert json.loads(configmap["data"]["rayfoundry-serving.json"]) == committed


# Serve configs

@pytest.mark.parametrize("path", sorted((CONFIGS / "serve").glob("*.yaml")), ids=ids)
def test_committed_serve_config_validates(path):
    _validate_serve_config(path)  # Ray Serve's schema, each app's args by its builder, host 127.0.0.1


def _as_deployed(apps: list[dict]) -> list[dict]:
    """Applications with their args as the builders read them (defaults filled in), deployment overrides aside."""
    from serve_deployments.config import ModelArgs, ServerArgs

    kinds = {"serve_deployments.model:build_app": ModelArgs, "serve_deployments.app:build_app": ServerArgs}
    return [{"name": a["name"], "route_prefix": a["route_prefix"], "import_path": a["import_path"],
             "args": kinds[a["import_path"]].model_validate(a["args"]).model_dump()} for a in apps]


def test_digits_serve_config_deploys_what_applications_builds_for_its_settings():
    """The declarative deployment and `python -m ray_apps serve` deploy the same two applications."""
    from serve_deployments.app import applications

    committed = yaml.safe_load((CONFIGS / "serve" / "digits.yaml").read_text())["applications"]
    assert [a["name"] for a in committed] == ["model-digits", "rayfoundry"]
    model_args = dict(committed[0]["args"])
    ref = model_args.pop("model")
    settings = model_args | {"models": [ref]}  # ServeArgs: the model app's settings, for each listed ref
    # applications() gives the server application the models' limits (its /v1 timeouts and body bounds): a model
    # app whose limits differ from the defaults needs the same limits under the server application's args.
    assert _as_deployed(committed) == _as_deployed(applications(settings))
    assert committed[0]["deployments"] == [{"name": "ModelServer", "user_config": model_args["batching"]}]


def test_digits_serve_config_header_exports_the_haproxy_ingress_env():
    from serve_deployments.app import INGRESS_ENV

    lines = (CONFIGS / "serve" / "digits.yaml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("#   export "))
    command = lines[start].lstrip("# ")
    while command.endswith("\\"):
        start += 1
        command = command[:-1] + lines[start].lstrip("#")
    words = shlex.split(command)
    assert words[0] == "export"
    assert dict(w.split("=", 1) for w in words[1:]) == INGRESS_ENV["haproxy"]


def test_rayservice_serve_config_validates_and_runs_the_committed_apps(tmp_path):
    from ray.serve.schema import ServeDeploySchema

    from ray_apps.manifests import load_serve_config

    (rayservice,) = [d for _, d in _ray_docs() if d["kind"] == "RayService"]
    embedded = yaml.safe_load(rayservice["spec"]["serveConfigV2"])
    config = ServeDeploySchema.model_validate(embedded)
    spec = yaml.safe_load((CONFIGS / "cluster.yaml").read_text())
    source = yaml.safe_load((CONFIGS / "serve" / "digits.yaml").read_text())
    assert config.http_options.host == "0.0.0.0" and config.http_options.port == source["http_options"]["port"]
    for app, committed in zip(embedded["applications"], source["applications"], strict=True):
        if app["import_path"] == "serve_deployments.model:build_app":  # the model replicas read the cluster's registry
            assert app["args"]["registry"] == spec["registry_uri"]
            assert app["args"] | {"registry": committed["args"]["registry"]} == committed["args"]
        else:
            assert app["args"] == committed["args"]
        assert {k: v for k, v in app.items() if k not in ("args", "runtime_env")} == \
            {k: v for k, v in committed.items() if k != "args"}
        assert app["runtime_env"]["working_dir"] == spec["code_uri"]
        assert any(p.startswith("torch==") for p in app["runtime_env"]["pip"]["packages"])
        assert not any(p.startswith("ray") for p in app["runtime_env"]["pip"]["packages"]), "the image holds ray"
    path = tmp_path / "embedded.yaml"
    path.write_text(rayservice["spec"]["serveConfigV2"])
    assert load_serve_config(path) == embedded  # the embedded config passes the same checks as the committed one


MISSING = object()


@pytest.mark.parametrize("app, where, value, message", [
    (0, ["args", "batching", "max_batch_sise"], 8, "application model-digits args: batching.max_batch_sise: unknown field"),
    (0, ["args", "models"], ["digits"], "application model-digits args: models: unknown field"),  # ServeArgs', not ModelArgs'
    (0, ["args", "model"], MISSING, "application model-digits args: model: required field is missing"),
    (1, ["args", "registry"], "registry", "application rayfoundry args: registry: unknown field"),  # ModelArgs', not ServerArgs'
    (0, ["import_path"], "serve_deployments.models:build_app", "application model-digits: import_path "
     "'serve_deployments.models:build_app' is not one of serve_deployments.model:build_app, serve_deployments.app:build_app"),
    (0, ["route_prefix"], "/digits",
     "application model-digits: route_prefix must be /v2/models/digits for model digits@champion"),
    (0, ["deployments", 0, "name"], "model-digits",
     "application model-digits: deployments: 'model-digits' is not a deployment of it (only ModelServer)"),
    (0, ["deployments", 0, "user_config", "max_batch_size"], 0, "application model-digits: ModelServer user_config: "
     "max_batch_size: Input should be greater than or equal to 1 (got 0)"),
    (1, ["args", "models"], ["digits", "sst2"], "application rayfoundry: models: sst2 has no application "
     "(add one with import_path serve_deployments.model:build_app and model sst2[@ALIAS])"),
], ids=["model-app-unknown-field", "model-app-takes-no-models", "model-app-needs-a-model", "server-app-takes-no-registry",
        "unknown-builder", "model-route-follows-its-name", "model-deployment-is-ModelServer", "live-batching-is-checked",
        "server-names-a-model-without-an-app"])
def test_serve_config_error_names_the_file_the_application_and_the_field(app, where, value, message, tmp_path):
    """Each application's args are checked by its own builder's model, chosen by import_path, before anything deploys."""
    from ray_apps.manifests import load_serve_config
    from rayfoundry.errors import ConfigError

    raw = yaml.safe_load((CONFIGS / "serve" / "digits.yaml").read_text())
    parent = raw["applications"][app]
    for key in where[:-1]:
        parent = parent[key]
    if value is MISSING:
        del parent[where[-1]]
    else:
        parent[where[-1]] = value
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as caught:
        load_serve_config(path)
    assert str(caught.value) == f"{path}: {message}"


# The render CLI

@pytest.mark.parametrize("argv, message", [
    (["--target", "raycluser"], "error: --target 'raycluser': choose one of raycluster, rayjob, rayservice"),
    (["--target", "rayjob", "--job", "ray_apps/configs/nope.yaml"], "error: --job ray_apps/configs/nope.yaml: no such file"),
    (["--target", "rayjob"], "error: --target rayjob needs --job (a train config)"),
    (["--target", "rayjob", "--job", "cluster_configs/serve/digits.yaml"],
     "cluster_configs/serve/digits.yaml: data: required field is missing"),
    (["--target", "rayservice", "--job", "ray_apps/configs/digits_cnn.yaml"],
     "digits_cnn.yaml: applications: required field is missing"),
])
def test_cluster_render_refuses_bad_input_in_one_line(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["cluster", "render", *argv, "--out", str(tmp_path / "out.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "out.yaml").exists()


def test_cluster_render_names_the_spec_field_at_fault(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load((CONFIGS / "cluster.yaml").read_text()) | {"gpu_image": "rayproject/ray:2.9.0-py311-gpu"}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    assert main(["cluster", "render", "--target", "raycluster", "--spec", str(tmp_path / "spec.yaml"),
                 "--out", str(tmp_path / "out.yaml")]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'spec.yaml'}: gpu_image tag '2.9.0-py311-gpu' "
                                       "is not Ray 2.60.0 (ray_version)\n")
