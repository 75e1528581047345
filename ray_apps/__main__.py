"""rayfoundry command line: `python -m ray_apps <job> [options]`.

    python -m ray_apps train --config ray_apps/configs/digits_cnn.yaml [--set optim.lr=3e-4] [--dry-run]
    python -m ray_apps tune --config ray_apps/configs/tune_digits.yaml [--register digits]
    python -m ray_apps export --checkpoint runs/digits_cnn --name digits --quantize int8 --promote champion
    python -m ray_apps registry list
    python -m ray_apps serve --model digits@champion
    python -m ray_apps rollout start digits --candidate digits:3
    python -m ray_apps monitor digits
    python -m ray_apps runs compare digits_cnn digits_cnn_lr3e-3

Each job lives in its own module here; this file maps job names to them and turns every
`RayfoundryError` (also one that Ray wrapped around a worker's) into one line and its exit code.
"""

from __future__ import annotations

import argparse
import sys

from ray_apps import cluster, export, monitor, registry, retrain, rollout, runs, serve, train, tune
from rayfoundry.errors import RayfoundryError
from rayfoundry.ray_env import find_cause, quiet_process

JOBS = {"train": train, "tune": tune, "export": export, "registry": registry, "serve": serve, "rollout": rollout,
        "monitor": monitor, "retrain": retrain, "runs": runs, "cluster": cluster}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ray_apps",
        description="Train, tune, export and serve models on Ray from one typed config. "
        "Runs on a local Ray, or on the cluster in RAY_ADDRESS (as under `ray job submit`).",
    )
    sub = parser.add_subparsers(dest="job", required=True, metavar="JOB")
    for module in JOBS.values():
        module.add_parser(sub)
    args = parser.parse_args(argv)
    quiet_process()
    try:
        return JOBS[args.job].run(args)
    except Exception as e:  # our errors, raised here or inside a Ray worker (then wrapped by Ray)
        cause = find_cause(e, RayfoundryError)
        if cause is None:
            raise
        print(f"{cause.prefix}: {cause}", file=sys.stderr)
        return cause.exit_code


if __name__ == "__main__":
    sys.exit(main())
