"""One model's Serve application: the deployment that parses HTTP also batches and runs the engine.

    python -m ray_apps serve --model digits@champion          # this app per model, plus the server app
    serve deploy cluster_configs/serve/digits.yaml            # the same, declaratively

Route prefix /v2/models/NAME (KServe V2: metadata, ready, stats, infer with JSON or binary tensors;
the routes are serve_deployments/routes.py).
The server application (`serve_deployments.app`) answers /v2, /v2/health/* and /v1, and forwards
/v1 predictions here through a handle (`ModelServer.predict`). One HTTP hop for V2: with HAProxy
ingress the request goes from HAProxy straight to this replica.

Each request's instances are checked before they are queued (a bad one is that request's 422).
Each served version is a lane (`serve_deployments.lane`): its own batcher and engine thread, one
vectorized encode per batch, probabilities split back per request, and a request whose rows give
non-finite outputs failing alone, with nothing re-run.

The application also runs a `RolloutController` (serve_deployments/controller.py). Every replica
reports its counts to it once a second and serves what its plan says: the champion, and during a
rollout the candidate too, answering the callers whose key hashes into the canary weight, or a
mirrored share of requests in shadow (docs/rollouts.md).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections import deque
from typing import Any

from ray import serve

from monitoring.monitor import AnsweredBatch
from serve_deployments.controller import RolloutController, read_service
from serve_deployments.http import BodyReader
from serve_deployments.instances import InstanceError, InstanceSpec
from serve_deployments.lane import Lane
from serve_deployments.protocol import ApiError
from serve_deployments.rollout import Plan, ReplicaReport, assign
from serve_deployments.routes import KServeRoutes

logger = logging.getLogger("ray.serve")
LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]
REPORT_S = 1.0  # how often a replica reports its counts to the rollout controller and gets the plan


class Metrics:
    """The replica's Prometheus series; each observation is tagged with the version that answered."""

    def __init__(self, name: str):
        from ray.serve import metrics

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
        self.shadow = metrics.Counter("rayfoundry_shadow_requests_total", "Requests mirrored to a rollout's candidate, "
                                      "by outcome: compared, disagreed (instances), dropped (busy).",
                                      tag_keys=("model", "outcome"))
        for m in (self.requests, self.latency, self.batch_size, self.queue_wait, self.inference, self.fit_gauge,
                  self.slo_refused, self.shadow):
            m.set_default_tags({"model": name})  # Serve adds its own tags to the dict it is given


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=20)
class ModelServer(KServeRoutes):
    def __init__(self, registry: str, ref: str, engine: str, device: str, intra_op_threads: int,
                 limits: dict[str, Any], controller: Any = None, monitoring: dict[str, Any] | None = None):
        from model_registry.registry import Registry
        from monitoring.config import MonitoringPolicy
        from rayfoundry.ray_env import quiet_process

        quiet_process()  # this replica's own actor process: its entry point, nothing else shares it
        self.registry, self.engine, self.device, self.threads = registry, engine, device, intra_op_threads
        self.limits, self.batching = limits, {}  # batching: set by reconfigure (user_config) before any request
        name, built = ref.split(":")
        self.name, self.controller = name, controller
        # Monitoring reports to the controller: without one (rollout: null) there is none.
        policy = MonitoringPolicy.model_validate(monitoring or {}) if controller is not None else None
        self.monitoring = policy if policy is not None and policy.enabled else None
        # (request_id, version, labels) of each answer since the last report, for the feedback join
        self.answered: deque[tuple[str, str, list[str]]] = deque(
            maxlen=self.monitoring.feedback.max_pending if self.monitoring else 1)
        self.metrics = Metrics(name)
        # What the service serves now (a rollout or a promotion may have moved on from the deployed version).
        service = read_service(Registry(registry), name, built) if controller is not None else None
        champion = service.champion if service else built
        self.lanes: dict[str, Lane] = {champion: self._load(champion)}
        self.plan = Plan(champion=champion, generation=-1)  # -1: the controller's plan applies at the first report
        first = self.lanes[champion]
        self.kind, self.num_features = first.kind, first.num_features
        self.spec = InstanceSpec(self.name, self.kind, self.num_features, limits["max_text_chars"])
        self.bodies = BodyReader(limits["max_body_bytes"], limits["body_timeout_s"], limits["max_bodies_in_flight"])
        self.shadow = {"compared": 0, "disagreed": 0, "dropped": 0}
        self.shadow_tasks: set[asyncio.Task] = set()
        self.load_error: str | None = None
        self.failed_generation: int | None = None  # a plan whose champion failed to load here
        self.reporter: asyncio.Task | None = None
        self.replica = serve.get_replica_context().replica_tag if controller is not None else "local"

    def _load(self, version: str) -> Lane:
        return Lane(self.registry, f"{self.name}:{version}", self.engine, self.device, self.threads, self.limits,
                    self.metrics, self.batching or None, self.monitoring.window.sample if self.monitoring else None)

    @property
    def champion(self) -> Lane:
        return self.lanes[self.plan.champion]

    # --- control -------------------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config (serve_deployments.config.Batching): changes without a restart."""
        from serve_deployments.config import Batching

        self.batching = Batching.model_validate(config).model_dump()
        for lane in self.lanes.values():
            lane.configure(self.batching)

    async def check_health(self) -> None:
        self._start_reporting()
        for lane in self.lanes.values():
            task = lane.batcher.task
            if task is not None and task.done() and not task.cancelled():
                raise RuntimeError(f"the batching loop of version {lane.version} stopped: {task.exception()!r}")

    def statistics(self) -> dict[str, Any]:
        """This replica's counters: execution_count < inference_count means requests were batched."""
        return self.champion.statistics() | self.batching | {"shadow": dict(self.shadow)}

    def info(self) -> dict[str, Any]:
        return self.champion.info() | {"monitoring": self.monitoring is not None}

    # --- rollouts: report counts, follow the plan ------------------------------------------------
    def _start_reporting(self) -> None:
        if self.controller is not None and (self.reporter is None or self.reporter.done()):
            self.reporter = asyncio.get_running_loop().create_task(self._report_loop())

    async def _report_loop(self) -> None:
        while True:
            try:
                report = ReplicaReport(replica=self.replica, generation=self.plan.generation,
                                       versions={v: lane.tally.take() for v, lane in self.lanes.items()},
                                       shadow_compared=self.shadow["compared"], shadow_disagreed=self.shadow["disagreed"],
                                       shadow_dropped=self.shadow["dropped"], load_error=self.load_error,
                                       monitor={v: c for v, lane in self.lanes.items() if lane.observer is not None
                                                and (c := lane.observer.take()) is not None},
                                       answered=self._answered())
                self.shadow = {"compared": 0, "disagreed": 0, "dropped": 0}
                self.answered.clear()  # a failed report loses these answers' feedback join, never a request
                plan = await asyncio.wait_for(self.controller.report.remote(report), 30)
                await self._apply(plan)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - the controller restarting: serve on, report again
                logger.warning("%s: rollout report failed (%s); retrying", self.name, e)
            await asyncio.sleep(REPORT_S)

    def _answered(self) -> AnsweredBatch:
        if not self.answered:
            return AnsweredBatch()
        ids, versions, labels = zip(*self.answered)
        return AnsweredBatch.model_construct(request_ids=list(ids), versions=list(versions), labels=list(labels))

    async def _apply(self, plan: Plan) -> None:
        """Load what the plan serves (on a thread: requests go on meanwhile), then switch in one step.
        A version no longer served is dropped once its queue is empty."""
        if plan.generation != self.plan.generation and plan.generation != self.failed_generation:
            self.load_error = None  # reported until the controller answers with a new plan
            for version in (plan.champion, plan.candidate):
                if version is not None and version not in self.lanes:
                    try:
                        self.lanes[version] = await asyncio.to_thread(self._load, version)
                    except Exception as e:  # noqa: BLE001 - reported: the controller rolls the candidate back
                        logger.exception("%s: version %s failed to load", self.name, version)
                        self.load_error = f"{type(e).__name__}: {e}"[:500]
                        if version == plan.champion:
                            self.failed_generation = plan.generation  # not retried until the plan changes
                            return  # keep serving what works; the error is reported
                        plan = plan.model_copy(update={"candidate": None, "weight": 0.0, "shadow_fraction": 0.0})
            self.plan = plan
        for version in [v for v in self.lanes if v not in (self.plan.champion, self.plan.candidate)]:
            if self.lanes[version].idle:
                self.lanes.pop(version).close()

    def _route_lane(self, headers: Any) -> tuple[Lane, Lane | None]:
        """The lane that answers this caller, and the candidate's lane when the request is to be mirrored."""
        plan = self.plan
        candidate = self.lanes.get(plan.candidate) if plan.candidate else None
        if candidate is None:
            return self.champion, None
        key = headers.get(plan.key_header) or headers.get("x-request-id") if headers else None
        if assign(key, plan.weight):
            return candidate, None
        mirror = plan.shadow_fraction > 0 and random.random() < plan.shadow_fraction
        return self.champion, candidate if mirror else None

    def _champion_sampling(self) -> float:
        """The share of the champion's answers whose latency and confidences are reported: about as many
        per second as the candidate gets, so the guards compare the two over the same time."""
        plan = self.plan
        if plan.candidate is None:
            return 0.0  # no rollout: the counts alone are reported
        if plan.weight > 0:
            return min(1.0, plan.weight / (1 - plan.weight))
        return plan.shadow_fraction

    def _mirror(self, candidate: Lane, rows: Any, answer: dict[str, Any]) -> None:
        """Run the request on the candidate too, never returning its answer: bounded, dropped when busy."""
        if candidate.version != self.plan.candidate:
            return  # the rollout ended while the champion answered
        if len(self.shadow_tasks) >= self.plan.shadow_max_in_flight:
            self.shadow["dropped"] += 1
            self.metrics.shadow.inc(tags={"outcome": "dropped"})
            return

        async def shadow() -> None:
            try:
                theirs = await candidate.answer(rows, self.limits["request_timeout_s"], mirrored=True)
            except ApiError:
                return  # counted as the candidate's error by its lane
            differ = sum(a != b for a, b in zip(answer["labels"], theirs["labels"]))
            self.shadow["compared"] += len(rows)
            self.shadow["disagreed"] += differ
            self.metrics.shadow.inc(len(rows), tags={"outcome": "compared"})
            if differ:
                self.metrics.shadow.inc(differ, tags={"outcome": "disagreed"})

        task = asyncio.get_running_loop().create_task(shadow())
        self.shadow_tasks.add(task)
        task.add_done_callback(self.shadow_tasks.discard)

    # --- requests ------------------------------------------------------------------------------
    async def predict(self, instances: Any, protocol: str = "v1", headers: dict[str, str] | None = None) -> dict[str, Any]:
        """Probabilities and labels for one request, or {"error", "status"}: the handle path (/v1 via the
        server application)."""
        try:
            return await self._predict(instances, protocol, headers)
        except ApiError as e:
            return {"error": e.message, "status": e.status}

    async def _predict(self, instances: Any, protocol: str, headers: Any = None, version: str | None = None) -> dict[str, Any]:
        self._start_reporting()
        started, status = time.perf_counter(), 500
        if version is not None and version not in self.lanes:  # retired while the body was read
            raise ApiError(404, f"model {self.name} no longer serves version {version!r}")
        lane, mirror = (self.lanes[version], None) if version is not None else self._route_lane(headers)
        try:
            if len(instances) > self.limits["max_instances"]:
                raise ApiError(422, f"instances: {len(instances)} instances; the limit is "
                                    f"{self.limits['max_instances']} per request")
            try:
                rows = self.spec.check(instances)
            except InstanceError as e:
                raise ApiError(422, str(e)) from None
            answer = await lane.answer(rows, self.limits["request_timeout_s"], tally=version is None,
                                       sample=lane is not self.champion or random.random() < self._champion_sampling())
            status = 200
            answer["request_id"] = uuid.uuid4().hex  # feedback labels name it (POST /v1/models/NAME:feedback)
            if self.monitoring is not None:
                self.answered.append((answer["request_id"], lane.version, answer["labels"]))
            if mirror is not None:
                self._mirror(mirror, rows, answer)
            return answer
        except ApiError as e:
            status = e.status
            raise
        finally:
            tags = {"version": lane.version, "protocol": protocol}
            self.metrics.requests.inc(tags=tags | {"status": str(status)})
            self.metrics.latency.observe(time.perf_counter() - started, tags=tags)


def build_app(args: dict[str, Any]) -> serve.Application:
    """The application for one model (serve_deployments.config.ModelArgs): its replicas and its rollout
    controller. Resolves the ref to a version; the controller then decides what the replicas serve
    (that version, until a rollout or a move of the followed alias changes it)."""
    from model_registry.registry import GATED_ALIAS, Registry, parse_ref
    from rayfoundry.ray_env import check_cluster_paths
    from serve_deployments.config import ModelArgs, parse_args

    cfg = parse_args(ModelArgs, args, "model args")
    # Every replica opens the registry, on whichever node it runs. Never connect from here: `serve run`
    # builds the app before it connects with its own options.
    check_cluster_paths({"registry": cfg.registry}, join=False)
    registry = Registry(cfg.registry)
    name, version = registry.resolve(cfg.model)
    _, pinned, alias = parse_ref(cfg.model)
    follow = None if pinned else (alias or GATED_ALIAS)  # NAME and NAME@ALIAS follow the alias; NAME:V is pinned
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
    controller = (RolloutController.bind(cfg.registry, name, version, follow, cfg.rollout.model_dump(),
                                         cfg.monitoring.model_dump()) if cfg.rollout is not None else None)
    return ModelServer.options(**options).bind(cfg.registry, f"{name}:{version}", engine, cfg.device, threads,
                                               cfg.limits.model_dump(), controller, cfg.monitoring.model_dump())
