"""`python -m ray_apps registry`: list, show, promote and roll back model package versions.

    python -m ray_apps registry list
    python -m ray_apps registry show digits@champion
    python -m ray_apps registry promote digits:2 --to champion
    python -m ray_apps registry rollback digits

Exit codes: 0 done; 2 unknown model/version/alias or a corrupt package (named); 3 gate refused.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

EPILOG = """Refs: NAME (its champion, else its newest version), NAME:VERSION, NAME@ALIAS.
Promotion to `champion` is gated: the version's validation metric must be at least the current
champion's minus --tolerance, measured on the same validation rows. --force overrides the gate and
is recorded in the model's history with --reason. Any other alias (challenger, canary...) is set
without a gate. `rollback` points the alias back at the version it had before its last promotion."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("registry", help="list / show / promote / rollback model packages",
                       description=__doc__.splitlines()[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registry", default=os.environ.get("RAYFOUNDRY_REGISTRY", "registry"),
                   help="registry root: path or URI (default $RAYFOUNDRY_REGISTRY or ./registry)")
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
    pr.add_argument("--force", action="store_true", help="promote even when the gate refuses (recorded)")
    pr.add_argument("--reason", help="why; recorded in the history")
    rb = ops.add_parser("rollback", help="restore an alias's previous version")
    rb.add_argument("name")
    rb.add_argument("--alias", default="champion", help="which alias (default champion)")
    rb.add_argument("--reason", help="why; recorded in the history")


def _list(reg, only: str | None) -> None:
    from trainers.package import ENGINE_FILES

    print(f"{'model':<16} {'version':>7}  {'aliases':<22} {'metric':<14} {'value':>7}  {'engines':<22} created")
    for name in [reg.resolve(only)[0]] if only else reg.models():
        aliases = reg.state(name)["aliases"]
        for version in reg.versions(name):
            meta = reg.metadata(name, version)
            v = meta["validation"]
            tags = ",".join(a for a, ver in aliases.items() if ver == version) or "-"
            engines = ",".join(e for e, f in ENGINE_FILES.items() if f in meta["files"])
            print(f"{name:<16} {version:>7}  {tags:<22} {v['metric']:<14} {v['metrics']['onnx'][v['metric']]:>7.4f}  "
                  f"{engines:<22} {meta['created_at']}")


def _show(reg, ref: str, as_json: bool) -> None:
    pkg = reg.open(ref)
    name, version = pkg.metadata["name"], pkg.metadata["version"]
    state = reg.state(name)
    events = [e for e in state["history"] if version in (e.get("version"), e.get("previous"))]
    if as_json:
        print(json.dumps({"metadata": pkg.metadata, "aliases": state["aliases"], "history": events}, indent=2))
        return
    print((pkg.path / "README.md").read_text())
    aliases = [a for a, v in state["aliases"].items() if v == version]
    print(f"path: {pkg.path}\naliases: {', '.join(aliases) or '-'}\nfiles verified: {len(pkg.metadata['files'])}")
    for e in events:
        extra = f" (forced: {e.get('reason')})" if e.get("forced") else (f" ({e['reason']})" if e.get("reason") else "")
        print(f"  {e['at']} {e['action']} {e['alias']} -> {e['version']} (was {e['previous']}) by {e['user']}{extra}")


def run(args: argparse.Namespace) -> int:
    from trainers.package import PackageError
    from trainers.registry import GateRefused, Registry, RegistryError, parse_ref

    reg = Registry(args.registry)
    try:
        if args.op == "list":
            _list(reg, args.name)
        elif args.op == "show":
            _show(reg, args.ref, args.json)
        elif args.op == "promote":
            if parse_ref(args.ref)[1] is None:
                raise RegistryError(f"{args.ref!r}: promote takes NAME:VERSION, e.g. {parse_ref(args.ref)[0]}:2")
            event = reg.promote(args.ref, args.to, tolerance=args.tolerance, force=args.force, reason=args.reason)
            if event["action"] == "unchanged":
                print(f"unchanged: {args.ref} is already @{args.to}")
                return 0
            gate = f"\n  gate: {event['gate']['summary']}" if event["gate"] else ""
            forced = " (forced past the gate; recorded)" if event["forced"] else ""
            print(f"promoted: {args.ref} is now @{args.to} (was {event['previous']}){forced}{gate}")
        else:
            event = reg.rollback(args.name, args.alias, args.reason)
            print(f"rolled back: {args.name}@{args.alias} -> {event['version']} (was {event['previous']})")
    except GateRefused as e:
        print(f"refused: {e}", file=sys.stderr)
        return 3
    except (RegistryError, PackageError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
