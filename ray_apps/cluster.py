"""`python -m ray_apps cluster render`: write the KubeRay manifests from the cluster spec and a job or Serve config.

    python -m ray_apps cluster render --target raycluster
    python -m ray_apps cluster render --target rayjob --job ray_apps/configs/digits_cnn.yaml
    python -m ray_apps cluster render --target rayservice --job cluster_configs/serve/digits.yaml

The files in cluster_configs/kuberay/ are this command's output; each names the command in its header.
Exit codes: 0 written, 2 bad target, spec or job config (one line names the fault).
"""

from __future__ import annotations

import argparse
from pathlib import Path

TARGETS = ("raycluster", "rayjob", "rayservice")
OUT_DIR = "cluster_configs/kuberay"

EPILOG = """The cluster spec (--spec, default cluster_configs/cluster.yaml) names the images, resources,
storage and registry; --job is a train config for rayjob, a Serve config for rayservice, and unused
for raycluster. Output goes to cluster_configs/kuberay/<target>[-<job>].yaml unless --out says otherwise."""

HEADER = """# {kind} for KubeRay (ray.io/v1), rendered from {spec}{job_from}.
# Do not edit: change the sources and re-render (tests/unit/test_cluster_configs.py fails when stale):
#   {command}
# Apply (KubeRay operator >= 1.6, for authOptions):
#   kubectl apply -f {out}
# Code and dependencies: the pods run the stock rayproject/ray image; the runtime env unpacks
# code_uri (a zip of the repo at one commit) as the working dir and pip-installs pyproject's pins
# except ray (in the image) and deepspeed (needs torch to build; bake it into an image for ZeRO jobs).
# Each node installs them once per runtime env, so a new pod's first task waits for the install; a
# custom image (FROM the same tag + `pip install .`) trades that for an image build per release.
# env_vars match cluster_configs/runtime_env.yaml. Token auth is on; Services stay ClusterIP; the
# NetworkPolicy admits only this workload's pods, same-namespace pods labelled rayfoundry.io/access=true,
# the operator (dashboard) and Prometheus (metrics, scraped per the pod annotations).
"""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("cluster", help="render KubeRay manifests from the cluster spec", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    r = actions.add_parser("render", help="write a RayCluster, RayJob or RayService manifest", epilog=EPILOG,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    r.add_argument("--target", required=True, help=f"one of {', '.join(TARGETS)}")
    r.add_argument("--job", dest="job_path", help="train config (rayjob) or Serve config (rayservice), inside the repo")
    r.add_argument("--spec", default=None, help="cluster spec YAML (default cluster_configs/cluster.yaml)")
    r.add_argument("--out", type=Path, help="where to write (default cluster_configs/kuberay/<target>[-<job>].yaml)")


def _repo_relative(path: str, repo: Path) -> str:
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise ValueError(f"--job {path}: no such file")
    try:
        return resolved.relative_to(repo).as_posix()
    except ValueError:
        raise ValueError(f"--job {path}: must be inside the repo (the cluster runs the repo's code_uri zip)") from None


def run(args: argparse.Namespace) -> int:
    from ray_apps import manifests
    from rayfoundry.errors import ConfigError

    try:
        if args.target not in TARGETS:
            raise ValueError(f"--target {args.target!r}: choose one of {', '.join(TARGETS)}")
        if args.target != "raycluster" and not args.job_path:
            raise ValueError(f"--target {args.target} needs --job (a {'train' if args.target == 'rayjob' else 'Serve'} config)")
        job = _repo_relative(args.job_path, manifests.REPO) if args.job_path else None
        spec = manifests.load_spec(manifests.REPO / (args.spec or manifests.DEFAULT_SPEC))
        if args.target == "raycluster":
            docs = manifests.raycluster(spec)
        elif args.target == "rayjob":
            docs = manifests.rayjob(spec, job)
        else:
            docs = manifests.rayservice(spec, job)
    except ValueError as e:  # a bad --target/--job/--spec; the spec's own errors are ConfigErrors already
        raise ConfigError(str(e)) from None
    name = args.target + (f"-{Path(job).stem}" if job and args.target != "raycluster" else "")
    default_out = f"{OUT_DIR}/{name}.yaml"
    command = f"python -m ray_apps cluster render --target {args.target}"
    command += (f" --job {job}" if job else "") + (f" --spec {args.spec}" if args.spec else "")
    header = HEADER.format(kind=docs[0]["kind"], spec=args.spec or manifests.DEFAULT_SPEC,
                           job_from=f" and {job}" if job and args.target != "raycluster" else "",
                           command=command, out=default_out)
    out = args.out or manifests.REPO / default_out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(manifests.dump(docs, header))
    print(f"wrote {out}")
    return 0
