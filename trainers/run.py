"""The training driver: check the run's config against what it was started with, prepare data, fit a
TorchTrainer, write the `RunSummary` (result.json)."""

from __future__ import annotations

import json
import math
import time

from pydantic import ValidationError

from rayfoundry import storage
from rayfoundry.errors import ConfigError, DataError
from rayfoundry.ray_env import check_cluster_paths, connect_ray
from tracking.fingerprint import changed_sources, fingerprint_data
from tracking.records import DataFingerprint, Lineage, TrackingRef
from tracking.tracker import Tracker, build_lineage, flatten, lineage_tags
from trainers.budget import SKIPPED_STEPS, WARMUP_STEPS, initial_plan
from trainers.config import TrainJob
from trainers.hardware import NodeShape, resolve_scaling
from trainers.summary import CONFIG_FILE, ENDED_EARLY, RESULT_FILE, RunSummary, parse_summary

LINEAGE_FILE = "data_fingerprint.json"  # the data a run directory was started on


def run_dir(job) -> str:
    """<storage>/<name> of a job's `run` section (a TrainJob's, or a sweep's)."""
    return storage.join(storage.resolve(job.run.storage_path), job.run.name)


def cluster_nodes() -> list[NodeShape]:
    """The connected Ray cluster's alive nodes."""
    import ray

    return [NodeShape(cpus=n["Resources"].get("CPU", 0), gpus=n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["Alive"]]


def shared_places(job: TrainJob) -> dict[str, str | None]:
    """The paths of a job that processes on other nodes read or write (built-in sklearn data excepted)."""
    places = {"run.storage_path": job.run.storage_path, "model.pretrained_path": getattr(job.model, "pretrained_path", None)}
    places |= {f"data.{k}": p for k, p in (("train_path", job.data.train_path),
                                           ("validation_path", job.data.validation_path))
               if p and not p.startswith("sklearn:")}
    if job.tracking.backend == "mlflow":
        places["tracking.uri"] = job.tracking.uri
    return places


def config_changes(stored: dict, new: dict) -> list[str]:
    """Fields whose values differ between two resolved TrainJobs (as JSON), as `field: old -> new`.
    The run's place (run.name, run.storage_path), run.epochs (extending a run) and tracking do not count."""
    old, now = flatten(stored), flatten(new)
    ignored = {"run.name", "run.storage_path", "run.epochs"}
    return [f"{k}: {old.get(k)!r} -> {now.get(k)!r}" for k in sorted(old.keys() | now.keys())
            if k not in ignored and not k.startswith("tracking.") and old.get(k) != now.get(k)]


def check_same_config(job: TrainJob, out_dir: str, previous: RunSummary | None) -> None:
    """Refuse to resume or return a run that was started with another config: its checkpoints and
    result were made from other data or settings. Runs from before job.json have nothing to compare."""
    stored = storage.read_json(storage.join(out_dir, CONFIG_FILE)) or (previous.config if previous else None)
    if stored is None:
        return
    try:  # fields added since the run started take their defaults, which keep the earlier behaviour
        stored = json.loads(TrainJob.model_validate(stored).model_dump_json())
    except ValidationError:
        pass  # a config this version no longer accepts: compared as written
    changes = config_changes(stored, json.loads(job.model_dump_json()))
    if changes:
        more = f" (+{len(changes) - 5} more)" if len(changes) > 5 else ""
        raise ConfigError(f"{out_dir} holds a run started with another config ({'; '.join(changes[:5])}{more}); "
                          f"--restart trains it again from scratch, or set run.name to start a new run beside it")


def open_tracking(job: TrainJob, out_dir: str, tracked_by: TrackingRef | None, log) -> tuple[Tracker, Lineage]:
    """Fingerprint the data, then open the run's tracker (or note the sweep's, for a trial) and build its
    lineage: what every checkpoint and package of this run carries. A run directory started on other
    data is refused, naming the file that changed, as one started with another config is."""
    job_json = json.loads(job.model_dump_json())
    data = fingerprint_data(job.data.train_path, job.data.validation_path)
    lineage_path = storage.join(out_dir, LINEAGE_FILE)
    stored = storage.read_text(lineage_path)
    if stored is not None:
        changed = changed_sources(DataFingerprint.model_validate_json(stored), data)
        if changed:
            raise DataError(f"{out_dir} holds a run started on other data ({'; '.join(changed)}); --restart trains it "
                            f"again from scratch, or set run.name to start a new run beside it")
    else:
        storage.write_text(lineage_path, data.model_dump_json(indent=2))
    lineage = build_lineage(job_json, data)
    tracker = Tracker.open(job.tracking, storage_path=job.run.storage_path, run_dir=out_dir, run_name=job.run.name,
                           params=flatten(job_json), tags=lineage_tags(lineage, "train", out_dir), log=log)
    lineage.tracking = tracker.ref if not tracker.off else tracked_by
    return tracker, lineage


def train(job: TrainJob, *, dry_run: bool = False, restart: bool = False, log=print, callbacks: list | None = None,
          init_checkpoint: str | None = None, quiet: bool = False, tracked_by: TrackingRef | None = None,
          started_at: float | None = None) -> RunSummary:
    """Run (or resume) the job and return its summary (also written to result.json). `started_at` (a
    time.time()) is when the command started, which run.time_budget_min counts from; unset: now.

    For Tune trials: `callbacks` are extra Train callbacks (the trial's report relay), `init_checkpoint`
    a checkpoint the run starts from when it has none of its own, `quiet` drops the per-epoch lines,
    `tracked_by` the sweep's tracking of this trial (the trial's job has tracking off)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from tracking.train_callback import TrainTracking
    from trainers.models import default_text_model_dir
    from trainers.ray_data import check_local_paths, prepare_data, quiet_ray_data
    from trainers.recovery import FailureLog, count_failures, fault_from_env, new_run_id
    from trainers.worker import train_loop_per_worker

    started_at = time.time() if started_at is None else started_at
    check_cluster_paths(shared_places(job))  # on several nodes, every node must reach the same places
    check_local_paths(job.data)  # a bad path is an error even for a run that already finished
    out_dir = run_dir(job)
    result_path = storage.join(out_dir, RESULT_FILE)
    if restart and not dry_run and storage.delete_dir(out_dir):
        log(f"--restart: removed {out_dir}")
    previous = None
    if not dry_run:
        text = storage.read_text(result_path)
        previous = parse_summary(text) if text is not None else None
        check_same_config(job, out_dir, previous)
    if previous and previous.ended_by in ENDED_EARLY:
        log(f"{job.run.name} already finished: its {previous.ended_by.replace('_', ' ')} ended it at step "
            f"{previous.global_step}; --restart trains again")
        return previous
    if previous and (previous.epochs_completed or 0) >= job.run.epochs:
        log(f"{job.run.name} already finished {previous.epochs_completed} epochs; "
            f"--restart trains again, --set run.epochs=N continues")
        return previous

    if dry_run:
        job = job.model_copy(deep=True)
        job.data.max_rows = min(job.data.max_rows or 256, 256)
    connect_ray()
    quiet_ray_data()
    started = time.time()
    written, choice = job, resolve_scaling(job.scaling, cluster_nodes())
    job = job.scaled(choice)  # what runs; job.json keeps what was written (auto stays auto on a rerun)
    if "auto" in (written.scaling.num_workers, written.scaling.threads_per_worker):
        log(f"scaling: {choice.reason}")
    warming = None if dry_run or tracked_by else Tracker.warm_up(job.tracking, storage_path=job.run.storage_path,
                                                                  run_dir=out_dir)
    tokenizer_path = (job.model.pretrained_path or default_text_model_dir()) if job.model.type == "text" else None
    data = prepare_data(job, tokenizer_path)
    world = 1 if dry_run else job.scaling.num_workers
    batches_per_worker = math.ceil((data.train_rows // world) / job.micro_batch_size)
    steps_per_epoch = math.ceil(batches_per_worker / job.optim.grad_accum_steps)
    plan = initial_plan(steps_per_epoch, job.run.epochs, job.run.max_steps)
    skipped = f", skipped {data.skipped_rows} bad rows" if data.skipped_rows else ""
    log(f"data: {data.train_rows} train / {data.val_rows} validation rows, {len(data.labels)} labels{skipped}; "
        f"{world} worker(s) x batch {job.micro_batch_size} x accum {job.optim.grad_accum_steps}, "
        f"{steps_per_epoch} steps/epoch; plan {plan.total} steps ({plan.ended_by.replace('_', ' ')})")
    deadline = None
    if job.run.time_budget_min is not None and not dry_run:
        deadline = started_at + 60 * job.run.time_budget_min
        log(f"time budget {job.run.time_budget_min:g} min from the command's start ({deadline - time.time():.0f} s "
            f"left): the plan is set after the first {SKIPPED_STEPS + WARMUP_STEPS} steps are timed")

    tracker, lineage = Tracker(None), None
    if not dry_run:  # the data checked out: from here on the run directory belongs to this config
        storage.write_text(storage.join(out_dir, CONFIG_FILE), written.model_dump_json(indent=2))
        if warming is not None:
            warming.join()
        tracker, lineage = open_tracking(written, out_dir, tracked_by, log)
    run_id = new_run_id()
    use_gpu = choice.use_gpu
    resources = {"CPU": job.scaling.cpus_per_worker} | ({"GPU": 1} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "job": json.loads(job.model_dump_json()), "labels": data.labels, "num_features": data.num_features,
            "feature_columns": list(data.feature_columns) if data.feature_columns else None,
            "feature_moments": data.feature_moments, "total_steps": plan.total, "plan": plan.model_dump(),
            "deadline": deadline, "val_rows": data.val_rows,
            "steps_per_epoch": steps_per_epoch, "run_dir": out_dir, "fault": fault_from_env(),
            "dry_run": dry_run, "init_checkpoint": init_checkpoint, "quiet": quiet,
            "lineage": lineage.model_dump(mode="json") if lineage else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=0 if dry_run else world, use_gpu=bool(use_gpu), resources_per_worker=resources,
            placement_strategy="STRICT_SPREAD" if choice.spread and not dry_run else "PACK"),
        run_config=ray.train.RunConfig(
            name=job.run.name, storage_path=storage.resolve(job.run.storage_path),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=job.checkpoint.keep, checkpoint_score_attribute=job.checkpoint.metric,
                checkpoint_score_order=job.checkpoint.resolved_mode),
            failure_config=ray.train.FailureConfig(max_failures=job.failure.max_failures),
            callbacks=[FailureLog(out_dir, run_id), *([TrainTracking(tracker.ref)] if not tracker.off else []),
                       *(callbacks or [])],
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
        # Validation is small and every worker reads all of it each epoch: read and tokenize it once.
        datasets={"train": data.train, "val": data.val.materialize()},
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"], execution_options=ingest_options()),
    )
    try:
        result = trainer.fit()
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    metrics = dict(result.metrics or {})
    if dry_run:
        log(f"dry run OK: 2 steps, train_loss {metrics.get('train_loss', float('nan')):.4f}; nothing written")
        return RunSummary(job=job.run.name, status="dry_run", final_metrics=metrics)

    best_ckpt, best_metrics = _best(result, job)
    summary = RunSummary(
        job=job.run.name, run_dir=out_dir, run_id=run_id, restarts=count_failures(out_dir, run_id),
        epochs_completed=metrics.get("epoch"), global_step=metrics.get("global_step"),
        ended_by=metrics.get("ended_by"), planned_steps=metrics.get("planned_steps"),
        checks=metrics.get("checks", []), final_metrics=metrics, best_metrics=best_metrics, best_checkpoint=best_ckpt,
        latest_checkpoint=result.checkpoint.path if result.checkpoint else None,
        use_gpu=bool(use_gpu), num_workers=world, worker_nodes=metrics.get("worker_nodes", []), init_checkpoint=init_checkpoint,
        labels=data.labels, train_rows=data.train_rows, val_rows=data.val_rows,
        skipped_rows=data.skipped_rows, wall_seconds=round(time.time() - started, 2),
        samples_per_s=metrics.get("train_samples_per_s"), config=json.loads(written.model_dump_json()), lineage=lineage,
    )
    storage.write_text(result_path, summary.model_dump_json(indent=2))
    tracker.log_metrics({f"best_{k}": v for k, v in best_metrics.items() if k.startswith("val_")}
                        | {"wall_seconds": summary.wall_seconds, "restarts": summary.restarts},
                        step=summary.epochs_completed or 0)
    tracker.log_text(summary.model_dump_json(indent=2), RESULT_FILE)
    tracker.finish()
    return summary


def ingest_options():
    """Ray Data options for the workers' shards. Ray Train builds its defaults from the DataContext of the
    actor that splits the datasets, where the order is not preserved, and then the split may follow block
    locality: rank k could read other rows on another placement or attempt. In order, every rank reads
    the same rows on one node or many and after a restart."""
    import copy

    from ray.data import DataContext

    options = copy.copy(DataContext.get_current().execution_options)  # this driver's, as quiet_ray_data set them
    options.preserve_order = True
    return options


def _best(result, job: TrainJob) -> tuple[str | None, dict]:
    ranked = [(c, m) for c, m in (result.best_checkpoints or []) if job.checkpoint.metric in m]
    if not ranked:
        return None, {}
    pick = max if job.checkpoint.resolved_mode == "max" else min
    ckpt, m = pick(ranked, key=lambda cm: cm[1][job.checkpoint.metric])
    return ckpt.path, m
