"""`python -m ray_apps export`: turn a training checkpoint into a verified, versioned model package.

    python -m ray_apps export --checkpoint runs/digits_cnn --name digits --quantize int8
    python -m ray_apps export --checkpoint runs/sst2_minilm/epoch_0001 --name sst2 --promote champion

Exit codes: 0 published (and promoted, if asked); 2 bad input or refused export (parity, int8 drop,
corrupt checkpoint; one line says why); 3 published, but the promotion gate refused it.
"""

from __future__ import annotations

import argparse

from ray_apps.options import add_json_out, add_registry, write_json_out

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
    add_registry(p)
    p.add_argument("--quantize", choices=["none", "int8"], help="int8: also ship model.int8.onnx (default none)")
    p.add_argument("--max-int8-drop", type=float,
                   help="refuse int8 when validation accuracy drops more than this (default 0.01 = 1 point)")
    p.add_argument("--parity-rows", type=int, help="validation rows compared torch vs ONNX (default 64)")
    p.add_argument("--parity-tolerance", type=float, help="max |logit diff| allowed (default 1e-4)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default auto: CUDA when present")
    p.add_argument("--promote", metavar="ALIAS", help="then point ALIAS (e.g. champion) at the new version")
    p.add_argument("--tolerance", type=float, default=0.005,
                   help="promotion gate tolerance on the validation metric (default 0.005)")
    add_json_out(p, "the package metadata")


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from model_registry.export import ExportJob, export
    from model_registry.registry import Registry
    from rayfoundry.errors import ConfigError, describe_validation_error
    from rayfoundry.ray_env import check_cluster_paths

    # Unset options take ExportJob's defaults, so each default is written once.
    given = {k: getattr(args, k) for k in ("quantize", "max_int8_drop", "parity_rows", "parity_tolerance", "device")
             if getattr(args, k) is not None}
    try:
        spec = ExportJob(checkpoint=args.checkpoint, name=args.name, registry=args.registry, **given)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, as_flags=True)) from None
    check_cluster_paths({"--registry": args.registry})  # a submitted job's working dir is a temporary copy
    meta = export(spec)
    write_json_out(args.json_out, meta)
    print(f"done: {meta.ref} in {args.registry}  ({', '.join(meta.files)})")
    if args.promote:
        event = Registry(args.registry).promote(meta.ref, args.promote, tolerance=args.tolerance)
        gate = f"; gate: {event.gate.summary}" if event.gate else ""
        print(f"promoted: {meta.ref} is now {meta.name}@{args.promote}{gate}")
    return 0
