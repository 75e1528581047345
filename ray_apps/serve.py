"""`python -m ray_apps serve`: serve registry models over HTTP on Ray Serve, locally or on RAY_ADDRESS.

    python -m ray_apps serve --model digits@champion
    python -m ray_apps serve --model sst2@champion --model digits:2 --engine onnx --port 8000
    NO_WAIT=1 python -m ray_apps serve --model digits@champion      # answer the samples, then exit

Starts Serve on 127.0.0.1 (--host to change) with HAProxy as its ingress when this command starts
Ray itself, deploys one application per model plus the server application
(serve_deployments.app.applications), sends the sample instances each package carries through /v1
and the V2 protocol, prints the answers and the curl commands that ask the same, then serves until
Ctrl-C. With no --num-cpus, the models share this machine's cores. Exit codes: 0 ok, 2 bad arguments
or models.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import time

from ray_apps.options import add_registry

EPILOG = """The same application deploys declaratively: cluster_configs/serve/digits.yaml
(`serve deploy`). Endpoints: POST /v1/models/NAME:predict {"instances": [...]}; GET /v2/health/ready;
GET /v2/models/NAME; POST /v2/models/NAME/infer (KServe V2, JSON or binary tensors); GET
/v2/models/NAME/stats. Metrics go to Ray's Prometheus endpoint (rayfoundry_* series)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve registry models over HTTP (Ray Serve)", description=__doc__.splitlines()[0],
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", dest="models", action="append", required=True, metavar="REF",
                   help="NAME, NAME:VERSION or NAME@ALIAS (repeatable)")
    add_registry(p)
    p.add_argument("--engine", choices=["auto", "onnx", "onnx-int8", "torch"], default="auto",
                   help="auto (default): int8 when the package ships it (it passed the export gate), else onnx")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--num-cpus", type=float, help="CPUs per model replica (default: this machine's cores, shared "
                   "by the models, when this command starts Ray; 1 on a running cluster)")
    p.add_argument("--ingress", choices=["haproxy", "proxy"], default="haproxy",
                   help="when this command starts Ray: HAProxy in front of the model replicas (default), or "
                   "Serve's Python proxy")
    p.add_argument("--no-wait", action="store_true", default=os.environ.get("NO_WAIT") == "1",
                   help="exit after the sample requests (also NO_WAIT=1)")


def _show(method: str, url: str, body: dict | None) -> None:
    import requests

    reply = requests.request(method, url, json=body, timeout=60)
    data = json.dumps(body, separators=(",", ":")) if body is not None else None
    curl = f"curl -s -X {method} {url}" + (f" -H 'content-type: application/json' -d {shlex.quote(data)}" if data else "")
    print(f"\n$ {curl}\n{reply.status_code} {reply.text}")


def run(args: argparse.Namespace) -> int:
    from model_registry.registry import Registry
    from rayfoundry.ray_env import connect_ray
    from serve_deployments.app import applications, ingress_env, local_cpus_per_model, run_applications

    registry = Registry(args.registry)
    packages = [registry.open(ref) for ref in args.models]  # fail here, before Ray, on a bad ref or file
    starts_ray = not os.environ.get("RAY_ADDRESS")
    num_cpus = args.num_cpus or (local_cpus_per_model(len(packages)) if starts_ray else 1.0)
    apps = applications({"registry": args.registry, "models": args.models, "engine": args.engine, "num_cpus": num_cpus})
    if starts_ray:  # Serve reads its ingress settings when Ray starts
        os.environ.update(ingress_env(args.ingress))
    import logging

    from ray import serve

    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # no INFO line per deployed application
    connect_ray()
    serve.start(http_options={"host": args.host, "port": args.port},
                logging_config={"log_level": "WARNING", "enable_access_log": False})  # the proxy's access log too
    run_applications(apps)
    base = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    print(f"serving {', '.join(p.ref for p in packages)} at {base} ({num_cpus:g} CPUs per model replica)")
    for pkg in packages:
        name, samples = pkg.metadata.name, pkg.metadata.samples
        if not samples:  # packages exported before they carried samples
            print(f"\n{name}: this package carries no sample inputs; POST {base}/v1/models/{name}:predict "
                  '{"instances": [...]}')
            continue
        _show("POST", f"{base}/v1/models/{name}:predict", {"instances": samples})
        datatype = "BYTES" if pkg.inputs.kind == "text" else "FP32"
        shape = [len(samples)] if datatype == "BYTES" else [len(samples), len(samples[0])]
        data = samples if datatype == "BYTES" else [x for row in samples for x in row]
        _show("POST", f"{base}/v2/models/{name}/infer",
              {"inputs": [{"name": "text" if datatype == "BYTES" else "features", "shape": shape,
                           "datatype": datatype, "data": data}]})
    _show("GET", f"{base}/v2/health/ready", None)
    if not args.no_wait:
        print("\nserving until Ctrl-C")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    # Remove these applications only: on a shared cluster other Serve apps keep running. A local Ray this
    # process started ends with it, Serve's controller included (serve.shutdown() would kill the
    # controller while its own graceful-shutdown task is still pending, which the raylet reports).
    import ray

    for app in reversed(apps):
        serve.delete(app["name"])
    ray.shutdown()
    return 0
