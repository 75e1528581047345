"""How close does the service come to its engine? Closed-loop HTTP load on the SST-2 MiniLM package.

    .venv/bin/python benchmarks/serve_load.py                   # make bench-serve, ~10 min on 2 cores
    .venv/bin/python benchmarks/serve_load.py --seconds 5 --concurrency 1,32 --arms service,handwritten

One request = one SST-2 dev sentence, loopback only, load from a separate process. Arms:
  service       the default service: HAProxy ingress, one hop to the model replica, V2 JSON infer
  v1            the same service through /v1 (server application, then a handle to the model replica)
  python-proxy  lever: Serve's Python proxy instead of HAProxy (the ingress before this version; also
                without RAY_SERVE_THROUGHPUT_OPTIMIZED)
  throughput-off  lever: the service without RAY_SERVE_THROUGHPUT_OPTIMIZED
  no-batching   lever: the service with max_batch_size 1
  handwritten   FastAPI + uvicorn + torch eager, no batching (benchmarks/handwritten_app.py)
  offline       the same package and engine in one process, tokenizer included: the ceiling at
                batch 32 (sequences/s) and the batch-1 latency (p50)
Each Serve arm starts its own Ray (ingress settings are read when Ray starts) with the defaults of
`python -m ray_apps serve`: one model replica holding all cores but the server's share, int8.
Each concurrency level runs a fixed time after a warm-up. Targets, checked and printed:
  at concurrency 32, service >= 0.8 x offline and >= 3 x handwritten (QPS); at concurrency 1,
  service p50 <= offline batch-1 p50 + 3 ms; p99 <= 2 x p50 at every level; Serve's CPU outside the
  engine < 2 ms per request. That CPU is every process's CPU during the run (psutil, system-wide)
  minus the load generator's and minus what the engine alone needs offline for the same sequences
  at the same mean batch size.
Writes benchmarks/results/serve_load.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from benchmarks.flops import machine  # noqa: E402
from benchmarks.sst2_package import DEFAULT_CHECKPOINT, DEFAULT_REGISTRY, bench_package, checkpoint_or_train  # noqa: E402

SERVE_ARMS = {  # arm -> (ingress, extra env read when Ray starts, path, batching)
    "service": ("haproxy", {}, "v2", {}),
    "v1": ("haproxy", {}, "v1", {}),
    "python-proxy": ("proxy", {}, "v2", {}),
    "throughput-off": ("haproxy", {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "0"}, "v2", {}),
    "no-batching": ("haproxy", {}, "v2", {"max_batch_size": 1}),
}
ALL_ARMS = [*SERVE_ARMS, "handwritten"]


# --- load generator (runs in its own process) -------------------------------------------------
def body(kind: str, text: str) -> dict:
    if kind == "v1" or kind == "handwritten":
        return {"instances": [text]}
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


async def closed_loop(url: str, kind: str, texts: list[str], concurrency: int, seconds: float) -> dict:
    import aiohttp

    latencies, statuses = [], Counter()
    payloads = [json.dumps(body(kind, t)).encode() for t in texts]
    stop = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                began = time.perf_counter()
                try:
                    async with session.post(url, data=payloads[i % len(payloads)], headers=headers) as r:
                        await r.read()
                        statuses[r.status] += 1
                        if r.status == 200:
                            latencies.append(time.perf_counter() - began)
                except (TimeoutError, aiohttp.ClientError):
                    statuses["connection"] += 1
                i += concurrency

        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    lat = np.array(latencies) if latencies else np.array([float("nan")])
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"qps": len(latencies) / seconds, "p50_ms": 1e3 * float(np.percentile(lat, 50)),
            "p99_ms": 1e3 * float(np.percentile(lat, 99)), "ok": len(latencies),
            "errors": sum(n for s, n in statuses.items() if s != 200), "statuses": {str(k): v for k, v in statuses.items()},
            "loadgen_cpu_s": usage.ru_utime + usage.ru_stime}


def process_cpu() -> dict[int, tuple[str, float]]:
    """Every process's CPU seconds, under a group name: HAProxy, the model replica, the server
    replica, Serve's proxy and controller, or the rest of Ray."""
    import psutil

    out = {}
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [p.info["name"] or ""])
            t = p.cpu_times()
        except psutil.Error:
            continue
        group = ("HAProxy" if "haproxy" in cmd else "model replica" if "ServeReplica:model-" in cmd
                 else "server replica" if "ServeReplica:" in cmd else "Serve proxy" if "ProxyActor" in cmd
                 else "Serve controller" if "ServeController" in cmd else "other")
        out[p.pid] = (group, t.user + t.system)
    return out


def run_load(url: str, kind: str, texts_file: str, concurrency: int, seconds: float) -> dict:
    """Load from a separate process; also the CPU that every other process used meanwhile."""
    before = process_cpu()
    out = subprocess.run([sys.executable, __file__, "--loadgen", url, "--kind", kind, "--texts", texts_file,
                          "--concurrency", str(concurrency), "--seconds", str(seconds)], capture_output=True, text=True,
                         check=True)
    after = process_cpu()
    result = json.loads(out.stdout.strip().splitlines()[-1])
    mine = {os.getpid()}  # this driver waits; the load generator has exited, its CPU is reported apart
    groups: Counter = Counter()
    for pid, (group, t) in after.items():
        if pid not in mine:
            groups[group] += t - before.get(pid, (group, 0.0))[1]
    result["cpu_s_by_process"] = dict(groups)
    result["all_cpu_s"] = sum(groups.values())
    return result


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def show(arm: str, c: int, r: dict) -> None:
    extra = f"  mean batch {r['mean_batch']:.1f}" if "mean_batch" in r else ""
    print(f"  {arm:<13} c={c:<3} {r['qps']:7.1f} QPS  p50 {r['p50_ms']:7.1f} ms  p99 {r['p99_ms']:7.1f} ms  "
          f"errors {r['errors']}{extra}", flush=True)


# --- arms ---------------------------------------------------------------------------------------
def serve_arm(arm: str, pkg_ref: str, args, texts_file: str, levels: list[int]) -> dict:
    """One Serve arm in a Ray of its own, started with the arm's ingress settings."""
    code = f"""
import json, sys
sys.path.insert(0, {str(REPO)!r})
from benchmarks.serve_load import serve_arm_inside
print("RESULT " + json.dumps(serve_arm_inside({arm!r}, {pkg_ref!r}, {args.registry!r}, {args.seconds!r},
                                               {texts_file!r}, {levels!r})))
"""
    ingress, env, _, _ = SERVE_ARMS[arm]
    from serve_deployments.app import ingress_env

    proc = subprocess.run([sys.executable, "-c", code], env=os.environ | ingress_env(ingress) | env, cwd=REPO,
                          capture_output=True, text=True)
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise SystemExit(f"arm {arm} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    results = {int(k): v for k, v in json.loads(lines[-1].removeprefix("RESULT ")).items()}
    for c in levels:
        show(arm, c, results[c])
    return results


def serve_arm_inside(arm: str, pkg_ref: str, registry: str, seconds: float, texts_file: str, levels: list[int]) -> dict:
    import ray
    import requests
    from ray import serve

    from rayfoundry.ray_env import quiet_env, quiet_process
    from serve_deployments.app import applications, local_cpus_per_model, run_applications

    quiet_process()
    _, _, kind, batching = SERVE_ARMS[arm]
    ray.init(num_cpus=os.cpu_count(), logging_level="ERROR", runtime_env={"env_vars": quiet_env()})
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})
    name = pkg_ref.split(":")[0]
    run_applications(applications({"registry": registry, "models": [pkg_ref], "num_cpus": local_cpus_per_model(1),
                                   "batching": batching}))
    base = f"http://127.0.0.1:{port}"
    url = f"{base}/v1/models/{name}:predict" if kind == "v1" else f"{base}/v2/models/{name}/infer"
    stats_url = f"{base}/v2/models/{name}/stats"
    for _ in range(60):  # HAProxy picks up the replica within a few health checks
        try:
            if requests.post(url, json=body(kind, "warm up"), timeout=10).status_code == 200:
                break
        except requests.ConnectionError:
            pass
        time.sleep(0.5)
    run_load(url, kind, texts_file, 8, 3)  # warm-up
    results = {}
    for c in levels:
        s0 = requests.get(stats_url, timeout=30).json()["model_stats"][0]
        results[c] = run_load(url, kind, texts_file, c, seconds)
        s1 = requests.get(stats_url, timeout=30).json()["model_stats"][0]
        calls = max(1, s1["execution_count"] - s0["execution_count"])
        results[c]["mean_batch"] = (s1["inference_count"] - s0["inference_count"]) / calls
        results[c]["engine"] = s1.get("engine", "")
        results[c]["replica_wall_s"] = {"tokenizer": s1["encode_seconds"] - s0["encode_seconds"],
                                        "engine": s1["engine_seconds"] - s0["engine_seconds"]}
    serve.shutdown()
    ray.shutdown()
    return results


def handwritten_arm(pkg_path: Path, texts_file: str, args, levels: list[int]) -> dict:
    import requests

    port = free_port()
    env = os.environ | {"RAYFOUNDRY_PACKAGE": str(pkg_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "benchmarks.handwritten_app:app", "--host", "127.0.0.1",
                               "--port", str(port), "--log-level", "warning"], cwd=REPO, env=env)
    url = f"http://127.0.0.1:{port}/predict"
    try:
        for _ in range(120):
            try:
                if requests.post(url, json={"instances": ["warm"]}, timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        run_load(url, "handwritten", texts_file, 8, 2)
        out = {}
        for c in levels:
            out[c] = run_load(url, "handwritten", texts_file, c, args.seconds)
            show("handwritten", c, out[c])
        return out
    finally:
        server.terminate()
        server.wait(30)


def offline_arm(pkg, engine: str, threads: int, texts: list[str], seconds: float) -> dict:
    """The ceiling (batch 32) and batch-1 latency of the engine as offline code runs it, and its CPU per
    sequence at several batch sizes as the replica runs it (idle engine threads sleep, no spinning)."""
    from model_registry.predictor import Predictor

    out: dict = {"cpu_ms_per_seq": {}}
    for spinning in (True, False):
        predictor = Predictor(pkg, engine, "cpu", intra_op_threads=threads, spinning=spinning)
        predictor.logits(predictor.encode(texts[:32]))
        for size in (1, 32) if spinning else (1, 2, 4, 8, 16, 32):
            batches = [texts[i:i + size] for i in range(0, len(texts) - size + 1, size)]
            done, k, lat = 0, 0, []
            cpu0, start = time.process_time(), time.perf_counter()
            while time.perf_counter() - start < seconds / 3:
                t0 = time.perf_counter()
                predictor.logits(predictor.encode(batches[k % len(batches)]))  # tokenizer included, as served
                lat.append(time.perf_counter() - t0)
                done, k = done + size, k + 1
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
            if not spinning:
                out["cpu_ms_per_seq"][size] = 1e3 * cpu / done
            elif size == 1:
                out["batch1_p50_ms"] = 1e3 * float(np.percentile(lat, 50))
            else:
                out["seq_per_s"] = done / wall
    return out


def engine_cpu_ms(offline: dict, mean_batch: float) -> float:
    """Offline CPU per sequence at the service's mean batch size (interpolated in log2 of the size)."""
    sizes = sorted(offline["cpu_ms_per_seq"])
    return float(np.interp(np.log2(max(1.0, mean_batch)), np.log2(sizes), [offline["cpu_ms_per_seq"][s] for s in sizes]))


# --- report -------------------------------------------------------------------------------------
def report(results: dict, offline: dict, levels: list[int], pkg_ref: str, engine: str, seconds: float) -> dict:
    print(f"\nSST-2 MiniLM-L6 ({pkg_ref}, engine {engine}), {machine()}, {seconds:g}s per level; offline: "
          f"{offline['seq_per_s']:.1f} seq/s at batch 32, {offline['batch1_p50_ms']:.2f} ms p50 at batch 1\n")
    print("| concurrency | arm | QPS | p50 ms | p99 ms | p99/p50 | errors | mean batch | Serve CPU ms/req outside the engine |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in levels:
        for arm, r in results.items():
            if c not in r:
                continue
            x = r[c]
            outside = "-"
            if "mean_batch" in x and x["ok"]:
                x["outside_engine_cpu_ms"] = 1e3 * x["all_cpu_s"] / x["ok"] - engine_cpu_ms(offline, x["mean_batch"])
                outside = f"{x['outside_engine_cpu_ms']:.2f}"
            print(f"| {c} | {arm} | {x['qps']:.1f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['p99_ms'] / x['p50_ms']:.2f} | "
                  f"{x['errors']} | {x.get('mean_batch', 1.0):.1f} | {outside} |")
    checks = []
    s = results.get("service", {})
    if 32 in s:
        r = s[32]["qps"] / offline["seq_per_s"]
        checks.append(("c=32 QPS / offline batch 32", r, ">= 0.8", r >= 0.8))
        if "handwritten" in results and 32 in results["handwritten"]:
            r = s[32]["qps"] / results["handwritten"][32]["qps"]
            checks.append(("c=32 QPS / handwritten", r, ">= 3", r >= 3))
        if "outside_engine_cpu_ms" in s[32]:
            checks.append(("c=32 Serve CPU ms/req outside the engine", s[32]["outside_engine_cpu_ms"], "< 2",
                           s[32]["outside_engine_cpu_ms"] < 2))
    if 1 in s:
        gap = s[1]["p50_ms"] - offline["batch1_p50_ms"]
        checks.append(("c=1 p50 - offline batch-1 p50 (ms)", gap, "<= 3", gap <= 3))
    for c in levels:
        if c in s:
            r = s[c]["p99_ms"] / s[c]["p50_ms"]
            checks.append((f"c={c} p99 / p50", r, "<= 2", r <= 2))
    for lever in ("python-proxy", "throughput-off", "no-batching", "v1"):
        if lever in results and 32 in results[lever] and 32 in s:
            checks.append((f"c=32 QPS service / {lever}", s[32]["qps"] / results[lever][32]["qps"], "(lever)", None))
    top = max(c for c in levels if c in s) if s else None
    if top is not None and "cpu_s_by_process" in s[top]:
        x = s[top]
        print(f"\nCPU of the service arm at concurrency {top}, per request (ms):\n\n| process | ms per request |\n| --- | ---: |")
        for group, cpu in sorted(x["cpu_s_by_process"].items(), key=lambda kv: -kv[1]):
            print(f"| {group} | {1e3 * cpu / x['ok']:.2f} |")
        print(f"| load generator (not Serve) | {1e3 * x['loadgen_cpu_s'] / x['ok']:.2f} |")
        print(f"| engine alone, offline, at batch {x['mean_batch']:.1f} | {engine_cpu_ms(offline, x['mean_batch']):.2f} |")
    print("\n| check | value | target | met |\n| --- | ---: | --- | --- |")
    for name, value, target, met in checks:
        print(f"| {name} | {value:.2f} | {target} | {'-' if met is None else ('yes' if met else 'NO')} |")
    return {"checks": [{"check": n, "value": v, "target": t, "met": m} for n, v, t, m in checks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--registry", default=DEFAULT_REGISTRY)
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--arms", default=",".join(ALL_ARMS), help=f"comma list of {', '.join(ALL_ARMS)}")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per arm and level")
    p.add_argument("--loadgen", help=argparse.SUPPRESS)
    p.add_argument("--kind", help=argparse.SUPPRESS)
    p.add_argument("--texts", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.loadgen:
        texts = json.loads(Path(args.texts).read_text())
        print(json.dumps(asyncio.run(closed_loop(args.loadgen, args.kind, texts, int(args.concurrency), args.seconds))))
        return
    print(f"machine: {machine()}", flush=True)
    from model_registry.validation import read_rows
    from rayfoundry.ray_env import quiet_process
    from serve_deployments.app import local_cpus_per_model

    quiet_process()
    levels = [int(c) for c in args.concurrency.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    pkg = bench_package(checkpoint_or_train(args.checkpoint), args.registry)
    from trainers.config import parse_job

    job = parse_job(pkg.metadata.training.config)
    rows = read_rows(job.data.validation_path or job.data.train_path, job)
    texts = [t for t in rows.column(job.data.text_column).to_pylist() if t]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    engine = "onnx-int8" if "onnx-int8" in pkg.metadata.engines() else "onnx"  # what the service picks by default
    threads = max(1, round(local_cpus_per_model(1)))
    print(f"package {pkg.ref} ({engine}, {threads} engine threads), {len(texts)} SST-2 sentences, "
          f"{args.seconds:g}s per level", flush=True)
    offline = offline_arm(pkg, engine, threads, texts, args.seconds)
    print(f"  offline: {offline['seq_per_s']:.1f} seq/s at batch 32, batch-1 p50 {offline['batch1_p50_ms']:.2f} ms", flush=True)
    results = {}
    for arm in arms:
        if arm == "handwritten":
            results[arm] = handwritten_arm(pkg.path, f.name, args, levels)
        else:
            results[arm] = serve_arm(arm, pkg.ref, args, f.name, levels)
    os.unlink(f.name)
    summary = report(results, offline, levels, pkg.ref, engine, args.seconds)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "package": pkg.ref, "engine": engine,
        "seconds": args.seconds, "offline": offline, "arms": results, **summary,
        "args": {k: v for k, v in vars(args).items() if k not in ("loadgen", "texts", "kind")},
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
