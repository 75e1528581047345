"""One Tune trial: build the trial's TrainJob, fit a TorchTrainer (the Train V2 pattern), and hand every
epoch's metrics and checkpoint to Tune as it happens.

Why not `ray.tune.integration.ray_train.TuneReportCallback` alone: it forwards metrics and a
`checkpoint_path` string, but registers no Tune checkpoint. PBT then has nothing to clone ("no
checkpoint for trial ... skip exploit"), and a retried or resumed trial has nothing to start from.
`ReportRelay` is the same per-epoch stream (a Train callback on the controller, a one-slot queue, so
training waits while Tune decides), carrying the checkpoint too; the trial thread calls
`ray.tune.report(metrics, checkpoint=...)`, and Tune keeps a copy of our checkpoint directory. PBT
clones that directory, which `trainers.checkpoint` reads like any other.

Each call of the trial function is a new Train run under the trial's directory
(`train-<id>`). It starts from `ray.tune.get_checkpoint()` when there is one: the trial's own last
checkpoint when Tune retries an errored trial or resumes a sweep, another trial's when PBT exploits.
A worker failure inside the run resumes from the run's own checkpoints, as in plain training.
"""

from __future__ import annotations

import threading
from typing import Any

from ray.train import UserCallback

CHECKPOINT_PATH_KEY = "checkpoint_path"


class ReportRelay(UserCallback):
    """Runs on the Train controller: puts (rank 0's metrics, checkpoint) for each report on the queue."""

    def __init__(self, queue):
        self.queue = queue

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        import ray

        ckpt = (checkpoint.path, checkpoint.filesystem) if checkpoint is not None else None
        controller = ray.get_runtime_context().current_actor  # so the trial can abort this run
        self.queue.put((dict(metrics[0]), ckpt, controller), block=True)


def _abort(controller, queue, runner: threading.Thread) -> None:
    """Tune stopped the trial (ASHA, a PBT exploit, the end of the sweep) while its Train run was still
    going: abort the run the way Ray Train's own Ctrl-C handler does, which removes its placement
    group. Otherwise the controller waits forever on the relay queue, the trial's CPUs stay reserved,
    and a small cluster hangs: the next trials' Ray Data tasks never get a whole CPU."""
    import ray

    if controller is not None:
        try:
            ray.get(controller.abort.remote(), timeout=60)
        except Exception:  # abort ends the controller process, so the call itself fails
            pass
    queue.shutdown(force=True)
    runner.join(timeout=60)


def run_trial(config: dict[str, Any], *, trial_base: dict[str, Any], source: str, tracked_by=None) -> None:
    """The Tune trainable: `config` maps dotted TrainJob fields to this trial's values. `tracked_by` is the
    sweep's tracked run: the trial's run is nested under it by the sweep's Tune callback, so the
    training run inside the trial tracks nothing itself and only records where it is tracked."""
    import ray.tune
    from ray.util.queue import Empty, Queue

    from trainers.recovery import new_run_id
    from trainers.run import train
    from tuning.config import job_for

    job = job_for(trial_base, config, source)
    job.run.storage_path = ray.tune.get_context().get_trial_dir()
    job.run.name = f"train-{new_run_id()}"
    job.tracking.backend = "none"
    if tracked_by is not None:
        tracked_by = tracked_by.model_copy(update={"parent_run_id": tracked_by.run_id, "run_id": None,
                                                   "trial_id": ray.tune.get_context().get_trial_id()})
    start = ray.tune.get_checkpoint()
    init = None
    if start is not None:
        init = start.path if start.filesystem.type_name == "local" else f"{start.filesystem.type_name}://{start.path}"

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    outcome: dict[str, Any] = {}

    def fit() -> None:
        try:
            outcome["summary"] = train(job, log=lambda *_: None, callbacks=[ReportRelay(queue)],
                                       init_checkpoint=init, quiet=True, tracked_by=tracked_by)
        except BaseException as e:  # re-raised in the trial thread, so Tune sees the trial fail
            outcome["error"] = e

    runner = threading.Thread(target=fit, name="train-fit", daemon=True)
    runner.start()
    controller = None
    try:
        while True:
            try:
                metrics, ckpt, controller = queue.get(block=True, timeout=0.5)
            except Empty:
                if runner.is_alive() or not queue.empty():
                    continue
                break
            checkpoint = ray.tune.Checkpoint(path=ckpt[0], filesystem=ckpt[1]) if ckpt else None
            metrics[CHECKPOINT_PATH_KEY] = ckpt[0] if ckpt else None
            ray.tune.report(metrics, checkpoint=checkpoint)  # raises SystemExit when Tune stops the trial
    finally:
        if runner.is_alive():
            _abort(controller, queue, runner)
    runner.join()
    if "error" in outcome:
        raise outcome["error"]
