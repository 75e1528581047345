"""`python -m ray_apps tune`: sweep TrainJob fields with Ray Tune (ASHA, PBT or FIFO; random or Optuna search).

    python -m ray_apps tune --config ray_apps/configs/tune_digits.yaml
    python -m ray_apps tune --config ray_apps/configs/tune_digits.yaml --set num_samples=16 --register digits
    ray job submit --working-dir . -- python -m ray_apps tune --config ray_apps/configs/tune_sst2_minilm.yaml

Exit codes: 0 done (at least one trial finished an epoch); 1 every trial failed; 2 bad config (one
line names the field) or a sweep that cannot resume as asked.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

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
    p.add_argument("--json-out", type=Path, metavar="PATH", help="also write the summary (leaderboard, best) to PATH")
    p.add_argument("--register", metavar="NAME", help="export the best checkpoint as NAME and make it NAME@challenger")
    p.add_argument("--registry", default=os.environ.get("RAYFOUNDRY_REGISTRY", "registry"),
                   help="registry root for --register (default $RAYFOUNDRY_REGISTRY or ./registry)")
    p.add_argument("--quantize", choices=["none", "int8"], default="none", help="with --register: also ship int8 ONNX")


def run(args: argparse.Namespace) -> int:
    from trainers.config import ConfigError
    from tuning.config import load_tune

    try:
        loaded = load_tune(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainers.checkpoint import CheckpointError
    from trainers.data import DataError
    from trainers.export import ExportError
    from trainers.package import PackageError
    from trainers.registry import RegistryError
    from tuning.sweep import SweepError, format_leaderboard, register_best, run_sweep

    try:
        summary = run_sweep(loaded, restart=args.restart)
    except SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
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
        try:
            summary["registered"] = register_best(summary, args.register, args.registry, args.quantize)
        except (ExportError, CheckpointError, ConfigError, DataError, PackageError, RegistryError, SweepError) as e:
            print(f"error: --register: {e}", file=sys.stderr)
            return 2
        print(f"registered: {summary['registered']['ref']} is now {summary['registered']['alias']} "
              f"in {args.registry}")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2, default=str))
    return 0
