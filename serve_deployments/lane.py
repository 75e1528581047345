"""One served version inside a model replica: its verified package, engine thread, batcher and counters.

A replica holds one lane for the champion, and a second one for the candidate during a rollout
(serve_deployments/rollout.py). Each lane batches and runs on its own, so a candidate's queue
never holds up the champion's.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from model_registry.predictor import softmax
from monitoring.profile import batch_stats
from monitoring.window import Observer
from serve_deployments.batching import Batcher, Pending, Refused
from serve_deployments.instances import InstanceError
from serve_deployments.protocol import ApiError
from serve_deployments.rollout import VersionReport

logger = logging.getLogger("ray.serve")
CALIBRATION_SIZES = (1, 4, 16)  # batch sizes timed at start-up, so the SLO fit has a line from the first request
REPORT_SAMPLES = 2000  # latencies and confidences sent per report at most (a uniform sample beyond)


class Tally:
    """A lane's counts since the last report to the rollout controller."""

    def __init__(self) -> None:
        self.report = VersionReport()
        self.seen_latencies = self.seen_confidences = 0

    def add(self, latency_s: float, ok: bool, confidences: list[float], sample: bool = True,
            mirrored: bool = False) -> None:
        """Count a request; `sample` also keeps its latency and confidences (the champion keeps them at
        the candidate's rate, so both versions' samples cover the same stretch of time). A mirrored
        request's latency is not kept: it ran after the champion's answer, beside live traffic."""
        r = self.report
        r.requests += 1
        r.errors += not ok
        r.instances += len(confidences)
        if sample and not mirrored:
            self.seen_latencies = _reservoir(r.latencies_ms, [1e3 * latency_s], self.seen_latencies)
        if sample:
            self.seen_confidences = _reservoir(r.confidences, confidences, self.seen_confidences)

    def take(self) -> VersionReport:
        out, self.report = self.report, VersionReport()
        self.seen_latencies = self.seen_confidences = 0
        return out


def _reservoir(kept: list[float], new: list[float], seen: int) -> int:
    """Keep a uniform sample of at most REPORT_SAMPLES of everything offered (Vitter's algorithm R)."""
    for x in new:
        seen += 1
        if len(kept) < REPORT_SAMPLES:
            kept.append(x)
        else:
            j = random.randrange(seen)
            if j < REPORT_SAMPLES:
                kept[j] = x
    return seen


class Lane:
    def __init__(self, registry: str, ref: str, engine: str, device: str, intra_op_threads: int, limits: dict[str, Any],
                 metrics: Any, batching: dict[str, Any] | None, monitor_sample: int | None = None):
        from model_registry.predictor import Predictor
        from model_registry.registry import Registry

        self.package = Registry(registry).open(ref)  # verifies every file's sha256; never unpickles
        # No spinning: a replica shares its node's cores with the ingress and other replicas.
        self.predictor = Predictor(self.package, engine, device, intra_op_threads, spinning=False)
        meta = self.package.metadata
        self.name, self.version, self.engine = meta.name, meta.version, engine
        self.kind, self.labels = self.package.inputs.kind, self.package.labels
        self.num_features = self.package.inputs.num_features
        self.metrics, self.tags = metrics, {"version": self.version}
        self.stats = {"inference_count": 0, "execution_count": 0, "engine_calls": 0, "failed_count": 0,
                      "encode_seconds": 0.0, "engine_seconds": 0.0}
        self.tally = Tally()
        # Monitoring: each batch's outputs and inputs counted in the package's reference bins (monitoring/).
        self.embedding = bool(monitor_sample and meta.monitoring and meta.monitoring.embedding
                              and self.predictor.has_embedding)  # fetched from the same engine call
        self.observer = Observer(meta.monitoring, monitor_sample, embedding=self.embedding) \
            if monitor_sample and meta.monitoring else None
        tokenizer = self.predictor.tokenizer
        self.unk_id = tokenizer.unk_token_id if tokenizer is not None else None
        self.observe_failed = False
        self.fit_exported = 0.0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"engine-v{self.version}")  # one call at a time
        self.batcher = Batcher(self._engine, max_batch_size=32, max_queued_instances=limits["max_queued_instances"])
        if batching:
            self.configure(batching)
        self._calibrate()

    def configure(self, batching: dict[str, Any]) -> None:
        self.batcher.configure(batching["max_batch_size"], batching["batch_wait_timeout_s"], batching["slo_p99_ms"])

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

    @property
    def idle(self) -> bool:
        return self.batcher.queued_instances == 0 and self.batcher.running == 0

    def close(self) -> None:
        """Stop the batching loop and the engine thread (a retired version, once idle)."""
        if self.batcher.task is not None:
            self.batcher.task.cancel()
        self.pool.shutdown(wait=False)

    def info(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "engine": self.engine, "kind": self.kind,
                "labels": self.labels, "num_features": self.num_features}

    def statistics(self) -> dict[str, Any]:
        fit = self.batcher.fit
        return self.stats | self.batcher.stats | {"queued_instances": self.batcher.queued_instances,
                                                  "fit_per_instance_ms": 1e3 * fit.a, "fit_fixed_ms": 1e3 * fit.b,
                                                  "fit_margin": fit.margin}

    async def answer(self, rows: Any, timeout_s: float, tally: bool = True, sample: bool = True,
                     mirrored: bool = False) -> dict[str, Any]:
        """This version's answer for checked instances; ApiError otherwise. For rollouts, a lane tallies
        its answers and its own failures (an engine error, a non-finite output); a request the caller
        gave up on, that timed out or that a full queue refused says nothing about the model. `tally`
        False: not counted at all (a request that named its version)."""
        started = time.perf_counter()
        try:
            answer = await asyncio.wait_for(self.batcher.enqueue(rows, len(rows)), timeout_s)
        except TimeoutError:  # wait_for cancelled the future: the batcher drops it if its batch has not started
            raise ApiError(408, f"model {self.name} did not answer within {timeout_s:g}s") from None
        except Refused as e:
            if e.slo:
                self.metrics.slo_refused.inc(tags=self.tags)
            raise ApiError(503, f"model {self.name}: {e}; retry shortly") from None
        except InstanceError as e:  # the model's output was not finite for this input
            if tally:
                self.tally.add(time.perf_counter() - started, False, [], sample=False)
            raise ApiError(422, str(e)) from None
        except ApiError:  # the engine failed on this request
            if tally:
                self.tally.add(time.perf_counter() - started, False, [], sample=False)
            raise
        if tally:
            self.tally.add(time.perf_counter() - started, True, [max(p) for p in answer["probabilities"]], sample,
                           mirrored)
        return answer

    async def _engine(self, batch: list[Pending]) -> None:
        """One engine call for the batch; sets every request's future."""
        started = time.perf_counter()
        for p in batch:
            self.metrics.queue_wait.observe(max(0.0, self.batcher.clock() - p.arrived), tags=self.tags)
        loop = asyncio.get_running_loop()
        try:
            # Always on the engine thread, even for a lone request (running it on the event loop saves a
            # hand-off but stops the loop reading the requests that would form the next batch).
            outputs = await loop.run_in_executor(self.pool, self._run, [p.instances for p in batch])
        except Exception:  # noqa: BLE001 - rare (inputs pass their checks first): find the request that breaks it
            logger.exception("%s:%s: an engine call for %d requests failed; running them one by one", self.name,
                             self.version, len(batch))
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
        self.metrics.inference.observe(time.perf_counter() - started, tags=self.tags)
        if self.batcher.planner.slo_s and started - self.fit_exported > 1.0:  # the fit, once a second at most
            fit, self.fit_exported = self.batcher.fit, started
            for term, value in (("per_instance", fit.a), ("fixed", fit.b), ("margin", fit.margin)):
                self.metrics.fit_gauge.set(value, tags=self.tags | {"term": term})

    def _run(self, parts: list[Any]) -> list[np.ndarray | InstanceError]:
        """One vectorized encode + engine call for all requests' instances: probabilities per request,
        or an InstanceError for a request any of whose rows gave a non-finite output (inputs far
        outside what the model saw); the other requests keep their answers, nothing runs twice."""
        flat = [x for p in parts for x in p] if self.kind == "text" else np.concatenate(parts)
        t0 = time.perf_counter()
        feeds = self.predictor.encode(flat)
        t1 = time.perf_counter()
        embedding = None
        with np.errstate(all="ignore"):  # non-finite rows are reported per request below
            if self.embedding:
                logits, embedding = self.predictor.logits_and_embedding(feeds)
            else:
                logits = self.predictor.logits(feeds)
            probs = softmax(logits.astype(np.float64))
        t2 = time.perf_counter()
        self.batcher.observe(len(flat), t2 - t0)
        self.stats["encode_seconds"] += t1 - t0  # where a replica's time goes (benchmarks/serve_load.py)
        self.stats["engine_seconds"] += t2 - t1
        self.stats["engine_calls"] += 1
        self.stats["execution_count"] += 1
        self.stats["inference_count"] += len(flat)
        self.metrics.batch_size.observe(len(flat), tags=self.tags)
        if self.observer is not None:
            self._observe(feeds, probs, embedding)
        out: list[np.ndarray | InstanceError] = []
        for part in np.split(probs, np.cumsum([len(p) for p in parts])[:-1]):
            bad = np.flatnonzero(~np.isfinite(part).all(axis=1))
            out.append(InstanceError(f"instances[{bad[0]}]: the model's output is not finite for this input "
                                     "(values far outside the training data?)") if len(bad) else part)
        return out

    def _observe(self, feeds: dict[str, np.ndarray], probs: np.ndarray, embedding: np.ndarray | None) -> None:
        """Count the batch's finite rows for monitoring; a failure here is logged once and never fails a request."""
        try:
            ok = np.isfinite(probs).all(axis=1)
            if not ok.all():
                feeds, probs = {k: v[ok] for k, v in feeds.items()}, probs[ok]
                embedding = embedding[ok] if embedding is not None else None
            self.observer.observe(batch_stats(feeds, probs, self.unk_id, embedding))
        except Exception:  # noqa: BLE001 - monitoring is advisory; the answers stand
            if not self.observe_failed:
                self.observe_failed = True
                logger.exception("%s:%s: monitoring could not count a batch (answers are unaffected)", self.name,
                                 self.version)

    def _answer(self, probs: np.ndarray) -> dict[str, Any]:
        top = probs.argmax(axis=1)
        return {"model": self.name, "model_version": self.version, "labels": [self.labels[k] for k in top],
                "classes": self.labels,
                "probabilities": np.round(probs, 6).tolist()}  # finite: _run answers non-finite rows with errors
