"""Checkpoints as Hugging Face-style directories; tensors in safetensors, everything else JSON.

Layout (rank 0 writes all but the per-rank files; Ray Train merges the workers' directories):
  model.safetensors, config.json      model (loads with from_pretrained for text models)
  tokenizer files                     text models
  label_map.json                      labels in id order and the columns they came from
  optimizer.safetensors               AdamW state, param groups in its metadata (DDP)
  deepspeed/                          DeepSpeed's own sharded engine state (DeepSpeed runs)
  trainer_state.json                  epoch, global step, scheduler, metrics history
  rng_rank{R}.safetensors             every RNG of worker R, for exact resume
  checksums.rank{R}.json              sha256 of each file worker R wrote
Nothing here unpickles. (DeepSpeed's loader reads its own shards with torch.load; resume hands it
only files whose sha256 matches what this run wrote, and export/serving read safetensors only.)
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rayfoundry import storage
from rayfoundry.errors import CheckpointError
from trainers.models import load_model, save_model

__all__ = ["CheckpointError", "load_trainer_state", "save_checkpoint", "sha256", "verify_checksums"]


sha256 = storage.sha256


def write_checksums(directory: Path, files: list[Path], rank: int) -> None:
    sums = {str(p.relative_to(directory)): sha256(p) for p in sorted(files) if p.is_file()}
    (directory / f"checksums.rank{rank}.json").write_text(json.dumps(sums, indent=1, sort_keys=True))


def _manifests(directory: Path) -> dict[Path, dict[str, str]]:
    manifests = sorted(directory.glob("checksums.rank*.json"))
    if not manifests:
        raise CheckpointError(f"{directory}: no checksums.rank*.json; not a complete rayfoundry checkpoint")
    out = {}
    for manifest in manifests:
        try:
            listed = json.loads(manifest.read_text())
        except ValueError as e:
            raise CheckpointError(f"{manifest}: unreadable checksum manifest ({e})") from None
        if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
            raise CheckpointError(f"{manifest}: not a checksum manifest (file name -> sha256)")
        out[manifest] = listed
    return out


def manifest_files(directory: Path) -> list[str]:
    """Every file name the checkpoint's checksum manifests list (relative to the checkpoint)."""
    return sorted({name for listed in _manifests(directory).values() for name in listed})


def verify_checksums(directory: Path) -> None:
    """Each file every manifest lists exists inside the checkpoint, is a regular file (not a symlink)
    and has the listed sha256."""
    root = directory.resolve()
    for manifest, listed in _manifests(directory).items():
        for name, expected in listed.items():
            path = directory / name
            if path.is_symlink():
                raise CheckpointError(f"{path}: a symlink in the checkpoint; checkpoints hold regular files only")
            if not path.resolve().is_relative_to(root):
                raise CheckpointError(f"{manifest}: lists {name!r}, outside the checkpoint")
            if not path.is_file():
                raise CheckpointError(f"{path}: missing from checkpoint (listed in {manifest.name})")
            if sha256(path) != expected:
                raise CheckpointError(f"{path}: sha256 mismatch; the file is truncated or altered")


def save_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().contiguous().cpu()
            else:
                scalars[f"{idx}.{key}"] = value
    meta = {"param_groups": json.dumps(sd["param_groups"]), "scalars": json.dumps(scalars)}
    save_file(tensors, str(path), metadata=meta)


def load_optimizer(optimizer: torch.optim.Optimizer, path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    state: dict[int, dict[str, Any]] = {}
    for flat, value in list(tensors.items()) + list(json.loads(meta["scalars"]).items()):
        idx, key = flat.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    try:
        optimizer.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    except ValueError as e:  # other parameters than this model's (e.g. a model layout changed since)
        raise CheckpointError(f"{path}: the optimizer state does not fit this model's parameters ({e}); it was "
                              f"saved for another model layout: --restart trains the run again") from None


def scheduler_state(scheduler) -> dict[str, Any]:
    sd = scheduler.state_dict()
    return {k: v for k, v in sd.items() if k != "lr_lambdas"} | {"lr_lambdas": [None] * len(sd.get("lr_lambdas", []))}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    np_state = np.random.get_state()
    tensors = {"torch": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps(random.getstate()), "numpy": json.dumps([np_state[0], *np_state[2:]])}
    return tensors, meta


def restore_rng(path: Path) -> None:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    t = load_file(str(path))
    torch.set_rng_state(t["torch"])
    if "cuda" in t and torch.cuda.is_available():
        torch.cuda.set_rng_state(t["cuda"])
    version, state, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(state), gauss))
    name, *rest = json.loads(meta["numpy"])
    np.random.set_state((name, t["numpy_keys"].numpy().astype(np.uint32), *rest))


def save_checkpoint(directory: Path, *, rank: int, engine, own_config: dict | None, tokenizer, label_map: dict,
                    trainer_state: dict, job_yaml: str) -> None:
    """Write this worker's part of an epoch checkpoint into `directory`. Every rank must call it: a
    sharded engine gathers the full weights collectively."""
    directory.mkdir(parents=True, exist_ok=True)
    before = set(directory.rglob("*"))
    full_weights = engine.full_state_dict()  # collective for ZeRO-3; None where the module is whole
    engine.save_training_state(directory, rank)
    if rank == 0:
        save_model(engine.unwrapped(), directory, own_config, full_weights)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
        (directory / "label_map.json").write_text(json.dumps(label_map, indent=2))
        state = trainer_state | {"global_step": engine.global_step, "scheduler": scheduler_state(engine.scheduler)}
        (directory / "trainer_state.json").write_text(json.dumps(state, indent=2))
        (directory / "job.yaml").write_text(job_yaml)
    tensors, meta = rng_state()
    save_file(tensors, str(directory / f"rng_rank{rank}.safetensors"), metadata=meta)
    write_checksums(directory, [p for p in directory.rglob("*") if p not in before and p.is_file()], rank)


def load_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a consolidated model.safetensors into `model`, refusing one of another architecture."""
    weights = load_file(str(path))
    expected = model.state_dict()
    resized = [k for k, v in weights.items() if k in expected and v.shape != expected[k].shape]
    if resized:
        raise CheckpointError(f"{path}: does not match the model "
                              f"(other shapes for {resized[:3]}; was the model config changed?)")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    # save_pretrained drops tied weights (e.g. decoder tied to embeddings); anything else is an error.
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or [k for k in missing if k not in tied]:
        raise CheckpointError(f"{path}: does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


def load_trainer_state(directory: Path, engine, rank: int) -> dict[str, Any]:
    """Verify checksums, then restore the engine's state (weights, optimizer, scheduler), the step and
    this rank's RNG."""
    verify_checksums(directory)
    state = json.loads((directory / "trainer_state.json").read_text())
    for r in range(state.get("world_size", 1)):
        if not (directory / f"checksums.rank{r}.json").is_file():
            raise CheckpointError(f"{directory / f'checksums.rank{r}.json'}: missing; rank {r} never finished "
                                  "writing this checkpoint")
    engine.load_training_state(directory, state)
    engine.global_step = state["global_step"]
    rng_file = directory / f"rng_rank{rank}.safetensors"
    if rng_file.exists():
        restore_rng(rng_file)
    return state


def load_for_inference(directory: Path) -> tuple[torch.nn.Module, dict]:
    """Model and label map from a checkpoint, after checking every file's sha256."""
    verify_checksums(directory)
    return load_model(directory), json.loads((directory / "label_map.json").read_text())
