"""Where a training run's per-epoch metrics reach its tracker: a Ray Train callback on the Train
controller. It sees rank 0's report, so other ranks never log, and a worker-group restart does not
start a second run. It imports no MLflow until the first report, so the controller starts as fast as
an untracked one.

Why not `setup_mlflow` in the workers: it starts a new MLflow run each time the worker group starts,
so a run that recovers from a worker failure would be split over several MLflow runs.
"""

from __future__ import annotations

from typing import Any

from ray.train import UserCallback

from tracking.records import TrackingRef
from tracking.tracker import Tracker


def say(line: str) -> None:
    print(line, flush=True)


class TrainTracking(UserCallback):
    """On the Train controller: rank 0's report of each epoch, logged at step = epoch, and the epoch's
    in-epoch checks (run.check_every_steps) as check_* metrics at step = their optimizer step. A report
    carries the run's checks so far; those of its own epoch are the new ones."""

    def __init__(self, ref: TrackingRef):
        self.ref = ref
        self._tracker: Tracker | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        if self._tracker is None:
            self._tracker = Tracker(self.ref, log=say)
        report = metrics[0]
        epoch = report.get("epoch")
        self._tracker.log_metrics(report, step=epoch if isinstance(epoch, int) else 0)
        for check in report.get("checks", []):
            if check["epoch"] == epoch:
                self._tracker.log_metrics({f"check_{k}": v for k, v in check.items() if k.startswith("val_")}
                                          | {"check_train_seconds": check["train_seconds"]}, step=check["global_step"])
