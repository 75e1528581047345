"""KubeRay manifests (RayCluster, RayJob, RayService) built from the cluster spec and a job or Serve config.

    python -m ray_apps cluster render --target rayjob --job ray_apps/configs/digits_cnn.yaml

`ClusterSpec` is the typed form of cluster_configs/cluster.yaml; the builders are pure functions
returning plain dicts; `dump` writes them as YAML with a header naming the command that rendered
them. Every failure is a one-line `ConfigError` naming the file and field.
"""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from pydantic import Field, ValidationError, model_validator

from rayfoundry.errors import describe_validation_error
from rayfoundry.validation import check_order
from trainers.config import ConfigError, Section, load_job, read_yaml

if TYPE_CHECKING:
    from ray.serve.schema import ServeApplicationSchema

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SPEC = "cluster_configs/cluster.yaml"
DASHBOARD = REPO / "cluster_configs" / "monitoring" / "rayfoundry-serving.json"
METRICS_PORT, DASHBOARD_PORT, CLIENT_PORT, SERVE_PORT = 8080, 8265, 10001, 8000
# HAProxy's Prometheus exporter (Ray's RAY_SERVE_HAPROXY_METRICS_PORT), on every interface of a Serve pod.
HAPROXY_METRICS_PORT = 9101
MODEL_BUILDER, SERVER_BUILDER = "serve_deployments.model:build_app", "serve_deployments.app:build_app"
# The image already holds Ray; DeepSpeed builds against an installed torch, which one pip call cannot
# order, so ZeRO jobs need an image with DeepSpeed baked in (the digits and MiniLM DDP jobs do not).
NOT_PIP_INSTALLED = ("ray", "deepspeed")
# Where a rendered value overrides the loopback default, or Ray reads it at start, the line says why.
COMMENTS = {
    "dashboard-host: 0.0.0.0": "# pods bind all interfaces so the head Service reaches them; the NetworkPolicy limits who can",
    "host: 0.0.0.0": "# in a pod: the Serve Service reaches HAProxy, HAProxy the replicas (30000-31000) in other pods; "
                     "the NetworkPolicy limits who can",
    "- name: RAY_SERVE_ENABLE_HA_PROXY": "# Serve's ingress, read at ray start (serve_deployments.app.INGRESS_ENV)",
    "mode: token": "# KubeRay creates a Secret (key auth_token) and sets RAY_AUTH_MODE/RAY_AUTH_TOKEN in every Ray container",
}


class HeadSpec(Section):
    cpu: str = Field("2", description="CPUs the head pod requests and is limited to (Kubernetes quantity).")
    memory: str = Field("8Gi", description="Memory the head pod requests and is limited to.")


class WorkerSpec(Section):
    cpu: str = Field("8", description="CPUs per worker pod (Kubernetes quantity).")
    memory: str = Field("32Gi", description="Memory per worker pod.")
    gpu: int = Field(1, ge=0, description="NVIDIA GPUs per worker pod; 0 runs workers on the CPU image.")
    min_replicas: int = Field(0, ge=0, description="Worker pods the autoscaler keeps at least.")
    max_replicas: int = Field(4, ge=1, description="Worker pods the autoscaler adds at most.")
    idle_timeout_s: int = Field(300, ge=0, description="An idle worker pod is removed after this many seconds.")

    @model_validator(mode="after")
    def _bounds(self) -> WorkerSpec:
        check_order(self, "min_replicas", "max_replicas", prefix="worker.")
        return self


class ClusterSpec(Section):
    """What the KubeRay manifests need to know about the Kubernetes cluster they run on."""

    name: str = Field("rayfoundry", pattern=r"^[a-z][a-z0-9-]{0,29}$", description="Prefix of every resource name.")
    namespace: str = Field("rayfoundry", description="Namespace every resource goes in.")
    ray_version: str = Field(description="Ray version of the images (rayVersion); must match pyproject.toml.")
    image: str = Field(description="Image of the head and of CPU workers, e.g. rayproject/ray:2.60.0-py311-cpu.")
    gpu_image: str = Field(description="Image of GPU workers, e.g. rayproject/ray:2.60.0-py311-gpu.")
    code_uri: str = Field(description="Zip of the repo at the commit to run (https://, s3://, gs://): the "
                          "runtime_env working_dir every job and Serve app starts in.")
    storage_path: str = Field(description="Shared storage for run directories (run.storage_path), e.g. s3://bucket/runs.")
    registry_uri: str = Field(description="Model registry root every model replica reads (ModelArgs.registry of "
                              "each serve_deployments.model application).")
    service_account: str = Field("rayfoundry", description="ServiceAccount of the Ray pods (cloud storage access).")
    operator_namespace: str = Field("kuberay-system", description="Namespace of the KubeRay operator, which "
                                    "polls the dashboard for job and Serve status.")
    monitoring_namespace: str = Field("monitoring", description="Namespace of the Prometheus that scrapes port 8080.")
    head: HeadSpec = HeadSpec()
    worker: WorkerSpec = WorkerSpec()

    @model_validator(mode="after")
    def _versions(self) -> ClusterSpec:
        for field in ("image", "gpu_image"):
            tag = getattr(self, field).rpartition(":")[2]
            if not tag.startswith(f"{self.ray_version}-") and tag != self.ray_version:
                raise ValueError(f"{field} tag '{tag}' is not Ray {self.ray_version} (ray_version)")
        return self


def load_spec(path: str | Path = DEFAULT_SPEC) -> ClusterSpec:
    try:
        return ClusterSpec.model_validate(read_yaml(path) or {})
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path))) from None


def load_serve_config(path: str | Path) -> dict:
    """A Serve config as Ray Serve and each application's `build_app` would take it; else a one-line
    ConfigError naming the file, the application and the field."""
    from ray.serve.schema import ServeDeploySchema

    raw = read_yaml(path)
    try:
        config = ServeDeploySchema.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path))) from None
    served = set().union(*(_check_app(path, app) for app in config.applications))
    for app in config.applications:  # the server application forwards /v1 to each model's application by name
        missing = [m for m in app.args["models"] if m not in served] if app.import_path == SERVER_BUILDER else []
        if missing:
            raise ConfigError(f"{path}: application {app.name}: models: {missing[0]} has no application "
                              f"(add one with import_path {MODEL_BUILDER} and model {missing[0]}[@ALIAS])")
    return raw


def _check_app(path: str | Path, app: ServeApplicationSchema) -> set[str]:
    """One application's args by its builder's own model (ModelArgs or ServerArgs), its route and its
    deployment overrides; returns the model name it serves, if it is a model application."""
    from serve_deployments.app import MODEL_DEPLOYMENT, model_app_name, model_route
    from serve_deployments.config import Batching, ModelArgs, ServerArgs

    kinds = {MODEL_BUILDER: ModelArgs, SERVER_BUILDER: ServerArgs}
    where = f"{path}: application {app.name}"
    if app.import_path not in kinds:
        raise ConfigError(f"{where}: import_path {app.import_path!r} is not one of {', '.join(kinds)}")
    try:
        args = kinds[app.import_path].model_validate(app.args)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, f"{where} args")) from None
    if app.import_path == SERVER_BUILDER:
        return set()
    name = args.model.split("@")[0].split(":")[0]
    expected = {"name": model_app_name(name), "route_prefix": model_route(name)}
    for field, value in expected.items():
        if getattr(app, field) != value:
            raise ConfigError(f"{where}: {field} must be {value} for model {args.model}")
    for d in app.deployments or []:
        if d.name != MODEL_DEPLOYMENT:
            raise ConfigError(f"{where}: deployments: {d.name!r} is not a deployment of it (only {MODEL_DEPLOYMENT})")
        if isinstance(d.user_config, dict):  # else unset: the builder's args.batching applies
            try:
                Batching.model_validate(d.user_config)
            except ValidationError as e:
                raise ConfigError(describe_validation_error(e, f"{where}: {MODEL_DEPLOYMENT} user_config")) from None
    return {name}


def pip_packages() -> list[str]:
    """pyproject's pins, minus what the image holds or pip cannot build in one call."""
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if d.split("[")[0].split("=")[0].strip() not in NOT_PIP_INSTALLED]


def runtime_env(spec: ClusterSpec) -> dict:
    """The code and its dependencies, installed per node on first use (cached there after)."""
    env_vars = read_yaml(REPO / "cluster_configs" / "runtime_env.yaml")["env_vars"]
    return {"working_dir": spec.code_uri, "pip": {"packages": pip_packages(), "pip_check": False},
            "env_vars": env_vars}


def _labels(spec: ClusterSpec, instance: str) -> dict:
    return {"app.kubernetes.io/part-of": "rayfoundry", "app.kubernetes.io/instance": instance}


def _pod(spec: ClusterSpec, instance: str, role: str, image: str, cpu: str, memory: str, gpu: int, serve: bool) -> dict:
    limits = {"cpu": cpu, "memory": memory} | ({"nvidia.com/gpu": str(gpu)} if gpu else {})
    ports = [{"containerPort": METRICS_PORT, "name": "metrics"}]
    if role == "head":
        ports = [{"containerPort": 6379, "name": "gcs"}, {"containerPort": DASHBOARD_PORT, "name": "dashboard"},
                 {"containerPort": CLIENT_PORT, "name": "client"}, {"containerPort": SERVE_PORT, "name": "serve"}] + ports
    return {
        "metadata": {
            "labels": _labels(spec, instance),
            "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(METRICS_PORT),
                            "prometheus.io/path": "/metrics"},
        },
        "spec": {
            "serviceAccountName": spec.service_account,
            "containers": [{"name": f"ray-{role}", "image": image, "ports": ports,
                            "resources": {"requests": dict(limits), "limits": limits}} | _serve_env(serve)],
        },
    }


def _serve_env(serve: bool) -> dict:
    """Serve reads its ingress settings from the environment `ray start` gives it, on every node: the
    controller and HAProxy on the head, each replica's own HTTP server on the workers."""
    from serve_deployments.app import INGRESS_ENV

    return {"env": [{"name": k, "value": v} for k, v in INGRESS_ENV["haproxy"].items()]} if serve else {}


def ray_cluster_spec(spec: ClusterSpec, instance: str, serve: bool) -> dict:
    """`serve`: the cluster may run Serve (a RayCluster, a RayService), so it starts with its ingress set."""
    w = spec.worker
    return {
        "rayVersion": spec.ray_version,
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": w.min_replicas < w.max_replicas,
        "headGroupSpec": {
            "serviceType": "ClusterIP",
            "rayStartParams": {"dashboard-host": "0.0.0.0", "metrics-export-port": str(METRICS_PORT),
                               "num-cpus": "0"},  # drivers and Serve controller only; work goes to workers
            "template": _pod(spec, instance, "head", spec.image, spec.head.cpu, spec.head.memory, 0, serve),
        },
        "workerGroupSpecs": [{
            "groupName": "gpu-workers" if w.gpu else "cpu-workers",
            "replicas": w.min_replicas, "minReplicas": w.min_replicas, "maxReplicas": w.max_replicas,
            "idleTimeoutSeconds": w.idle_timeout_s,
            "rayStartParams": {"metrics-export-port": str(METRICS_PORT)},
            "template": _pod(spec, instance, "worker", spec.gpu_image if w.gpu else spec.image, w.cpu, w.memory, w.gpu,
                             serve),
        }],
    }


def network_policy(spec: ClusterSpec, instance: str, serve: bool, clients: list[dict] = ()) -> dict:
    """Ingress to the pods of `instance` only from: each other (every port, so HAProxy reaches the model
    replicas' own ports 30000-31000 in other pods); same-namespace pods labelled rayfoundry.io/access=true
    (dashboard, client, Serve); the operator (dashboard); Prometheus (Ray's metrics and, where Serve runs,
    HAProxy's exporter). HAProxy's stats page (8404) is left to the workload's own pods."""
    def ports(*numbers: int) -> list[dict]:
        return [{"protocol": "TCP", "port": n} for n in numbers]

    def namespace(name: str) -> dict:
        return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": name}}}

    rules = [
        {"from": [{"podSelector": {"matchLabels": _labels(spec, instance)}}]},
        {"from": [{"podSelector": {"matchLabels": {"rayfoundry.io/access": "true"}}}, *clients],
         "ports": ports(DASHBOARD_PORT, CLIENT_PORT, SERVE_PORT)},
        {"from": [namespace(spec.operator_namespace)], "ports": ports(DASHBOARD_PORT)},
        {"from": [namespace(spec.monitoring_namespace)],
         "ports": ports(METRICS_PORT, *([HAPROXY_METRICS_PORT] if serve else []))},
    ]
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": f"{instance}-ingress", "namespace": spec.namespace},
            "spec": {"podSelector": {"matchLabels": _labels(spec, instance)}, "policyTypes": ["Ingress"],
                     "ingress": rules}}


def _meta(spec: ClusterSpec, name: str) -> dict:
    return {"name": name, "namespace": spec.namespace, "labels": {"app.kubernetes.io/part-of": "rayfoundry"}}


def raycluster(spec: ClusterSpec) -> list[dict]:
    cluster = {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _meta(spec, spec.name),
               "spec": ray_cluster_spec(spec, spec.name, serve=True)}  # `serve deploy` may target it
    return [cluster, network_policy(spec, spec.name, serve=True)]


def rayjob(spec: ClusterSpec, job_path: str) -> list[dict]:
    job = load_job(REPO / job_path)  # a bad job config fails here, not an hour later on the cluster
    name = f"{spec.name}-{job.run.name}".replace("_", "-").lower()
    entrypoint = f"python -m ray_apps train --config {job_path} --set run.storage_path={spec.storage_path}"
    body = {
        "entrypoint": entrypoint,
        "runtimeEnvYAML": yaml.safe_dump(runtime_env(spec), sort_keys=False),
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 600,
        "backoffLimit": 0,
        "rayClusterSpec": ray_cluster_spec(spec, name, serve=False),
    }
    # The submitter is a Kubernetes Job named after the RayJob; it reaches the dashboard to submit.
    submitter = {"podSelector": {"matchLabels": {"batch.kubernetes.io/job-name": name}}}
    return [{"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _meta(spec, name), "spec": body},
            network_policy(spec, name, serve=False, clients=[submitter])]


def rayservice(spec: ClusterSpec, serve_path: str) -> list[dict]:
    serve = load_serve_config(REPO / serve_path)
    serve["http_options"] = serve.get("http_options", {}) | {"host": "0.0.0.0"}
    for app in serve["applications"]:
        if app["import_path"] == MODEL_BUILDER:  # the server application reads no registry
            app["args"] = app["args"] | {"registry": spec.registry_uri}
        app["runtime_env"] = runtime_env(spec)
    name = f"{spec.name}-serve-{Path(serve_path).stem}".replace("_", "-").lower()
    meta = _meta(spec, name)
    meta["annotations"] = {"rayfoundry.io/grafana-dashboard": f"{spec.name}-grafana-dashboard"}
    service = {"apiVersion": "ray.io/v1", "kind": "RayService", "metadata": meta, "spec": {
        "serveConfigV2": yaml.safe_dump(serve, sort_keys=False),
        "rayClusterConfig": ray_cluster_spec(spec, name, serve=True),
    }}
    return [service, network_policy(spec, name, serve=True), grafana_dashboard(spec)]


def grafana_dashboard(spec: ClusterSpec) -> dict:
    """The serving dashboard as a ConfigMap the Grafana sidecar picks up by its label."""
    text = json.dumps(json.loads(DASHBOARD.read_text()), indent=2) + "\n"
    return {"apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": f"{spec.name}-grafana-dashboard", "namespace": spec.namespace,
                         "labels": {"grafana_dashboard": "1", "app.kubernetes.io/part-of": "rayfoundry"}},
            "data": {DASHBOARD.name: text}}


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (runtimeEnvYAML, serveConfigV2, the dashboard) as readable `|` blocks."""


_Dumper.add_representer(str, lambda d, s: d.represent_scalar(
    "tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def dump(docs: list[dict], header: str) -> str:
    lines = []
    for line in yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=110).splitlines():
        comment = COMMENTS.get(line.strip())
        lines.append(f"{line}  {comment}" if comment else line)
    return header + "\n".join(lines) + "\n"
