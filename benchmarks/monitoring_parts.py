"""Where does monitoring's CPU go? Its parts timed in one process, at the rates monitoring_overhead.py served.

    .venv/bin/python benchmarks/monitoring_parts.py                      # make bench-monitoring, after it; ~2 min
    .venv/bin/python benchmarks/monitoring_parts.py --models digits --seconds 2

No HTTP and no Serve: the code the replica and controller run, called directly, at each level's served rate
and batch size as results/monitoring_overhead.json records them (run benchmarks/monitoring_overhead.py first).
Counting a batch (Lane._observe: batch_stats + Observer.observe) against its engine call, keeping each answer
for feedback, the replica's report (Observer.take, Ray's serialiser: ray.put) and the controller's share (Ray's
deserialiser: ray.get, Monitor.add with the drift tests of the windows it closes, Monitor.answered). Their sum
per request over the served CPU per request predicts the throughput cost. Writes results/monitoring_parts.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.flops import machine  # noqa: E402
from benchmarks.monitoring_overhead import RESULTS, Served, packages  # noqa: E402
from benchmarks.sst2_package import DEFAULT_CHECKPOINT, DEFAULT_REGISTRY  # noqa: E402

REPORTS = 20  # reports timed per package and level
TAKE, PUT, GET = "take", "serialize (ray.put)", "deserialize (ray.get)"


def lane_for(m: Served):
    """The replica's lane for the package: its engine (as engine auto picks it), observer and counting code."""
    from monitoring.config import MonitoringPolicy
    from serve_deployments.config import Limits
    from serve_deployments.lane import Lane

    engine = "onnx-int8" if "onnx-int8" in m.package.metadata.engines() else "onnx"
    return Lane(m.registry, m.package.ref, engine, "cpu", 2, Limits().model_dump(), None, None,
                MonitoringPolicy().window.sample)


def engine_call(lane, batch: Any) -> tuple[dict, np.ndarray, np.ndarray | None]:
    """What Lane._run computes for a batch: encode, then logits (and, monitoring text, the pooled
    embedding from the same call), softmax."""
    from model_registry.predictor import softmax

    feeds = lane.predictor.encode(batch)
    logits, embedding = lane.predictor.logits_and_embedding(feeds) if lane.embedding else \
        (lane.predictor.logits(feeds), None)
    return feeds, softmax(logits.astype(np.float64)), embedding


def batches_of(m: Served, size: int) -> list:
    rows = m.rows if m.kind == "v2" else np.asarray(m.rows, dtype=np.float32)
    return [rows[i:i + size] for i in range(0, len(rows) - size + 1, size)]


def batch32(m: Served, lane, seconds: float) -> dict:
    """Median µs per batch of 32: the engine call and the counting the engine thread then does
    (Lane._observe); then batch_stats and Observer.observe called again at once (warm caches)."""
    from monitoring.profile import batch_stats

    batches = batches_of(m, 32)
    times: dict[str, list[float]] = {"engine": [], "counting": [], "batch_stats": [], "observe": []}
    k, stop = 0, time.perf_counter() + seconds
    while time.perf_counter() < stop or k < 2 * len(batches):  # the first len(batches) fill the reservoir
        t0 = time.perf_counter()
        feeds, probs, embedding = engine_call(lane, batches[k % len(batches)])
        t1 = time.perf_counter()
        lane._observe(feeds, probs, embedding)
        t2 = time.perf_counter()
        stats = batch_stats(feeds, probs, lane.unk_id, embedding)
        t3 = time.perf_counter()
        lane.observer.observe(stats)
        for key, t in zip(times, (t1 - t0, t2 - t1, t3 - t2, time.perf_counter() - t3)):
            times[key].append(t)
        k += 1
    return {key: 1e6 * statistics.median(t[len(batches):]) for key, t in times.items()} | {"batches": k - len(batches)}


def per_request(m: Served, lane, qps: float, mean_batch: float) -> dict:
    """µs per request of each part of monitoring at a served rate and batch size: counting each batch right
    after its engine call (as the engine thread does; warm caches would hide most of it), then REPORTS
    reports of one second of answers each, sent through Ray's object store (ray.put on the replica's side,
    ray.get on the controller's) and merged by a Monitor, timed without the cyclic garbage collector."""
    import ray

    from monitoring.config import MonitoringPolicy
    from monitoring.monitor import AnsweredBatch, Monitor
    from serve_deployments.rollout import ReplicaReport, VersionReport

    policy = MonitoringPolicy()
    n, size = max(1, round(qps)), max(1, round(mean_batch))
    counting = []
    for batch in batches_of(m, size)[:30]:
        feeds, probs, embedding = engine_call(lane, batch)
        t0 = time.perf_counter()
        lane._observe(feeds, probs, embedding)
        counting.append(time.perf_counter() - t0)
    ids = [uuid.uuid4().hex for _ in range(n)]  # made with monitoring off too
    kept: deque = deque(maxlen=policy.feedback.max_pending)
    monitor = Monitor(m.package.metadata.name, lane.labels, policy)
    monitor.track(lane.version, m.package.metadata.monitoring)
    keys = ("answer kept", TAKE, PUT, GET, "merge + drift tests", "answers")
    t, windows = dict.fromkeys(keys, 0.0), 0
    gc.collect()
    gc.disable()  # a collection's pause would land on whichever part happens to allocate
    for _ in range(REPORTS):
        for _ in range(n // size):  # the counts a report carries
            lane._observe(feeds, probs, embedding)
        marks = [time.perf_counter()]
        for i in ids:  # what _predict adds per answer
            kept.append((i, lane.version, [lane.labels[0]]))
        marks.append(time.perf_counter())
        counts = lane.observer.take()
        marks.append(time.perf_counter())
        columns = [list(c) for c in zip(*kept)]  # as ModelServer._answered sends them
        answered = AnsweredBatch.model_construct(request_ids=columns[0], versions=columns[1], labels=columns[2])
        ref = ray.put(ReplicaReport(replica="r", generation=0, versions={lane.version: VersionReport()},
                                    monitor={lane.version: counts}, answered=answered))
        kept.clear()
        marks.append(time.perf_counter())
        got = ray.get(ref)
        marks.append(time.perf_counter())
        windows += len(monitor.add(lane.version, got.monitor[lane.version]))
        marks.append(time.perf_counter())
        monitor.answered(got.answered.items())
        marks.append(time.perf_counter())
        for key, t0, t1 in zip(keys, marks, marks[1:]):
            t[key] += t1 - t0
        del ref
    gc.enable()
    us = {"counting": 1e6 * statistics.median(counting) / size} | {key: 1e6 * v / (REPORTS * n) for key, v in t.items()}
    return {"answers_per_report": n, "batch": size, "report_json_bytes": len(got.model_dump_json()),
            "windows_closed": windows, "reports": REPORTS, "us_per_req": us, "added_us_per_req": sum(us.values()),
            "replica_ms_per_report": 1e-3 * n * (us[TAKE] + us[PUT]),
            "controller_ms_per_report": 1e-3 * n * (us[GET] + us["merge + drift tests"] + us["answers"])}


def report(parts: dict, summary: dict) -> None:
    print(f"\nMonitoring's parts, {machine()}\n\nIn isolation, median µs per batch of 32:\n\n| model | engine call | "
          "counting after it (Lane._observe) | batch_stats, again | Observer.observe, again | counting / engine |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for label, x in parts.items():
        b = x["batch32"]
        print(f"| {label} | {b['engine']:.0f} | {b['counting']:.0f} | {b['batch_stats']:.0f} | {b['observe']:.0f} | "
              f"{100 * b['counting'] / b['engine']:.1f}% |")
    keys = list(next(iter(parts.values()))["levels"].values())[0]["us_per_req"]
    print("\nWhere monitoring's CPU goes, µs per request at each level's served rate and batch size (a replica "
          "reports once a second; report size: its pydantic model_dump_json(), not what Ray sends):\n\n"
          "| model | concurrency | answers a second, batch | " + " | ".join(keys) +
          " | total | replica / controller ms per report | report, JSON bytes | predicted on/off | measured on/off |\n"
          "| --- | ---: | ---: |" + " ---: |" * (len(keys) + 5))
    for label, x in parts.items():
        for c, y in x["levels"].items():
            print(f"| {label} | {c} | {y['answers_per_report']}, {y['batch']} | " +
                  " | ".join(f"{v:.1f}" for v in y["us_per_req"].values()) +
                  f" | {y['added_us_per_req']:.1f} | {y['replica_ms_per_report']:.1f} / {y['controller_ms_per_report']:.1f}"
                  f" ({y['windows_closed']} windows in {y['reports']}) | {y['report_json_bytes']} | "
                  f"{y['predicted_ratio']:.3f} | {summary[label][c].get('ratio', float('nan')):.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", help="comma list of sst2, digits (default: those the served results hold)")
    p.add_argument("--seconds", type=float, default=5.0, help="batches of 32 timed per model")
    p.add_argument("--served", type=Path, default=RESULTS / "monitoring_overhead.json",
                   help="monitoring_overhead.py's results: the levels, rates and batch sizes to time the parts at")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="SST-2 checkpoint")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry of the SST-2 bench package")
    args = p.parse_args()
    began = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    if not args.served.exists():
        raise SystemExit(f"{args.served} not found: run benchmarks/monitoring_overhead.py first")
    served_run = json.loads(args.served.read_text())
    summary = served_run["summary"]
    models = [x for x in args.models.split(",") if x] if args.models else list(summary)
    if set(models) - set(summary):
        raise SystemExit(f"--models: {args.served} holds {', '.join(summary)}")
    print(f"served rates from {args.served.name} ({served_run['date']}, {served_run['machine']})", flush=True)
    import ray

    from rayfoundry.ray_env import quiet_process

    quiet_process()
    if not ray.is_initialized():  # for ray.put / ray.get only: no tasks, actors or Serve
        ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR")  # no dashboard: no fixed port
    ray.get(ray.put(None))  # the first put connects to the object store: not a report's cost
    parts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, m in packages(models, args.checkpoint, args.registry, Path(tmp)).items():
            lane = lane_for(m)
            parts[label] = {"batch32": batch32(m, lane, args.seconds), "levels": {}}
            for c, s in summary[label].items():
                arm = "off" if "qps_off" in s else "on"
                y = per_request(m, lane, s[f"qps_{arm}"], s[f"mean_batch_{arm}"])
                # A closed loop on saturated cores: the CPU added per request comes out of every request's share.
                y["predicted_ratio"] = 1 - 1e-3 * y["added_us_per_req"] / (s[f"cpu_ms_per_req_{arm}"] +
                                                                            s[f"loadgen_ms_per_req_{arm}"])
                parts[label]["levels"][c] = y
            lane.close()
    ray.shutdown()
    report(parts, summary)
    wall = time.perf_counter() - began
    print(f"\n{wall / 60:.1f} min")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring_parts.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "settings": {"models": models, "seconds": args.seconds, "reports": REPORTS,
                     "served": {"file": args.served.name, "date": served_run["date"], "machine": served_run["machine"]}},
        "parts": parts, "wall_s": wall}, indent=2, default=str))
    print(f"wrote {RESULTS / 'monitoring_parts.json'}")


if __name__ == "__main__":
    main()
