"""`python -m ray_apps registry`: list, show, promote and roll back model package versions.

    python -m ray_apps registry list
    python -m ray_apps registry show digits@champion
    python -m ray_apps registry promote digits:2 --to champion
    python -m ray_apps registry rollback digits
    python -m ray_apps registry policy digits [--metric val_macro_f1 --mode max --force --reason "..."]

Exit codes: 0 done; 2 unknown model/version/alias or a corrupt package (named); 3 gate refused.
"""

from __future__ import annotations

import argparse
import json

from ray_apps.options import add_registry

EPILOG = """Refs: NAME (its champion, else its newest version), NAME:VERSION, NAME@ALIAS.
Promotion to `champion` is gated on the model's policy (a metric and its direction, set by its first
version): the version must be at least as good as the current champion within --tolerance, measured
on the same validation rows. --force overrides the gate, or replaces a corrupt champion, and is
recorded in the model's history with --reason. The policy changes only with `policy --force --reason`.
Any other alias (challenger, canary...) is set without a gate. `rollback` points the alias back at the
version it had before its last promotion."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list / show / promote / rollback model packages",
                       description=__doc__.splitlines()[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_registry(p)
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    ls = ops.add_parser("list", help="models, versions, aliases and validation metrics")
    ls.add_argument("name", nargs="?", help="only this model")
    show = ops.add_parser("show", help="one version's model card and history (verifies its files)")
    show.add_argument("ref", help="NAME, NAME:VERSION or NAME@ALIAS")
    show.add_argument("--json", action="store_true", help="print metadata.json and history as JSON")
    pr = ops.add_parser("promote", help="point an alias at a version (champion is gated)")
    pr.add_argument("ref", help="NAME:VERSION")
    pr.add_argument("--to", required=True, metavar="ALIAS", help="champion, challenger, or any name")
    pr.add_argument("--tolerance", type=float, default=0.005, help="gate tolerance on the metric (default 0.005)")
    pr.add_argument("--force", action="store_true",
                    help="promote even when the gate refuses or the champion is corrupt (recorded)")
    pr.add_argument("--reason", help="why; recorded in the history")
    rb = ops.add_parser("rollback", help="restore an alias's previous version")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion", help="which alias (default champion)")
    rb.add_argument("--reason", help="why; recorded in the history")
    po = ops.add_parser("policy", help="show a model's gate policy, or change it (--force --reason)")
    po.add_argument("name")
    po.add_argument("--metric", choices=["val_accuracy", "val_macro_f1", "val_loss"], help="the metric the gate compares")
    po.add_argument("--mode", choices=["max", "min"], help="max: higher is better; min: lower is better")
    po.add_argument("--force", action="store_true", help="required to change the policy")
    po.add_argument("--reason", help="required to change the policy; recorded in the history")


def _list(reg, only: str | None) -> None:
    print(f"{'model':<16} {'version':>7}  {'aliases':<22} {'metric':<14} {'value':>7}  {'engines':<22} created")
    for name in [reg.resolve(only)[0]] if only else reg.models():
        aliases = reg.state(name).aliases
        metric = reg.policy(name).metric
        for version in reg.versions(name):
            meta = reg.metadata(name, version)
            value = meta.validation.metrics["onnx"].get(metric, float("nan"))
            tags = ",".join(a for a, ver in aliases.items() if ver == version) or "-"
            print(f"{name:<16} {version:>7}  {tags:<22} {metric:<14} {value:>7.4f}  "
                  f"{','.join(meta.engines()):<22} {meta.created_at}")


def _describe_event(e) -> str:
    if e.action == "rollout" and e.rollout is not None:
        r = e.rollout
        lines = [f"  {e.at} rollout of {r.candidate} against {r.champion}: {r.outcome} in {r.phase} at weight "
                 f"{r.weight:.0%} ({e.reason})"]
        lines += [f"    {g.name}: {g.status}" + (f" {g.value:.4g} (limit {g.threshold:g}, {g.samples} samples)"
                                                  if g.value is not None else "") for g in r.guards]
        lines += [f"    version {v}: {t.requests} requests, {t.errors} errors" +
                  (f", p99 {t.p99_ms:.1f} ms" if t.p99_ms is not None else "") for v, t in sorted(r.tallies.items())]
        return "\n".join(lines)
    if e.action == "retrain" and e.retraining is not None:
        r = e.retraining
        parts = [f"  {e.at} retrain {r.stage} (serving {e.version})"]
        parts += [f"{k} {v}" for k, v in (("candidate", r.candidate), ("data", r.data_path), ("run", r.run_dir),
                                          ("via", r.submission)) if v]
        return "; ".join(parts) + (f" ({e.reason})" if e.reason else "")
    if e.action == "policy":
        was = f" (was {e.previous_policy})" if e.previous_policy else ""
        return f"  {e.at} policy -> {e.policy}{was} by {e.user}" + (f" ({e.reason})" if e.reason else "")
    extra = f" (forced: {e.reason})" if e.forced else (f" ({e.reason})" if e.reason else "")
    if e.gate and e.gate.champion_corrupt:
        extra += " [champion was corrupt]"
    return f"  {e.at} {e.action} {e.alias} -> {e.version} (was {e.previous}) by {e.user}{extra}"


def describe_lineage(meta) -> str:
    """The chain from a package back to its data: package -> run -> tracked run -> config and data."""
    src, lineage = meta.source, meta.training.lineage
    lines = [f"lineage: {meta.ref} <- checkpoint {src.checkpoint} (epoch {src.epoch})",
             f"  run: {src.run_dir or '-'} (driver run id {src.run_id or '-'})"]
    if lineage is None:
        return "\n".join(lines + ["  no lineage recorded: the checkpoint predates data fingerprints"])
    t = lineage.tracking
    if t is not None:
        run = t.run_id or (f"trial {t.trial_id} of sweep run {t.parent_run_id}" if t.trial_id else "-")
        lines.append(f"  tracked: {t.backend} run {run} at {t.uri}")
    lines.append(f"  config hash: {lineage.config_hash}")
    lines.append(f"  code: {lineage.code_revision or 'not a git checkout'} (rayfoundry {lineage.rayfoundry_version})")
    lines.append(f"  data fingerprint: {lineage.data.digest}")
    for field, fp in lineage.data.sources():
        lines.append(f"    {field} {fp.path}: {fp.method} {fp.digest[:16]}, {fp.files} file(s), {fp.bytes} bytes")
    return "\n".join(lines)


def _show(reg, ref: str, as_json: bool) -> None:
    pkg = reg.open(ref)
    name, version = pkg.metadata.name, pkg.metadata.version
    state = reg.state(name)
    events = [e for e in state.history if version in (e.version, e.previous)]
    if as_json:
        print(json.dumps({"metadata": pkg.metadata.model_dump(mode="json"), "aliases": state.aliases,
                          "policy": reg.policy(name, state).model_dump(),
                          "history": [e.model_dump(mode="json", exclude_none=True) for e in events]}, indent=2))
        return
    print((pkg.path / "README.md").read_text())
    aliases = [a for a, v in state.aliases.items() if v == version]
    print(f"path: {pkg.path}\naliases: {', '.join(aliases) or '-'}\nfiles verified: {len(pkg.metadata.files)}\n"
          f"gate policy: {reg.policy(name, state)}")
    print(describe_lineage(pkg.metadata))
    for e in events:
        print(_describe_event(e))


def _policy(reg, args: argparse.Namespace) -> None:
    if args.metric is None and args.mode is None:
        reg.resolve(args.name)
        print(f"{args.name}: the gate compares {reg.policy(args.name)}")
        return
    current = reg.policy(args.name)
    event = reg.set_policy(args.name, args.metric or current.metric, args.mode or current.mode, force=args.force,
                           reason=args.reason)
    print(f"policy: {args.name} now gates on {event.policy} (was {event.previous_policy}); recorded")


def run(args: argparse.Namespace) -> int:
    from model_registry.registry import Registry, RegistryError, parse_ref

    reg = Registry(args.registry)
    if args.op == "list":
        _list(reg, args.name)
    elif args.op == "show":
        _show(reg, args.ref, args.json)
    elif args.op == "policy":
        _policy(reg, args)
    elif args.op == "promote":
        if parse_ref(args.ref)[1] is None:
            raise RegistryError(f"{args.ref!r}: promote takes NAME:VERSION, e.g. {parse_ref(args.ref)[0]}:2")
        event = reg.promote(args.ref, args.to, tolerance=args.tolerance, force=args.force, reason=args.reason)
        if event.action == "unchanged":
            print(f"unchanged: {args.ref} is already @{args.to}")
            return 0
        gate = f"\n  gate: {event.gate.summary}" if event.gate else ""
        forced = " (forced past the gate; recorded)" if event.forced else ""
        print(f"promoted: {args.ref} is now @{args.to} (was {event.previous}){forced}{gate}")
    else:
        event = reg.rollback(args.name, args.alias, args.reason)
        print(f"rolled back: {args.name}@{args.alias} -> {event.version} (was {event.previous})")
    return 0
