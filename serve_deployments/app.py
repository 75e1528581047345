"""The inference service: a FastAPI ingress in front of one `ModelServer` deployment per model.

    serve run serve_deployments.app:build_app models=digits@champion registry=registry
    serve deploy cluster_configs/serve/digits.yaml
    python -m ray_apps serve --model digits@champion

HTTP API: `POST /v1/models/{name}:predict` ({"instances": [...]}) and the KServe V2 Open Inference
Protocol under `/v2` (health, model metadata and readiness, infer with JSON or binary tensors,
statistics). Errors are JSON `{"error": "..."}` naming the field or instance at fault. Importing
this module does no I/O; `build_app` resolves the model refs (so every replica, including ones the
autoscaler adds later, loads the same version) and binds the deployments.
"""

# No `from __future__ import annotations` here: FastAPI must see the real `Request` annotation on
# the ingress methods to inject the request.
import asyncio
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from rayfoundry.errors import ConfigError, describe_validation_error
from serve_deployments.config import ServeArgs
from serve_deployments.instances import InstanceError, InstanceSpec
from serve_deployments.model import LATENCY_BUCKETS, ModelServer
from serve_deployments.protocol import BINARY_HEADER, ApiError, parse_json, parse_v2, v1_instances, v2_response

api = FastAPI(title="rayfoundry inference", version="1")


@api.exception_handler(ApiError)
async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status,
                        headers={"retry-after": "1"} if exc.status == 503 else None)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"error": describe_validation_error(exc.errors())}, status_code=422)


@api.exception_handler(StarletteHTTPException)
async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


@serve.deployment(ray_actor_options={"num_cpus": 0.1})
@serve.ingress(api)
class Gateway:
    def __init__(self, models: dict[str, Any], info: dict[str, dict], limits: dict[str, Any]):
        from ray.serve import metrics

        self.models, self.info, self.limits = models, info, limits
        self.specs = {n: InstanceSpec(n, i["kind"], i["num_features"], limits["max_text_chars"]) for n, i in info.items()}
        self.bodies_in_flight = 0
        self.requests = metrics.Counter("rayfoundry_requests_total", "Requests by model, version and status.",
                                        tag_keys=("model", "version", "status", "protocol"))
        self.latency = metrics.Histogram("rayfoundry_request_latency_seconds", "Ingress-to-answer time.",
                                         boundaries=LATENCY_BUCKETS, tag_keys=("model", "version", "protocol"))

    # --- helpers -------------------------------------------------------------------------------
    async def _model(self, name: str, version: str | None = None) -> dict[str, Any]:
        if name not in self.models:
            raise ApiError(404, f"unknown model {name!r} (models: {', '.join(sorted(self.models))})")
        info = self.info[name]
        if version is not None and version != info["version"]:
            raise ApiError(404, f"model {name} has no version {version!r} here (serving version {info['version']})")
        return info

    async def _body(self, request: Request) -> bytes:
        """The whole body, within max_body_bytes (413) and body_timeout_s (408); at most
        max_bodies_in_flight bodies are read at once (503), so slow clients cannot hold every slot."""
        limit = self.limits["max_body_bytes"]
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > limit:
            raise ApiError(413, f"request body of {declared} bytes; the limit is {limit}")
        if self.bodies_in_flight >= self.limits["max_bodies_in_flight"]:
            raise ApiError(503, f"{self.bodies_in_flight} request bodies are being received; retry shortly")
        self.bodies_in_flight += 1
        body = bytearray()

        async def read() -> None:
            async for chunk in request.stream():
                body.extend(chunk)
                if len(body) > limit:
                    raise ApiError(413, f"request body over the limit of {limit} bytes")

        try:
            await asyncio.wait_for(read(), self.limits["body_timeout_s"])
        except TimeoutError:
            raise ApiError(408, f"request body not received within {self.limits['body_timeout_s']:g}s "
                                f"({len(body)} bytes arrived)") from None
        finally:
            self.bodies_in_flight -= 1
        return bytes(body)

    def _instances(self, info: dict, instances: Any) -> Any:
        """Count and check the instances before they are queued: a bad one is this request's 422 only."""
        if len(instances) > self.limits["max_instances"]:
            raise ApiError(422, f"instances: {len(instances)} instances; the limit is "
                                f"{self.limits['max_instances']} per request")
        try:
            return self.specs[info["name"]].check(instances)
        except InstanceError as e:
            raise ApiError(422, str(e)) from None

    async def _predict(self, info: dict, instances: Any, protocol: str) -> dict[str, Any]:
        from ray.serve.exceptions import BackPressureError

        name, started, status = info["name"], time.perf_counter(), 500
        try:
            instances = self._instances(info, instances)
            response = self.models[name].predict.remote(instances)
            try:
                answer = await asyncio.wait_for(response, self.limits["request_timeout_s"])
            except TimeoutError:
                response.cancel()  # the replica stops working on an answer nobody waits for
                raise ApiError(408, f"model {name} did not answer within {self.limits['request_timeout_s']}s") from None
            except BackPressureError:
                raise ApiError(503, f"model {name} is at capacity (max_queued_requests reached); retry shortly") from None
            if "error" in answer:
                raise ApiError(answer["status"], answer["error"])
            status = 200
            return answer
        except ApiError as e:
            status = e.status
            raise
        finally:
            tags = {"model": name, "version": info["version"], "protocol": protocol}
            self.requests.inc(tags=tags | {"status": str(status)})
            self.latency.observe(time.perf_counter() - started, tags=tags)

    # --- /v1 -----------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def list_models(self) -> dict[str, Any]:
        return {"models": [await self._model(n) for n in sorted(self.models)]}

    @api.post("/v1/models/{name}:predict")
    async def predict(self, name: str, request: Request) -> dict[str, Any]:
        info = await self._model(name)
        instances = v1_instances(parse_json(await self._body(request)))  # _predict checks them
        answer = await self._predict(info, instances, "v1")
        return {"model": answer["model"], "model_version": answer["model_version"],
                "predictions": [{"label": label, "probabilities": dict(zip(info["labels"], probs))}
                                for label, probs in zip(answer["labels"], answer["probabilities"])]}

    # --- /v2 (KServe Open Inference Protocol) --------------------------------------------------
    @api.get("/v2")
    async def server_metadata(self) -> dict[str, Any]:
        return {"name": "rayfoundry", "version": "1", "extensions": ["binary_tensor_data", "statistics"]}

    @api.get("/v2/health/live")
    async def live(self) -> dict[str, bool]:
        return {"live": True}

    @api.get("/v2/health/ready")
    async def ready(self) -> dict[str, bool]:
        from ray.serve.exceptions import BackPressureError

        for name, handle in self.models.items():
            try:  # a replica answering (or too busy to: it is up) means the model is ready
                await asyncio.wait_for(handle.statistics.remote(), 5)
            except BackPressureError:
                pass
            except Exception as e:  # noqa: BLE001 - any failure means not ready
                raise ApiError(503, f"model {name} is not ready: {type(e).__name__}") from None
        return {"ready": True}

    @api.get("/v2/models/{name}")
    @api.get("/v2/models/{name}/versions/{version}")
    async def model_metadata(self, name: str, version: str | None = None) -> dict[str, Any]:
        info = await self._model(name, version)
        if info["kind"] == "text":
            inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        else:
            inputs = [{"name": "features", "datatype": "FP32", "shape": [-1, info["num_features"]]}]
        return {"name": name, "versions": [info["version"]], "platform": f"rayfoundry_{info['engine']}",
                "inputs": inputs, "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(info["labels"])]},
                                              {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"labels": info["labels"]}}

    @api.get("/v2/models/{name}/ready")
    @api.get("/v2/models/{name}/versions/{version}/ready")
    async def model_ready(self, name: str, version: str | None = None) -> dict[str, Any]:
        await self._model(name, version)
        return {"name": name, "ready": True}

    @api.get("/v2/models/{name}/stats")
    async def model_stats(self, name: str) -> dict[str, Any]:
        info = await self._model(name)
        stats = await self.models[name].statistics.remote()
        return {"model_stats": [{"name": name, "version": info["version"]} | stats]}

    @api.post("/v2/models/{name}/infer")
    @api.post("/v2/models/{name}/versions/{version}/infer")
    async def infer(self, name: str, request: Request, version: str | None = None) -> Response:
        info = await self._model(name, version)
        req, tensors = parse_v2(await self._body(request), request.headers.get(BINARY_HEADER))
        instances = self._v2_instances(info, tensors)
        answer = await self._predict(info, instances, "v2")
        body, headers = v2_response(req, answer)
        return Response(content=body, headers=headers)

    @staticmethod
    def _v2_instances(info: dict, tensors: dict[str, np.ndarray]) -> Any:
        want = "text" if info["kind"] == "text" else "features"
        if want not in tensors and len(tensors) != 1:
            raise ApiError(422, f"inputs: expected one input named {want!r}, got {', '.join(tensors)}")
        name, value = (want, tensors[want]) if want in tensors else next(iter(tensors.items()))
        if value.ndim == 0 or value.shape[0] == 0:
            raise ApiError(422, f"inputs.{name}: shape {list(value.shape)}; the first dimension is the batch (>= 1)")
        if info["kind"] == "text":
            if value.dtype != object:
                raise ApiError(422, f"inputs.{name}.datatype: {info['name']} takes BYTES (text)")
            if value.ndim > 2 or (value.ndim == 2 and value.shape[1] != 1):
                raise ApiError(422, f"inputs.{name}: shape {list(value.shape)}; expected [N] or [N, 1] texts")
            return [str(v) for v in value.reshape(-1)]
        if value.dtype == object:
            raise ApiError(422, f"inputs.{name}.datatype: {info['name']} takes FP32 (numbers), not BYTES")
        per_row = int(np.prod(value.shape[1:])) if value.ndim > 1 else 0
        if per_row != info["num_features"]:
            raise ApiError(422, f"inputs.{name}: shape {list(value.shape)}; expected [N, {info['num_features']}]"
                                + (" or [N, 8, 8]" if info["kind"] == "image" else ""))
        return value.reshape(len(value), -1).astype(np.float32)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The Serve application for `args` (see ServeArgs). `serve run` passes key=value strings;
    `models` may then be a comma-separated list."""
    from pydantic import ValidationError

    from model_registry.registry import Registry

    if isinstance(args.get("models"), str):
        args = args | {"models": [m for m in args["models"].split(",") if m]}
    try:
        cfg = ServeArgs.model_validate(args)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, "serve args")) from None
    registry = Registry(cfg.registry)
    threads = cfg.intra_op_threads or max(1, round(cfg.num_cpus))
    scale = cfg.autoscaling
    logging = {"log_level": "WARNING", "enable_access_log": cfg.access_log}
    handles, info = {}, {}
    for ref in cfg.models:
        name, version = registry.resolve(ref)  # pin the version: replicas added later load the same one
        meta = registry.metadata(name, version)  # the replicas verify every file when they load it
        info[name] = {"name": name, "version": version, "engine": cfg.engine, "kind": meta.inputs.kind,
                      "labels": meta.task.labels, "num_features": meta.inputs.num_features}
        options: dict[str, Any] = {
            "name": f"model-{name}", "max_ongoing_requests": cfg.limits.max_ongoing_requests,
            "max_queued_requests": cfg.limits.max_queued_requests,
            "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
            "user_config": cfg.batching.model_dump(),
            "logging_config": logging,
        }
        if scale.min_replicas == scale.max_replicas:
            options["num_replicas"] = scale.max_replicas
        else:
            options["autoscaling_config"] = scale.model_dump()
        handles[name] = ModelServer.options(**options).bind(
            cfg.registry, f"{name}:{version}", cfg.engine, cfg.device, threads, cfg.limits.max_text_chars,
            cfg.limits.max_queued_instances)
    # The ingress only awaits the model handles, whose bounded queues refuse overload with a JSON 503;
    # its own bound is wide (beyond it Serve's proxy answers 503 itself).
    capacity = max(1024, 2 * len(handles) * (cfg.limits.max_ongoing_requests + cfg.limits.max_queued_requests))
    return Gateway.options(max_ongoing_requests=capacity, max_queued_requests=capacity, logging_config=logging).bind(
        handles, info, cfg.limits.model_dump())
