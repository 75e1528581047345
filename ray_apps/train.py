"""`python -m ray_apps train`: validate a TrainJob config and run it on Ray Train.

    python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml
    python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml --set optim.lr=3e-5 --dry-run
    ray job submit --working-dir . -- python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml

Exit codes: 0 finished, 1 training failed, 2 bad config or data, or a rerun with another config
(one line names the fault).
"""

from __future__ import annotations

import argparse

from ray_apps.options import add_json_out, write_json_out

EPILOG = """examples:
  python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml
  python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml --set optim.lr=3e-3 --set scaling.num_workers=1
  python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml --dry-run

Re-running the same run name (run.name, default: the config file's name) resumes from its
latest checkpoint; --set run.epochs=N (more than before) continues a finished run. A rerun whose
config differs in any other field is refused, naming the fields; --restart deletes the run
directory and trains from scratch, or choose another run.name."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (DDP on Ray Train)", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="job YAML, e.g. ray_apps/configs/digits_cnn.yaml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, data and model on a few rows; 2 steps in one process; writes nothing")
    p.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start fresh")
    add_json_out(p, "the run summary (result.json)")


def run(args: argparse.Namespace) -> int:
    from trainers.config import load_job
    from trainers.run import train

    job = load_job(args.config, args.overrides)
    summary = train(job, dry_run=args.dry_run, restart=args.restart)
    if args.dry_run:
        return 0
    metric = job.checkpoint.metric
    print(f"done: {summary.job} epochs {summary.epochs_completed}  best {metric} {summary.best_value(metric):.4f}  "
          f"wall {summary.wall_seconds or 0:.0f}s\n  best checkpoint: {summary.best_checkpoint}\n"
          f"  summary: {summary.run_dir}/result.json")
    write_json_out(args.json_out, summary)
    return 0
