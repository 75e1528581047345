"""The Tune logger callback that tracks a sweep's trials as nested MLflow runs (Ray's
`MLflowLoggerCallback`, extended). It runs on the Tune driver, one place per sweep."""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback

from tracking.records import TrackingRef
from tracking.tracker import TRIAL_TAG, Tracker, config_hash, find_trial_run, flatten
from tracking.train_callback import say

END_TAG = "rayfoundry.end_reason"
MAX_CLONE_NOTES = 10
# Tune's bookkeeping in each result; the trial's own metrics and Tune's config/<field> are what is worth a chart.
TUNE_NOISE = {"pid", "timestamp", "done", "should_checkpoint", "time_this_iter_s", "time_since_restore",
              "iterations_since_restore", "training_iteration"}
CLONES_TAG = "rayfoundry.pbt_clones"


class SweepTracking(MLflowLoggerCallback):
    """Ray's MLflow logger for Tune, with one nested run per trial under the sweep's run. A trial keeps
    its run through PBT exploits, retries and a resumed sweep. Parameters are the trial's whole TrainJob,
    logged when the trial ends (PBT changes them while it runs; Tune's `config/<field>` metrics show
    them over time). Each trial run ends with a tag saying why: finished, stopped early, or failed."""

    def __init__(self, parent: TrackingRef, *, experiment: str, tags: dict[str, str], epochs: int, scheduler: str,
                 trial_job):
        super().__init__(tracking_uri=parent.uri, experiment_name=experiment, log_params_on_trial_end=True,
                         tags=tags | {"mlflow.parentRunId": parent.run_id, "rayfoundry.kind": "trial"})
        self.parent, self.epochs, self.scheduler, self.trial_job = parent, epochs, scheduler, trial_job
        self.off = False

    def _guard(self, what: str, fn) -> None:
        if self.off:
            return
        try:
            fn()
        except Exception as e:  # a tracking failure never fails the sweep
            self.off = True
            say(f"tracking: mlflow at {self.parent.uri} failed to {what} ({type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]}); the sweep goes on without tracking")

    def setup(self, *args, **kwargs):
        self._guard("open the sweep's experiment", lambda: super(SweepTracking, self).setup(*args, **kwargs))

    def _run_id(self, trial) -> str:
        if trial not in self._trial_runs:
            client = self.mlflow_util._get_client()
            found = find_trial_run(client, self.mlflow_util.experiment_id, self.parent.run_id, trial.trial_id)
            if found is None:
                run = self.mlflow_util.start_run(run_name=str(trial), tags=self.tags | {
                    "trial_name": str(trial), TRIAL_TAG: trial.trial_id})
                found = run.info.run_id
            self._trial_runs[trial] = found
        return self._trial_runs[trial]

    def log_trial_start(self, trial):
        def start() -> None:
            self._run_id(trial)
            # After a PBT exploit the trial restarts from the donor's checkpoint (Tune's latest checkpoint of
            # the trial is then the donor's): noted here, since a clone of a last epoch reports nothing more.
            donor = getattr(getattr(trial, "checkpoint", None), "path", None)
            if donor:
                self._note_clone(trial, str(donor), int((trial.last_result or {}).get("epoch") or 0))
        self._guard("start a trial's run", start)

    def _note_clone(self, trial, donor: str, epoch: int) -> None:
        """Record a continuation from another trial's checkpoint (a PBT exploit), once per donor checkpoint."""
        noted = self.__dict__.setdefault("_noted", set())  # (trial, donor) pairs on record, so later epochs skip the store
        if trial.trial_id in donor or (trial.trial_id, donor) in noted:  # its own checkpoint: a retry or a resume
            return
        noted.add((trial.trial_id, donor))
        run_id = self._run_id(trial)
        client = self.mlflow_util._get_client()
        before = client.get_run(run_id).data.tags.get(CLONES_TAG, "")
        if donor in before:
            return
        values = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial.config.items())
        note = f"after epoch {epoch}: continued from {donor} with {values}"
        # the newest clones, within MLflow's tag size
        client.set_tag(run_id, CLONES_TAG, "\n".join([*before.splitlines(), note][-MAX_CLONE_NOTES:]))

    def log_trial_result(self, iteration: int, trial, result: dict):
        def log() -> None:
            run_id = self._run_id(trial)
            step = int(result.get("epoch") or iteration)
            metrics = {k: v for k, v in result.items() if k not in TUNE_NOISE}
            self.mlflow_util.log_metrics(run_id=run_id, metrics_to_log=metrics, step=step)
            if result.get("resumed_from"):  # this Train run started from another trial's checkpoint
                self._note_clone(trial, str(result["resumed_from"]), step - 1)
        self._guard("log a trial's metrics", log)

    def log_trial_end(self, trial, failed: bool = False):
        def end() -> None:
            run_id = self._run_id(trial)
            ran = int((trial.last_result or {}).get("epoch") or 0)
            if failed:
                reason = f"failed at epoch {ran}" + (f" (traceback in {trial.error_file})" if trial.error_file else "")
            elif ran < self.epochs:
                reason = f"stopped early by {self.scheduler} after epoch {ran} of {self.epochs}"
            else:
                reason = f"finished {ran} epochs"
            job = self.trial_job(trial.config)
            tracker = Tracker(self.parent.model_copy(update={"run_id": run_id}), say)
            tracker.set_tags({END_TAG: reason, "rayfoundry.config_hash": config_hash(job)})  # the trial's own recipe
            tracker.log_params(flatten(job))
            self.mlflow_util.end_run(run_id=run_id, status="FAILED" if failed else "FINISHED")
        self._guard("end a trial's run", end)
