"""`python -m ray_apps export`: turn a training checkpoint into a verified, versioned model package.

    python -m ray_apps export --checkpoint runs/digits_cnn --name digits --quantize int8
    python -m ray_apps export --checkpoint runs/sst2_minilm/epoch_0001 --name sst2 --promote champion

Exit codes: 0 published (and promoted, if asked); 2 bad input or refused export (parity, int8 drop,
corrupt checkpoint; one line says why); 3 published, but the promotion gate refused it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

EPILOG = """--checkpoint takes a checkpoint directory (runs/NAME/epoch_0005) or a run directory (runs/NAME),
which means the best checkpoint its result.json names. The package gets the next version number;
--promote champion then passes it through the promotion gate (see `registry promote --help`).
The registry root is --registry, else $RAYFOUNDRY_REGISTRY, else ./registry."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> ONNX/int8 model package in the registry",
                       description=__doc__.splitlines()[0], epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint dir, or run dir (its best checkpoint)")
    p.add_argument("--name", required=True, help="model name in the registry, e.g. sst2")
    p.add_argument("--registry", default=os.environ.get("RAYFOUNDRY_REGISTRY", "registry"),
                   help="registry root: path or URI (default $RAYFOUNDRY_REGISTRY or ./registry)")
    p.add_argument("--quantize", choices=["none", "int8"], help="int8: also ship model.int8.onnx (default none)")
    p.add_argument("--max-int8-drop", type=float,
                   help="refuse int8 when validation accuracy drops more than this (default 0.01 = 1 point)")
    p.add_argument("--parity-rows", type=int, help="validation rows compared torch vs ONNX (default 64)")
    p.add_argument("--parity-tolerance", type=float, help="max |logit diff| allowed (default 1e-4)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when present")
    p.add_argument("--promote", metavar="ALIAS", help="then point ALIAS (e.g. champion) at the new version")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="promotion gate tolerance on the validation metric (default 0.005)")
    p.add_argument("--json-out", type=Path, metavar="PATH", help="also write the package metadata to PATH")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from trainers.checkpoint import CheckpointError
    from trainers.config import ConfigError
    from trainers.data import DataError
    from trainers.export import ExportError, ExportJob, export
    from trainers.package import PackageError
    from trainers.registry import GateRefused, Registry, RegistryError
    from trainers.run import quiet_libraries

    quiet_libraries()
    try:
        # Unset options take ExportJob's defaults, so each default is written once.
        given = {k: getattr(args, k) for k in ("quantize", "max_int8_drop", "parity_rows", "parity_tolerance", "device")
                 if getattr(args, k) is not None}
        spec = ExportJob(checkpoint=args.checkpoint, name=args.name, registry=args.registry, **given)
        meta = export(spec)
    except ValidationError as e:
        err = e.errors()[0]
        print(f"error: --{'-'.join(str(p) for p in err['loc']).replace('_', '-')}: {err['msg']}", file=sys.stderr)
        return 2
    except (ExportError, CheckpointError, ConfigError, DataError, PackageError, RegistryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(meta, indent=2))
    ref = f"{meta['name']}:{meta['version']}"
    print(f"done: {ref} in {args.registry}  ({', '.join(meta['files'])})")
    if args.promote:
        try:
            event = Registry(args.registry).promote(ref, args.promote, tolerance=args.tolerance)
        except GateRefused as e:
            print(f"not promoted: {e}", file=sys.stderr)
            return 3
        gate = f"; gate: {event['gate']['summary']}" if event["gate"] else ""
        print(f"promoted: {ref} is now {meta['name']}@{args.promote}{gate}")
    return 0
