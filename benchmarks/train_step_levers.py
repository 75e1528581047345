"""Which step-level levers pay on this machine? One training step of the MiniLM-L6 classifier, timed
five ways in one process: the shipped step (bf16 autocast where the CPU has it, fused AdamW), the
default (foreach) AdamW instead, frozen token embeddings, torch.compile, and both of the last two.

    .venv/bin/python benchmarks/train_step_levers.py            # ~4 minutes on 2 cores

Batches are 64 rows of real SST-2 train phrases, cut into length-grouped batches as
data.group_by_length makes them, the same batches for every setup. Each setup runs warm-up steps
(for torch.compile: its compilations, timed separately) and then the measured steps. Prints a
Markdown table of samples/s with the ratio to the shipped step and writes
benchmarks/results/train_step_levers.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
SST2 = REPO.parent / "shared" / "data" / "sst2" / "train.tsv"

from benchmarks.flops import machine  # noqa: E402

SETUPS = {
    "shipped step (fused AdamW)": {},
    "foreach AdamW": {"fused": False},
    "frozen embeddings": {"freeze": True},
    "torch.compile": {"compile": True},
    "frozen embeddings + torch.compile": {"freeze": True, "compile": True},
}


def grouped_batches(n_batches: int, batch: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    from trainers.config import TextModel
    from trainers.data import length_grouped
    from trainers.models import load_tokenizer

    lines = SST2.read_text().splitlines()[1:]
    rng = np.random.default_rng(seed)
    picked = [lines[i].rsplit("\t", 1) for i in rng.choice(len(lines), n_batches * batch, replace=False)]
    tokenizer = load_tokenizer(TextModel(type="text"))
    ids = np.empty(len(picked), dtype=object)
    ids[:] = [np.asarray(x) for x in tokenizer([p[0] for p in picked], truncation=True, max_length=64)["input_ids"]]
    window = {"input_ids": ids, "label": np.asarray([int(p[1]) for p in picked])}
    return list(length_grouped([window], batch, tokenizer.pad_token_id, seed=(seed, 1, 0)))


def time_setup(setup: dict, batches: list[dict], warmup: int, precision: str) -> dict:
    from trainers.config import OptimSection, TextModel
    from trainers.models import build_model
    from trainers.strategy import build_optimizer

    torch.manual_seed(0)
    model = build_model(TextModel(type="text", freeze_embeddings=setup.get("freeze", False)), ["0", "1"])
    optimizer = build_optimizer(model, OptimSection(lr=5e-5))
    if not setup.get("fused", True):  # the same groups, without the fused kernel (torch's default: foreach)
        optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k in ("params", "weight_decay")}
                                       for g in optimizer.param_groups], lr=5e-5)
    forward = torch.compile(model, dynamic=True) if setup.get("compile") else model
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()

    def step(b: dict) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        F.cross_entropy(logits.float(), b["labels"]).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    start = time.perf_counter()
    for b in batches[:warmup]:
        step(b)
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for b in batches[warmup:]:
        step(b)
    seconds = time.perf_counter() - start
    rows = sum(len(b["labels"]) for b in batches[warmup:])
    return {"samples_per_s": rows / seconds, "warmup_seconds": warm,
            "trainable_params": sum(p.numel() for p in params)}


def main() -> None:
    from trainers.hardware import resolve_precision

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per setup")
    parser.add_argument("--warmup", type=int, default=12, help="unmeasured steps first (compilations happen here)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    print(f"machine: {machine()}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    precision, why = resolve_precision("auto", torch.device("cpu"))
    print(f"precision: {precision} ({why}); {args.threads} threads", flush=True)
    batches = grouped_batches(args.warmup + args.steps, 64)
    results = {}
    for name, setup in SETUPS.items():
        results[name] = time_setup(setup, batches, args.warmup, precision)
        print(f"{name}: {results[name]['samples_per_s']:.1f} samples/s", flush=True)
    base = results["shipped step (fused AdamW)"]["samples_per_s"]
    print(f"\nMiniLM-L6 classifier, batch 64 of SST-2 phrases grouped by length, {precision}, "
          f"{args.steps} measured steps after {args.warmup}\n")
    print("| setup | trainable params | samples/s | ratio to shipped | warm-up steps (s) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, r in results.items():
        print(f"| {name} | {r['trainable_params'] / 1e6:.1f}M | {r['samples_per_s']:.1f} | "
              f"{r['samples_per_s'] / base:.2f} | {r['warmup_seconds']:.1f} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{machine()}, torch {torch.__version__}",
              "precision": precision, "args": vars(args),
              "rows": [{"setup": k} | {m: round(v, 3) for m, v in r.items()} for k, r in results.items()]}
    (RESULTS / "train_step_levers.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
