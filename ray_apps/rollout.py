"""`python -m ray_apps rollout`: move a running service to a new model version through shadow and canary.

    python -m ray_apps rollout start digits --candidate digits:3 [--policy policy.yaml]
    python -m ray_apps rollout status digits [--json-out status.json]
    python -m ray_apps rollout report digits          # the A/B comparison of the versions
    python -m ray_apps rollout abort digits --reason "wrong data"

Talks to the model's rollout controller on the Ray cluster that serves it (RAY_ADDRESS, or the
local `ray start` head). The policy file holds a `RolloutPolicy` (docs/rollouts.md); without one the
service's own policy applies. Exit codes: 0 ok, 2 bad arguments or no such service.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ray_apps.options import add_json_out, write_json_out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("rollout", help="roll a new model version out to a running service", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:7]))
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    start = ops.add_parser("start", help="start a rollout of a candidate version")
    start.add_argument("name", help="the served model's name")
    start.add_argument("--candidate", required=True, metavar="REF", help="NAME:VERSION (or NAME@ALIAS) to roll out")
    start.add_argument("--policy", metavar="FILE", help="a YAML RolloutPolicy (default: the service's policy)")
    for op, text in (("status", "phase, weight, guards and counts"), ("report", "A/B comparison of the versions"),
                     ("abort", "stop the rollout; the champion serves everyone")):
        q = ops.add_parser(op, help=text)
        q.add_argument("name", help="the served model's name")
        if op == "abort":
            q.add_argument("--reason", help="recorded in the model's registry history")
        add_json_out(q, text)
    add_json_out(start, "the status after the start")


def load_policy(path: str) -> dict[str, Any]:
    """A policy file as a checked RolloutPolicy (a bad field names the file and the field)."""
    import yaml
    from pydantic import ValidationError

    from rayfoundry.errors import ConfigError, describe_validation_error
    from serve_deployments.rollout import RolloutPolicy

    try:
        with open(path) as f:
            doc = yaml.safe_load(f) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    try:
        return RolloutPolicy.model_validate(doc).model_dump()
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, path)) from None


def controller(name: str) -> Any:
    """The rollout controller of the service that serves `name`, on the cluster this process joins."""
    import logging

    import ray
    from ray import serve

    from rayfoundry.errors import ConfigError
    from serve_deployments.app import model_app_name

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS", "auto"), logging_level=logging.WARNING)
    apps = serve.status().applications
    if model_app_name(name) not in apps:
        served = sorted(a.removeprefix("model-") for a in apps if a.startswith("model-"))
        raise ConfigError(f"{name}: no service for this model on the cluster (served: {', '.join(served) or 'none'})")
    handle = serve.get_deployment_handle("RolloutController", model_app_name(name))
    # A driver whose environment has RAY_SERVE_THROUGHPUT_OPTIMIZED=1 (a process started by the service,
    # or a job on a cluster started with it) would get a handle usable only inside an event loop; the CLI
    # calls it from plain code.
    if not handle.is_initialized:  # Serve may hand back a handle this process already used
        handle._init(_run_router_in_separate_loop=True)
    return handle


def _guard_line(g: dict[str, Any]) -> str:
    value = "-" if g["value"] is None else f"{g['value']:.4g}"
    p = f"  p={g['p_value']:.2g}" if g.get("p_value") is not None else ""
    return (f"  {g['name']:<13} {g['status']:<8} {value:>9} (limit {g['threshold']:g})  "
            f"samples {g['samples']}/{g['min_samples']}{p}  {g.get('detail', '')}").rstrip()


def print_status(s: dict[str, Any]) -> None:
    print(f"{s['model']}: champion {s['champion']}, phase {s['phase']}" +
          (f", following @{s['following']}" if s.get("following") else ""))
    if s["phase"] == "none":
        return
    step = f" (step {s['step']} of {s['steps']})" if s.get("step") else ""
    print(f"candidate {s['candidate']}: weight {s['weight']:.0%}{step}, shadow {s['shadow_fraction']:.0%}, "
          f"in this phase {s['held_s']:g}s; started {s['started']}")
    if s.get("reason"):
        print(f"decision: {s['reason']}")
    print("guards:")
    for g in s["guards"]:
        print(_guard_line(g))
    for version, t in sorted(s["tallies"].items()):
        p99 = "-" if t["p99_ms"] is None else f"{t['p99_ms']:.1f} ms"
        print(f"version {version}: {t['requests']} requests, {t['errors']} errors, p99 {p99}")
    sh = s["shadow"]
    print(f"shadow: {sh['compared']} instances compared, {sh['disagreed']} disagreed, {sh['dropped']} requests dropped")


def print_report(r: dict[str, Any]) -> None:
    if not r["versions"]:
        print(f"{r['model']}: {r.get('note', 'no answers recorded for this rollout yet')}")
        return
    print(f"{r['model']}: champion {r['champion']} against candidate {r['candidate']} ({r['phase']}); "
          "95% intervals in brackets")
    print(f"{'version':<8} {'requests':>9} {'error rate':>24} {'p50 ms':>22} {'p99 ms':>22}")

    def ci(x: dict[str, float] | None, scale: float = 1.0, fmt: str = ".1f") -> str:
        if not x:
            return "-"
        return f"{x['value'] * scale:{fmt}} [{x['low'] * scale:{fmt}}, {x['high'] * scale:{fmt}}]"

    for version, row in sorted(r["versions"].items()):
        print(f"{version:<8} {row['requests']:>9} {ci(row.get('error_rate'), 100, '.2f') + ' %':>24} "
              f"{ci(row.get('p50_ms')):>22} {ci(row.get('p99_ms')):>22}")
    sh = r["shadow"]
    if "disagreement" in sh:
        print(f"disagreement in shadow: {ci(sh['disagreement'], 100, '.2f')} % of {sh['compared']} instances")
    accuracy = r["accuracy"]
    if isinstance(accuracy, str):
        print(f"accuracy: {accuracy}")
        return
    for version, live in sorted(accuracy.items()):
        value = "no feedback labels yet" if live["accuracy"] is None else \
            f"{live['accuracy']:.4f} on {live['labels']} feedback labels"
        print(f"live accuracy of version {version}: {value}")


def run(args: argparse.Namespace) -> int:
    handle = controller(args.name)
    if args.op == "start":
        policy = load_policy(args.policy) if args.policy else None
        doc = handle.start.remote(args.candidate, policy).result()
    elif args.op == "abort":
        doc = handle.abort.remote(args.reason).result()
    elif args.op == "report":
        doc = handle.ab_report.remote().result()
        print_report(doc)
        write_json_out(args.json_out, doc)
        return 0
    else:
        doc = handle.status.remote().result()
    print_status(doc)
    write_json_out(args.json_out, doc)
    return 0
