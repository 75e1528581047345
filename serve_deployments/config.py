"""`ServeArgs`: the typed arguments of `build_app`, from `serve run` key=value pairs, a Serve config
file's `args:`, or `python -m ray_apps serve`. Every field says what it does; checks live here."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Batching(Section):
    max_batch_size: int = Field(16, ge=1, le=1024, description="Largest batch one model call takes.")
    batch_wait_timeout_s: float = Field(0.005, ge=0, le=1, description="How long a partial batch waits for more.")


class Autoscaling(Section):
    min_replicas: int = Field(1, ge=0, description="Replicas per model at least (0 scales to zero).")
    max_replicas: int = Field(1, ge=1, description="Replicas per model at most.")
    target_ongoing_requests: float = Field(16, gt=0, description="Requests per replica the autoscaler aims at.")


class Limits(Section):
    max_body_bytes: int = Field(1 << 20, ge=1024, description="Larger request bodies get 413.")
    max_instances: int = Field(256, ge=1, description="More instances in one request get 422.")
    max_text_chars: int = Field(4096, ge=1, description="Longer texts get 422 (they are truncated to the "
                                "model's max_length tokens anyway; this bounds tokenizer work).")
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one model replica works on at once.")
    max_queued_requests: int = Field(256, ge=1, description="Requests waiting for a replica beyond that; "
                                     "more get 503 at once.")
    request_timeout_s: float = Field(30, gt=0, description="A request unanswered this long gets 408 (and is cancelled).")
    body_timeout_s: float = Field(10, gt=0, description="A request body not received this long gets 408 (slow clients).")
    max_bodies_in_flight: int = Field(256, ge=1, description="Request bodies one ingress replica receives at once; "
                                      "more get 503 at once, so slow clients cannot hold every slot.")
    max_queued_instances: int = Field(8192, ge=1, description="Instances waiting in one model replica, over all its "
                                      "requests; a request that would pass this gets 503 at once.")


class ServeArgs(Section):
    """What `build_app` serves and how."""

    registry: str = Field("registry", description="Registry root (path or URI) holding the packages.")
    models: list[str] = Field(min_length=1, description="Model refs: NAME, NAME:VERSION or NAME@ALIAS.")
    engine: Literal["onnx", "onnx-int8", "torch"] = Field("onnx", description="Which file of the package runs.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: CUDA when the replica has a GPU.")
    num_cpus: float = Field(1, gt=0, description="CPUs reserved per model replica.")
    num_gpus: float = Field(0, ge=0, description="GPUs per model replica (set 1 on GPU nodes).")
    intra_op_threads: int = Field(0, ge=0, description="Engine threads per replica; 0 = one per reserved CPU.")
    access_log: bool = Field(False, description="Serve's per-request access log in the replicas; off saves "
                             "CPU on every request (metrics count requests either way).")
    batching: Batching = Batching()
    autoscaling: Autoscaling = Autoscaling()
    limits: Limits = Limits()

    @field_validator("models")
    @classmethod
    def _unique_names(cls, refs: list[str]) -> list[str]:
        names = [r.split("@")[0].split(":")[0] for r in refs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: {dupes[0]} is listed twice; serve one version per model name")
        return refs
