"""What the service does when its replicas change under load: scale-up and back down, a cold start
from zero, and the loss of a replica. The tests (tests/integration/test_serve_events.py) run these
on a tiny digits model with short delays; `make bench-serve` runs them on the SST-2 package.

    .venv/bin/python benchmarks/serve_events.py                 # SST-2 package, ~3 min on 2 cores

Writes benchmarks/results/serve_events.json.

Each scenario deploys one model application of its own on the running Serve and returns a typed
record of what it measured.
"""

from __future__ import annotations

import itertools
import json
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import requests
from pydantic import BaseModel

REPO = Path(__file__).resolve().parents[1]


class Load:
    """Closed-loop HTTP load from `clients` threads until stopped; every answer recorded with its time."""

    def __init__(self, url: str, body: dict | list[dict], clients: int, keyed: bool = False):
        """`body` one request body, or a list the clients send in turn; `keyed`: client i sends the header
        x-user-id: user-i (the key a rollout assigns callers by)."""
        self.url, self.clients, self.keyed = url, clients, keyed
        self.bodies = itertools.cycle(body if isinstance(body, list) else [body])
        # (sent, latency s, status, parsed body or text, client index)
        self.answers: list[tuple[float, float, int, Any, int]] = []
        self.in_flight = 0
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(clients)]

    def _client(self, i: int) -> None:
        session = requests.Session()
        if self.keyed:
            session.headers["x-user-id"] = f"user-{i}"
        while not self.stopped.is_set():
            sent = time.perf_counter()
            with self.lock:
                self.in_flight += 1
                body = next(self.bodies)
            try:
                r = session.post(self.url, json=body, timeout=60)
                status = r.status_code
                content = r.json() if r.headers.get("content-type", "").startswith("application/json") else r.text
            except requests.RequestException as e:
                status, content = 0, repr(e)
            with self.lock:
                self.in_flight -= 1
                self.answers.append((sent, time.perf_counter() - sent, status, content, i))

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.stopped.set()
        for t in self.threads:
            t.join(90)

    def between(self, start: float, end: float) -> list[tuple[float, float, int, Any, int]]:
        with self.lock:
            return [a for a in self.answers if start <= a[0] < end]


def p99_ms(answers: list[tuple[float, float, int, Any, int]]) -> float:
    ok = [a[1] for a in answers if a[2] == 200]
    return 1e3 * float(np.percentile(ok, 99)) if ok else float("nan")


def running_replicas(app: str) -> int:
    """Running model replicas of a model application (its rollout controller is not one)."""
    from ray import serve

    from serve_deployments.app import MODEL_DEPLOYMENT

    status = serve.status().applications.get(app)
    if status is None or MODEL_DEPLOYMENT not in status.deployments:
        return 0
    return status.deployments[MODEL_DEPLOYMENT].replica_states.get("RUNNING", 0)


def replica_names(app: str) -> list[str]:
    """Actor names of a model application's model replicas."""
    import ray

    from serve_deployments.app import MODEL_DEPLOYMENT

    prefix = f"SERVE_REPLICA::{app}#{MODEL_DEPLOYMENT}#"
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["namespace"] == "serve" and a["name"].startswith(prefix)]


def wait_for(condition: Callable[[], bool], timeout_s: float, every_s: float = 0.25) -> float | None:
    """Seconds until `condition()` held, or None after timeout_s."""
    began = time.perf_counter()
    while time.perf_counter() - began < timeout_s:
        if condition():
            return time.perf_counter() - began
        time.sleep(every_s)
    return None


def deploy(name: str, prefix: str, args: dict[str, Any]) -> None:
    from ray import serve

    from serve_deployments.model import build_app

    serve.run(build_app(args), name=name, route_prefix=prefix)


class ScaleUp(BaseModel):
    replicas_before: int
    scale_up_s: float | None  # held load until max_replicas were running
    p99_ms_before: float  # p99 of the answers sent before the load was held
    p99_ms_during: float  # p99 of the answers sent while the deployment scaled up
    failed_during: int
    scale_down_s: float | None  # load stopped until min_replicas were left


def scale_up_and_down(base: str, args: dict[str, Any], body: dict, clients: int, timeout_s: float = 60) -> ScaleUp:
    """Held load on a deployment with autoscaling from min to max replicas, then none."""
    name, scale = "scaling", args["autoscaling"]
    deploy(name, "/scaling", args)
    try:
        with Load(f"{base}/scaling/infer", body, 1) as light:  # one client: below target, the baseline
            time.sleep(3)
        before = light.answers
        with Load(f"{base}/scaling/infer", body, clients) as load:
            began = time.perf_counter()
            up = wait_for(lambda: running_replicas(name) >= scale["max_replicas"], timeout_s)
            during = load.between(began, time.perf_counter())
        down = wait_for(lambda: running_replicas(name) <= scale["min_replicas"], timeout_s)
        return ScaleUp(replicas_before=scale["min_replicas"], scale_up_s=up, p99_ms_before=p99_ms(before),
                       p99_ms_during=p99_ms(during), failed_during=sum(a[2] != 200 for a in during), scale_down_s=down)
    finally:
        from ray import serve

        serve.delete(name)


class ColdStart(BaseModel):
    replicas_at_rest: int
    first_status: int
    first_answer_s: float  # the first request after zero replicas, to its answer
    warm_ms: float  # a request once the replica is up


def cold_start(base: str, args: dict[str, Any], body: dict, timeout_s: float = 60) -> ColdStart:
    """min_replicas 0: wait for zero replicas, send one request, time its answer."""
    from ray import serve

    name = "coldstart"
    deploy(name, "/coldstart", args)
    try:
        if wait_for(lambda: running_replicas(name) == 0, timeout_s) is None:
            raise AssertionError(f"{name} did not scale to zero within {timeout_s}s")
        began = time.perf_counter()
        first = requests.post(f"{base}/coldstart/infer", json=body, timeout=timeout_s)
        first_s = time.perf_counter() - began
        began = time.perf_counter()
        requests.post(f"{base}/coldstart/infer", json=body, timeout=timeout_s)
        return ColdStart(replicas_at_rest=0, first_status=first.status_code, first_answer_s=first_s,
                         warm_ms=1e3 * (time.perf_counter() - began))
    finally:
        serve.delete(name)


class ReplicaLoss(BaseModel):
    replicas: int
    in_flight_at_kill: int
    failed: int
    failures: list[str]  # status and body of each failed answer
    recovered_s: float | None  # kill until all replicas were running again
    ok_after: bool  # every answer sent after recovery succeeded


def replica_loss(base: str, args: dict[str, Any], body: dict, clients: int, timeout_s: float = 60) -> ReplicaLoss:
    """Kill one of a fixed number of replicas while load runs; count what failed and time the recovery."""
    import ray
    from ray import serve

    name = "loss"
    deploy(name, "/loss", args)
    replicas = args["autoscaling"]["max_replicas"]
    try:
        wait_for(lambda: running_replicas(name) >= replicas, timeout_s)
        with Load(f"{base}/loss/infer", body, clients) as load:
            time.sleep(2)
            victim = replica_names(name)[0]
            with load.lock:
                in_flight = load.in_flight
            ray.kill(ray.get_actor(victim, namespace="serve"), no_restart=True)
            recovered = wait_for(lambda: victim not in replica_names(name) and len(replica_names(name)) >= replicas
                                 and running_replicas(name) >= replicas, timeout_s)
            settled = time.perf_counter() + 2
            time.sleep(4)
            after = load.between(settled, time.perf_counter())
        failed = [a for a in load.answers if a[2] != 200]
        return ReplicaLoss(replicas=replicas, in_flight_at_kill=in_flight, failed=len(failed),
                           failures=[f"{a[2]} {a[3]}"[:200] for a in failed],
                           recovered_s=recovered,
                           ok_after=bool(after) and all(a[2] == 200 for a in after))
    finally:
        serve.delete(name)


def main() -> None:
    """The three scenarios on the SST-2 package, on a Ray of their own behind HAProxy."""
    import os

    sys.path.insert(0, str(REPO))
    from benchmarks.flops import machine
    from benchmarks.sst2_package import DEFAULT_CHECKPOINT, DEFAULT_REGISTRY, bench_package, checkpoint_or_train
    from rayfoundry.ray_env import quiet_env, quiet_process
    from serve_deployments.app import ingress_env

    quiet_process()
    print(f"machine: {machine()}", flush=True)
    pkg = bench_package(checkpoint_or_train(DEFAULT_CHECKPOINT), DEFAULT_REGISTRY)
    os.environ.update(ingress_env("haproxy"))
    import ray
    from ray import serve

    ray.init(num_cpus=os.cpu_count(), logging_level="ERROR", runtime_env={"env_vars": quiet_env()})
    serve.start(http_options={"host": "127.0.0.1", "port": 8765}, logging_config={"log_level": "WARNING"})
    base = "http://127.0.0.1:8765"
    body = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a gripping, beautifully acted film"]}]}
    common = {"registry": DEFAULT_REGISTRY, "model": pkg.ref, "num_cpus": 0.9}
    fast = {"upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2, "target_ongoing_requests": 2}
    up = scale_up_and_down(base, common | {"autoscaling": {"min_replicas": 1, "max_replicas": 2} | fast}, body, 16)
    cold = cold_start(base, common | {"autoscaling": {"min_replicas": 0, "max_replicas": 1} | fast}, body)
    loss = replica_loss(base, common | {"autoscaling": {"min_replicas": 2, "max_replicas": 2}}, body, 16)
    print(f"\nServing events, SST-2 MiniLM ({pkg.ref}), {machine()}\n")
    print("| event | figure |\n| --- | --- |")
    print(f"| scale-up 1 -> 2 replicas under 16 clients | {up.scale_up_s:.1f} s; p99 {up.p99_ms_before:.0f} ms before "
          f"(1 client), {up.p99_ms_during:.0f} ms during; {up.failed_during} failed |")
    print(f"| scale-down 2 -> 1 after the load stops | {up.scale_down_s:.1f} s (downscale_delay_s 3) |")
    print(f"| cold start from zero replicas | first answer {cold.first_answer_s:.1f} s (status {cold.first_status}); "
          f"then {cold.warm_ms:.0f} ms |")
    print(f"| one of 2 replicas killed under 16 clients | {loss.failed} failed of {loss.in_flight_at_kill} in flight; "
          f"recovered in {loss.recovered_s:.1f} s; all ok after: {loss.ok_after} |")
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "serve_events.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "package": pkg.ref,
        "scale_up": up.model_dump(), "cold_start": cold.model_dump(), "replica_loss": loss.model_dump()}, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
