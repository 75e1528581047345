"""What does tracking cost a training run, and what does fingerprinting the data cost?

    .venv/bin/python benchmarks/tracking_overhead.py            # ~5 minutes on 2 cores
    .venv/bin/python benchmarks/tracking_overhead.py --repeats 3 --epochs 6

Training: the shipped digits job (2 DDP workers) with tracking `none`, `mlflow` (the default: a SQLite
store beside the runs, created by the first tracked run) and `tensorboard`, interleaved, each arm
`--repeats` times in one Ray session, in rotated order. Per arm: the driver's wall time of `train()` (data fingerprint,
run start, fit, summary) and the training samples/s of the last epoch, as ratios to `none`.
Fingerprints: the SST-2 and AG News train files hashed with an empty cache, then again with the cache
filled (size and mtime unchanged). Prints Markdown tables and writes benchmarks/results/tracking_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.flops import machine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
DATA = Path(os.environ.get("RAYFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))
ARMS = ("none", "mlflow", "tensorboard")


def train_arm(storage: Path, backend: str, repeat: int, epochs: int) -> dict:
    from trainers.config import load_job
    from trainers.run import train

    job = load_job(REPO / "ray_apps" / "configs" / "digits_cnn.yaml",
                   [f"run.storage_path={storage}", f"run.name={backend}-{repeat}", f"run.epochs={epochs}",
                    f"tracking.backend={backend}"])
    started = time.perf_counter()
    summary = train(job, log=lambda *_: None)
    return {"backend": backend, "repeat": repeat, "wall_s": time.perf_counter() - started,
            "samples_per_s": summary.final_metrics["train_samples_per_s"],
            "val_accuracy": summary.final_metrics["val_accuracy"]}


def fingerprint_arm(path: Path, cache_dir: Path) -> dict:
    from tracking.fingerprint import fingerprint_data

    os.environ["RAYFOUNDRY_CACHE"] = str(cache_dir)
    times = []
    for _ in range(2):  # empty cache, then filled
        started = time.perf_counter()
        fingerprint_data(str(path))
        times.append(time.perf_counter() - started)
    return {"file": str(path.relative_to(DATA)), "mb": path.stat().st_size / 2**20, "cold_s": times[0], "cached_s": times[1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    from rayfoundry.ray_env import connect_ray, quiet_process

    quiet_process()
    print(f"machine: {machine()}", flush=True)
    connect_ray(num_cpus=os.cpu_count())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for backend in ARMS[repeat % 3:] + ARMS[:repeat % 3]:  # rotated: no arm always runs first
                runs.append(train_arm(Path(tmp), backend, repeat, args.epochs))
                print(f"  {backend} #{repeat}: {runs[-1]['wall_s']:.1f} s, {runs[-1]['samples_per_s']:.0f} samples/s", flush=True)
        prints = [fingerprint_arm(DATA / rel, Path(tmp) / "cache") for rel in ("sst2/train.tsv", "agnews/train.tsv")
                  if (DATA / rel).is_file()]

    def median(backend: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["backend"] == backend)

    rows = [{"backend": b, "wall_s": median(b, "wall_s"), "samples_per_s": median(b, "samples_per_s"),
             "wall_ratio": median(b, "wall_s") / median("none", "wall_s"),
             "throughput_ratio": median(b, "samples_per_s") / median("none", "samples_per_s")} for b in ARMS]
    print(f"\ndigits, 2 DDP workers, {args.epochs} epochs, median of {args.repeats} (the first mlflow run creates the store)")
    print("| tracking | wall of train() | × none | samples/s, last epoch | × none |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['backend']} | {r['wall_s']:.1f} s | {r['wall_ratio']:.2f}× | {r['samples_per_s']:.0f} | "
              f"{r['throughput_ratio']:.2f}× |")
    if prints:
        print("\n| data file | size | fingerprint, empty cache | cached |")
        print("| --- | ---: | ---: | ---: |")
        for p in prints:
            print(f"| {p['file']} | {p['mb']:.1f} MiB | {p['cold_s']:.2f} s | {p['cached_s'] * 1000:.1f} ms |")
    RESULTS.mkdir(exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "args": vars(args), "runs": runs, "rows": rows,
           "fingerprints": prints}
    (RESULTS / "tracking_overhead.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'tracking_overhead.json'}")


if __name__ == "__main__":
    main()
