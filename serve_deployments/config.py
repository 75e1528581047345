"""Typed arguments of the Serve applications, from a Serve config file's `args:`, `serve run` key=value
pairs, or `python -m ray_apps serve`. Every field says what it does; checks live here.

- `ModelArgs`: one model's application (`serve_deployments.model:build_app`), route /v2/models/NAME;
- `ServerArgs`: the server-level application (`serve_deployments.app:build_app`), route /;
- `ServeArgs`: several models with shared settings, split into the two by `serve_deployments.app`.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitoring.config import MonitoringPolicy
from rayfoundry.errors import ConfigError, describe_validation_error
from rayfoundry.validation import check_order
from serve_deployments.rollout import RolloutPolicy


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Batching(Section):
    """Changes without a restart (the model deployment's user_config)."""

    max_batch_size: int = Field(32, ge=1, le=1024, description="Most instances one model call takes.")
    batch_wait_timeout_s: float = Field(0, ge=0, le=1, description="How long a partial batch may wait for more while "
                                        "other requests are queued; 0 runs whatever is queued as soon as the engine "
                                        "is free (a lone request never waits).")
    slo_p99_ms: float | None = Field(None, gt=0, le=600_000, description="Keep each request's time in the replica "
                                     "under this: batch sizes follow an online fit of the engine's batch time, and a "
                                     "request that can no longer make it gets 503 at once.")


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=0, description="Replicas per model at least (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, description="Replicas per model at most.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica the autoscaler aims at.")
    upscale_delay_s: float = Field(30, ge=0, description="Load above target this long adds replicas.")
    downscale_delay_s: float = Field(600, ge=0, description="Load below target this long removes replicas.")
    look_back_period_s: float = Field(30, gt=0, description="Window over which the autoscaler averages the load.")

    @model_validator(mode="after")
    def _ordered(self) -> Autoscaling:
        check_order(self, "min_replicas", "max_replicas")
        return self


class Limits(Section):
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_instances: int = Field(256, ge=1, description="More instances in one request get 422.")
    max_text_chars: int = Field(4096, ge=1, description="Longer texts get 422 (they are truncated to the "
                                "model's max_length tokens anyway; this bounds tokenizer work).")
    max_ongoing_requests: int = Field(128, ge=1, description="Requests one model replica holds at once (receiving, "
                                      "queued for a batch or in one); Serve queues more up to max_queued_requests.")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting for a replica beyond that; "
                                     "more get 503 at once.")
    request_timeout_s: float = Field(30, gt=0, description="A request unanswered this long gets 408 (and is cancelled).")
    body_timeout_s: float = Field(10, gt=0, description="A request body not received this long gets 408 (slow clients).")
    max_bodies_in_flight: int = Field(64, ge=1, description="Request bodies one ingress replica receives at once; "
                                      "more get 503 at once, so slow clients cannot hold every slot.")
    max_queued_instances: int = Field(8192, ge=1, description="Instances waiting in one model replica, over all its "
                                      "requests; a request that would pass this gets 503 at once.")

    @model_validator(mode="after")
    def _bodies_below_ongoing(self) -> Limits:
        if self.max_bodies_in_flight >= self.max_ongoing_requests:
            raise ValueError(f"max_bodies_in_flight ({self.max_bodies_in_flight}) must be below max_ongoing_requests "
                             f"({self.max_ongoing_requests}), or slow clients can hold every slot of a model replica")
        return self


class ModelArgs(Section):
    """One model's application (`serve_deployments.model:build_app`), under /v2/models/NAME."""

    registry: str = Field("registry", description="Registry root (path or URI) holding the packages.")
    model: str = Field(description="Model ref: NAME, NAME:VERSION or NAME@ALIAS (resolved to a version at build).")
    engine: Literal["auto", "onnx", "onnx-int8", "torch"] = Field("auto", description="Which file of the package runs; "
                                                                  "auto: int8 when the package ships it (its accuracy "
                                                                  "passed the export gate), else ONNX fp32.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when the replica has a GPU.")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per model replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica (set 1 on GPU nodes).")
    intra_op_threads: int = Field(0, ge=0, description="Engine threads per replica; 0 = one per reserved CPU.")
    access_log: bool = Field(False, description="Serve's per-request access log in the replicas; off saves "
                             "CPU on every request (metrics count requests either way).")
    batching: Batching = Batching()
    autoscaling: Autoscaling = Autoscaling()
    limits: Limits = Limits()
    rollout: RolloutPolicy | None = Field(default_factory=RolloutPolicy, description="How a new version reaches "
                                          "the callers: shadow, canary steps and guards (`python -m ray_apps "
                                          "rollout`). null: no rollout controller; the deployed version is served "
                                          "until the application is redeployed.")
    monitoring: MonitoringPolicy = Field(default_factory=MonitoringPolicy, description="Drift against the package's "
                                         "reference profile, live accuracy from feedback labels, and the retraining "
                                         "loop (docs/monitoring.md). Kept by the controller: off with rollout null.")


class ServerArgs(Section):
    """The server-level application (`serve_deployments.app:build_app`) at /: /v2, /v2/health/*,
    /v1/models and /v1/models/NAME:predict for the model applications it names."""

    models: list[str] = Field(min_length=1, description="Names of the served models (one application each).")
    limits: Limits = Limits()


class ServeArgs(ModelArgs):
    """Several models with the same settings: one model application each, plus the server application."""

    model: str = Field("", description="Unused here: list the refs under models.")
    models: list[str] = Field(min_length=1, description="Model refs: NAME, NAME:VERSION or NAME@ALIAS.")

    def for_model(self, ref: str) -> ModelArgs:
        return ModelArgs.model_validate(self.model_dump(exclude={"models"}) | {"model": ref})

    @field_validator("models")
    @classmethod
    def _unique_names(cls, refs: list[str]) -> list[str]:
        names = [r.split("@")[0].split(":")[0] for r in refs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: {dupes[0]} is listed twice; serve one version per model name")
        return refs


Args = TypeVar("Args", bound=BaseModel)


def parse_args(kind: type[Args], args: dict[str, Any], source: str) -> Args:
    """`args` as `kind`; `serve run` passes key=value strings, so a `models` string may be a comma list.
    A bad field is a ConfigError naming it."""
    if isinstance(args.get("models"), str):
        args = args | {"models": [m for m in args["models"].split(",") if m]}
    try:
        return kind.model_validate(args)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, source)) from None
