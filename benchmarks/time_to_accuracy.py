"""Time to accuracy on SST-2: minutes of training to reach 0.90 and 0.92 on dev.tsv, for the previous
recipe, each speed lever alone, and all of them together, in one run.

    .venv/bin/python benchmarks/time_to_accuracy.py               # 6 rows, at most --cap-min each (~60 min)
    .venv/bin/python benchmarks/time_to_accuracy.py --rows previous,all --cap-min 8

Every row is the user's command, `python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml`,
with `--set` overrides:
  previous  2 DDP workers x 1 thread, fp32, batches in arrival order, embeddings trained (the recipe
            before the levers)
  + one process, + bf16 (precision auto), + length grouping, + frozen embeddings: that lever alone
  all       every lever together
Common to all rows: the full dev.tsv is scored every --check-steps optimizer steps
(run.check_every_steps, run.check_rows null) and the run stops at 0.92 (run.stop_at) or when its
time budget of --cap-min minutes ends; the learning-rate schedule is laid out over that budget in
every row. Minutes count training only (the checks are excluded: they are the benchmark's, not the
recipe's). MFU counts 6 x non-embedding parameters per non-padding token against a large matmul of
the row's precision on 2 threads, measured in this run. Writes benchmarks/results/time_to_accuracy.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"
CONFIG = REPO / "ray_apps" / "configs" / "sst2_minilm.yaml"
TARGETS = (0.90, 0.92)

from benchmarks.flops import machine, matmul_peak_flops, non_embedding_params  # noqa: E402
from trainers.summary import RunSummary  # noqa: E402

PREVIOUS = {"scaling.num_workers": 2, "scaling.threads_per_worker": 1, "scaling.cpus_per_worker": 0.5,
            "optim.precision": "fp32", "data.group_by_length": False, "model.freeze_embeddings": False}
LEVERS = {
    "one_process": ("+ one process x 2 threads", {"scaling.num_workers": "auto", "scaling.threads_per_worker": "auto",
                                                 "scaling.cpus_per_worker": 1}),
    "bf16": ("+ bf16 (precision auto)", {"optim.precision": "auto"}),
    "grouping": ("+ length grouping", {"data.group_by_length": True}),
    "frozen": ("+ frozen embeddings", {"model.freeze_embeddings": True}),
}
ROWS = {"previous": ("previous recipe", PREVIOUS)} | {
    key: (label, PREVIOUS | overrides) for key, (label, overrides) in LEVERS.items()} | {
    "all": ("all levers together", PREVIOUS | {k: v for _, o in LEVERS.values() for k, v in o.items()})}


def run_row(key: str, overrides: dict, args, storage: Path) -> RunSummary:
    common = {"run.name": key, "run.storage_path": str(storage), "run.epochs": 3, "run.time_budget_min": args.cap_min,
              "run.check_every_steps": args.check_steps, "run.check_rows": None, "run.stop_at": TARGETS[-1],
              "tracking.backend": "none"}
    sets = [f"{k}={json.dumps(v)}" for k, v in (overrides | common).items()]
    out = storage / f"{key}.json"
    cmd = [sys.executable, "-m", "ray_apps", "train", "--config", str(CONFIG), "--json-out", str(out)]
    for item in sets:
        cmd += ["--set", item]
    started = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, check=True, stdout=sys.stdout, stderr=subprocess.DEVNULL)
    summary = RunSummary.model_validate_json(out.read_text())
    print(f"{key}: {summary.ended_by} at step {summary.global_step}, command {time.perf_counter() - started:.0f} s",
          flush=True)
    return summary


def minutes_to(summary: RunSummary, target: float) -> float | None:
    """Training minutes at the first check at or above `target`; a run that first reached it at its
    last full validation (ended_by target) counts all of its training."""
    hit = next((c.train_seconds for c in summary.checks if c.val_accuracy >= target), None)
    if hit is None and summary.final_metrics["val_accuracy"] >= target:
        hit = summary.final_metrics["train_seconds_total"]
    return None if hit is None else round(hit / 60, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--cap-min", type=float, default=10.0, help="each row's time budget in minutes")
    parser.add_argument("--check-steps", type=int, default=100, help="optimizer steps between dev.tsv checks")
    args = parser.parse_args()
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = sorted(set(keys) - set(ROWS))
    if unknown:
        parser.error(f"--rows: unknown {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    print(f"machine: {machine()}", flush=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    peaks = {"fp32": matmul_peak_flops(dtype=torch.float32), "bf16": matmul_peak_flops(dtype=torch.bfloat16)}
    flops_per_token = 6 * non_embedding_params()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tta-") as tmp:
        for key in keys:
            label, overrides = ROWS[key]
            s = run_row(key, overrides, args, Path(tmp))
            m = s.final_metrics
            trained = m["train_seconds_total"]
            tokens_per_s = m.get("train_tokens_per_s", 0.0)
            rows.append({
                "row": key, "setup": label, "overrides": overrides, "ended_by": s.ended_by,
                "minutes_to": {f"{t:.2f}": minutes_to(s, t) for t in TARGETS},
                "train_minutes": round(trained / 60, 2), "steps": s.global_step, "num_workers": s.num_workers,
                "precision": m["precision"], "samples_per_s": round(m["train_samples_per_s"], 1),
                "tokens_per_s": round(tokens_per_s, 1),
                "mfu": round(tokens_per_s * flops_per_token / peaks[m["precision"]], 3),
                "final_val_accuracy": m["val_accuracy"],
                "checks": [c.model_dump() for c in s.checks],
            })
    base = next((r for r in rows if r["row"] == "previous"), None)
    print(f"\nSST-2, all-MiniLM-L6-v2; dev.tsv ({rows[0]['checks'][0]['rows'] if rows and rows[0]['checks'] else '?'} "
          f"rows) scored every {args.check_steps} steps; each row capped at {args.cap_min:g} min of budget; matmul "
          f"peak on 2 threads: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s\n")
    print("| setup | min to 0.90 | min to 0.92 | speed-up to 0.90 | samples/s | ratio | MFU |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        t90, t92 = r["minutes_to"]["0.90"], r["minutes_to"]["0.92"]
        base90 = base["minutes_to"]["0.90"] if base else None
        speedup = f"{base90 / t90:.2f}x" if base90 and t90 else "-"
        ratio = f"{r['samples_per_s'] / base['samples_per_s']:.2f}" if base else "-"
        t90, t92 = (f"> {r['train_minutes']}" if t is None else t for t in (t90, t92))  # not reached in the cap
        print(f"| {r['setup']} | {t90} | {t92} | {speedup} | {r['samples_per_s']:.0f} | {ratio} | "
              f"{r['mfu']:.2f} ({r['precision']}) |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    record = {"date": time.strftime("%Y-%m-%d"), "machine": f"{machine()}, torch {torch.__version__}",
              "matmul_peak_flops": peaks, "args": vars(args), "rows": rows}
    (RESULTS / "time_to_accuracy.json").write_text(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
