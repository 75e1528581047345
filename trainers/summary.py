"""`RunSummary`: what a finished training run hands the next stage, stored as `<run_dir>/result.json`.

Export resolves a run directory to its best checkpoint through it, `train --json-out` writes it,
and a rerun compares its stored config with the new one. No Ray here.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tracking.records import Lineage

RUN_SUMMARY_FORMAT = 1
RESULT_FILE = "result.json"
ENDED_EARLY = ("max_steps", "time_budget", "target")  # ended before its epochs: finished, never trained on
CONFIG_FILE = "job.json"  # the resolved TrainJob a run was started with, written before its first epoch


class CheckRecord(BaseModel):
    """One in-epoch check on the fixed validation sample."""

    model_config = ConfigDict(extra="forbid")

    epoch: int
    global_step: int
    train_seconds: float = Field(description="Training time since the run's first step, validation excluded.")
    rows: int = Field(description="Validation rows scored (the fixed sample).")
    val_loss: float
    val_accuracy: float
    val_macro_f1: float


class RunSummary(BaseModel):
    """One training run's result; `status` is `dry_run` for `--dry-run`, which writes nothing."""

    model_config = ConfigDict(extra="forbid")

    format_version: Literal[1] = Field(RUN_SUMMARY_FORMAT, description="Layout of this record.")
    job: str = Field(description="Run name (run.name).")
    status: Literal["finished", "dry_run"] = "finished"
    run_dir: str | None = Field(None, description="<storage_path>/<name>: checkpoints, failures, this file.")
    run_id: str | None = Field(None, description="Id of the driver invocation that finished the run.")
    restarts: int = Field(0, description="Worker-group failures Ray Train recovered from in that invocation.")
    epochs_completed: int | None = Field(None, description="The last epoch trained (in part, when the run ended "
                                         "by max_steps or its time budget).")
    global_step: int | None = None
    ended_by: Literal["epochs", "max_steps", "time_budget", "target"] | None = Field(
        None, description="What ended the run: its epochs, run.max_steps, run.time_budget_min, or reaching run.stop_at.")
    planned_steps: int | None = Field(None, description="The optimizer steps the run was planned for (its "
                                      "learning-rate schedule ends there).")
    checks: list[CheckRecord] = Field(default_factory=list, description="In-epoch checks on the fixed validation "
                                      "sample (run.check_every_steps), in step order.")
    final_metrics: dict[str, Any] = Field(default_factory=dict, description="The last epoch's report (metrics, resume notes).")
    best_metrics: dict[str, Any] = Field(default_factory=dict, description="The best checkpoint's report.")
    best_checkpoint: str | None = Field(None, description="Best checkpoint by checkpoint.metric.")
    latest_checkpoint: str | None = None
    use_gpu: bool = False
    num_workers: int = 1
    worker_nodes: list[str] = Field(default_factory=list, description="The Ray node id of each worker, in rank "
                                    "order, in the attempt that finished the run.")
    init_checkpoint: str | None = Field(None, description="Another run's checkpoint this run started from (PBT).")
    labels: list[str] = Field(default_factory=list, description="Class labels in id order.")
    train_rows: int | None = None
    val_rows: int | None = None
    skipped_rows: int = 0
    wall_seconds: float | None = None
    samples_per_s: float | None = None
    config: dict[str, Any] | None = Field(None, description="The resolved TrainJob, as JSON.")
    lineage: Lineage | None = Field(None, description="Config hash, data fingerprint, code revision, tracked run.")

    def best_value(self, metric: str) -> float:
        return self.best_metrics.get(metric, float("nan"))


def parse_summary(text: str) -> RunSummary | None:
    """A run's result.json, or None for another file of that name (a Tune trial's is JSON lines)."""
    try:
        return RunSummary.model_validate_json(text)
    except ValidationError:
        return None
