"""Does ASHA pay off over plain random search, and what does a trial cost? Digits, one space, one seed.

    .venv/bin/python benchmarks/tune_efficiency.py              # ~8 minutes on 2 cores
    .venv/bin/python benchmarks/tune_efficiency.py --samples 8 --epochs 6 --target 0.96

Both arms run the same sampled configs (Tune's variant generator with the same seed), 1 Ray Train
worker per trial, as many trials at once as the resource rule allows (2 on a 2-CPU machine):
  (a) ASHA (grace 1 epoch, reduction factor 2)    (b) random search, every trial to the last epoch
For each arm: wall time and total epochs trained until some trial first reports the target
validation accuracy, the best accuracy reached within a fixed wall budget (the faster arm's
total time), and the totals. Then the per-trial overhead: no-op Tune trials (one report each),
and no-op trials that each start a 1-worker TorchTrainer (the fixed cost every real trial pays).
Prints a Markdown table and writes benchmarks/results/tune_efficiency.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.flops import machine  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"

SPACE = {"optim.lr": {"loguniform": [1.0e-4, 2.0e-2]}, "model.hidden": {"choice": [32, 64, 128]},
         "model.dropout": {"uniform": [0.0, 0.3]}}


def sweep_arm(storage: Path, scheduler: dict, args) -> dict:
    """Run one arm; returns its per-result timeline and totals."""
    import yaml

    from tuning.config import load_tune
    from tuning.sweep import run_sweep

    name = scheduler["type"]
    config = storage / f"{name}.yaml"
    config.write_text(yaml.safe_dump({
        "base": str(REPO / "ray_apps" / "configs" / "digits_cnn.yaml"), "train": {"run": {"epochs": args.epochs}},
        "scaling": {"num_workers": 1, "cpus_per_worker": 0.45}, "space": SPACE, "num_samples": args.samples,
        "scheduler": scheduler, "search": {"type": "random", "seed": args.seed},
        "run": {"name": name, "storage_path": str(storage)}}))
    started = time.time()
    summary = run_sweep(load_tune(config), log=lambda *_: None)
    wall = time.time() - started
    events = []  # (seconds since start, val_accuracy) of every epoch any trial reported
    for row in summary["leaderboard"]:
        for line in (Path(row["path"]) / "result.json").read_text().splitlines():
            r = json.loads(line)
            events.append((r["timestamp"], r["val_accuracy"]))  # Tune's wall clock of the report, in seconds
    events = sorted((t - started, acc) for t, acc in events)
    return {"arm": name, "wall_s": wall, "epochs": len(events), "events": events,
            "best": max(acc for _, acc in events), "stopped_early": sum(r["stopped_early"] for r in summary["leaderboard"]),
            "configs": [r["config"] for r in summary["leaderboard"]], "concurrency": summary["concurrency"]}


def until_target(arm: dict, target: float) -> tuple[float | None, int | None]:
    for i, (t, acc) in enumerate(arm["events"]):
        if acc >= target:
            return t, i + 1
    return None, None


def best_within(arm: dict, budget_s: float) -> float:
    return max((acc for t, acc in arm["events"] if t <= budget_s), default=float("nan"))


def noop_trials(storage: Path, n: int, with_trainer: bool, at_once: int) -> float:
    """Seconds per trial (wall / n x at_once) of trials that do nothing but report once."""
    from ray import tune

    def trainable(config):
        if with_trainer:
            import ray.train
            from ray.train.torch import TorchTrainer

            TorchTrainer(lambda: ray.train.report({"done": 1}),
                         scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 0.45}),
                         run_config=ray.train.RunConfig(storage_path=str(storage), name=f"noop-{config['i']}")).fit()
        tune.report({"done": 1})

    started = time.time()
    tune.Tuner(tune.with_resources(trainable, {"cpu": 0.01}), param_space={"i": tune.grid_search(list(range(n)))},
               tune_config=tune.TuneConfig(max_concurrent_trials=at_once),
               run_config=tune.RunConfig(storage_path=str(storage), name=f"noop-{with_trainer}", verbose=0)).fit()
    return (time.time() - started) / n * at_once


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=8)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", type=float, default=0.96, help="validation accuracy to reach")
    p.add_argument("--noop", type=int, default=6, help="no-op trials per overhead measurement")
    args = p.parse_args()
    print(f"machine: {machine()}", flush=True)

    from rayfoundry.ray_env import connect_ray, quiet_process

    quiet_process()
    connect_ray()
    with tempfile.TemporaryDirectory() as tmp:
        storage = Path(tmp)
        arms = [sweep_arm(storage, {"type": "asha", "grace_period": 1, "reduction_factor": 2}, args),
                sweep_arm(storage, {"type": "fifo"}, args)]
        assert arms[0]["configs"] and sorted(map(str, arms[0]["configs"])) == sorted(map(str, arms[1]["configs"]))
        budget = min(a["wall_s"] for a in arms)
        noop = noop_trials(storage, args.noop, False, 2)
        noop_train = noop_trials(storage, args.noop, True, 2)

    rows = []
    for arm in arms:
        t, epochs = until_target(arm, args.target)
        rows.append({"arm": arm["arm"], "time_to_target_s": t, "epochs_to_target": epochs,
                     "best_within_budget": best_within(arm, budget), "best": arm["best"], "wall_s": arm["wall_s"],
                     "epochs_total": arm["epochs"], "stopped_early": arm["stopped_early"]})
    asha, fifo = rows
    print(f"\n{args.samples} trials x up to {args.epochs} epochs, seed {args.seed}, {arms[0]['concurrency']}; "
          f"target val_accuracy {args.target}; wall budget {budget:.0f}s\n")
    print("| arm | time to target | epochs to target | best within budget | best | wall | epochs | stopped early |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        tt = "not reached" if r["time_to_target_s"] is None else f"{r['time_to_target_s']:.0f} s"
        et = "-" if r["epochs_to_target"] is None else str(r["epochs_to_target"])
        print(f"| {r['arm']} | {tt} | {et} | {r['best_within_budget']:.4f} | {r['best']:.4f} | {r['wall_s']:.0f} s "
              f"| {r['epochs_total']} | {r['stopped_early']} |")
    ratio = {"wall": fifo["wall_s"] / asha["wall_s"], "epochs": fifo["epochs_total"] / asha["epochs_total"]}
    if asha["time_to_target_s"] and fifo["time_to_target_s"]:
        ratio["time_to_target"] = fifo["time_to_target_s"] / asha["time_to_target_s"]
    print("\nrandom / ASHA: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()))
    print(f"per-trial overhead (2 at once): no-op Tune trial {noop:.1f} s; no-op trial with a 1-worker "
          f"TorchTrainer {noop_train:.1f} s")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "args": vars(args), "rows": rows, "ratios": ratio,
           "noop_trial_s": noop, "noop_train_trial_s": noop_train,
           "timelines": {a["arm"]: a["events"] for a in arms}}
    (RESULTS / "tune_efficiency.json").write_text(json.dumps(out, indent=2))
    print(f"wrote {RESULTS / 'tune_efficiency.json'}")


if __name__ == "__main__":
    main()
