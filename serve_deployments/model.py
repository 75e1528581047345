"""`ModelServer`: one registry package behind `@serve.batch`, on ONNX Runtime (or torch).

Requests arrive from the ingress as lists of instances (texts, 8x8 images, feature rows). Each
batch checks every request's instances, tokenizes or stacks the good ones in one vectorized call,
runs the engine once, and splits the probabilities back. A request with a bad instance gets its own
error; the others in the batch are answered. If the batched call itself fails, each request is
retried alone so only the guilty one fails.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import numpy as np
from ray import serve

from serve_deployments.instances import InstanceError, InstanceSpec

LATENCY_BUCKETS = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10]
BATCH_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.exp(logits - logits.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30, graceful_shutdown_timeout_s=20)
class ModelServer:
    def __init__(self, registry: str, ref: str, engine: str, device: str, intra_op_threads: int, max_text_chars: int,
                 max_queued_instances: int = 8192):
        from ray.serve import metrics

        from model_registry.predictor import Predictor
        from model_registry.registry import Registry
        from rayfoundry.ray_env import quiet_process

        quiet_process()  # this replica's own actor process: its entry point, nothing else shares it
        self.package = Registry(registry).open(ref)  # verifies every file's sha256; never unpickles
        # No spinning: a replica shares its node's cores with Serve's proxy and other replicas.
        self.predictor = Predictor(self.package, engine, device, intra_op_threads, spinning=False)
        meta = self.package.metadata
        self.name, self.version, self.engine = meta.name, meta.version, engine
        self.kind, self.labels = self.package.inputs.kind, self.package.labels
        self.num_features = self.package.inputs.num_features
        self.spec = InstanceSpec(self.name, self.kind, self.num_features, max_text_chars)
        self.max_queued_instances, self.queued_instances = max_queued_instances, 0
        self.stats = {"inference_count": 0, "execution_count": 0, "engine_calls": 0, "failed_count": 0,
                      "encode_seconds": 0.0, "engine_seconds": 0.0}
        self.batching: dict[str, float] = {}  # set by reconfigure (user_config) before the first request
        tags = {"model": self.name, "version": self.version}
        self.batch_size = metrics.Histogram("rayfoundry_batch_size", "Instances per model call.",
                                            boundaries=BATCH_BUCKETS, tag_keys=("model", "version"))
        self.queue_wait = metrics.Histogram("rayfoundry_queue_wait_seconds", "Time a request waited for its batch.",
                                            boundaries=LATENCY_BUCKETS, tag_keys=("model", "version"))
        self.inference = metrics.Histogram("rayfoundry_inference_seconds", "Encode + engine time per batch.",
                                           boundaries=LATENCY_BUCKETS, tag_keys=("model", "version"))
        for m in (self.batch_size, self.queue_wait, self.inference):
            m.set_default_tags(dict(tags))  # Serve adds its own tags to the dict it is given
        self.check_health()

    # --- control -------------------------------------------------------------------------------
    def reconfigure(self, config: dict[str, Any]) -> None:
        """user_config: max_batch_size and batch_wait_timeout_s change without a restart."""
        self.batching = {"max_batch_size": int(config["max_batch_size"]),
                         "batch_wait_timeout_s": float(config["batch_wait_timeout_s"])}
        self.predict_batch.set_max_batch_size(self.batching["max_batch_size"])
        self.predict_batch.set_batch_wait_timeout_s(self.batching["batch_wait_timeout_s"])

    def check_health(self) -> None:
        """A tiny input through the engine; an exception marks the replica unhealthy."""
        tiny = ["ok"] if self.kind == "text" else [[0.0] * self.num_features]
        out = self.predictor.logits(self.predictor.encode(tiny))
        if out.shape != (1, len(self.labels)) or not np.isfinite(out).all():
            raise RuntimeError(f"{self.name}:{self.version}: health check gave {out.shape} / non-finite logits")

    def statistics(self) -> dict[str, Any]:
        """This replica's counters: execution_count < inference_count means requests were batched."""
        return self.stats | self.batching

    # --- inference -----------------------------------------------------------------------------
    async def predict(self, instances: Any) -> dict[str, Any]:
        """Probabilities and labels for one request, or {"error", "status"} when an instance is bad or the
        replica already holds max_queued_instances (the limits of each request alone do not bound that)."""
        n = len(instances)
        if self.queued_instances + n > self.max_queued_instances:
            return {"error": f"model {self.name} has {self.queued_instances} instances queued; this request's {n} "
                             f"would pass the bound of {self.max_queued_instances}; retry shortly", "status": 503}
        self.queued_instances += n
        try:
            return await self.predict_batch((instances, time.perf_counter()))
        finally:
            self.queued_instances -= n

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
        self.stats["encode_seconds"] += t1 - t0  # where a replica's time goes (benchmarks/serve_load.py)
        self.stats["engine_seconds"] += time.perf_counter() - t1
        self.stats["engine_calls"] += 1  # == execution_count unless a failing batch was re-run request by request
        out: list[np.ndarray | InstanceError] = []
        for part in np.split(probs, np.cumsum([len(p) for p in parts])[:-1]):
            bad = np.flatnonzero(~np.isfinite(part).all(axis=1))
            out.append(InstanceError(f"instances[{bad[0]}]: the model's output is not finite for this input "
                                     "(values far outside the training data?)") if len(bad) else part)
        return out

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def predict_batch(self, items: list[tuple[Any, float]]) -> list[dict[str, Any]]:
        started = time.perf_counter()
        results: list[dict[str, Any] | None] = [None] * len(items)
        good, parts = [], []
        for i, (instances, queued_at) in enumerate(items):
            self.queue_wait.observe(started - queued_at)
            try:
                parts.append(self.spec.check(instances))
                good.append(i)
            except InstanceError as e:
                results[i] = {"error": str(e), "status": 422}
        if parts:
            loop = asyncio.get_running_loop()
            try:  # off the event loop, so the next batch can form while this one runs
                outputs = await loop.run_in_executor(None, self._run, parts)
            except Exception:
                outputs = []
                for part in parts:  # find the request that breaks the batch; answer the rest
                    try:
                        outputs.extend(await loop.run_in_executor(None, self._run, [part]))
                    except Exception as e:  # noqa: BLE001 - reported to that request only
                        outputs.append(e)
            for i, out in zip(good, outputs):
                if isinstance(out, InstanceError):
                    self.stats["failed_count"] += 1
                    results[i] = {"error": str(out), "status": 422}
                elif isinstance(out, Exception):
                    self.stats["failed_count"] += 1
                    results[i] = {"error": f"the model could not score this request: {out}", "status": 422}
                else:
                    results[i] = self._answer(out)
            rows = sum(len(p) for p in parts)
            self.stats["inference_count"] += rows
            self.stats["execution_count"] += 1
            self.batch_size.observe(rows)
        self.inference.observe(time.perf_counter() - started)
        return results

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        top = probs.argmax(axis=1)
        return {"model": self.name, "model_version": self.version, "labels": [self.labels[k] for k in top],
                "probabilities": np.round(probs, 6).tolist()}  # finite: _run answers non-finite rows with errors
