"""`python -m ray_apps monitor`: how a served model's live traffic compares with its training reference.

    python -m ray_apps monitor sst2                   # each signal against its threshold, live accuracy, volume
    python -m ray_apps monitor sst2 --json-out m.json
    GET /v2/models/sst2/monitor                        # the same document over HTTP

Talks to the model's controller on the Ray cluster that serves it (RAY_ADDRESS, or the local
`ray start` head). Exit codes: 0 no alarm in the latest windows, 1 an alarm, 2 no such service.
"""

from __future__ import annotations

import argparse
from typing import Any

from ray_apps.options import add_json_out, write_json_out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("monitor", help="drift, live accuracy and volume of a served model",
                       description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="\n".join(__doc__.splitlines()[2:9]))
    p.add_argument("name", help="the served model's name")
    add_json_out(p, "the monitoring status")


def _signal_line(s: dict[str, Any]) -> str:
    flag = "ALARM" if s["alarm"] else "ok"
    return (f"    {s['signal']:<15} {flag:<6} score {s['score']:>8.4f} (alarms at >= {s['min_score']:g})  "
            f"p={s['p_value']:.2g} (alpha {s['alpha']:.2g})  {s['detail']}")


def print_status(doc: dict[str, Any]) -> bool:
    """Print the status; True when a version's latest window alarmed."""
    if not doc.get("enabled"):
        print(f"{doc['model']}: monitoring is off for this service")
        return False
    alarm = False
    window = doc["policy"]["window"]
    print(f"{doc['model']}: champion {doc['champion']}" + (f", candidate {doc['candidate']}" if doc.get("candidate")
                                                           else "") +
          f"; windows of {window['instances']} instances or {window['seconds']:g}s")
    for version, v in sorted(doc["versions"].items(), key=lambda kv: int(kv[0])):
        ref = v["reference"]
        print(f"version {version}: {v['instances']} instances in {v['windows']} closed windows "
              f"({v['alarmed_windows']} alarmed, {v['open_window']} instances in the open one)")
        if ref is None:
            print("  no reference profile (package exported before profiles existed): volume only")
        else:
            print(f"  reference: {ref['rows']} rows of {ref['source']}, accuracy {ref['accuracy']:.4f}")
        for kind in ("drift", "feedback"):
            w = v[kind]
            if w is None:
                continue
            alarm |= w["alarm"]
            print(f"  latest {kind} window ({w['instances']} {'instances' if kind == 'drift' else 'labels'}, "
                  f"closed {w['closed']}): {'ALARM' if w['alarm'] else 'ok'}")
            for s in w["signals"]:
                print(_signal_line(s))
        live = v["live"]
        acc = "-" if live["accuracy"] is None else f"{live['accuracy']:.4f}"
        print(f"  live accuracy: {acc} over {live['labels']} feedback labels ({live['open_window']} in the open window)")
    f = doc["feedback"]
    print(f"feedback: {f['matched']} matched, {f['unmatched']} unmatched, {f['duplicate']} duplicate, "
          f"{f['expired']} answers expired; {f['pending_answers']} answers await labels")
    r = doc["retraining"]
    print(f"retraining: {'on' if r['enabled'] else 'off'}" + (" (dry run)" if r["enabled"] and r["dry_run"] else "")
          + (f", after {r['after_windows']} alarmed windows" if r["enabled"] else ""))
    return alarm


def run(args: argparse.Namespace) -> int:
    from ray_apps.rollout import controller

    doc = controller(args.name).monitor_status.remote().result()
    alarm = print_status(doc)
    write_json_out(args.json_out, doc)
    return 1 if alarm else 0
