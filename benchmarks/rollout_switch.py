"""What rollouts cost the service, and what a traffic switch costs its callers, on the SST-2 package.

    python benchmarks/rollout_switch.py        # part of `make bench-serve`; results/rollout.json

1. Idle cost: the same closed-loop load (16 clients, one short review per request) against the model
   application without a rollout controller (`rollout: null`) and with one but no rollout running.
   The replicas then report to the controller once a second and route through the plan: the ratio
   of their throughputs is what the rollout machinery costs the champion path.
2. Switches under load: with 8 keyed clients running throughout, a candidate (a second export of
   the same checkpoint) goes through shadow and two canary steps to champion; then a second
   rollout is aborted mid-canary. Every answer is recorded: failed requests, and the time from each
   decision until every answer came from the winning version.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BODY = {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": ["a gripping, beautifully acted film"]}]}
POLICY = {"shadow": {"fraction": 0.5, "hold_s": 5, "min_samples": 200},
          "canary": [{"weight": 0.2, "hold_s": 5, "min_samples": 200}, {"weight": 0.5, "hold_s": 5, "min_samples": 200}]}
DONE = ("promoted", "rolled_back", "aborted")


def candidate_of(registry: str, pkg) -> str:
    """A second version exported from the same checkpoint (reused from an earlier run when there is one)."""
    from model_registry.export import ExportJob, export
    from model_registry.registry import Registry

    reg = Registry(registry)
    for version in reversed(reg.versions("sst2-bench")):
        meta = reg.metadata("sst2-bench", version)
        if version != pkg.metadata.version and meta.source.checkpoint == pkg.metadata.source.checkpoint:
            return version
    return export(ExportJob(checkpoint=pkg.metadata.source.checkpoint, name="sst2-bench", registry=registry,
                            quantize="int8", max_int8_drop=1.0)).version


def qps(base: str, clients: int, seconds: float) -> tuple[float, int]:
    from benchmarks.serve_events import Load

    with Load(f"{base}/v2/models/sst2-bench/infer", BODY, clients) as load:
        time.sleep(2)
        start = time.perf_counter()
        time.sleep(seconds)
        window = load.between(start, start + seconds)
    return len(window) / seconds, sum(a[2] != 200 for a in load.answers)


def switch_s(answers: list, decided: float, winner: str, until: float) -> float | None:
    """Seconds from a decision until the first answer after which every answer (sent before `until`)
    came from `winner`."""
    later = [a for a in answers if decided <= a[0] < until and a[2] == 200]
    last_other = max((a[0] + a[1] for a in later if a[3]["model_version"] != winner), default=decided)
    return last_other - decided


def main() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.flops import machine
    from benchmarks.serve_events import Load, deploy, wait_for
    from benchmarks.sst2_package import DEFAULT_CHECKPOINT, DEFAULT_REGISTRY, bench_package, checkpoint_or_train
    from rayfoundry.ray_env import quiet_env, quiet_process
    from serve_deployments.app import ingress_env

    quiet_process()
    print(f"machine: {machine()}", flush=True)
    pkg = bench_package(checkpoint_or_train(DEFAULT_CHECKPOINT), DEFAULT_REGISTRY)
    candidate = candidate_of(DEFAULT_REGISTRY, pkg)
    os.environ.update(ingress_env("haproxy"))
    import ray
    from ray import serve

    from model_registry.registry import Registry

    ray.init(num_cpus=os.cpu_count(), logging_level="ERROR", runtime_env={"env_vars": quiet_env()})
    serve.start(http_options={"host": "127.0.0.1", "port": 8766}, logging_config={"log_level": "WARNING"})
    base = "http://127.0.0.1:8766"
    common = {"registry": DEFAULT_REGISTRY, "model": pkg.ref, "num_cpus": 0.9}
    idle = {}
    for arm, rollout in (("no controller", None), ("controller, no rollout", {}), ("no controller, again", None)):
        deploy("model-sst2-bench", "/v2/models/sst2-bench", common | {"rollout": rollout})
        idle[arm] = qps(base, 16, 20)
        print(f"{arm}: {idle[arm][0]:.1f} QPS, {idle[arm][1]} failed", flush=True)
        serve.delete("model-sst2-bench")
    baseline = (idle["no controller"][0] + idle["no controller, again"][0]) / 2

    state = Path(DEFAULT_REGISTRY) / "sst2-bench" / "rollout.json"
    state.unlink(missing_ok=True)  # this service starts afresh
    deploy("model-sst2-bench", "/v2/models/sst2-bench", common | {"rollout": POLICY})
    from ray_apps.rollout import controller

    handle = controller("sst2-bench")
    phase = lambda: handle.status.remote().result()["phase"]  # noqa: E731
    with Load(f"{base}/v2/models/sst2-bench/infer", BODY, 8, keyed=True) as load:
        time.sleep(2)
        handle.start.remote(f"sst2-bench:{candidate}").result()
        wait_for(lambda: phase() in DONE, 300, every_s=0.2)
        promoted_at, promoted = time.perf_counter(), handle.status.remote().result()
        time.sleep(5)
        second = time.perf_counter()
        handle.start.remote(pkg.ref).result()  # and back: the original version as the next candidate
        wait_for(lambda: phase() == "canary", 120, every_s=0.2)
        time.sleep(3)
        handle.abort.remote("benchmark: abort mid-canary").result()
        aborted_at = time.perf_counter()
        time.sleep(5)
        end = time.perf_counter()
    failed = [a for a in load.answers if a[2] != 200]
    serve.delete("model-sst2-bench")
    state.unlink(missing_ok=True)
    result = {
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "package": pkg.ref, "candidate": candidate,
        "idle_qps": {arm: q for arm, (q, _) in idle.items()}, "idle_ratio": idle["controller, no rollout"][0] / baseline,
        "rollout": {"outcome": promoted["phase"], "requests": len(load.answers), "failed": len(failed),
                    "failures": [f"{a[2]} {a[3]}"[:200] for a in failed[:5]],
                    "promote_switch_s": switch_s(load.answers, promoted_at, candidate, second),
                    "abort_switch_s": switch_s(load.answers, aborted_at, candidate, end)}}
    print(f"\nRollouts, SST-2 MiniLM ({pkg.ref} and {candidate}), {machine()}\n")
    print("| measure | figure |\n| --- | --- |")
    print(f"| QPS at 16 clients, no rollout controller (mean of two runs) | {baseline:.1f} |")
    print(f"| QPS at 16 clients, controller but no rollout | {idle['controller, no rollout'][0]:.1f} "
          f"({result['idle_ratio']:.3f}x) |")
    r = result["rollout"]
    print(f"| promote through shadow and 2 canary steps, then abort a rollout mid-canary, 8 clients | "
          f"{r['outcome']}; {r['failed']} failed of {r['requests']} |")
    print(f"| decision to every answer from the winner | promote {r['promote_switch_s']:.2f} s, "
          f"abort {r['abort_switch_s']:.2f} s |")
    print(f"\nregistry history: {Registry(DEFAULT_REGISTRY).state('sst2-bench').history[-1].reason}")
    results = REPO / "benchmarks" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "rollout.json").write_text(json.dumps(result, indent=2))
    serve.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
