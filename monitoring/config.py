"""The monitoring policy of a served model (`ModelArgs.monitoring`): windows, alarm thresholds,
feedback labels and the retraining loop. Every field says what it does; checks live here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from rayfoundry.validation import check_order

SIGNALS = ("class_shares", "confidence", "softmax", "embedding", "text_length", "unknown_tokens", "features",
           "live_accuracy")
Signal = Literal["class_shares", "confidence", "softmax", "embedding", "text_length", "unknown_tokens", "features",
                 "live_accuracy"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Window(Section):
    instances: int = Field(500, ge=20, le=1_000_000, description="A window closes once the replicas have answered "
                           "this many instances of a version (counted over every replica).")
    seconds: float = Field(300, gt=0, le=86_400, description="... or once it is this old, if it holds at least "
                           "min_instances; a smaller window is then dropped, unscored.")
    min_instances: int = Field(100, ge=10, description="Fewest instances a window is scored on.")
    sample: int = Field(1000, ge=50, le=20_000, description="Softmax rows kept per window (a uniform sample) for "
                        "the Kolmogorov-Smirnov tests.")

    @model_validator(mode="after")
    def _ordered(self) -> Window:
        check_order(self, "min_instances", "instances")
        return self


class Thresholds(Section):
    """A signal alarms when its test is significant at alpha over all signals (Bonferroni) AND the shift is
    large enough to matter: big windows find tiny, harmless shifts significant."""

    alpha: float = Field(0.01, gt=0, lt=1, description="Family-wise false-alarm rate per window and version.")
    min_psi: float = Field(0.1, ge=0, description="Smallest population stability index that alarms (class shares, "
                           "text length, features); 0.1 is the usual 'moderate shift'.")
    min_ks: float = Field(0.1, ge=0, le=1, description="Smallest Kolmogorov-Smirnov distance that alarms "
                          "(confidence, softmax, embedding).")
    min_unknown_increase: float = Field(0.05, ge=0, le=1, description="Smallest rise in the share of texts with an "
                                        "unknown token that alarms.")
    min_accuracy_drop: float = Field(0.05, ge=0, le=1, description="Smallest fall of live accuracy below the "
                                     "package's validation accuracy that alarms.")


class Feedback(Section):
    window: int = Field(200, ge=10, le=1_000_000, description="Labels per live-accuracy window.")
    max_pending: int = Field(100_000, ge=100, le=10_000_000, description="Answered requests remembered for a "
                             "feedback label at most; the oldest are forgotten first (counted as expired).")
    max_age_s: float = Field(3600, gt=0, description="An answer older than this takes no more feedback (expired).")
    wait_s: float = Field(10, ge=0, le=600, description="Feedback for an id not yet known is held this long (the "
                          "replica reports its answers once a second), then counted as unmatched.")


class Retraining(Section):
    """What to do when an alarm persists: train the model's job on the newest data, export it, shadow it."""

    enabled: bool = Field(False, description="Off by default: alarms are reported, nothing is trained.")
    dry_run: bool = Field(False, description="Record and log what would run, and run nothing.")
    after_windows: int = Field(3, ge=1, description="Consecutive alarmed windows of the champion that trigger it.")
    signals: list[Signal] = Field(default_factory=lambda: list(SIGNALS), min_length=1,
                                  description="The signals whose alarms count.")
    job: str | None = Field(None, description="Training job YAML; default: the champion package's own training "
                            "config.")
    train_path: str | None = Field(None, description="Training data for the new run: a path or a glob, whose newest "
                                   "match (by modification time) is used; default: the job's own train_path.")
    overrides: list[str] = Field(default_factory=list, description="KEY=VALUE changes to the job, as `train --set` "
                                 "takes them (e.g. scaling.num_workers=1).")
    storage_path: str = Field("runs/retraining", description="Where the retraining runs write (a shared path or URI "
                              "on a cluster).")
    submit: Literal["local", "ray-job"] = Field("local", description="local: a process on the controller's node; "
                                                "ray-job: `ray job submit` to the cluster (its address in RAY_ADDRESS "
                                                "or the dashboard on this node).")
    address: str | None = Field(None, description="ray-job: the job server's address (default: RAY_ADDRESS, else "
                                "the cluster the controller runs on).")
    quantize: Literal["none", "int8"] = Field("int8", description="Export option for the new package.")
    cooldown_s: float = Field(3600, ge=0, description="No new trigger this long after the last one.")


class MonitoringPolicy(Section):
    enabled: bool = Field(True, description="Drift and feedback monitoring in the model's controller.")
    window: Window = Window()
    thresholds: Thresholds = Thresholds()
    feedback: Feedback = Feedback()
    retraining: Retraining = Retraining()
