"""`python -m ray_apps tune`: sweep TrainJob fields with Ray Tune (ASHA, PBT or FIFO; random or Optuna search).

    python -m ray_apps tune --config ray_apps/configs/tune_digits.yaml
    python -m ray_apps tune --config ray_apps/configs/tune_digits.yaml --set num_samples=16 --register digits
    ray job submit --working-dir . -- python -m ray_apps tune --config ray_apps/configs/tune_sst2_minilm.yaml

Exit codes: 0 done (at least one trial finished an epoch); 1 every trial failed; 2 bad config (one
line names the field) or a sweep that cannot resume as asked.
"""

from __future__ import annotations

import argparse
import sys

from ray_apps.options import add_json_out, add_registry, write_json_out

EPILOG = """Re-running the same command resumes an interrupted sweep (run.name, default the config file's
name): finished trials are kept, unfinished and errored ones continue from their last checkpoint.
--restart discards the sweep directory and starts over.

Output: a leaderboard (trial, sampled values, best metric, epochs run, stopped early), the best
config as a complete TrainJob YAML (<storage>/<name>/best_train.yaml) that `python -m ray_apps train`
accepts, and the best checkpoint's path. --register NAME exports that checkpoint to the registry
(ONNX, parity-checked, see `export --help`) and points NAME@challenger at it.

--set takes TuneJob fields (num_samples=4, scheduler.grace_period=2, train.run.epochs=3,
scaling.num_workers=1) and search space entries ('space.optim.lr={loguniform: [1e-4, 1e-2]}')."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tune", help="hyperparameter sweep over a training config (Ray Tune)",
                       description=__doc__.splitlines()[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="TuneJob YAML, e.g. ray_apps/configs/tune_digits.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a TuneJob field or a space entry (repeatable)")
    p.add_argument("--restart", action="store_true", help="discard this sweep's directory and start over")
    add_json_out(p, "the sweep summary (leaderboard, best)")
    p.add_argument("--register", metavar="NAME", help="export the best checkpoint as NAME and make it NAME@challenger")
    add_registry(p, "registry root for --register")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="with --register: also ship int8 ONNX")


def run(args: argparse.Namespace) -> int:
    from rayfoundry.ray_env import check_cluster_paths
    from tuning.config import load_tune
    from tuning.sweep import format_leaderboard, register_best, run_sweep

    loaded = load_tune(args.config, args.overrides)
    if args.register:  # before the sweep: a refused registry would waste it
        check_cluster_paths({"--registry": args.registry})
    summary = run_sweep(loaded, restart=args.restart)
    print(format_leaderboard(summary))
    best = summary["best"]
    if best is None:
        print("every trial failed before reporting an epoch; see the errors above", file=sys.stderr)
        return 1
    print(f"best: trial {best['trial']} epoch {best['epoch']}  {best['metric']} {best['value']:.4f}  "
          f"({', '.join(f'{k}={v}' for k, v in best['config'].items())})\n"
          f"  best config:     {best['yaml']}\n  best checkpoint: {best['checkpoint']}\n"
          f"  train it:        python -m ray_apps train --config {best['yaml']}")
    if args.register:
        summary["registered"] = register_best(summary, args.register, args.registry, args.quantize)
        print(f"registered: {summary['registered']['ref']} is now {summary['registered']['alias']} "
              f"in {args.registry}")
    write_json_out(args.json_out, summary)
    return 0
