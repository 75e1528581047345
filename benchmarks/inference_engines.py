"""Which engine should serve the MiniLM classifier? Latency, throughput and accuracy of four engines.

    .venv/bin/python benchmarks/inference_engines.py                          # ~7 min on 2 cores
    .venv/bin/python benchmarks/inference_engines.py --checkpoint runs/sst2_minilm --seconds 1

One SST-2 MiniLM-L6 checkpoint (default runs/sst2_minilm, the full-epoch run of
ray_apps/configs/sst2_minilm.yaml; without one, a 1-epoch run on 8,000 SST-2 rows is trained first)
is exported to a package with int8, then served from that package by:
  torch eager fp32 | torch bf16 autocast | ONNX Runtime fp32 | ONNX Runtime int8 (dynamic)
at batch 1, 8, 32 and sequence 64, 128 (synthetic full-length token ids), all on the same threads,
taking turns in three rounds per cell so that drift in the machine's speed hits every engine alike.
Prints per cell: latency p50/p99, sequences/s, ratio to torch eager, achieved FLOP/s as a fraction
of a large fp32 matmul measured in this run; then each engine's accuracy on the SST-2 validation
file. Writes benchmarks/results/inference_engines.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

from benchmarks.flops import machine, matmul_peak_flops, non_embedding_params  # noqa: E402
from benchmarks.sst2_package import DEFAULT_CHECKPOINT, DEFAULT_REGISTRY, bench_package, checkpoint_or_train  # noqa: E402

ENGINES = {  # label -> (package engine, bf16 autocast)
    "torch eager fp32": ("torch", False),
    "torch bf16 autocast": ("torch", True),
    "ONNX Runtime fp32": ("onnx", False),
    "ONNX Runtime int8": ("onnx-int8", False),
}


def bf16(enabled: bool):
    return torch.autocast("cpu", dtype=torch.bfloat16) if enabled else contextlib.nullcontext()


def time_engines(predictors: dict, feeds: dict, seconds: float, rounds: int = 3) -> dict[str, list[float]]:
    """Per-call latencies (s) of every engine on the same input. Engines take turns in `rounds` slices
    of seconds/rounds each (after 3 warm-up calls), so drift in the machine's speed hits all alike."""
    lat: dict[str, list[float]] = {label: [] for label in ENGINES}
    for label, (_, autocast) in ENGINES.items():
        with bf16(autocast):
            for _ in range(3):
                predictors[label].logits(feeds)
    for _ in range(rounds):
        for label, (_, autocast) in ENGINES.items():
            with bf16(autocast):
                start = time.perf_counter()
                while len(lat[label]) < 4 or time.perf_counter() - start < seconds / rounds:
                    t = time.perf_counter()
                    predictors[label].logits(feeds)
                    lat[label].append(time.perf_counter() - t)
    return lat


def flops_per_sequence(n_params: int, layers: int, hidden: int, seq: int) -> float:
    """2 x non-embedding params per token for the dense layers, plus QK^T and AV in every layer."""
    return 2 * n_params * seq + 4 * layers * seq * seq * hidden


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT,
                   help="SST-2 MiniLM checkpoint or run dir (trained first when missing)")
    p.add_argument("--registry", default=DEFAULT_REGISTRY, help="where the package goes")
    p.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    p.add_argument("--seconds", type=float, default=3.0, help="measured wall time per engine and cell")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--seqs", default="64,128")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)
    from rayfoundry.ray_env import quiet_process

    quiet_process()
    from model_registry.predictor import Predictor, score
    from model_registry.validation import load_validation
    from trainers.config import parse_job

    ckpt = checkpoint_or_train(args.checkpoint)
    pkg = bench_package(ckpt, args.registry)
    torch.set_num_threads(args.threads)
    predictors = {label: Predictor(pkg, engine, "cpu", intra_op_threads=args.threads)
                  for label, (engine, _) in ENGINES.items()}
    model = predictors["torch eager fp32"].model
    n_params, cfg = non_embedding_params(model), model.config
    peak = matmul_peak_flops(args.threads)
    peak_bf16 = matmul_peak_flops(args.threads, dtype=torch.bfloat16)  # context: bf16 units (AMX) may beat fp32
    torch.set_num_threads(args.threads)

    rng = np.random.default_rng(0)
    cells = []
    for batch in map(int, args.batches.split(",")):
        for seq in map(int, args.seqs.split(",")):
            ids = rng.integers(1000, cfg.vocab_size, (batch, seq), dtype=np.int64)
            feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
            lat = time_engines(predictors, feeds, args.seconds)
            base = batch * len(lat["torch eager fp32"]) / sum(lat["torch eager fp32"])
            for label, times in lat.items():
                sps = batch * len(times) / sum(times)
                cells.append({"engine": label, "batch": batch, "seq": seq, "calls": len(times),
                              "p50_ms": 1e3 * float(np.percentile(times, 50)), "p99_ms": 1e3 * float(np.percentile(times, 99)),
                              "seq_per_s": sps, "ratio_to_torch_eager": sps / base,
                              "flops_fraction": sps * flops_per_sequence(n_params, cfg.num_hidden_layers,
                                                                         cfg.hidden_size, seq) / peak})
                print(f"  batch {batch:>2} seq {seq:>3}  {label:<20} p50 {cells[-1]['p50_ms']:8.2f} ms  "
                      f"{sps:8.1f} seq/s  x{sps / base:.2f}", flush=True)

    job = parse_job(pkg.metadata.training.config)
    validation = load_validation(job, pkg.labels, predictors["torch eager fp32"].tokenizer)
    accuracy = {}
    for label, (_, autocast) in ENGINES.items():
        with bf16(autocast):
            accuracy[label] = score(predictors[label], validation)["val_accuracy"]

    print(f"\nMiniLM-L6 classifier ({n_params / 1e6:.1f}M non-embedding params), {args.threads} threads, "
          f"{machine()}; large-matmul peak {peak / 1e9:.0f} GFLOP/s fp32, "
          f"{peak_bf16 / 1e9:.0f} GFLOP/s bf16 (FLOP/s column: fraction of the fp32 peak)\n")
    print("| batch | seq | engine | p50 ms | p99 ms | seq/s | ratio to torch eager | FLOP/s / matmul peak |")
    print("| ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |")
    for c in cells:
        print(f"| {c['batch']} | {c['seq']} | {c['engine']} | {c['p50_ms']:.2f} | {c['p99_ms']:.2f} | "
              f"{c['seq_per_s']:.1f} | {c['ratio_to_torch_eager']:.2f} | {c['flops_fraction']:.3f} |")
    fp32 = accuracy["torch eager fp32"]
    print(f"\nAccuracy on {validation.source} ({len(validation)} rows):\n")
    print("| engine | accuracy | change vs torch fp32 (points) |\n| --- | ---: | ---: |")
    for label, acc in accuracy.items():
        print(f"| {label} | {acc:.4f} | {100 * (acc - fp32):+.2f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "inference_engines.json").write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": machine(),
        "torch": torch.__version__, "package": pkg.ref, "checkpoint": str(ckpt), "threads": args.threads,
        "matmul_peak_flops": peak, "matmul_peak_flops_bf16": peak_bf16, "non_embedding_params": n_params, "cells": cells,
        "accuracy": accuracy, "validation_rows": len(validation), "validation_source": validation.source,
    }, indent=2))


if __name__ == "__main__":
    main()
