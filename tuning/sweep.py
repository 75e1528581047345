"""Build and run a Tune sweep from a `TuneJob`, resume an interrupted one, and summarize it.

Resources: a trial's driver (the function that builds the TorchTrainer) holds 0.01 CPU; its Ray Train
workers hold what `scaling` says. How many trials run at once is derived from the cluster:

    at_once = min(num_samples, max_concurrent_trials,
                  floor((cluster CPUs - reserve_cpus) / (num_workers * cpus_per_worker + 0.01)),
                  floor(cluster GPUs / num_workers)            # GPU trials only
                  ), at least 1

`reserve_cpus` (default 1) stays free for Ray Data's read and preprocessing tasks, which every trial
runs too and which each take one whole CPU: if the trials' workers and drivers leave less than one
CPU, their data pipelines wait forever. On a 2-CPU machine with 1 worker x 0.45 CPU per trial that
is 2 trials at once (2 x 0.46 leaves 1.08 CPUs); on a 64-CPU cluster with 2 workers x 1 CPU, 31.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import yaml
from ray.tune import Callback

from rayfoundry import storage
from rayfoundry.errors import SweepError
from rayfoundry.ray_env import check_cluster_paths, connect_ray
from tracking.callbacks import SweepTracking
from tracking.fingerprint import fingerprint_data
from tracking.tracker import DEFAULT_EXPERIMENT, Tracker, build_lineage, flatten, lineage_tags
from trainers.config import TrainJob
from trainers.hardware import NodeShape
from trainers.run import cluster_nodes, run_dir, shared_places
from tuning.config import ASHA, PBT, LoadedTune, TuneJob, job_for

DRIVER_CPU = 0.01  # Tune rejects 0; a whole CPU per driver starves the trials' own workers on small nodes
SPEC_FILE = "rayfoundry_tune.json"


def concurrency(spec: TuneJob, scaling, nodes: list[NodeShape]) -> tuple[int, str]:
    """(trials at once, the arithmetic that gave it) on a cluster of `nodes`. Ray Data's tasks take a
    whole CPU on one node, so on several nodes the reserve is kept whole on one node and trials are
    counted where they fit whole (`_per_node`)."""
    if scaling.num_workers == "auto":
        raise SweepError("scaling.num_workers: auto gives one run a whole node or every GPU, and a sweep's trials share "
                         "the cluster; set a number (e.g. 1)")
    per_trial = scaling.num_workers * scaling.cpus_per_worker + DRIVER_CPU
    cpus, gpus, reserve = sum(n.cpus for n in nodes), sum(n.gpus for n in nodes), spec.reserve_cpus
    if cpus - reserve < per_trial:
        raise SweepError(f"one trial needs {per_trial:g} CPUs (workers and driver) plus reserve_cpus {reserve:g}, "
                         f"but the cluster has {cpus:g}; lower scaling.cpus_per_worker or reserve_cpus")
    cpu_nodes = sorted((n.cpus for n in nodes if n.cpus > 0), reverse=True)
    if len(cpu_nodes) == 1:
        fits = _floor(cpus - reserve, per_trial)
        rule = f"floor(({cpus:g} CPUs - reserve {reserve:g}) / {per_trial:g} per trial) = {fits}"
    else:
        fits, rule = _per_node(cpu_nodes, scaling.num_workers, scaling.cpus_per_worker, reserve)
        if fits < 1:
            raise SweepError(f"one trial ({scaling.num_workers} x {scaling.cpus_per_worker:g} CPUs) plus reserve_cpus "
                             f"{reserve:g} whole on one node does not fit on nodes of "
                             f"{_shape(cpu_nodes)} CPUs; lower scaling.cpus_per_worker or reserve_cpus")
    bounds = {"num_samples": spec.num_samples, "cpu": fits}
    if scaling.use_gpu is True or (scaling.use_gpu == "auto" and gpus >= 1):
        bounds["gpu"] = math.floor(gpus / scaling.num_workers)
        if bounds["gpu"] < 1:
            raise SweepError(f"a trial needs {scaling.num_workers} GPUs; the cluster has {gpus:g}")
    if spec.max_concurrent_trials:
        bounds["max_concurrent_trials"] = spec.max_concurrent_trials
    at_once = max(1, min(bounds.values()))
    why = (f"{at_once} trial(s) at once: min(num_samples {spec.num_samples}, {rule}"
           + (f", GPUs {bounds['gpu']}" if "gpu" in bounds else "")
           + (f", max_concurrent_trials {spec.max_concurrent_trials}" if spec.max_concurrent_trials else "") + ")")
    return at_once, why


def _floor(cpus: float, each: float) -> int:
    return max(0, math.floor(cpus / each + 1e-9))


def _shape(cpu_nodes: list[float]) -> str:
    return "/".join(f"{c:g}" for c in cpu_nodes)


def _per_node(cpu_nodes: list[float], workers: int, per_worker: float, reserve: float) -> tuple[int, str]:
    """(trials at once, why) on several nodes: Ray Data's tasks need `reserve` CPUs whole on one node, so
    one node big enough keeps it; workers are counted in the whole slots each node has left, and a trial
    that fits on one node is counted on one node (each trial's driver is left out: 0.01 CPU)."""
    if workers * per_worker <= max(cpu_nodes):  # whole trials, each on one node
        each = workers * per_worker + DRIVER_CPU
        per_trial, unit = 1, f"whole trials of {each:g} CPUs"
    else:  # trials span nodes: worker slots
        each, per_trial, unit = per_worker, workers, f"worker slots of {per_worker:g} CPUs, {workers} per trial"
    best = (-1, "")
    for kept in (j for j, c in enumerate(cpu_nodes) if c >= reserve):
        counts = [_floor(c - reserve if j == kept else c, each) for j, c in enumerate(cpu_nodes)]
        fits = sum(counts) // per_trial
        if fits > best[0]:
            best = (fits, f"{' + '.join(map(str, counts))} {unit} on {len(cpu_nodes)} nodes ({_shape(cpu_nodes)} CPUs), "
                          f"reserve {reserve:g} kept whole on one = {fits}")
    return max(best[0], 0), best[1]


def _domain(kind: str, args: Any):
    from ray import tune

    return {"uniform": lambda: tune.uniform(*args), "loguniform": lambda: tune.loguniform(*args),
            "randint": lambda: tune.randint(*args), "choice": lambda: tune.choice(args)}[kind]()


def param_space(spec: TuneJob) -> dict[str, Any]:
    return {field: _domain(*next(iter(domain.items()))) for field, domain in spec.space.items()}


def build_scheduler(spec: TuneJob, epochs: int):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining

    s = spec.scheduler
    if isinstance(s, ASHA):
        if s.grace_period > epochs:
            raise SweepError(f"scheduler.grace_period {s.grace_period} exceeds the trials' run.epochs {epochs}")
        return ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=s.grace_period,
                             reduction_factor=s.reduction_factor, brackets=s.brackets)
    if isinstance(s, PBT):
        return PopulationBasedTraining(time_attr="epoch", perturbation_interval=s.perturbation_interval,
                                       quantile_fraction=s.quantile_fraction,
                                       resample_probability=s.resample_probability,
                                       hyperparam_mutations=param_space(spec), synch=s.synch)
    return FIFOScheduler()


def build_search(spec: TuneJob, at_once: int):
    if spec.search.type == "random":
        from ray.tune.search import BasicVariantGenerator

        return BasicVariantGenerator(random_state=spec.search.seed, max_concurrent=at_once)
    import optuna
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=spec.search.seed)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=at_once)


def experiment_path(spec: TuneJob) -> str:
    return run_dir(spec)  # the same storage_path/name rule as a training run


def trial_job_json(trial_base: dict[str, Any], source: str, config: dict[str, Any]) -> dict[str, Any]:
    """A trial's resolved TrainJob as JSON (what its tracked run lists as parameters)."""
    return json.loads(job_for(trial_base, config, source).model_dump_json())


def open_sweep_tracking(loaded: LoadedTune, path: str, log) -> tuple[Tracker, list]:
    """The sweep's own run (parameters: the sweep spec) and the Tune callback that nests one run per trial
    under it. The trials' own training runs track nothing themselves."""
    job = loaded.base_job
    lineage = build_lineage(json.loads(job.model_dump_json()),
                            fingerprint_data(job.data.train_path, job.data.validation_path))
    tags = lineage_tags(lineage, "sweep", path)
    tracker = Tracker.open(job.tracking, storage_path=loaded.spec.run.storage_path, run_dir=path,
                           run_name=loaded.spec.run.name, params=flatten(json.loads(loaded.fingerprint())), tags=tags,
                           log=log)
    if tracker.off or tracker.ref.backend != "mlflow":
        return tracker, []  # TensorBoard: Tune writes each trial's event files into its trial directory
    callback = SweepTracking(tracker.ref, experiment=job.tracking.experiment or DEFAULT_EXPERIMENT,
                             tags={k: v for k, v in tags.items() if k != "rayfoundry.kind"},
                             epochs=job.run.epochs, scheduler=loaded.spec.scheduler.type.upper(),
                             trial_job=functools.partial(trial_job_json, loaded.trial_base, loaded.source))
    return tracker, [callback]


def build_tuner(loaded: LoadedTune, at_once: int, *, restore: bool, tracking: Tracker | None = None,
                callbacks: list | None = None):
    from ray import tune

    from tuning.trial import run_trial

    spec = loaded.spec
    tracked_by = tracking.ref if tracking is not None and not tracking.off and tracking.ref.backend == "mlflow" else None
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, trial_base=loaded.trial_base, source=loaded.source, tracked_by=tracked_by),
        {"cpu": DRIVER_CPU})
    path = experiment_path(spec)
    if restore:  # unfinished trials continue from their last checkpoint; errored ones are retried from theirs
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space=param_space(spec),
        tune_config=tune.TuneConfig(
            metric=spec.metric, mode=spec.resolved_mode, num_samples=spec.num_samples,
            scheduler=build_scheduler(spec, loaded.base_job.run.epochs), search_alg=build_search(spec, at_once)),
        run_config=tune.RunConfig(
            name=spec.run.name, storage_path=storage.resolve(spec.run.storage_path), verbose=0,
            failure_config=tune.FailureConfig(max_failures=spec.max_failures),
            # PBT keeps every checkpoint: its exploit re-registers the donor's latest one, and Tune's
            # pruning then tries to delete an already deleted directory, fails the save, and the
            # exploit is skipped (seen on this machine with num_to_keep=3).
            checkpoint_config=tune.CheckpointConfig(num_to_keep=None if isinstance(spec.scheduler, PBT)
                                                    else spec.keep_checkpoints,
                                                    checkpoint_score_attribute=spec.metric,
                                                    checkpoint_score_order=spec.resolved_mode),
            callbacks=[ProgressLines(spec.metric, loaded.base_job.run.epochs), *(callbacks or [])]),
    )


class ProgressLines(Callback):
    """One line per trial epoch and per trial end, instead of Tune's status tables."""

    def __init__(self, metric: str, epochs: int):
        self.metric, self.epochs = metric, epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        print(f"  {trial.trial_id}  epoch {result.get('epoch')}  {self.metric} "
              f"{result.get(self.metric, float('nan')):.4f}  ({result.get('epoch_seconds', 0):.1f}s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        ran = (trial.last_result or {}).get("epoch") or 0
        state = "finished" if ran >= self.epochs else f"stopped early at epoch {ran}"
        print(f"  {trial.trial_id}  {state}", flush=True)

    def on_trial_error(self, iteration, trials, trial, **info):
        print(f"  {trial.trial_id}  failed; Tune retries it from its last checkpoint (max_failures)", flush=True)


def run_sweep(loaded: LoadedTune, *, restart: bool = False, log=print) -> dict[str, Any]:
    """Run the sweep, or resume it when its directory holds an unfinished one; returns the summary."""
    from ray import tune

    # Tune snapshots the sweep's state at most every 10 s by default ("auto"); a driver killed inside
    # that window would, on resumption, start trials again that had finished. A snapshot is a small
    # JSON file, so take one every 2 s.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    spec = loaded.spec
    path = experiment_path(spec)
    connect_ray()
    check_cluster_paths(shared_places(loaded.base_job) | {"run.storage_path": spec.run.storage_path})
    if restart and storage.delete_dir(path):
        log(f"--restart: removed {path}")
    resumed = tune.Tuner.can_restore(path)
    if resumed:
        stored = storage.read_json(f"{path}/{SPEC_FILE}")
        if stored is not None and stored != json.loads(loaded.fingerprint()):
            raise SweepError(f"{path} holds a sweep started from another config; re-run with --restart to discard it, "
                             f"or set run.name to start a new sweep beside it")
        at_once, why = None, "as when the sweep started"
        log(f"resuming {path}: finished trials are kept, unfinished ones continue from their last checkpoint")
    else:
        at_once, why = concurrency(spec, loaded.base_job.scaling, cluster_nodes())
        storage.write_text(f"{path}/{SPEC_FILE}", loaded.fingerprint())
        log(f"sweep {spec.run.name}: {spec.num_samples} trials, {spec.scheduler.type} + {spec.search.type} search "
            f"on {spec.metric} ({spec.resolved_mode}); {why}\n  storage: {path}")
    tracker, callbacks = open_sweep_tracking(loaded, path, log)
    started = time.time()
    try:
        results = build_tuner(loaded, at_once or 1, restore=resumed, tracking=tracker, callbacks=callbacks).fit()
    except BaseException as e:
        tracker.finish("KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    summary = summarize(loaded, results, path)
    summary |= {"resumed": resumed, "concurrency": why, "wall_seconds": round(time.time() - started, 1)}
    best = summary["best"]
    if best:
        best["yaml"] = f"{path}/best_train.yaml"
        storage.write_text(best["yaml"], best_train_yaml(loaded, best["config"], best["yaml"]))
    storage.write_text(f"{path}/leaderboard.json", json.dumps(summary, indent=2, default=str))
    if best:
        tracker.log_metrics({f"best_{spec.metric}": best["value"]}, step=0)
        tracker.log_text(storage.read_text(best["yaml"]), "best_train.yaml")
    tracker.log_text(json.dumps(summary, indent=2, default=str), "leaderboard.json")
    tracker.finish()
    return summary


def summarize(loaded: LoadedTune, results, path: str) -> dict[str, Any]:
    """Leaderboard rows (best first) and the best checkpoint over every trial and epoch."""
    spec = loaded.spec
    epochs = loaded.base_job.run.epochs
    sign = 1 if spec.resolved_mode == "max" else -1
    rows, best = [], None
    for result in results:
        # The trial's own reports: after a PBT exploit, Tune's "last result" is the donor's (a clone of
        # the donor's last epoch may have had nothing left to train, yet it did reach that epoch).
        history = result.metrics_dataframe
        own = history is not None and not history.empty
        scores = history[spec.metric].dropna().tolist() if own and spec.metric in history else []
        ran = max(int(history["epoch"].max()) if own and "epoch" in history else 0,
                  int((result.metrics or {}).get("epoch") or 0))
        row = {"trial": history["trial_id"].iloc[-1] if own else Path(result.path).name,
               "config": {k: result.config.get(k) for k in spec.space},
               spec.metric: (max(scores, key=lambda v: sign * v) if scores else None),
               "epochs": ran, "stopped_early": result.error is None and 0 < ran < epochs,
               "status": "error" if result.error else "finished" if ran >= epochs else "stopped",
               "error": str(result.error).splitlines()[0][:300] if result.error else None, "path": result.path,
               "worker_nodes": (result.metrics or {}).get("worker_nodes", [])}
        rows.append(row)
        for ckpt, metrics in result.best_checkpoints or []:
            value = metrics.get(spec.metric)
            if value is not None and (best is None or sign * value > sign * best["value"]):
                best = {"trial": row["trial"], "config": row["config"], "value": value, "metric": spec.metric,
                        "epoch": metrics.get("epoch"), "checkpoint": ckpt.path}
    rows.sort(key=lambda r: (r[spec.metric] is None, -sign * (r[spec.metric] or 0)))
    return {"sweep": spec.run.name, "experiment_path": path, "metric": spec.metric, "mode": spec.resolved_mode,
            "scheduler": spec.scheduler.type, "search": spec.search.type, "epochs_per_trial": epochs,
            "leaderboard": rows, "best": best}


def best_train_yaml(loaded: LoadedTune, config: dict[str, Any], path: str) -> str:
    """The best trial as a complete TrainJob YAML for `python -m ray_apps train`: the base job with the
    sweep's overrides and the trial's values, at the base job's own scaling (batch_size is global, so
    the result does not depend on the worker count)."""
    spec = loaded.spec
    base_raw = yaml.safe_load(loaded.base_path.read_text()) or {}
    raw = json.loads(json.dumps(loaded.trial_base))
    raw["scaling"] = base_raw.get("scaling", {})
    job: TrainJob = job_for(raw, config, loaded.source)
    job.run.name, job.run.storage_path = f"{spec.run.name}_best", "runs"
    values = ", ".join(f"{k}={v}" for k, v in config.items())
    note = ("# PBT changed hyperparameters during training; these are the best trial's final values.\n"
            if isinstance(spec.scheduler, PBT) else "")
    header = (f"# Best trial of sweep {spec.run.name} ({spec.metric}, {spec.resolved_mode}): {values}\n{note}"
              f"# Train it:  python -m ray_apps train --config {path}\n")
    return header + yaml.safe_dump(json.loads(job.model_dump_json()), sort_keys=False)


def register_best(summary: dict[str, Any], name: str, registry: str, quantize: str = "none", log=print) -> dict:
    """Export the sweep's best checkpoint into the registry and point `challenger` at it."""
    from model_registry.export import ExportJob, export
    from model_registry.registry import Registry

    if not summary.get("best"):
        raise SweepError("the sweep has no checkpoint to register (every trial failed before its first epoch)")
    meta = export(ExportJob(checkpoint=summary["best"]["checkpoint"], name=name, registry=registry,
                            quantize=quantize), log=log)
    Registry(registry).promote(meta.ref, "challenger", reason=f"best trial of sweep {summary['sweep']}")
    return {"ref": meta.ref, "alias": f"{name}@challenger", "registry": registry}


def format_leaderboard(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    fields = list(summary["leaderboard"][0]["config"]) if summary["leaderboard"] else []
    head = ["trial", *fields, metric, "epochs", "early stop", "status"]
    lines = [head]
    for r in summary["leaderboard"]:
        lines.append([r["trial"], *(_fmt(r["config"][f]) for f in fields),
                      "-" if r[metric] is None else f"{r[metric]:.4f}", str(r["epochs"]),
                      "yes" if r["stopped_early"] else "no", r["status"]])
    widths = [max(len(str(row[i])) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in lines)


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)
