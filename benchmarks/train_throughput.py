"""Does Ray Train cost anything over plain torchrun? Training throughput of one model, five ways.

    .venv/bin/python benchmarks/train_throughput.py            # ~4 minutes on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --steps 20 --batch 64

Same model (all-MiniLM-L6-v2 classifier), same global batch, same synthetic in-memory tokens at
sequence length 64, warm-up steps then measured steps, each step forward + backward + fused AdamW:
  (a) Ray Train DDP, 2 workers x 1 thread      (b) torchrun --nproc_per_node=2 DDP, 1 thread each
  (c) one process with 2 threads               (d) Ray Train DeepSpeed ZeRO-2 and ZeRO-3, 2 workers
Prints a Markdown table (samples/s, ratio to (b), peak RSS per worker, achieved FLOP/s as a
fraction of a large fp32 matmul measured in this run, counting 6 x non-embedding params per token)
and writes benchmarks/results/train_throughput.json. Target: (a) >= 0.95 x (b).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from benchmarks.flops import machine, matmul_peak_flops, non_embedding_params  # noqa: E402


def job_for(strategy: dict, args) -> object:
    from trainers.config import parse_job

    return parse_job({"data": {"train_path": "synthetic.tsv", "text_column": "text"}, "model": {"type": "text"},
                      "optim": {"batch_size": args.batch, "lr": 1e-5, "warmup_fraction": 0.0, "max_grad_norm": 1.0},
                      "scaling": {"num_workers": 2}, "strategy": strategy})


def synthetic_batch(rows: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(1000, 30000, (rows, seq), generator=g),
            "attention_mask": torch.ones(rows, seq, dtype=torch.long),
            "labels": torch.randint(0, 2, (rows,), generator=g)}


def timed_steps(step, warmup: int, steps: int) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def engine_steps(engine, batch) -> callable:
    """One optimizer step through a rayfoundry Engine, exactly as trainers/loop.py drives it."""
    import torch.nn.functional as F

    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step():
        with engine.sync_gradients(True):
            loss = F.cross_entropy(engine.model(**inputs).logits, batch["labels"])
            engine.backward(loss)
        engine.step()
    return step


def ray_worker(config: dict) -> dict:
    """(a) and (d): a Ray Train worker running the rayfoundry Engine for the given strategy."""
    import ray.train
    import torch.distributed as dist

    from trainers.models import build_model
    from trainers.strategy import build_engine

    torch.set_num_threads(1)
    ctx = ray.train.get_context()
    os.environ.setdefault("LOCAL_RANK", str(ctx.get_local_rank()))
    job = job_for(config["strategy"], argparse.Namespace(**config["args"]))
    torch.manual_seed(0)
    model = build_model(job.model, ["0", "1"])
    engine = build_engine(model, job, total_steps=1000, distributed=True, device=torch.device("cpu"),
                          fresh_model=lambda: build_model(job.model, ["0", "1"]))
    args = config["args"]
    batch = synthetic_batch(args["batch"] // 2, args["seq"], seed=ctx.get_world_rank())
    seconds = timed_steps(engine_steps(engine, batch), args["warmup"], args["steps"])
    rss = [None, None]
    dist.all_gather_object(rss, peak_rss_mb())
    return {"seconds": seconds, "rss_mb": rss}  # rank 0's return value becomes Result.return_value


def run_ray(strategy: dict, args) -> dict:
    import ray.train
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        ray_worker, train_loop_config={"strategy": strategy, "args": vars(args)},
        scaling_config=ray.train.ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(storage_path=tempfile.mkdtemp(), name="bench",
                                       logging_config=ray.train.LoggingConfig(log_level="WARNING")),
    )
    return trainer.fit().return_value


def torchrun_worker(args) -> None:
    """(b): hand-written DDP under torchrun, the baseline Ray Train is measured against."""
    import torch.distributed as dist
    import torch.nn.functional as F
    from torch.nn.parallel import DistributedDataParallel

    from trainers.models import build_model
    from trainers.strategy import build_optimizer, build_scheduler

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    job = job_for({"name": "ddp"}, args)
    torch.manual_seed(0)
    model = DistributedDataParallel(build_model(job.model, ["0", "1"]))
    optimizer = build_optimizer(model.module, job.optim)
    scheduler = build_scheduler(optimizer, job.optim, 1000)
    batch = synthetic_batch(args.batch // 2, args.seq, seed=rank)
    inputs = {k: v for k, v in batch.items() if k != "labels"}

    def step():
        F.cross_entropy(model(**inputs).logits, batch["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), job.optim.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_steps(step, args.warmup, args.steps)
    rss = [None, None]
    dist.all_gather_object(rss, peak_rss_mb())
    if rank == 0:
        Path(args.torchrun_out).write_text(json.dumps({"seconds": seconds, "rss_mb": rss}))
    dist.destroy_process_group()


def run_torchrun(args) -> dict:
    out = Path(tempfile.mkdtemp()) / "torchrun.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", __file__,
           "--torchrun-worker", "--torchrun-out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    subprocess.run(cmd, check=True, env=os.environ | {"OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    return json.loads(out.read_text())


def run_single_process(args) -> dict:
    """(c): no distribution at all, both cores as torch intra-op threads."""
    from trainers.config import DDPStrategy
    from trainers.models import build_model
    from trainers.strategy import DDPEngine

    torch.set_num_threads(2)
    job = job_for({"name": "ddp"}, args)
    torch.manual_seed(0)
    engine = DDPEngine(build_model(job.model, ["0", "1"]), job.optim, DDPStrategy(name="ddp"), 1000,
                       distributed=False, device=torch.device("cpu"))
    seconds = timed_steps(engine_steps(engine, synthetic_batch(args.batch, args.seq, 0)), args.warmup, args.steps)
    return {"seconds": seconds, "rss_mb": [peak_rss_mb()]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="measured optimizer steps per setup")
    parser.add_argument("--warmup", type=int, default=2, help="unmeasured steps before timing")
    parser.add_argument("--batch", type=int, default=32, help="global batch (split over 2 workers)")
    parser.add_argument("--seq", type=int, default=64, help="tokens per row")
    parser.add_argument("--torchrun-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--torchrun-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    if args.torchrun_worker:
        return torchrun_worker(args)

    peak = matmul_peak_flops()
    flops_per_sample = 6 * non_embedding_params() * args.seq
    runs = {"(c) one process, 2 threads": run_single_process(args),
            "(b) torchrun DDP, 2 x 1 thread": run_torchrun(args)}
    import ray

    from rayfoundry.ray_env import quiet_env

    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING",
             runtime_env={"env_vars": quiet_env() | {"OMP_NUM_THREADS": "1"}})
    runs["(a) Ray Train DDP, 2 x 1 thread"] = run_ray({"name": "ddp"}, args)
    runs["(d) Ray Train DeepSpeed ZeRO-2"] = run_ray({"name": "deepspeed", "zero_stage": 2}, args)
    runs["(d) Ray Train DeepSpeed ZeRO-3"] = run_ray({"name": "deepspeed", "zero_stage": 3}, args)
    ray.shutdown()

    baseline = args.batch * args.steps / runs["(b) torchrun DDP, 2 x 1 thread"]["seconds"]
    rows = []
    for name, r in sorted(runs.items()):
        sps = args.batch * args.steps / r["seconds"]
        rows.append({"setup": name, "samples_per_s": round(sps, 2), "ratio_to_torchrun": round(sps / baseline, 3),
                     "peak_rss_mb_per_worker": [round(x) for x in r["rss_mb"]],
                     "flops_fraction_of_matmul": round(sps * flops_per_sample / peak, 4)})
    print(f"\nMiniLM-L6 classifier, seq {args.seq}, global batch {args.batch}, {args.steps} measured steps "
          f"after {args.warmup} warm-up; large-matmul peak {peak / 1e9:.1f} GFLOP/s on 2 threads\n")
    print("| setup | samples/s | ratio to (b) | peak RSS per worker (MB) | FLOP/s / matmul peak |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['setup']} | {r['samples_per_s']:.1f} | {r['ratio_to_torchrun']:.3f} | "
              f"{' / '.join(str(x) for x in r['peak_rss_mb_per_worker'])} | {r['flops_fraction_of_matmul']:.3f} |")
    ratio = next(r["ratio_to_torchrun"] for r in rows if r["setup"].startswith("(a)"))
    print(f"\n(a)/(b) = {ratio:.3f} (target >= 0.95): {'met' if ratio >= 0.95 else 'NOT met'}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{machine()}, torch {torch.__version__}",
              "matmul_peak_flops": peak, "args": vars(args), "rows": rows}
    (RESULTS / "train_throughput.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
