"""What does monitoring cost a served model? Monitoring on vs off under closed-loop HTTP load, and its parts.

    .venv/bin/python benchmarks/monitoring_overhead.py                   # make bench-monitoring, ~7 min on 2 cores
    .venv/bin/python benchmarks/monitoring_overhead.py --models digits --concurrency 32 --rounds 1 --seconds 4

The requirement: monitoring (on by default) costs under 3% of throughput, i.e. QPS on / QPS off >= 0.97 with
`monitoring: {enabled: false}` as the baseline measured in the same run; the verdict is printed. Packages:
  sst2    the SST-2 MiniLM package (benchmarks/sst2_package.py): text, so each batch also counts token
          lengths and unknown tokens besides the softmax rows; one SST-2 dev sentence per request
  digits  the digits CNN exported from runs/digits_cnn (trained first when absent): 64 numeric features
          binned per instance, the most counting for the least model work; one row per request
Both arms of a package are served side by side on one Ray behind HAProxy (V2 JSON infer, engine auto, 2
engine threads, each replica reserving half the cores), under /on and /off. serve_load's closed loop, in a
process of its own, loads one arm at a time. Each of --rounds rounds deploys both arms anew (replica
processes differ in speed for as long as they live), runs them in the order --arms gives, reversed every
round so a drift of the machine's speed hits both alike, and deletes them. CPU: every process but the load
generator's. The ratio is over all runs: per round it shows how far one round can mislead.
Writes results/monitoring_overhead.json; benchmarks/monitoring_parts.py then times monitoring's parts at the
served rates and batch sizes recorded there.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from benchmarks import serve_load  # noqa: E402
from benchmarks.flops import machine  # noqa: E402
from benchmarks.sst2_package import DEFAULT_CHECKPOINT, DEFAULT_REGISTRY, bench_package, checkpoint_or_train  # noqa: E402

BOUND = 0.03  # the requirement: monitoring costs under 3% of throughput
DIGITS_RUN = REPO / "runs" / "digits_cnn"
TEXT_BODY = serve_load.body


@dataclass
class Served:
    """One package as the benchmark serves it."""

    label: str  # sst2 or digits
    package: Any  # model_registry ModelPackage
    registry: str
    kind: str  # request body: "v2" (one text) or "features" (one row)
    rows: list  # what the requests carry, one instance each
    rows_file: str


# --- load generator (runs in its own process) -------------------------------------------------
def body(kind: str, row: Any) -> dict:
    """serve_load's request body, and V2 FP32 for one row of features (serve_load sends texts only)."""
    if kind == "features":
        return {"inputs": [{"name": "features", "shape": [1, len(row)], "datatype": "FP32", "data": row}]}
    return TEXT_BODY(kind, row)


def load(url: str, kind: str, rows_file: str, concurrency: int, seconds: float) -> dict:
    """serve_load's closed loop from a process of its own; plus the CPU all other processes used meanwhile."""
    before = serve_load.process_cpu()
    out = subprocess.run([sys.executable, __file__, "--loadgen", url, "--kind", kind, "--rows", rows_file,
                          "--concurrency", str(concurrency), "--seconds", str(seconds)],
                         capture_output=True, text=True, check=True)
    after = serve_load.process_cpu()
    r = json.loads(out.stdout.strip().splitlines()[-1])
    by_pid = {pid: t - before.get(pid, ("", 0.0))[1] for pid, (_, t) in after.items() if pid != os.getpid()}
    per_req = 1e3 / max(1, r["ok"])
    return r | {"cpu_ms_per_req": per_req * sum(by_pid.values()), "loadgen_ms_per_req": per_req * r["loadgen_cpu_s"],
                "cpu_ms_per_req_by_pid": {pid: per_req * t for pid, t in by_pid.items()}}


def replica_titles() -> dict[int, str]:
    """pid -> "monitoring-on:ModelServer" (or :RolloutController, monitoring-off:...) for the arms' replicas."""
    import psutil

    out = {}
    for p in psutil.process_iter(["cmdline"]):
        title = " ".join(p.info["cmdline"] or [])
        if "ServeReplica:monitoring-" in title:
            out[p.pid] = title.split("ServeReplica:", 1)[1].split()[0]
    return out


# --- packages -----------------------------------------------------------------------------------
def sst2_package(checkpoint: Path, registry: str):
    """The bench package; exported again (once) when it predates reference profiles with the pooled
    embedding: monitoring would count less than it does for a package exported now."""
    from model_registry.export import ExportJob, export
    from model_registry.registry import Registry

    pkg = bench_package(checkpoint_or_train(checkpoint), registry)
    if pkg.metadata.monitoring is None or pkg.metadata.monitoring.embedding is None:
        print(f"{pkg.ref} predates the current reference profile: exporting the checkpoint again (~2 min, once)",
              flush=True)
        pkg = Registry(registry).open(export(ExportJob(checkpoint=str(checkpoint), name="sst2-bench", registry=registry,
                                                       quantize="int8", max_int8_drop=1.0)).ref)
    return pkg


def digits_package(registry: str):
    """The demo's digits CNN (runs/digits_cnn), exported with int8 as `make demo` does (seconds)."""
    from model_registry.export import ExportJob, export
    from model_registry.registry import Registry

    if not DIGITS_RUN.exists():
        print(f"{DIGITS_RUN} not found: training digits first (~1 min)", flush=True)
        subprocess.run([sys.executable, "-m", "ray_apps", "train", "--config", "ray_apps/configs/digits_cnn.yaml"],
                       cwd=REPO, check=True)
    return Registry(registry).open(export(ExportJob(checkpoint=str(DIGITS_RUN), name="digits-bench", registry=registry,
                                                    quantize="int8", max_int8_drop=1.0)).ref)


def packages(models: list[str], checkpoint: Path, registry: str, tmp: Path) -> dict[str, Served]:
    """The packages by label, as both monitoring benchmarks serve them; digits goes to a registry in `tmp`."""
    out = {}
    for label in models:
        reg = registry if label == "sst2" else str(tmp / "registry")
        pkg = sst2_package(checkpoint, reg) if label == "sst2" else digits_package(reg)
        out[label] = served(label, pkg, reg, tmp)
        print(f"{label}: {pkg.ref}, {len(out[label].rows)} request rows", flush=True)
    return out


def served(label: str, pkg, registry: str, tmp: Path) -> Served:
    """The package with its request rows: the validation rows of its training job."""
    from model_registry.validation import read_rows
    from trainers.config import parse_job

    job = parse_job(pkg.metadata.training.config)
    table = read_rows(job.data.validation_path or job.data.train_path, job)
    if pkg.inputs.kind == "text":
        kind, rows = "v2", [t for t in table.column(job.data.text_column).to_pylist() if t]
    else:
        kind = "features"
        rows = np.column_stack([table.column(c).to_numpy() for c in pkg.inputs.feature_columns]).astype(float).tolist()
    rows_file = tmp / f"{label}.json"
    rows_file.write_text(json.dumps(rows))
    return Served(label, pkg, registry, kind, rows, str(rows_file))


# --- served arms ----------------------------------------------------------------------------------
def serve_round(m: Served, base: str, order: list[str], levels: list[int], seconds: float) -> dict:
    """Deploy the package with monitoring on (/on) and off (/off) in `order`; at each level load each arm in
    that order; delete both. Every round starts new replica processes: two processes of the same
    deployment can differ by up to 10% in QPS for as long as they live (an A/A test here), so the
    ratio is taken over rounds."""
    import requests
    from ray import serve

    from benchmarks.serve_events import deploy, wait_for
    from serve_deployments.app import local_cpus_per_model

    probe = body(m.kind, m.rows[0])

    def answers(arm: str) -> bool:
        try:
            return requests.post(f"{base}/{arm}/infer", json=probe, timeout=10).status_code == 200
        except requests.ConnectionError:
            return False

    def stats(arm: str) -> dict:
        return requests.get(f"{base}/{arm}/stats", timeout=30).json()["model_stats"][0]

    for arm in order:  # each replica as a one-model service runs it, on a machine two models share
        deploy(f"monitoring-{arm}", f"/{arm}", {
            "registry": m.registry, "model": m.package.ref, "num_cpus": local_cpus_per_model(2),
            "intra_op_threads": max(1, round(local_cpus_per_model(1))), "monitoring": {"enabled": arm == "on"}})
        if wait_for(lambda: answers(arm), 90, every_s=0.5) is None:  # noqa: B023 - called at once
            raise SystemExit(f"{m.label}, monitoring {arm}: no answer within 90 s")
        load(f"{base}/{arm}/infer", m.kind, m.rows_file, 8, 3)  # warm-up
    runs, titles = [], replica_titles()
    for c in levels:
        for arm in order:
            before = stats(arm)
            r = load(f"{base}/{arm}/infer", m.kind, m.rows_file, c, seconds)
            after = stats(arm)
            d = {k: after[k] - before[k] for k in ("execution_count", "inference_count", "engine_seconds")}
            by_pid = r.pop("cpu_ms_per_req_by_pid")
            r["replica_cpu_ms_per_req"] = {title: by_pid.get(pid, 0.0) for pid, title in titles.items()}
            r |= {"arm": arm, "concurrency": c, "mean_batch": d["inference_count"] / max(1, d["execution_count"]),
                  "engine_ms_per_batch": 1e3 * d["engine_seconds"] / max(1, d["execution_count"])}
            runs.append(r)
            print(f"  {m.label:<6} monitoring {arm:<3} c={c:<3} {r['qps']:7.1f} QPS  p50 {r['p50_ms']:6.1f} ms  p99 "
                  f"{r['p99_ms']:6.1f} ms  CPU {r['cpu_ms_per_req']:.2f} ms/req  mean batch {r['mean_batch']:.1f}  "
                  f"errors {r['errors']}", flush=True)
    time.sleep(1.5)  # the last report (one a second) reaches the controller
    monitor = {}
    for arm in order:
        doc = requests.get(f"{base}/{arm}/monitor", timeout=30).json()
        seen = doc.get("versions", {}).get(m.package.metadata.version, {})
        monitor[arm] = {"enabled": doc["enabled"], "instances": seen.get("instances", 0), "windows": seen.get("windows", 0)}
        serve.delete(f"monitoring-{arm}")
    return {"runs": runs, "monitor": monitor}


def summarize(rounds: list[dict], level: int) -> dict:
    """Monitoring on against off at one level: means over all runs, the ratio, each round's, the verdict."""
    runs = [r | {"round": i} for i, x in enumerate(rounds) for r in x["runs"] if r["concurrency"] == level]
    side = {arm: [r for r in runs if r["arm"] == arm] for arm in ("on", "off")}
    out = {f"{key}_{arm}": statistics.mean(r[key] for r in side[arm]) for arm in side if side[arm]
           for key in ("qps", "p50_ms", "p99_ms", "cpu_ms_per_req", "loadgen_ms_per_req", "mean_batch", "engine_ms_per_batch")}
    out |= {f"qps_runs_{arm}": [r["qps"] for r in side[arm]] for arm in side}
    for arm in (a for a in side if side[a]):  # the CPU of the loaded arm's own replica and controller
        for key, process in (("model_replica", "ModelServer"), ("controller", "RolloutController")):
            out[f"{key}_ms_per_req_{arm}"] = statistics.mean(
                r["replica_cpu_ms_per_req"].get(f"monitoring-{arm}:{process}", 0.0) for r in side[arm])
    if side["on"] and side["off"]:
        out["ratio"] = out["qps_on"] / out["qps_off"]
        out["round_ratios"] = [statistics.mean(r["qps"] for r in side["on"] if r["round"] == i) /
                               statistics.mean(r["qps"] for r in side["off"] if r["round"] == i) for i in range(len(rounds))]
        out["verdict"] = "PASS" if out["ratio"] >= 1 - BOUND else "FAIL"
    return out


# --- report -------------------------------------------------------------------------------------
def on_off(s: dict, key: str, fmt: str = ".1f") -> str:
    return f"{s[key + '_on']:{fmt}} / {s[key + '_off']:{fmt}}"


def report(summary: dict, seconds: float, rounds: int) -> None:
    print(f"\nMonitoring on vs off, {machine()}: {rounds} rounds of new replicas, {seconds:g}s per run, the arms' "
          "order reversed each round; CPU: every process's but the load generator's, and of it the loaded arm's "
          "model replica and controller\n")
    print("| model | concurrency | QPS on (runs) | QPS off (runs) | on/off | on/off by round | p50 ms on / off | "
          "p99 ms on / off | CPU ms/req on / off | model replica | controller | mean batch | cost < 3% |\n"
          "| --- | ---: | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for label, by_level in summary.items():
        for c, s in by_level.items():
            if "ratio" not in s:
                continue
            runs = {arm: ", ".join(f"{q:.0f}" for q in s[f"qps_runs_{arm}"]) for arm in ("on", "off")}
            print(f"| {label} | {c} | {s['qps_on']:.1f} ({runs['on']}) | {s['qps_off']:.1f} ({runs['off']}) | "
                  f"{s['ratio']:.3f} | {', '.join(f'{r:.2f}' for r in s['round_ratios'])} | {on_off(s, 'p50_ms')} | "
                  f"{on_off(s, 'p99_ms')} | {on_off(s, 'cpu_ms_per_req', '.2f')} | "
                  f"{on_off(s, 'model_replica_ms_per_req', '.2f')} | {on_off(s, 'controller_ms_per_req', '.3f')} | "
                  f"{s['mean_batch_on']:.1f} | {s['verdict']} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="sst2,digits", help="comma list of sst2, digits")
    p.add_argument("--arms", default="on,off", help="the arms, in the first round's order (reversed each round)")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each with new replicas of both arms")
    p.add_argument("--concurrency", default="32,1", help="levels, comma list")
    p.add_argument("--seconds", type=float, default=6.0, help="measured time per run")
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT, help="SST-2 checkpoint")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="registry of the SST-2 bench package")
    p.add_argument("--loadgen", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--rows", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loadgen:
        serve_load.body = body  # closed_loop builds every request with serve_load.body
        rows = json.loads(Path(args.rows).read_text())
        print(json.dumps(asyncio.run(serve_load.closed_loop(args.loadgen, args.kind, rows, int(args.concurrency),
                                                            args.seconds))))
        return
    began = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    from rayfoundry.ray_env import quiet_env, quiet_process
    from serve_deployments.app import ingress_env

    quiet_process()
    models, order = [x for x in args.models.split(",") if x], [x for x in args.arms.split(",") if x]
    levels = [int(c) for c in args.concurrency.split(",")]
    if set(models) - {"sst2", "digits"} or set(order) - {"on", "off"} or len(set(order)) < len(order):
        raise SystemExit("--models takes sst2 and digits, --arms takes on and off (each once)")
    with tempfile.TemporaryDirectory() as tmp:
        served_packages = packages(models, args.checkpoint, args.registry, Path(tmp))
        # HAProxy as the service runs it. A deleted replica waits out HAProxy's 30 s drain period, meant for
        # live traffic: the arms are deleted idle, so 1 s will do (teardown only; the data path is unchanged).
        os.environ.update(ingress_env("haproxy") | {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "1"})
        import ray
        from ray import serve

        ray.init(num_cpus=os.cpu_count(), logging_level="ERROR", runtime_env={"env_vars": quiet_env()})
        port = serve_load.free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"log_level": "WARNING", "enable_access_log": False})
        arms = {label: [serve_round(m, f"http://127.0.0.1:{port}", order[::-1] if i % 2 else order, levels, args.seconds)
                        for i in range(args.rounds)] for label, m in served_packages.items()}
        serve.shutdown()
        ray.shutdown()
        served_s = time.perf_counter() - began
        summary = {label: {c: summarize(rounds, c) for c in levels} for label, rounds in arms.items()}
    report(summary, args.seconds, args.rounds)
    for label, rounds in arms.items():
        if "on" in order and not all(x["monitor"]["on"]["instances"] for x in rounds):
            print(f"WARNING: {label}, monitoring on: the controller counted no instances (no reference profile?)")
    verdicts = [s["verdict"] for by_level in summary.values() for s in by_level.values() if "verdict" in s]
    verdict = ("PASS" if all(v == "PASS" for v in verdicts) else "FAIL") if verdicts else "-"
    wall = time.perf_counter() - began
    print(f"\nverdict: {verdict} (monitoring on keeps >= {1 - BOUND:.2f} of the QPS with it off at every level); "
          f"{wall / 60:.1f} min, {served_s / 60:.1f} of them serving")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "monitoring_overhead.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "bound": BOUND, "verdict": verdict,
        "settings": {"models": models, "arm_order": order, "rounds": args.rounds, "concurrency": levels, "seconds": args.seconds,
                     "packages": {k: m.package.ref for k, m in served_packages.items()}},
        "summary": summary, "rounds": arms, "wall_s": wall}, indent=2, default=str))
    print(f"wrote {RESULTS / 'monitoring_overhead.json'}")


if __name__ == "__main__":
    main()
