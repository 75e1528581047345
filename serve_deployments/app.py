"""The inference service: one Serve application per model, plus this small server-level application.

    python -m ray_apps serve --model digits@champion --model reviews        # both, locally
    serve deploy cluster_configs/serve/digits.yaml                           # the same, declaratively

Routes:
- /v2/models/NAME/...  the model's own application (`serve_deployments.model`): KServe V2 metadata,
  ready, stats and infer (JSON or binary tensors). One HTTP hop: ingress -> model replica.
- /  this application: GET /v2, /v2/health/live, /v2/health/ready and /v1/models, and
  POST /v1/models/NAME:predict ({"instances": [...]}), forwarded to the model's replica by handle, and
  POST /v1/models/NAME:feedback ({"request_id", "label"} pairs), forwarded to the model's controller.
Errors are JSON `{"error": "..."}` naming the field or instance at fault; 503s carry Retry-After.
Importing this module does no I/O; the builders resolve model refs when they run.
"""

# No `from __future__ import annotations`: FastAPI must see the real `Request` annotation.
import asyncio
import os
from typing import Any

from fastapi import FastAPI, Request
from ray import serve

from serve_deployments.config import ServeArgs, ServerArgs, parse_args
from serve_deployments.http import BodyReader, json_errors
from serve_deployments.protocol import ApiError, feedback_items, parse_json, v1_instances

SERVER_APP = "rayfoundry"
MODEL_DEPLOYMENT = "ModelServer"
SERVER_CPUS = 0.05  # the server application's replica: /v1 forwarding and health, little CPU

# Read when Ray starts (set them in the environment of `ray start` on a cluster). HAProxy takes Serve's
# Python proxy out of the data path: requests go from HAProxy straight to the model replica's own HTTP
# server (direct ingress). One HAProxy thread leaves the cores to the replicas on small nodes. A request
# whose replica died before answering (the connection closed with no response) is sent to another
# replica: a prediction has no side effects, so it is safe to retry. RAY_SERVE_THROUGHPUT_OPTIMIZED runs
# replica code on Serve's own event loop, uses gRPC for handle calls (the /v1 forward) and freezes the
# GC after start-up: about 5% more QPS at concurrency 32 here (benchmarks/serve_load.py, arm "throughput").
INGRESS_ENV = {"haproxy": {"RAY_SERVE_ENABLE_HA_PROXY": "1", "RAY_SERVE_HAPROXY_NBTHREAD": "1",
                           "RAY_SERVE_HAPROXY_RETRY_ON": "conn-failure empty-response", "RAY_SERVE_HAPROXY_RETRIES": "2",
                           "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"},
               "proxy": {}}


def ingress_env(kind: str) -> dict[str, str]:
    return dict(INGRESS_ENV[kind])


def local_cpus_per_model(models: int) -> float:
    """CPUs per model replica when the models share this machine: all its cores but the server's share."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return round(max(0.1, (cores - SERVER_CPUS) / models), 2)

api = json_errors(FastAPI(title="rayfoundry inference", version="1"))


def model_app_name(model: str) -> str:
    return f"model-{model}"


def model_route(model: str) -> str:
    return f"/v2/models/{model}"


@serve.deployment(ray_actor_options={"num_cpus": SERVER_CPUS})
@serve.ingress(api)
class Server:
    def __init__(self, models: list[str], limits: dict[str, Any]):
        self.names, self.limits = sorted(models), limits
        self.handles = {n: serve.get_deployment_handle(MODEL_DEPLOYMENT, model_app_name(n)) for n in models}
        self.controllers: dict[str, Any] = {}  # each model's controller (feedback), looked up on first use
        self.info: dict[str, dict] = {}  # each model's info(), refreshed when its version changes
        self.bodies = BodyReader(limits["max_body_bytes"], limits["body_timeout_s"], limits["max_bodies_in_flight"])

    async def _info(self, name: str, refresh: bool = False) -> dict[str, Any]:
        if name not in self.handles:
            raise ApiError(404, f"unknown model {name!r} (models: {', '.join(self.names)})")
        if refresh or name not in self.info:
            try:
                self.info[name] = await asyncio.wait_for(self.handles[name].info.remote(), 10)
            except Exception as e:  # noqa: BLE001 - any failure means the model is not up
                raise ApiError(503, f"model {name} is not ready: {type(e).__name__}") from None
        return self.info[name]

    # --- /v1 -----------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"models": [await self._info(n) for n in self.names]}

    @api.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        await self._info(name)
        instances = v1_instances(parse_json(await self.bodies.read(request)))  # the model replica checks them
        # The caller's headers go along: the model's rollout assigns a caller to a version by one of them.
        response = self.handles[name].predict.remote(instances, "v1", dict(request.headers))
        try:
            answer = await asyncio.wait_for(response, self.limits["request_timeout_s"] + 1)
        except TimeoutError:
            response.cancel()
            raise ApiError(408, f"model {name} did not answer within {self.limits['request_timeout_s']:g}s") from None
        except BackPressureError:
            raise ApiError(503, f"model {name} is at capacity (max_queued_requests reached); retry shortly") from None
        if "error" in answer:
            raise ApiError(answer["status"], answer["error"])
        return {"model": answer["model"], "model_version": answer["model_version"], "request_id": answer["request_id"],
                "predictions": [{"label": label, "probabilities": dict(zip(answer["classes"], probs))}
                                for label, probs in zip(answer["labels"], answer["probabilities"])]}

    @api.post("/v1/models/{name}:feedback")
    async def feedback(self, name: str, request: Request) -> dict[str, Any]:
        """True labels for answered requests, by the answers' request_id: live accuracy per version."""
        info = await self._info(name)
        if not info.get("monitoring"):
            raise ApiError(404, f"model {name} is served without monitoring (monitoring.enabled false or rollout "
                                "null): feedback is not collected")
        items = feedback_items(parse_json(await self.bodies.read(request)), name, info["labels"])
        if name not in self.controllers:
            self.controllers[name] = serve.get_deployment_handle("RolloutController", model_app_name(name))
        try:
            outcome = await asyncio.wait_for(self.controllers[name].feedback.remote(items), 10)
        except TimeoutError:
            raise ApiError(503, f"model {name}: its controller did not take the feedback; retry shortly") from None
        return {"model": name, "accepted": len(items)} | outcome

    # --- /v2 server level ----------------------------------------------------------------------
    @api.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        return {"name": "rayfoundry", "version": "1", "extensions": ["binary_tensor_data", "statistics"]}

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        for name in self.names:  # a replica answering means the model is ready
            await self._info(name, refresh=True)
        return {"ready": True}

    @api.get("/v2/models/{name}")
    @api.api_route("/v2/models/{name}/{rest:path}", methods=["GET", "POST"])
    async def unknown_model(self, name: str, rest: str = "") -> None:
        """Reached only for names without their own application (theirs is a longer route prefix)."""
        raise ApiError(404, f"unknown model {name!r} (models: {', '.join(self.names)})")


def build_app(args: dict[str, Any]) -> serve.Application:
    """The server-level application (serve_deployments.config.ServerArgs) for the named models."""
    cfg = parse_args(ServerArgs, args, "server args")
    # It only reads bodies and awaits handles (the model replicas bound their own queues): a wide bound.
    capacity = max(1024, 2 * len(cfg.models) * (cfg.limits.max_ongoing_requests + cfg.limits.max_queued_requests))
    return Server.options(max_ongoing_requests=capacity, max_queued_requests=capacity,
                          logging_config={"log_level": "WARNING", "enable_access_log": False}
                          ).bind(cfg.models, cfg.limits.model_dump())


def applications(args: dict[str, Any] | ServeArgs) -> list[dict[str, Any]]:
    """The Serve config `applications:` entries for `args` (ServeArgs): one per model, then the server
    application. `serve deploy`, `python -m ray_apps serve` and the tests deploy exactly these."""
    cfg = args if isinstance(args, ServeArgs) else parse_args(ServeArgs, args, "serve args")
    apps = []
    for ref in cfg.models:
        name = ref.split("@")[0].split(":")[0]
        model = cfg.for_model(ref).model_dump(exclude_defaults=True)
        apps.append({"name": model_app_name(name), "route_prefix": model_route(name),
                     "import_path": "serve_deployments.model:build_app", "args": model})
    names = [a["name"].removeprefix("model-") for a in apps]
    apps.append({"name": SERVER_APP, "route_prefix": "/", "import_path": "serve_deployments.app:build_app",
                 "args": {"models": names, "limits": cfg.limits.model_dump(exclude_defaults=True)}})
    return apps


def run_applications(apps: list[dict[str, Any]]) -> None:
    """Build and run `applications()` entries in this process, in order (the model applications
    first: the server application forwards /v1 to them). `serve deploy` does the same from a config."""
    import importlib

    for app in apps:
        module, builder = app["import_path"].split(":")
        serve.run(getattr(importlib.import_module(module), builder)(app["args"]), name=app["name"],
                  route_prefix=app["route_prefix"])
