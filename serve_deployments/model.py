"""One model's Serve application: the deployment that parses HTTP also batches and runs the engine.

    python -m ray_apps serve --model digits@champion          # this app per model, plus the server app
    serve deploy cluster_configs/serve/digits.yaml            # the same, declaratively

Route prefix /v2/models/NAME (KServe V2: metadata, ready, stats, infer with JSON or binary tensors).
The server application (`serve_deployments.app`) answers /v2, /v2/health/* and /v1, and forwards
/v1 predictions here through a handle (`ModelServer.predict`). One HTTP hop for V2: with HAProxy
ingress the request goes from HAProxy straight to this replica.

Each request's instances are checked before they are queued (a bad one is that request's 422).
`serve_deployments.batching.Batcher` forms batches; one engine call runs at a time on a thread of
its own, with one vectorized encode for all requests; probabilities are split back per request
and a request whose rows give non-finite outputs fails alone, with nothing re-run.
"""

from __future__ import annotations

import asyncio
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import Response

from serve_deployments.batching import Batcher, Pending, Refused
from serve_deployments.http import BodyReader, error_response, json_response, v2_instances
from serve_deployments.instances import InstanceError, InstanceSpec
from serve_deployments.protocol import BINARY_HEADER, ApiError, check_outputs, parse_v2, v2_response

logger = logging.getLogger("ray.serve")
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CALIBRATION_SIZES = (1, 4, 16)  # batch sizes timed at start-up, so the SLO fit has a line from the first request

def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=20)
class ModelServer:
    def __init__(self, registry: str, ref: str, engine: str, device: str, intra_op_threads: int, limits: dict[str, Any]):
        from model_registry.predictor import Predictor
        from model_registry.registry import Registry
        from rayfoundry.ray_env import quiet_process

        quiet_process()  # this replica's own actor process: its entry point, nothing else shares it
        self.package = Registry(registry).open(ref)  # verifies every file's sha256; never unpickles
        # No spinning: a replica shares its node's cores with the ingress and other replicas.
        self.predictor = Predictor(self.package, engine, device, intra_op_threads, spinning=False)
        meta = self.package.metadata
        self.name, self.version, self.engine = meta.name, meta.version, engine
        self.kind, self.labels = self.package.inputs.kind, self.package.labels
        self.num_features = self.package.inputs.num_features
        self.limits, self.batching = limits, {}  # batching: set by reconfigure (user_config) before any request
        self.spec = InstanceSpec(self.name, self.kind, self.num_features, limits["max_text_chars"])
        self.bodies = BodyReader(limits["max_body_bytes"], limits["body_timeout_s"], limits["max_bodies_in_flight"])
        self.stats = {"inference_count": 0, "execution_count": 0, "engine_calls": 0, "failed_count": 0,
                      "encode_seconds": 0.0, "engine_seconds": 0.0}
        self.fit_exported = 0.0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="engine")  # one call at a time; the loop stays free
        self.batcher = Batcher(self._engine, max_batch_size=32, max_queued_instances=limits["max_queued_instances"])
        self._metrics()
        self._calibrate()

    def _metrics(self) -> None:
        from ray.serve import metrics

        tags = {"model": self.name, "version": self.version}
        self.requests = metrics.Counter("rayfoundry_requests_total", "Requests by model, version, status and protocol.",
                                        tag_keys=("model", "version", "status", "protocol"))
        self.latency = metrics.Histogram("rayfoundry_request_latency_seconds", "Time from the request's arrival in "
                                         "the model replica to its answer.", boundaries=LATENCY_BUCKETS,
                                         tag_keys=("model", "version", "protocol"))
        self.batch_size = metrics.Histogram("rayfoundry_batch_size", "Instances per model call.",
                                            boundaries=BATCH_BUCKETS, tag_keys=("model", "version"))
        self.queue_wait = metrics.Histogram("rayfoundry_queue_wait_seconds", "Time a request waited for its batch.",
                                            boundaries=LATENCY_BUCKETS, tag_keys=("model", "version"))
        self.inference = metrics.Histogram("rayfoundry_inference_seconds", "Encode + engine time per batch.",
                                           boundaries=LATENCY_BUCKETS, tag_keys=("model", "version"))
        self.fit_gauge = metrics.Gauge("rayfoundry_batch_time_fit_seconds", "The SLO planner's fit of a batch's time: "
                                       "term=per_instance (a), fixed (b), margin (p99 actual/predicted).",
                                       tag_keys=("model", "version", "term"))
        self.slo_refused = metrics.Counter("rayfoundry_slo_refusals_total", "Requests answered 503 because they "
                                           "could not finish within batching.slo_p99_ms.", tag_keys=("model", "version"))
        for m in (self.requests, self.latency, self.batch_size, self.queue_wait, self.inference, self.fit_gauge,
                  self.slo_refused):
            m.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given

    def _calibrate(self) -> None:
        """Run the engine on tiny inputs (a broken package fails here, not on a user's request) and
        seed the batch-time fit. The first call allocates ONNX Runtime's buffers, so it is not timed."""
        for i, n in enumerate((1, *CALIBRATION_SIZES * 2)):
            tiny = ["ok"] * n if self.kind == "text" else [[0.0] * self.num_features] * n
            t0 = time.perf_counter()
            out = self.predictor.logits(self.predictor.encode(tiny))
            if i:
                self.batcher.observe(n, time.perf_counter() - t0)
            if out.shape != (n, len(self.labels)) or not np.isfinite(out).all():
                raise RuntimeError(f"{self.name}:{self.version}: start-up check gave {out.shape} / non-finite logits")

    # --- control -------------------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config (serve_deployments.config.Batching): changes without a restart."""
        from serve_deployments.config import Batching

        cfg = Batching.model_validate(config)
        self.batching = cfg.model_dump()
        self.batcher.configure(cfg.max_batch_size, cfg.batch_wait_timeout_s, cfg.slo_p99_ms)

    def check_health(self) -> None:
        if self.batcher.task is not None and self.batcher.task.done() and not self.batcher.task.cancelled():
            raise RuntimeError(f"the batching loop stopped: {self.batcher.task.exception()!r}")

    def statistics(self) -> dict[str, Any]:
        """This replica's counters: execution_count < inference_count means requests were batched."""
        fit = self.batcher.fit
        return self.stats | self.batching | self.batcher.stats | {
            "queued_instances": self.batcher.queued_instances, "fit_per_instance_ms": 1e3 * fit.a,
            "fit_fixed_ms": 1e3 * fit.b, "fit_margin": fit.margin}

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "engine": self.engine, "kind": self.kind,
                "labels": self.labels, "num_features": self.num_features}

    # --- requests ------------------------------------------------------------------------------
    async def predict(self, instances: Any, protocol: str = "v1") -> dict[str, Any]:
        """Probabilities and labels for one request, or {"error", "status"}: the handle path (/v1 via the
        server application)."""
        try:
            return await self._predict(instances, protocol)
        except ApiError as e:
            return {"error": e.message, "status": e.status}

    async def _predict(self, instances: Any, protocol: str) -> dict[str, Any]:
        started, status = time.perf_counter(), 500
        try:
            if len(instances) > self.limits["max_instances"]:
                raise ApiError(422, f"instances: {len(instances)} instances; the limit is "
                                    f"{self.limits['max_instances']} per request")
            try:
                rows = self.spec.check(instances)
            except InstanceError as e:
                raise ApiError(422, str(e)) from None
            try:
                answer = await asyncio.wait_for(self.batcher.enqueue(rows, len(rows)), self.limits["request_timeout_s"])
            except TimeoutError:  # wait_for cancelled the future: the batcher drops it if its batch has not started
                raise ApiError(408, f"model {self.name} did not answer within {self.limits['request_timeout_s']:g}s") from None
            except Refused as e:
                if e.slo:
                    self.slo_refused.inc()
                raise ApiError(503, f"model {self.name}: {e}; retry shortly") from None
            except InstanceError as e:
                raise ApiError(422, str(e)) from None
            status = 200
            return answer
        except ApiError as e:
            status = e.status
            raise
        finally:
            self.requests.inc(tags={"status": str(status), "protocol": protocol})
            self.latency.observe(time.perf_counter() - started, tags={"protocol": protocol})

    async def _engine(self, batch: list[Pending]) -> None:
        """One engine call for the batch; sets every request's future."""
        started = time.perf_counter()
        for p in batch:
            self.queue_wait.observe(max(0.0, self.batcher.clock() - p.arrived))
        loop = asyncio.get_running_loop()
        try:
            # Always on the engine thread, even for a lone request (running it on the event loop saves a
            # hand-off but stops the loop reading the requests that would form the next batch).
            outputs = await loop.run_in_executor(self.pool, self._run, [p.instances for p in batch])
        except Exception:  # noqa: BLE001 - rare (inputs pass their checks first): find the request that breaks it
            logger.exception("%s: an engine call for %d requests failed; running them one by one", self.name, len(batch))
            outputs = []
            for p in batch:
                try:
                    outputs.extend(await loop.run_in_executor(self.pool, self._run, [p.instances]))
                except Exception as e:  # noqa: BLE001 - answered to that request only
                    outputs.append(e)
        for p, out in zip(batch, outputs):
            if p.future.done():  # cancelled while the call ran
                continue
            if isinstance(out, InstanceError):
                self.stats["failed_count"] += 1
                p.future.set_exception(out)
            elif isinstance(out, Exception):
                self.stats["failed_count"] += 1
                p.future.set_exception(ApiError(500, f"model {self.name} could not score this request "
                                                     f"({type(out).__name__}); the replica's log has the details"))
            else:
                p.future.set_result(self._answer(out))
        self.inference.observe(time.perf_counter() - started)
        if self.batcher.planner.slo_s and started - self.fit_exported > 1.0:  # the fit, once a second at most
            fit, self.fit_exported = self.batcher.fit, started
            for term, value in (("per_instance", fit.a), ("fixed", fit.b), ("margin", fit.margin)):
                self.fit_gauge.set(value, tags={"term": term})

    def _run(self, parts: list[Any]) -> list[np.ndarray | InstanceError]:
        """One vectorized encode + engine call for all requests' instances: probabilities per request,
        or an InstanceError for a request any of whose rows gave a non-finite output (inputs far
        outside what the model saw); the other requests keep their answers, nothing runs twice."""
        flat = [x for p in parts for x in p] if self.kind == "text" else np.concatenate(parts)
        t0 = time.perf_counter()
        feeds = self.predictor.encode(flat)
        t1 = time.perf_counter()
        with np.errstate(all="ignore"):  # non-finite rows are reported per request below
            probs = softmax(self.predictor.logits(feeds).astype(np.float64))
        t2 = time.perf_counter()
        self.batcher.observe(len(flat), t2 - t0)
        self.stats["encode_seconds"] += t1 - t0  # where a replica's time goes (benchmarks/serve_load.py)
        self.stats["engine_seconds"] += t2 - t1
        self.stats["engine_calls"] += 1
        self.stats["execution_count"] += 1
        self.stats["inference_count"] += len(flat)
        self.batch_size.observe(len(flat))
        out: list[np.ndarray | InstanceError] = []
        for part in np.split(probs, np.cumsum([len(p) for p in parts])[:-1]):
            bad = np.flatnonzero(~np.isfinite(part).all(axis=1))
            out.append(InstanceError(f"instances[{bad[0]}]: the model's output is not finite for this input "
                                     "(values far outside the training data?)") if len(bad) else part)
        return out

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        top = probs.argmax(axis=1)
        return {"model": self.name, "model_version": self.version, "labels": [self.labels[k] for k in top],
                "probabilities": np.round(probs, 6).tolist()}  # finite: _run answers non-finite rows with errors

    # --- HTTP: KServe V2 under /v2/models/NAME -------------------------------------------------
    async def __call__(self, request: Request) -> Response:
        """Serve hands this replica each HTTP request under the route prefix. Six routes do not need a
        web framework: FastAPI's middleware and dependency solving cost about a third of the event
        loop's time per request here (py-spy, benchmarks/serve_load.py at concurrency 32)."""
        try:
            return await self._route(request)
        except ApiError as e:
            return error_response(e)
        except Exception as e:  # noqa: BLE001 - a bug answers this request with a JSON 500; the replica goes on
            logger.exception("%s: %s %s failed", self.name, request.method, request.scope["path"])
            return error_response(ApiError(500, f"internal error: {type(e).__name__}"))

    async def _route(self, request: Request) -> Response:
        path = request.scope["path"][len(request.scope.get("root_path", "")):].strip("/")
        parts = path.split("/") if path else []
        version = None
        if parts[:1] == ["versions"] and len(parts) >= 2:
            version, parts = parts[1], parts[2:]
        leaf = parts[0] if len(parts) == 1 else ("" if not parts else None)
        allowed = {"": "GET", "ready": "GET", "stats": "GET", "infer": "POST"}.get(leaf) if leaf is not None else None
        if allowed is None or (leaf == "stats" and version is not None):
            raise ApiError(404, f"no route {request.scope['path']!r} for model {self.name} (routes: infer, ready, "
                                "stats, versions/VERSION[/infer|/ready])")
        if request.method != allowed:
            raise ApiError(405, f"{request.method} {request.scope['path']}: use {allowed}")
        self._version(version)
        if leaf == "infer":
            return await self.infer(request)
        doc = self.metadata() if leaf == "" else {"name": self.name, "ready": True} if leaf == "ready" else \
            {"model_stats": [{"name": self.name, "version": self.version} | self.statistics()]}
        return json_response(doc)

    def _version(self, version: str | None) -> None:
        if version is not None and version != self.version:
            raise ApiError(404, f"model {self.name} has no version {version!r} here (serving version {self.version})")

    def metadata(self) -> dict[str, Any]:
        if self.kind == "text":
            inputs = [{"name": "text", "datatype": "BYTES", "shape": [-1]}]
        else:
            inputs = [{"name": "features", "datatype": "FP32", "shape": [-1, self.num_features]}]
        return {"name": self.name, "versions": [self.version], "platform": f"rayfoundry_{self.engine}",
                "inputs": inputs, "outputs": [{"name": "probabilities", "datatype": "FP32", "shape": [-1, len(self.labels)]},
                                              {"name": "label", "datatype": "BYTES", "shape": [-1]}],
                "parameters": {"labels": self.labels}}

    async def infer(self, request: Request) -> Response:
        req, tensors = parse_v2(await self.bodies.read(request), request.headers.get(BINARY_HEADER))
        check_outputs(req)  # before the engine runs for an answer nobody can have
        instances = v2_instances(self.name, self.kind, self.num_features, tensors)
        body, headers = v2_response(req, await self._predict(instances, "v2"))
        return Response(content=body, headers=headers)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for one model (serve_deployments.config.ModelArgs). Resolves the ref to a
    version, so every replica, including ones the autoscaler adds later, loads the same one."""
    from model_registry.registry import Registry
    from serve_deployments.config import ModelArgs, parse_args

    cfg = parse_args(ModelArgs, args, "model args")
    registry = Registry(cfg.registry)
    name, version = registry.resolve(cfg.model)
    meta = registry.metadata(name, version)  # the replicas verify every file when they load it
    engine = cfg.engine
    if engine == "auto":  # the export gate only ships int8 whose accuracy drop passed its bound
        engine = "onnx-int8" if "onnx-int8" in meta.engines() else "onnx"
    threads = cfg.intra_op_threads or max(1, round(cfg.num_cpus))
    options: dict[str, Any] = {
        "max_ongoing_requests": cfg.limits.max_ongoing_requests, "max_queued_requests": cfg.limits.max_queued_requests,
        "backpressure_config": {"retry_after_s": 1},  # Serve's own 503 beyond those bounds (plain text)
        "ray_actor_options": {"num_cpus": cfg.num_cpus, "num_gpus": cfg.num_gpus},
        "user_config": cfg.batching.model_dump(),
        "logging_config": {"log_level": "WARNING", "enable_access_log": cfg.access_log},
    }
    scale = cfg.autoscaling
    if scale.min_replicas == scale.max_replicas:
        options["num_replicas"] = scale.max_replicas
    else:
        options["autoscaling_config"] = scale.model_dump()
    return ModelServer.options(**options).bind(cfg.registry, f"{name}:{version}", engine, cfg.device, threads,
                                               cfg.limits.model_dump())
