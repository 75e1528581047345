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
from trainers.budget import BudgetClock, StepPlan
from trainers.checkpoint import save_checkpoint
from trainers.checks import SampleCheck, fixed_sample, reached
from trainers.config import TrainJob
from trainers.data import length_grouped
from trainers.hardware import resolve_precision
from trainers.loop import classification_metrics, evaluate, train_epoch
from trainers.models import build_model, load_tokenizer, model_config
from trainers.ray_data import PadCollate
from trainers.recovery import InjectedExit, checkpoint_name, resume
from trainers.strategy import agree_min, all_reduce_sum, apply_hyperparameters, build_engine, gather_strings, relayout_schedule
from trainers.summary import ENDED_EARLY

EVAL_BATCH = 256
GROUP_WINDOW = 50  # data.group_by_length sorts windows of this many batches by length


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


def _step_hooks(epoch: int, epochs: int, config: dict[str, Any], rank: int, world: int, engine, clock, check):
    hooks = [InjectedExit(config["fault"], rank, epoch)] if config["fault"] else []
    if rank == 0:
        hooks.append(ProgressLine(epoch, epochs, config["steps_per_epoch"], world))
    if clock is not None:
        hooks.append(lambda s: clock(engine.global_step))
    if check is not None:
        hooks.append(check)
    return (lambda s: [h(s) for h in hooks]) if hooks else None


def _budget_clock(job: TrainJob, config: dict[str, Any], plan: StepPlan, engine, rank: int, world: int):
    """The time budget's step hook (None without a budget, or once the plan was timed: a resumed run
    finishes the plan it stored)."""
    if not config.get("deadline") or plan.timed or config["dry_run"]:
        return None
    check_rows = min(job.run.check_rows or config["val_rows"], config["val_rows"])
    return BudgetClock(plan, deadline=config["deadline"], budget_s=job.run.time_budget_min * 60, cap=plan.total,
                       steps_per_epoch=config["steps_per_epoch"], eval_rows=-(-config["val_rows"] // world),
                       check_every=job.run.check_every_steps, check_rows=-(-check_rows // world),
                       rows_per_step=job.micro_batch_size * job.optim.grad_accum_steps, agree=agree_min,
                       relayout=lambda total: relayout_schedule(engine, job.optim, total),
                       log=(lambda line: print(line, flush=True)) if rank == 0 else (lambda line: None))


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
    precision, why = resolve_precision(job.optim.precision, device)
    if rank == 0 and not config.get("quiet"):
        print(f"precision: {precision} ({why}); device: {device}", flush=True)
    engine = build_engine(model, job.model_copy(update={"optim": job.optim.model_copy(update={"precision": precision})}),
                          config["total_steps"], distributed=world > 1, device=device,
                          fresh_model=lambda: build_model(job.model, labels, config["num_features"]))
    tokenizer = load_tokenizer(job.model) if job.model.type == "text" else None
    own_config = None if job.model.type == "text" else model_config(job.model, len(labels), config["num_features"], labels)
    seed_everything(job.run.seed + 1000 * (rank + 1))  # distinct dropout streams per rank

    nodes = {"worker_nodes": gather_strings(ray.get_runtime_context().get_node_id())}  # this attempt's placement
    start_epoch, history, resumed, plan = 1, [], {}, StepPlan.model_validate(config["plan"])
    if not dry_run:
        state, skipped = resume(engine, rank, config["run_dir"], config.get("init_checkpoint"))
        for note in skipped if rank == 0 else []:
            print(f"skipping corrupt checkpoint {note}", flush=True)
        if state is not None:
            start_epoch, history = state["epoch"] + 1, state["history"]
            resumed = {"resumed_from": state["resumed_from"], "skipped_checkpoints": skipped}
            stored = StepPlan.model_validate(state["plan"]) if state.get("plan") else None
            if stored is not None and stored.timed and not state["from_init"]:  # laid out over its time budget
                plan = stored
                relayout_schedule(engine, job.optim, plan.total)
            if state.get("ended_by") in ENDED_EARLY and not state["from_init"]:
                # it had ended: its last report, no training (a PBT copy of an ended trial trains on)
                ray.train.report(history[-1] | nodes)
                return
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

    clock = _budget_clock(job, config, plan, engine, rank, world)
    check = None if job.run.check_every_steps is None or dry_run else SampleCheck(
        fixed_sample(val_shard.iter_batches(batch_size=EVAL_BATCH * 8, batch_format="numpy"), config["val_rows"],
                     job.run.check_rows, job.run.seed, EVAL_BATCH, pad_id),
        every=job.run.check_every_steps, engine=engine, num_labels=len(labels), device=device, precision=precision,
        rank=rank, world=world, target=job.run.stop_at, metric=job.checkpoint.metric,
        mode=job.checkpoint.resolved_mode, all_reduce=all_reduce_sum, history=history,
        log=(lambda line: print(line, flush=True)) if rank == 0 and not config.get("quiet") else (lambda line: None),
        after=clock.check_ended if clock is not None else None)

    def planned() -> StepPlan:
        return clock.plan if clock is not None else plan

    for epoch in range(start_epoch, job.run.epochs + 1):
        t0 = time.perf_counter()
        if clock is not None:
            clock.epoch_started()
        if check is not None:
            check.epoch_started(epoch)
        shuffle = {"local_shuffle_buffer_size": job.data.shuffle_buffer or None,
                   "local_shuffle_seed": job.run.seed * 100_003 + epoch * 101 + rank if job.data.shuffle_buffer else None}
        if job.data.group_by_length:
            windows = train_shard.iter_batches(batch_size=job.micro_batch_size * GROUP_WINDOW, batch_format="numpy",
                                               **shuffle)
            batches = length_grouped(windows, job.micro_batch_size, pad_id, seed=(job.run.seed, epoch, rank))
        else:
            batches = train_shard.iter_torch_batches(batch_size=job.micro_batch_size, collate_fn=collate_fn, **shuffle)
        stats = train_epoch(engine, batches, accum_steps=job.optim.grad_accum_steps, device=device,
                            precision=precision, max_steps=2 if dry_run else None,
                            on_step=_step_hooks(epoch, job.run.epochs, config, rank, world, engine, clock, check),
                            stop=lambda: engine.global_step >= planned().total or (check is not None and check.done))
        ended_by = planned().ended_by if engine.global_step >= planned().total else \
            "epochs" if epoch == job.run.epochs else None
        trained = time.perf_counter()
        checked = {} if check is None else {"train_seconds_total": check.epoch_ended(),
                                            "checks": [r.model_dump() for r in check.records]}
        # Validation is not split by Ray: every worker reads it and scores every world-th batch.
        if job.data.group_by_length:
            scored = length_grouped(val_shard.iter_batches(batch_size=EVAL_BATCH * 8, batch_format="numpy"),
                                    EVAL_BATCH, pad_id)
        else:
            scored = val_shard.iter_torch_batches(batch_size=EVAL_BATCH, collate_fn=collate_fn)
        val_batches = (b for i, b in enumerate(scored) if i % world == rank and not (dry_run and i >= 2 * world))
        sums = evaluate(engine.eval_model(), val_batches, len(labels), device, precision)
        sums |= {"train_loss_sum": torch.tensor(stats["train_loss_sum"], dtype=torch.float64),
                 "train_rows": torch.tensor(stats["train_rows"], dtype=torch.float64),
                 "train_tokens": torch.tensor(stats["train_tokens"], dtype=torch.float64)}
        sums = all_reduce_sum(sums)
        train_rows = float(sums["train_rows"])
        seconds = stats["seconds"] - (check.spent if check is not None else 0.0)  # training only
        metrics = classification_metrics(sums) | {
            "epoch": epoch, "global_step": engine.global_step,
            "train_loss": float(sums["train_loss_sum"]) / max(train_rows, 1.0),
            "train_rows": int(train_rows), "train_seconds": seconds,
            "data_wait_seconds": stats["data_wait_seconds"],
            "train_samples_per_s": train_rows / max(seconds, 1e-9),
            "epoch_seconds": time.perf_counter() - t0, "lr": engine.scheduler.get_last_lr()[0],
            "planned_steps": planned().total, "precision": precision,
        } | resumed | checked | nodes
        if float(sums["train_tokens"]):  # text models
            metrics["train_tokens_per_s"] = float(sums["train_tokens"]) / max(seconds, 1e-9)
        if not dry_run and ((check is not None and check.done) or reached(
                metrics[job.checkpoint.metric], job.run.stop_at, job.checkpoint.resolved_mode)):
            ended_by = "target"
        metrics |= {"ended_by": ended_by} if ended_by else {}
        history.append(metrics)
        if rank == 0 and not config.get("quiet"):
            print(format_epoch(epoch, job.run.epochs, metrics), flush=True)
            if ended_by == "target":
                print(f"{job.checkpoint.metric} reached run.stop_at {job.run.stop_at}: stopped in epoch {epoch} at "
                      f"step {engine.global_step}", flush=True)
            elif ended_by in ("max_steps", "time_budget"):
                print(f"the plan of {planned().total} steps is done ({ended_by.replace('_', ' ')}): stopped in epoch "
                      f"{epoch} at learning rate {metrics['lr']:.2g}", flush=True)
        if dry_run:
            ray.train.report(metrics)
            break
        name = gather_strings(checkpoint_name(config["run_dir"], epoch) if rank == 0 else "")[0]  # rank 0's choice
        with tempfile.TemporaryDirectory() as tmp:
            save_checkpoint(Path(tmp), rank=rank, engine=engine, own_config=own_config, tokenizer=tokenizer,
                            label_map=label_map,
                            trainer_state={"epoch": epoch, "history": history, "world_size": world,
                                           "lineage": config.get("lineage"), "plan": planned().model_dump(),
                                           "ended_by": ended_by},
                            job_yaml=yaml.safe_dump(json.loads(job.model_dump_json()), sort_keys=False))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=name)
        if clock is not None:
            clock.epoch_ended(time.perf_counter() - trained)
        if ended_by is not None:
            break
