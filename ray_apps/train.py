"""`python -m ray_apps train`: validate a TrainJob config and run it on Ray Train.

    python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml
    python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml --set optim.lr=3e-5 --dry-run
    ray job submit --working-dir . -- python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml

Exit codes: 0 finished, 1 training failed, 2 bad config or data (one line names the fault).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EPILOG = """examples:
  python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml
  python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml --set optim.lr=3e-3 --set scaling.num_workers=1
  python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml --dry-run

Re-running the same run name (run.name, default: the config file's name) resumes from its
latest checkpoint; --restart deletes the run directory and trains from scratch."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (DDP on Ray Train)", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="job YAML, e.g. ray_apps/configs/digits_cnn.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, data and model on a few rows; 2 steps in one process; writes nothing")
    p.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start fresh")
    p.add_argument("--json-out", type=Path, metavar="PATH", help="also write the result summary to PATH")


def run(args: argparse.Namespace) -> int:
    from trainers.checkpoint import CheckpointError
    from trainers.config import ConfigError, load_job
    from trainers.data import DataError, find_cause

    try:
        job = load_job(args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from trainers.run import train

    try:
        summary = train(job, dry_run=args.dry_run, restart=args.restart)
    except Exception as e:  # a worker's DataError/CheckpointError arrives wrapped by Ray: one line
        cause = find_cause(e, (DataError, CheckpointError))
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        return 2
    if args.dry_run:
        return 0
    best = summary.get("best_metrics") or {}
    print(f"done: {summary['job']} epochs {summary['epochs_completed']}  "
          f"best {job.checkpoint.metric} {best.get(job.checkpoint.metric, float('nan')):.4f}  "
          f"wall {summary['wall_seconds']:.0f}s\n  best checkpoint: {summary['best_checkpoint']}\n"
          f"  summary: {summary['run_dir']}/result.json")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(summary, indent=2))
    return 0
