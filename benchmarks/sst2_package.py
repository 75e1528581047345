"""The SST-2 MiniLM package the inference benchmarks serve: exported (with int8) from a trained
checkpoint once, then reused; without a checkpoint, a 1-epoch run on 8,000 SST-2 rows is trained."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CHECKPOINT = REPO / "runs" / "sst2_minilm"
DEFAULT_REGISTRY = str(REPO / "runs" / "bench_registry")


def checkpoint_or_train(path: Path) -> Path:
    if path.exists():
        return path
    print(f"{path} not found: training a 1-epoch MiniLM on 8,000 SST-2 rows first (~5 min)", flush=True)
    subprocess.run([sys.executable, "-m", "ray_apps", "train", "--config", "ray_apps/configs/sst2_minilm.yaml",
                    "--set", "data.max_rows=8000", "--set", "run.epochs=1", "--set", f"run.name={path.name}",
                    "--set", f"run.storage_path={path.parent}"], cwd=REPO, check=True)
    return path


def bench_package(ckpt: Path, registry: str):
    """The package exported from `ckpt` with int8, reused from an earlier run when there is one."""
    from model_registry.export import ExportJob, export, resolve_checkpoint
    from model_registry.registry import Registry

    reg, source = Registry(registry), str(resolve_checkpoint(str(ckpt))[0].resolve())
    for version in reversed(reg.versions("sst2-bench")):
        meta = reg.metadata("sst2-bench", version)
        if meta.source.checkpoint == source and "onnx-int8" in meta.engines():
            return reg.open(f"sst2-bench:{version}")
    meta = export(ExportJob(checkpoint=str(ckpt), name="sst2-bench", registry=registry, quantize="int8",
                            max_int8_drop=1.0))  # record the int8 drop here, never refuse
    return reg.open(meta.ref)
