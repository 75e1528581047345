"""The typed records of lineage: what a run, and every package made from it, carries about where it
came from. No Ray, no MLflow here: serving reads these inside package metadata."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class SourceFingerprint(Record):
    """One data source (a file, a directory of files, an object-store prefix, or a built-in)."""

    path: str = Field(description="The path or URI as the config gives it.")
    method: Literal["sha256", "etag", "size+mtime", "builtin"] = Field(
        description="sha256: content hash of each file; etag: the object store's ETag or checksum per object; "
        "size+mtime: only sizes and times were available; builtin: a dataset shipped with a library.")
    files: int = Field(ge=0, description="Files (objects) the source holds.")
    bytes: int = Field(ge=0, description="Their total size.")
    digest: str = Field(description="sha256 over every file's relative name, size and content hash (or ETag).")
    entries: dict[str, str] = Field(default_factory=dict, description="Per file (relative name): size:hash, so a "
                                    "mismatch can name the file that changed.")


class DataFingerprint(Record):
    """The data a run read: train, and validation when it has its own source."""

    digest: str = Field(description="sha256 over the sources' digests: one value to compare.")
    train: SourceFingerprint
    validation: SourceFingerprint | None = None

    def sources(self) -> list[tuple[str, SourceFingerprint]]:
        return [("data.train_path", self.train)] + ([("data.validation_path", self.validation)] if self.validation else [])


class TrackingRef(Record):
    """Where a run is tracked: enough to open it again with MLflow's client (or find its TensorBoard files)."""

    backend: Literal["mlflow", "tensorboard"]
    uri: str = Field(description="MLflow tracking URI, or the TensorBoard log directory.")
    experiment_id: str | None = None
    run_id: str | None = Field(None, description="The MLflow run; for a sweep trial, resolved through trial_id.")
    parent_run_id: str | None = Field(None, description="The sweep's run, for a trial's run.")
    trial_id: str | None = Field(None, description="The Tune trial whose nested run this is.")


class Lineage(Record):
    """A training run's identity: its recipe, its data and its code; in the run summary and in package metadata."""

    config_hash: str = Field(description="sha256 of the resolved TrainJob, without run name, storage and tracking.")
    data: DataFingerprint
    code_revision: str | None = Field(None, description="git commit of the code (+ '-dirty' with local changes).")
    rayfoundry_version: str
    tracking: TrackingRef | None = None
