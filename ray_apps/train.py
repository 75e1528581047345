"""`python -m ray_apps train`: validate a TrainJob config and run it on Ray Train.

    python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml
    python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml --set optim.lr=3e-5 --dry-run
    python -m ray_apps train --reproduce digits:3          # the exact config of a package's source run
    ray job submit --working-dir . -- python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml

Exit codes: 0 finished, 1 training failed, 2 bad config or data, or a rerun with another config
(one line names the fault).
"""

from __future__ import annotations

import argparse

from ray_apps.options import add_json_out, add_registry, write_json_out

EPILOG = """examples:
  python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml
  python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml --set optim.lr=3e-3 --set scaling.num_workers=1
  python -m ray_apps train --config ray_apps/configs/sst2_minilm.yaml --dry-run

Re-running the same run name (run.name, default: the config file's name) resumes from its
latest checkpoint; --set run.epochs=N (more than before) continues a finished run. A rerun whose
config differs in any other field is refused, naming the fields; --restart deletes the run
directory and trains from scratch, or choose another run.name.

--reproduce NAME:V trains the resolved config that package's source run used, as run
<name>_reproduce_<model>_v<V>; it refuses, naming the file, when the data no longer matches the
fingerprint the run recorded."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model (DDP on Ray Train)", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--config", help="job YAML, e.g. ray_apps/configs/digits_cnn.yaml")
    what.add_argument("--reproduce", metavar="REF", help="re-run the source run of a package (NAME:VERSION, NAME@ALIAS)")
    add_registry(p, "registry of --reproduce")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="check config, data and model on a few rows; 2 steps in one process; writes nothing")
    p.add_argument("--restart", action="store_true", help="discard this run's checkpoints and start fresh")
    add_json_out(p, "the run summary (result.json)")


def reproduce_job(registry: str, ref: str, overrides: list[str]):
    """The TrainJob a package's source run used, after checking its data against the recorded fingerprint."""
    from model_registry.registry import Registry
    from rayfoundry.errors import ConfigError, DataError
    from tracking.fingerprint import changed_sources, fingerprint_data
    from trainers.config import apply_overrides, parse_job

    meta = Registry(registry).open(ref).metadata
    lineage = meta.training.lineage
    if lineage is None:
        raise ConfigError(f"{meta.ref}: its metadata.json records no data fingerprint (exported before lineage "
                          f"was kept); train its config by hand")
    config = dict(meta.training.config)
    trial = lineage.tracking is not None and lineage.tracking.trial_id is not None
    if trial:  # a sweep trial ran inside its Tune trial directory, tracked by the sweep
        config["run"] = dict(config["run"], storage_path="runs")
        config["tracking"] = {"backend": "mlflow", "uri": lineage.tracking.uri}
    job = parse_job(apply_overrides(config, overrides), f"{meta.ref} metadata.json training.config")
    job.run.name = f"{job.run.name}_reproduce_{meta.name}_v{meta.version}"
    now = fingerprint_data(job.data.train_path, job.data.validation_path, cached=False)  # trust no cache here
    changed = changed_sources(lineage.data, now)
    if changed:
        raise DataError(f"{meta.ref}: the data differs from what its source run read: {'; '.join(changed)}; "
                        f"refusing to reproduce")
    print(f"reproducing {meta.ref}: config {lineage.config_hash[:12]}, data {lineage.data.digest[:12]} (unchanged), "
          f"code then {lineage.code_revision or '-'}")
    return job


def run(args: argparse.Namespace) -> int:
    from trainers.config import load_job
    from trainers.run import train

    job = reproduce_job(args.registry, args.reproduce, args.overrides) if args.reproduce else \
        load_job(args.config, args.overrides)
    import psutil

    # run.time_budget_min counts from the command's start: interpreter start-up and imports included.
    summary = train(job, dry_run=args.dry_run, restart=args.restart, started_at=psutil.Process().create_time())
    if args.dry_run:
        return 0
    metric = job.checkpoint.metric
    ended = f" (ended by {summary.ended_by.replace('_', ' ')})" if summary.ended_by else ""
    print(f"done: {summary.job} epochs {summary.epochs_completed}{ended}  step {summary.global_step}  "
          f"best {metric} {summary.best_value(metric):.4f}  "
          f"wall {summary.wall_seconds or 0:.0f}s\n  best checkpoint: {summary.best_checkpoint}\n"
          f"  summary: {summary.run_dir}/result.json")
    write_json_out(args.json_out, summary)
    return 0
