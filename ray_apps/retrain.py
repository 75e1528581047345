"""`python -m ray_apps retrain`: the retraining loop's job. Train a served model's job on the newest data,
export the result and start a shadow rollout of it on the running service.

    python -m ray_apps retrain digits --from-version 3 --train-path 'data/digits-*.csv'
    python -m ray_apps retrain digits --from-version 3 --job ray_apps/configs/digits_cnn.yaml --set run.epochs=4

A service whose monitoring alarm persists starts this itself (`monitoring.retraining`, off by
default). The job is the package's own training config unless --job names a file; --train-path (a
path or glob; the newest match) replaces its training data. Each step is recorded in the model's
registry history. Exit codes: 0 shadow started, 1 training failed, 2 bad input or a refused export.
"""

from __future__ import annotations

import argparse
import time

from ray_apps.options import add_registry


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("retrain", help="train on the newest data, export, and shadow the result",
                       description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("name", help="the served model's name")
    p.add_argument("--from-version", required=True, metavar="V", help="the version whose training config is reused")
    add_registry(p)
    p.add_argument("--job", dest="job_file", metavar="FILE", help="training job YAML (default: the package's training config)")
    p.add_argument("--train-path", metavar="PATH", help="new training data: a path or glob (newest match)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a job field (repeatable)")
    p.add_argument("--storage", default="runs/retraining", help="run storage for the new run")
    p.add_argument("--quantize", choices=["none", "int8"], default="int8", help="export option (default int8)")
    p.add_argument("--reason", default="by hand", help="why; recorded in the registry history")
    p.add_argument("--no-rollout", action="store_true", help="train and export only")


def run(args: argparse.Namespace) -> int:
    from model_registry.export import ExportJob, export
    from model_registry.registry import Registry, RetrainRecord
    from monitoring.retrain import newest_data
    from rayfoundry.ray_env import check_cluster_paths
    from trainers.config import apply_overrides, load_job, parse_job
    from trainers.run import train

    check_cluster_paths({"--registry": args.registry})
    registry = Registry(args.registry)
    name, version = registry.resolve(f"{args.name}:{args.from_version}")
    base = f"{name}:{version}"

    def record(stage: str, **fields) -> None:
        registry.record(name, "retrain", version=version, reason=args.reason,
                        retraining=RetrainRecord(stage=stage, **fields))

    overrides = list(args.overrides)
    data = newest_data(args.train_path) if args.train_path else None
    if data:
        overrides.append(f"data.train_path={data}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    overrides += [f"run.name={name}_retrain_{stamp}", f"run.storage_path={args.storage}"]
    try:
        if args.job_file:
            job = load_job(args.job_file, overrides)
        else:
            config = dict(registry.metadata(name, version).training.config)
            job = parse_job(apply_overrides(config, overrides), f"{base} metadata.json training.config")
        print(f"retrain {base}: {job.data.train_path} -> run {job.run.name} in {job.run.storage_path}")
        summary = train(job)
        record("trained", data_path=job.data.train_path, run_dir=summary.run_dir)
        meta = export(ExportJob(checkpoint=summary.run_dir, name=name, registry=args.registry, quantize=args.quantize))
        record("exported", run_dir=summary.run_dir, candidate=meta.ref)
        if not args.no_rollout:
            from ray_apps.rollout import controller

            controller(name).start.remote(meta.ref, None, True).result()
            record("shadow", candidate=meta.ref)
            print(f"shadow rollout of {meta.ref} started (python -m ray_apps rollout status {name})")
    except Exception as e:
        record("failed", data_path=data)
        print(f"retrain {base} failed: {type(e).__name__}: {str(e)[:300]}")
        raise
    return 0
