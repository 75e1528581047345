"""Is the Serve app worth it? Closed-loop HTTP load on the SST-2 MiniLM classifier, four arms.

    .venv/bin/python benchmarks/serve_load.py                         # ~6 min on 2 cores
    .venv/bin/python benchmarks/serve_load.py --seconds 5 --concurrency 1,32 --engine onnx

Arms, one request = one SST-2 dev sentence, loopback only, load from a separate process:
  (a) this service (serve_deployments.app) with batching     (b) the same with max_batch_size 1
  (c) FastAPI + uvicorn + torch eager, no batching (benchmarks/handwritten_app.py)
  (d) the offline throughput of the same package and engine in this process, batch 32: the ceiling
Each concurrency level (1, 8, 32, 64) runs a fixed time after a warm-up. Prints QPS, p50, p99 and
errors per arm, ratios a/b, a/c, a/d, and where the CPU went during (a) at concurrency 32 (Serve's
proxy, the ingress replica, the model replica split into tokenizer / engine / rest, and the load
generator). Writes benchmarks/results/serve_load.json. Targets at concurrency 32: (a) >= 3 x (c) in
QPS with p99 <= 100 ms, and (a) >= 0.6 x (d).
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


# --- load generator (runs in its own process) -------------------------------------------------
async def closed_loop(url: str, texts: list[str], concurrency: int, seconds: float) -> dict:
    import aiohttp

    latencies, statuses = [], Counter()
    stop = time.perf_counter() + seconds
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:
        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                began = time.perf_counter()
                try:
                    async with session.post(url, json={"instances": [texts[i % len(texts)]]}) as r:
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


def run_load(url: str, texts_file: str, concurrency: int, seconds: float) -> dict:
    out = subprocess.run([sys.executable, __file__, "--loadgen", url, "--texts", texts_file, "--concurrency",
                          str(concurrency), "--seconds", str(seconds)], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# --- arms ---------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_pids() -> dict[str, int]:
    from ray.util.state import list_actors

    found = {}
    for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000):
        if a.class_name == "ProxyActor":
            found["Serve HTTP proxy"] = a.pid
        elif a.class_name.endswith(":Gateway"):
            found["ingress replica (FastAPI)"] = a.pid
        elif ":model-" in a.class_name:
            found["model replica"] = a.pid
    return found


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def serve_arms(pkg_ref: str, args, texts_file: str, levels: list[int]) -> tuple[dict, dict]:
    import ray
    import requests
    from ray import serve

    from rayfoundry.ray_env import quiet_env
    from serve_deployments.app import build_app

    ray.init(num_cpus=2, logging_level="ERROR", runtime_env={"env_vars": quiet_env()})  # state API needs the dashboard
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})  # the proxy's access log too
    url = f"http://127.0.0.1:{port}/v1/models/{pkg_ref.split(':')[0]}:predict"
    stats_url = f"http://127.0.0.1:{port}/v2/models/{pkg_ref.split(':')[0]}/stats"
    results, breakdown = {}, {}
    for arm, batch in (("(a) Serve, batching", args.max_batch_size), ("(b) Serve, no batching", 1)):
        serve.run(build_app({"registry": args.registry, "models": [pkg_ref], "engine": args.engine, "num_cpus": 1,
                             "intra_op_threads": args.threads,
                             "batching": {"max_batch_size": batch, "batch_wait_timeout_s": args.batch_wait},
                             "limits": {"max_ongoing_requests": 256, "max_queued_requests": 1024}}),
                  name="bench", route_prefix="/")
        run_load(url, texts_file, 8, 2)  # warm-up
        results[arm] = {}
        for c in levels:
            pids = serve_pids()
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            s0 = requests.get(stats_url, timeout=30).json()["model_stats"][0]
            results[arm][c] = run_load(url, texts_file, c, args.seconds)
            s1 = requests.get(stats_url, timeout=30).json()["model_stats"][0]
            used = {k: cpu_seconds(p) - before[k] for k, p in pids.items()}
            calls = max(1, s1["execution_count"] - s0["execution_count"])
            results[arm][c]["mean_batch"] = (s1["inference_count"] - s0["inference_count"]) / calls
            if batch > 1 and c == 32:
                breakdown = {"seconds": args.seconds, "cpu_seconds": used | {"load generator": results[arm][c]["loadgen_cpu_s"]},
                             "model_replica_wall": {"tokenizer": s1["encode_seconds"] - s0["encode_seconds"],
                                                    "engine": s1["engine_seconds"] - s0["engine_seconds"]}}
            print(f"  {arm:<24} c={c:<3} {results[arm][c]['qps']:7.1f} QPS  p50 {results[arm][c]['p50_ms']:7.1f} ms  "
                  f"p99 {results[arm][c]['p99_ms']:7.1f} ms  errors {results[arm][c]['errors']}  "
                  f"mean batch {results[arm][c]['mean_batch']:.1f}", flush=True)
    serve.shutdown()
    ray.shutdown()
    return results, breakdown


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
        run_load(url, texts_file, 8, 2)
        out = {}
        for c in levels:
            out[c] = run_load(url, texts_file, c, args.seconds)
            print(f"  {'(c) FastAPI + torch eager':<24} c={c:<3} {out[c]['qps']:7.1f} QPS  p50 {out[c]['p50_ms']:7.1f} ms  "
                  f"p99 {out[c]['p99_ms']:7.1f} ms  errors {out[c]['errors']}", flush=True)
        return out
    finally:
        server.terminate()
        server.wait(30)


def offline_arm(pkg, texts: list[str], args) -> float:
    from model_registry.predictor import Predictor

    predictor = Predictor(pkg, args.engine, "cpu", intra_op_threads=args.threads)
    batches = [texts[i:i + 32] for i in range(0, len(texts) - 31, 32)]
    predictor.logits(predictor.encode(batches[0]))
    done, start, k = 0, time.perf_counter(), 0
    while time.perf_counter() - start < args.seconds:
        batch = batches[k % len(batches)]
        predictor.logits(predictor.encode(batch))  # tokenizer included, as the service does
        done, k = done + len(batch), k + 1
    return done / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    p.add_argument("--registry", default=DEFAULT_REGISTRY)
    p.add_argument("--engine", choices=["onnx", "onnx-int8", "torch"], default="onnx-int8")
    p.add_argument("--threads", type=int, default=1,
                   help="engine threads in the model replica and offline (1: the replica shares 2 cores with proxy and ingress)")
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--batch-wait", type=float, default=0.02, help="batch_wait_timeout_s of arm (a)")
    p.add_argument("--concurrency", default="1,8,32,64")
    p.add_argument("--seconds", type=float, default=10.0, help="measured time per arm and level")
    p.add_argument("--loadgen", help=argparse.SUPPRESS)
    p.add_argument("--texts", help=argparse.SUPPRESS)
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    if args.loadgen:
        texts = json.loads(Path(args.texts).read_text())
        print(json.dumps(asyncio.run(closed_loop(args.loadgen, texts, int(args.concurrency), args.seconds))))
        return
    from model_registry.validation import read_rows
    from rayfoundry.ray_env import quiet_process

    quiet_process()
    levels = [int(c) for c in args.concurrency.split(",")]
    pkg = bench_package(checkpoint_or_train(args.checkpoint), args.registry)
    from trainers.config import parse_job

    job = parse_job(pkg.metadata.training.config)
    rows = read_rows(job.data.validation_path or job.data.train_path, job)
    texts = [t for t in rows.column(job.data.text_column).to_pylist() if t]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(texts, f)
    print(f"package {pkg.ref} ({args.engine}), {len(texts)} SST-2 sentences, {args.seconds:g}s per level", flush=True)
    offline = offline_arm(pkg, texts, args)
    print(f"  (d) offline, batch 32: {offline:.1f} sequences/s", flush=True)
    served, breakdown = serve_arms(pkg.ref, args, f.name, levels)
    results = served | {"(c) FastAPI + torch eager": handwritten_arm(pkg.path, f.name, args, levels)}
    os.unlink(f.name)

    a, b, c = results["(a) Serve, batching"], results["(b) Serve, no batching"], results["(c) FastAPI + torch eager"]
    print(f"\nSST-2 MiniLM-L6 ({pkg.ref}, engine {args.engine}), {machine()}, {args.seconds:g}s per level; "
          f"(d) offline {offline:.1f} seq/s\n")
    print("| concurrency | arm | QPS | p50 ms | p99 ms | errors | mean batch |\n"
          "| ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for lvl in levels:
        for arm, r in results.items():
            x = r[lvl]
            print(f"| {lvl} | {arm} | {x['qps']:.1f} | {x['p50_ms']:.1f} | {x['p99_ms']:.1f} | {x['errors']} | "
                  f"{x.get('mean_batch', 1.0):.1f} |")
    print("\n| concurrency | a/b | a/c | a/d |\n| ---: | ---: | ---: | ---: |")
    for lvl in levels:
        qps = a[lvl]["qps"]
        print(f"| {lvl} | {qps / b[lvl]['qps']:.2f} | {qps / c[lvl]['qps']:.2f} | {qps / offline:.2f} |")
    if breakdown:
        secs = breakdown["seconds"]
        print(f"\nCPU during (a) at concurrency 32 (cores busy = CPU seconds / {secs:g}s):\n")
        print("| process | cores busy |\n| --- | ---: |")
        for k, v in breakdown["cpu_seconds"].items():
            print(f"| {k} | {v / secs:.2f} |")
        w = breakdown["model_replica_wall"]
        print(f"\nmodel replica wall time: tokenizer {w['tokenizer'] / secs:.0%}, engine {w['engine'] / secs:.0%} of the run")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "serve_load.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(), "package": pkg.ref,
        "engine": args.engine, "seconds": args.seconds, "offline_seq_per_s": offline, "arms": results,
        "cpu_breakdown_a_c32": breakdown, "args": {k: v for k, v in vars(args).items() if k not in ("loadgen", "texts")},
    }, indent=2, default=str))


if __name__ == "__main__":
    main()
