"""The Ray Train worker function: build, resume, then epoch by epoch train, evaluate, checkpoint.

Runs in each TorchTrainer worker (or once, in Train's local mode, for --dry-run).
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import yaml

from rayfoundry.ray_env import quiet_ray_data_console
from trainers.checkpoint import save_checkpoint
from trainers.config import TrainJob
from trainers.loop import classification_metrics, evaluate, train_epoch
from trainers.models import build_model, load_tokenizer, model_config
from trainers.ray_data import PadCollate
from trainers.recovery import InjectedExit, resume
from trainers.strategy import all_reduce_sum, apply_hyperparameters, build_engine

EVAL_BATCH = 256


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def quiet_worker_logs() -> None:
    """Keep Ray Train's per-report INFO lines off the console so the epoch lines stay readable.
    One of them logs through a logger named by its file path, outside the `ray.train` tree. This runs
    in the Train worker processes this job owns, like an entry point: nothing else shares them."""
    import transformers
    from ray.train.v2._internal.execution import context

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()

    for name in ("ray.train", context.__file__):
        logging.getLogger(name).setLevel(logging.WARNING)
    quiet_ray_data_console()


def format_epoch(epoch: int, epochs: int, m: dict[str, float]) -> str:
    return (f"epoch {epoch}/{epochs}  train_loss {m['train_loss']:.4f}  val_loss {m['val_loss']:.4f}  "
            f"val_accuracy {m['val_accuracy']:.4f}  val_macro_f1 {m['val_macro_f1']:.4f}  "
            f"samples/s {m['train_samples_per_s']:.0f}  data_wait {m['data_wait_seconds']:.1f}s  step {m['global_step']}  "
            f"({m['epoch_seconds']:.1f}s)")


class ProgressLine:
    """Rank 0's in-epoch progress, at most one line per `every_s` seconds, so long epochs show life."""

    def __init__(self, epoch: int, epochs: int, steps_per_epoch: int, world: int, every_s: float = 30.0):
        self.prefix, self.total, self.world, self.every_s = f"epoch {epoch}/{epochs}", steps_per_epoch, world, every_s
        self.last = time.perf_counter()

    def __call__(self, s: dict[str, float]) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every_s and s["steps"] < self.total:
            self.last = now
            print(f"{self.prefix}  step {s['steps']}/{self.total}  train_loss {s['loss']:.4f}  "
                  f"samples/s {s['rows'] * self.world / s['seconds']:.0f}", flush=True)


def _step_hooks(epoch: int, epochs: int, config: dict[str, Any], rank: int, world: int):
    hooks = [InjectedExit(config["fault"], rank, epoch)] if config["fault"] else []
    if rank == 0:
        hooks.append(ProgressLine(epoch, epochs, config["steps_per_epoch"], world))
    return (lambda s: [h(s) for h in hooks]) if hooks else None


def train_loop_per_worker(config: dict[str, Any]) -> None:
    job = TrainJob.model_validate(config["job"])
    quiet_worker_logs()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    for key, value in (("LOCAL_RANK", ctx.get_local_rank()), ("RANK", rank), ("WORLD_SIZE", world)):
        os.environ.setdefault(key, str(value))  # DeepSpeed reads these; Train's local mode sets none
    torch.set_num_threads(job.scaling.threads_per_worker)
    device = ray.train.torch.get_device()
    labels, dry_run = config["labels"], config["dry_run"]

    seed_everything(job.run.seed)  # identical initial weights on every rank
    model = build_model(job.model, labels, config["num_features"])
    if config["feature_moments"] and getattr(job.model, "standardize", False):
        mean, std = config["feature_moments"]
        model.mean.copy_(torch.tensor(mean)), model.std.copy_(torch.tensor(std))
    engine = build_engine(model, job, config["total_steps"], distributed=world > 1, device=device,
                          fresh_model=lambda: build_model(job.model, labels, config["num_features"]))
    tokenizer = load_tokenizer(job.model) if job.model.type == "text" else None
    own_config = None if job.model.type == "text" else model_config(job.model, len(labels), config["num_features"], labels)
    seed_everything(job.run.seed + 1000 * (rank + 1))  # distinct dropout streams per rank

    start_epoch, history, resumed = 1, [], {}
    if not dry_run:
        state, skipped = resume(engine, rank, config["run_dir"], config.get("init_checkpoint"))
        for note in skipped if rank == 0 else []:
            print(f"skipping corrupt checkpoint {note}", flush=True)
        if state is not None:
            start_epoch, history = state["epoch"] + 1, state["history"]
            resumed = {"resumed_from": state["resumed_from"], "skipped_checkpoints": skipped}
            if state["from_init"]:  # another run's state, this job's hyperparameters (PBT exploit)
                apply_hyperparameters(engine, job.optim)
            if rank == 0:  # checkpoints are taken at epoch ends: a failed epoch restarts from its beginning
                print(f"resumed from {state['resumed_from']} (epoch {state['epoch']}, step {engine.global_step}); "
                      f"epoch {start_epoch} starts from its first batch", flush=True)

    pad_id = tokenizer.pad_token_id if tokenizer is not None else 0
    collate_fn = PadCollate(pad_id)
    train_shard, val_shard = ray.train.get_dataset_shard("train"), ray.train.get_dataset_shard("val")
    label_map = {"labels": labels, "label_column": job.data.label_column, "text_column": job.data.text_column,
                 "feature_columns": config["feature_columns"]}

    for epoch in range(start_epoch, job.run.epochs + 1):
        t0 = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=job.micro_batch_size, collate_fn=collate_fn,
            local_shuffle_buffer_size=job.data.shuffle_buffer or None,
            local_shuffle_seed=job.run.seed * 100_003 + epoch * 101 + rank if job.data.shuffle_buffer else None,
        )
        stats = train_epoch(engine, batches, accum_steps=job.optim.grad_accum_steps, device=device,
                            precision=job.optim.precision, max_steps=2 if dry_run else None,
                            on_step=_step_hooks(epoch, job.run.epochs, config, rank, world))
        # Validation is not split by Ray: every worker reads it and scores every world-th batch.
        val_batches = (b for i, b in enumerate(val_shard.iter_torch_batches(batch_size=EVAL_BATCH, collate_fn=collate_fn))
                       if i % world == rank and not (dry_run and i >= 2 * world))
        sums = evaluate(engine.eval_model(), val_batches, len(labels), device, job.optim.precision)
        sums |= {"train_loss_sum": torch.tensor(stats["train_loss_sum"], dtype=torch.float64),
                 "train_rows": torch.tensor(stats["train_rows"], dtype=torch.float64)}
        sums = all_reduce_sum(sums)
        train_rows = float(sums["train_rows"])
        metrics = classification_metrics(sums) | {
            "epoch": epoch, "global_step": engine.global_step,
            "train_loss": float(sums["train_loss_sum"]) / max(train_rows, 1.0),
            "train_rows": int(train_rows), "train_seconds": stats["seconds"],
            "data_wait_seconds": stats["data_wait_seconds"],
            "train_samples_per_s": train_rows / max(stats["seconds"], 1e-9),
            "epoch_seconds": time.perf_counter() - t0,
        } | resumed
        history.append(metrics)
        if rank == 0 and not config.get("quiet"):
            print(format_epoch(epoch, job.run.epochs, metrics), flush=True)
        if dry_run:
            ray.train.report(metrics)
            break
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), rank=rank, engine=engine, own_config=own_config, tokenizer=tokenizer,
                            label_map=label_map,
                            trainer_state={"epoch": epoch, "history": history, "world_size": world,
                                           "lineage": config.get("lineage")},
                            job_yaml=yaml.safe_dump(json.loads(job.model_dump_json()), sort_keys=False))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=f"epoch_{epoch:04d}")
