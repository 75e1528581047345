"""A model package: the directory export writes and serving loads. Verified before use; never unpickled.

Layout (format 2):
  model.safetensors, config.json    the torch model (text: a transformers directory)
  model.onnx                        fp32 graph, dynamic batch (and sequence) axes, output `logits`
                                    (text also `embedding`, the pooled last hidden state, for monitoring)
  model.int8.onnx                   optional; onnxruntime dynamic int8 quantization
  tokenizer files                   text models
  label_map.json                    labels in id order, the input columns they came from
  README.md                         the model card, for people
  metadata.json                     `PackageMetadata`: the model card for programs (task, inputs, sample
                                    inputs, source run, training config and data, validation metrics,
                                    parity, the reference profile monitoring compares traffic with,
                                    sha256 and size of every file)
  metadata.json.sha256              sha256 of metadata.json itself

A package holds exactly the files its metadata lists, each a regular file with a plain name: loading
refuses symlinks, unlisted files and names that could leave the directory.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from monitoring.profile import ReferenceProfile
from rayfoundry import storage
from rayfoundry.errors import PackageError, describe_validation_error
from tracking.records import Lineage

__all__ = ["ENGINE_FILES", "METADATA", "PACKAGE_FORMAT", "ModelPackage", "PackageError", "PackageMetadata",
           "file_digests", "verify_package", "write_metadata"]

PACKAGE_FORMAT = 2
METADATA = "metadata.json"
COMMIT_MARKER = f"{METADATA}.sha256"
ENGINE_FILES = {"onnx": "model.onnx", "onnx-int8": "model.int8.onnx", "torch": "model.safetensors"}
Engine = Literal["onnx", "onnx-int8", "torch"]
Metric = Literal["val_accuracy", "val_macro_f1", "val_loss"]


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Task(Record):
    type: str = Field(description="text-classification, image-classification or tabular-classification.")
    labels: list[str] = Field(min_length=2, description="Class labels in id order.")


class Inputs(Record):
    kind: Literal["text", "image", "features"] = Field(description="What one instance is.")
    onnx_inputs: list[str] = Field(description="Input names of the ONNX graph.")
    max_length: int | None = Field(None, description="Text: tokens kept per instance.")
    text_column: str | None = None
    num_features: int | None = Field(None, description="Image and features: numbers per instance.")
    feature_columns: list[str] | None = None
    shape: list[int] | None = Field(None, description="Shape of one instance ([8, 8] for images).")
    dtype: str | None = None


class FileEntry(Record):
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    bytes: int = Field(ge=0)


class Source(Record):
    checkpoint: str = Field(description="The checkpoint directory exported.")
    run_dir: str | None = None
    run_id: str | None = None
    epoch: int | None = None
    global_step: int | None = None
    strategy: str


class TrainingData(Record):
    train_path: str
    train_rows: int | None = None


class Training(Record):
    config: dict[str, Any] = Field(description="The resolved TrainJob, as JSON.")
    reported_metrics: dict[str, Any] = Field(default_factory=dict, description="The checkpoint epoch's report.")
    data: TrainingData
    lineage: Lineage | None = Field(None, description="The source run's config hash, data fingerprint, code revision "
                                    "and tracked run; absent for packages of checkpoints made before lineage existed.")


class Validation(Record):
    source: str = Field(description="Which rows: the validation path, or the held-out share of train.")
    rows: int
    fingerprint: str = Field(description="sha256 over the rows' labels and raw inputs.")
    metric: Metric = Field(description="The training job's checkpoint metric.")
    mode: Literal["max", "min"]
    metrics: dict[str, dict[str, float]] = Field(description="Per engine: val_loss, val_accuracy, val_macro_f1, val_rows.")
    int8_accuracy_drop: float | None = None


class Parity(Record):
    rows: int
    max_abs_logit_diff: float
    shapes: list[list[int]]
    tolerance: float
    device: str


class Quantization(Record):
    method: str
    weight_type: str
    max_accuracy_drop: float


class ExportInfo(Record):
    exporter: str
    opset: int
    device: str
    quantization: Quantization | None = None
    seconds: float


class PackageMetadata(Record):
    """metadata.json: everything downstream needs to know about a package without opening its files."""

    format_version: Literal[2] = PACKAGE_FORMAT
    name: str
    version: str = Field(pattern=r"^[0-9]+$")
    created_at: str
    task: Task
    inputs: Inputs
    files: dict[str, FileEntry] = Field(description="Every file of the package but metadata.json and its digest.")
    samples: list[Any] = Field(default_factory=list, description="A few validation instances, as requests carry them.")
    source: Source
    training: Training
    validation: Validation
    parity: Parity
    export: ExportInfo
    libraries: dict[str, str] = Field(default_factory=dict)
    monitoring: ReferenceProfile | None = Field(None, description="What the model did on its validation rows, the "
                                                "reference that serving compares live traffic with; absent for "
                                                "packages exported before profiles existed.")

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        """Format 1 had no samples and kept the int8 drop among the engines' metrics."""
        if isinstance(data, dict) and data.get("format_version") == 1:
            data = dict(data, format_version=2, samples=[])
            validation = dict(data.get("validation") or {})
            metrics = dict(validation.get("metrics") or {})
            validation["int8_accuracy_drop"] = metrics.pop("int8_accuracy_drop", None)
            data["validation"] = validation | {"metrics": metrics}
        return data

    @field_validator("files")
    @classmethod
    def _plain_names(cls, files: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in files:
            if not storage.is_plain_name(name) or name in (METADATA, COMMIT_MARKER):
                raise ValueError(f"{name!r} is not a plain file name inside the package")
        return files

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def engines(self) -> list[str]:
        return [e for e, f in ENGINE_FILES.items() if f in self.files]


def file_digests(directory: Path, names: list[str]) -> dict[str, FileEntry]:
    return {n: FileEntry(sha256=storage.sha256(directory / n), bytes=(directory / n).stat().st_size)
            for n in sorted(names)}


def write_metadata(directory: Path, metadata: PackageMetadata) -> None:
    """metadata.json, then its own digest: the last files written, so their presence marks a whole package."""
    (directory / METADATA).write_text(metadata.model_dump_json(indent=2))
    (directory / COMMIT_MARKER).write_text(storage.sha256(directory / METADATA) + "\n")


def _regular_file(path: Path, what: str) -> os.stat_result:
    """lstat of a package file that must be a regular file (not a symlink, not a directory)."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        raise PackageError(f"{path}: missing; {what}") from None
    if stat.S_ISLNK(st.st_mode):
        raise PackageError(f"{path}: a symlink; packages hold regular files only")
    if not stat.S_ISREG(st.st_mode):
        raise PackageError(f"{path}: not a regular file; packages hold regular files only")
    return st


def read_metadata(path: Path) -> PackageMetadata:
    """Parse a metadata.json (without checking its digest or the files it lists)."""
    try:
        return PackageMetadata.model_validate_json(path.read_bytes())
    except ValidationError as e:
        raise PackageError(describe_validation_error(e, str(path))) from None


def verify_package(directory: Path) -> PackageMetadata:
    """Check metadata.json against its digest, every listed file against its sha256 and size, and that
    the directory holds nothing else."""
    meta_path, digest_path = directory / METADATA, directory / COMMIT_MARKER
    for path in (meta_path, digest_path):
        _regular_file(path, "not a complete model package")
    if storage.sha256(meta_path) != digest_path.read_text().strip():
        raise PackageError(f"{meta_path}: sha256 mismatch; the file is truncated or altered")
    meta = read_metadata(meta_path)
    for name, want in meta.files.items():
        path = directory / name
        st = _regular_file(path, f"listed in {METADATA} but not in the package")
        if st.st_size != want.bytes or storage.sha256(path) != want.sha256:
            raise PackageError(f"{path}: sha256 mismatch; the file is truncated or altered")
    extra = sorted(p.name for p in directory.iterdir() if p.name not in meta.files and p.name not in (METADATA, COMMIT_MARKER))
    if extra:
        raise PackageError(f"{directory / extra[0]}: not listed in {METADATA}; a package holds only its listed files")
    return meta


@dataclass
class ModelPackage:
    """A verified package directory and its metadata."""

    path: Path
    metadata: PackageMetadata

    @classmethod
    def open(cls, path: str | Path) -> ModelPackage:
        path = Path(path)
        return cls(path, verify_package(path))

    @property
    def ref(self) -> str:
        return self.metadata.ref

    @property
    def labels(self) -> list[str]:
        return self.metadata.task.labels

    @property
    def inputs(self) -> Inputs:
        return self.metadata.inputs

    def engines(self) -> list[str]:
        return self.metadata.engines()
