"""`python -m ray_apps runs`: list, show and compare tracked training runs and sweeps.

    python -m ray_apps runs [--storage runs] list
    python -m ray_apps runs show digits_cnn               # a run name, an MLflow run id or id prefix
    python -m ray_apps runs compare 3f2a9c1e 8be04d77 --json-out compare.json

Reads the MLflow store (--tracking-uri, $MLFLOW_TRACKING_URI, or <storage>/mlflow.db when it exists);
without one, the run directories under --storage (their result.json). Exit codes: 0 ok, 2 no such run
or store (named).
"""

from __future__ import annotations

import argparse
import os

from ray_apps.options import add_json_out, write_json_out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list / show / compare tracked runs", description=__doc__.splitlines()[0],
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog="\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--storage", default="runs", help="run storage path (default ./runs): its mlflow.db or run directories")
    p.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"),
                   help="an MLflow tracking URI (default $MLFLOW_TRACKING_URI, else <storage>/mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment (default rayfoundry)")
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    ls = ops.add_parser("list", help="newest runs first: kind, status, best metric, config and data fingerprints")
    ls.add_argument("--limit", type=_positive, default=50, help="at most this many runs (default 50)")
    add_json_out(ls, "the runs")
    show = ops.add_parser("show", help="one run's parameters, metrics, lineage tags and artifacts")
    show.add_argument("run", help="run name, MLflow run id or id prefix (>= 6 characters), or run directory")
    add_json_out(show, "the run")
    cmp = ops.add_parser("compare", help="the parameters that differ and every metric, side by side")
    cmp.add_argument("runs", nargs="+", metavar="RUN")
    add_json_out(cmp, "the comparison")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _best(record) -> str:
    for key in ("best_val_accuracy", "val_accuracy", "best_val_macro_f1", "best_val_loss"):
        if key in record.metrics:
            return f"{key} {record.metrics[key]:.4f}"
    return "-"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def run(args: argparse.Namespace) -> int:
    from rayfoundry.errors import ConfigError
    from tracking.store import compare, open_runs

    store = open_runs(args.storage, args.tracking_uri, args.experiment)
    if args.op == "list":
        records = store.list(args.limit)
        rows = [["run", "name", "kind", "status", "started", "best", "config", "data"]]
        rows += [[r.id[:12], r.name, r.kind, r.status, r.started or "-", _best(r),
                  r.tags.get("rayfoundry.config_hash", "-")[:8], r.tags.get("rayfoundry.data_fingerprint", "-")[:8]]
                 for r in records]
        print(_table(rows) if records else f"no runs in {getattr(store, 'uri', None) or store.root}")
        write_json_out(args.json_out, {"runs": [r.model_dump() for r in records]})
    elif args.op == "show":
        r = store.get(args.run)
        print(f"run {r.id}  {r.name}  ({r.kind}, {r.status}, started {r.started or '-'})"
              + (f"\n  sweep run: {r.parent}" if r.parent else ""))
        for title, items in (("tags", r.tags), ("params", r.params), ("metrics (latest)", r.metrics)):
            print(f"{title}:")
            for k in sorted(items):
                print(f"  {k}: {_fmt(items[k])}")
        print("artifacts: " + (", ".join(r.artifacts) or "-"))
        write_json_out(args.json_out, r)
    else:
        if len(args.runs) < 2:
            raise ConfigError("runs compare: give at least two runs")
        records = [store.get(ref) for ref in args.runs]
        c = compare(records)
        head = ["", *(f"{r.name} ({r.id[:8]})" for r in records)]
        print("params that differ:" if c.params else "params: all equal")
        if c.params:
            print(_table([head] + [[k, *map(_fmt, v)] for k, v in c.params.items()]))
        print("metrics:")
        print(_table([head] + [[k, *map(_fmt, v)] for k, v in c.metrics.items()]))
        write_json_out(args.json_out, c)
    return 0
