"""Failure recovery: where a (re)started worker group resumes from, a log of worker-group failures,
and a fault-injection hook for chaos tests.

Resume order: the newest complete checkpoint of the run, whether or not Ray Train registered it
(a worker may die right after every rank uploaded an epoch's checkpoint, before the controller
consumed the report), then older ones. A checkpoint whose checksums do not verify, or that lacks a
rank's files, is skipped with the faulty file named, so one truncated upload costs an epoch, not
the run.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train import UserCallback

from rayfoundry import storage
from rayfoundry.errors import CheckpointError
from trainers.checkpoint import load_trainer_state

FAULT_ENV = "RAYFOUNDRY_INJECT_EXIT"  # "rank=1,epoch=2,step=5,marker=/tmp/once": os._exit(1) there, once


def new_run_id() -> str:
    return time.strftime("%Y%m%dT%H%M%S") + "-" + uuid.uuid4().hex[:6]


def _kept_checkpoints(run_dir: str) -> list[ray.train.Checkpoint]:
    fs, path = storage.filesystem(run_dir)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    dirs = sorted((i.path for i in infos if i.type == pafs.FileType.Directory and i.base_name.startswith("epoch_")),
                  reverse=True)
    return [ray.train.Checkpoint(path=d, filesystem=fs) for d in dirs]


def checkpoint_name(run_dir: str, epoch: int) -> str:
    """The directory an epoch's checkpoint goes to: epoch_NNNN, or epoch_NNNN_K when a checkpoint of that
    name is already there (one skipped as corrupt: the run resumed from before it and trains that epoch
    again). Ray Train lists every reported checkpoint: a second epoch_NNNN would be deleted with the first."""
    base = f"epoch_{epoch:04d}"
    name, k = base, 1
    while storage.kind(storage.join(run_dir, name)) != "missing":
        name, k = f"{base}_{k}", k + 1
    return name


def resume(engine, rank: int, run_dir: str, init: str | None = None) -> tuple[dict[str, Any] | None, list[str]]:
    """Restore the newest usable checkpoint into `engine`; returns its trainer state (or None for a fresh
    start) and one note per checkpoint skipped as corrupt. `init` (a checkpoint of another run, e.g. the
    one a Tune trial continues from) is used only when this run has none of its own; its state then
    has `from_init` set."""
    latest = ray.train.get_checkpoint()
    candidates = _kept_checkpoints(run_dir)
    if latest is not None and Path(latest.path).name not in {Path(c.path).name for c in candidates}:
        candidates.insert(0, latest)
    if init is not None:
        fs, path = storage.filesystem(init)
        candidates.append(ray.train.Checkpoint(path=path, filesystem=fs))
    if not candidates:
        return None, []
    skipped = []
    for checkpoint in candidates:
        try:
            with checkpoint.as_directory() as d:
                state = load_trainer_state(Path(d), engine, rank)
            from_init = init is not None and checkpoint is candidates[-1]
            state["resumed_from"] = init if from_init else Path(checkpoint.path).name
            state["from_init"] = from_init
            return state, skipped
        except CheckpointError as e:
            skipped.append(f"{Path(checkpoint.path).name}: {e}".replace(f"{Path(checkpoint.path).name}: /", "/"))
    raise CheckpointError("no usable checkpoint: " + "; ".join(skipped))


class FailureLog(UserCallback):
    """Runs on the Train controller: records each worker-group failure as
    `<run_dir>/failures/<run_id>-<n>.json`, so the driver can report how many restarts it took."""

    def __init__(self, run_dir: str, run_id: str):
        self.run_dir, self.run_id, self.count = run_dir, run_id, 0

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        self.count += 1
        record = {"run_id": self.run_id, "failure": self.count, "time": time.time(),
                  "ranks": {str(r): f"{type(e).__name__}: {e}"[:2000] for r, e in worker_exceptions.items()}}
        fs, path = storage.filesystem(f"{self.run_dir}/failures")
        fs.create_dir(path, recursive=True)
        with fs.open_output_stream(f"{path}/{self.run_id}-{self.count:03d}.json") as f:
            f.write(json.dumps(record, indent=1).encode())


def count_failures(run_dir: str, run_id: str) -> int:
    fs, path = storage.filesystem(f"{run_dir}/failures")
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sum(1 for i in infos if i.base_name.startswith(run_id))


def fault_from_env() -> dict[str, str] | None:
    """Parse RAYFOUNDRY_INJECT_EXIT on the driver; the spec travels to workers in the loop config."""
    spec = os.environ.get(FAULT_ENV)
    return dict(part.split("=", 1) for part in spec.split(",")) if spec else None


class InjectedExit:
    """on_step hook: the chosen rank dies with os._exit(1) at the chosen step, once (marker file)."""

    def __init__(self, fault: dict[str, str] | None, rank: int, epoch: int):
        self.armed = (fault is not None and int(fault["rank"]) == rank and int(fault["epoch"]) == epoch
                      and not Path(fault["marker"]).exists())
        self.fault = fault

    def __call__(self, s: dict[str, float]) -> None:
        if self.armed and s["steps"] == int(self.fault["step"]):
            Path(self.fault["marker"]).write_text(f"exited at step {s['steps']}\n")
            os._exit(1)
