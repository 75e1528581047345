"""The typed config tree for a training job (`TrainJob`), loaded from YAML with `--set` overrides.

Every section is a pydantic model with `extra="forbid"` and a description per field; checks that
span fields live in validators here, nowhere else. `load_job` turns any problem into a `ConfigError`
whose message is one line naming the file, the field and the problem.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayfoundry.errors import ConfigError, describe_validation_error

__all__ = ["ConfigError", "Section", "TrainJob", "apply_overrides", "load_job", "parse_job", "read_yaml"]

SKLEARN_SOURCES = ("sklearn:digits", "sklearn:breast_cancer")
HIGHER_IS_BETTER = {"val_accuracy": True, "val_macro_f1": True, "val_loss": False}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSection(Section):
    train_path: str = Field(
        description="Training data: a file, directory or URI pyarrow reads (s3://, gs://), "
        "or a built-in: sklearn:digits, sklearn:breast_cancer."
    )
    validation_path: str | None = Field(
        None, description="Explicit validation data; when unset, validation_fraction of train is held out."
    )
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet"] = Field(
        "auto", description="File format; auto picks it from the file extension."
    )
    header: bool = Field(True, description="CSV/TSV files start with a header row naming the columns.")
    columns: list[str] | None = Field(
        None, description="Column names for CSV/TSV files without a header, in file order."
    )
    text_column: str | None = Field(None, description="Column holding the input text (text models).")
    feature_columns: list[str] | None = Field(
        None, description="Numeric input columns (image/tabular models); unset means all but the label."
    )
    label_column: str = Field("label", description="Column holding the class label (int or string).")
    labels: list[str] | None = Field(
        None, description="Allowed labels in id order; unset means the sorted labels found in train."
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="Share of train rows held out for validation (deterministic by run.seed)."
    )
    max_rows: int | None = Field(None, gt=0, description="Use only the first N rows of each source (quick runs).")
    max_length: int = Field(128, ge=8, le=4096, description="Truncate tokenized text to this many tokens.")
    on_bad_row: Literal["error", "skip"] = Field(
        "error", description="error: stop at the first bad row, naming it; skip: drop bad rows and report the count."
    )
    shuffle_buffer: int = Field(
        2048, ge=0, description="Rows in each worker's local shuffle buffer; 0 disables shuffling."
    )
    group_by_length: bool = Field(
        False, description="Text: batch rows of similar token length (sorted within windows of 50 batches, the "
        "batches then drawn in a seeded order), so batches carry little padding; validation is sorted too."
    )

    def resolved_format(self, path: str) -> str:
        if self.format != "auto":
            return self.format
        name = path.lower().removesuffix(".gz").removesuffix(".zst")
        for ext, fmt in ((".tsv", "tsv"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"), (".parquet", "parquet")):
            if name.endswith(ext):
                return fmt
        raise ConfigError(f"data.format: cannot tell the format of '{path}' from its extension; set data.format")

    @model_validator(mode="after")
    def _check(self) -> DataSection:
        if not self.header and not self.columns:
            paths = [self.train_path, self.validation_path]
            if any(p and not p.startswith("sklearn:") for p in paths):
                raise ValueError("data.columns must name the columns when data.header is false")
        if self.train_path.startswith("sklearn:") and self.train_path not in SKLEARN_SOURCES:
            raise ValueError(f"unknown built-in '{self.train_path}'; choose one of {', '.join(SKLEARN_SOURCES)}")
        if self.labels is not None and len(set(self.labels)) != len(self.labels):
            raise ValueError("data.labels has duplicates")
        if self.labels is not None and len(self.labels) < 2:
            raise ValueError("data.labels needs at least two classes")
        return self


class TextModel(Section):
    type: Literal["text"] = Field(description="Transformer sequence classifier (AutoModelForSequenceClassification).")
    pretrained_path: str | None = Field(
        None, description="Local Hugging Face model directory; unset means the all-MiniLM-L6-v2 shipped with rayfoundry."
    )
    from_config: dict[str, Any] | None = Field(
        None, description="Build a randomly initialised model from these config fields (e.g. a tiny BERT for tests) "
        "instead of loading pretrained weights; the tokenizer still comes from pretrained_path.",
    )
    dropout: float | None = Field(None, ge=0, lt=1, description="Override the model's hidden dropout probability.")
    freeze_embeddings: bool = Field(
        False, description="Keep the token embedding matrix at its pretrained values: no gradient or optimizer "
        "state for it (about half of a small encoder's parameters), and words seen only at serving time keep "
        "embeddings consistent with the trained ones.")


class CNNModel(Section):
    type: Literal["cnn"] = Field(description="Small convolutional net for 8x8 single-channel images (64 features).")
    channels: list[int] = Field([32, 64], min_length=1, description="Output channels of each 3x3 conv block.")
    hidden: int = Field(128, gt=0, description="Width of the fully connected layer before the classifier.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout before the classifier.")


class MLPModel(Section):
    type: Literal["mlp"] = Field(description="Multi-layer perceptron for tabular features.")
    hidden: list[int] = Field([128, 64], min_length=1, description="Width of each hidden layer.")
    dropout: float = Field(0.1, ge=0, lt=1, description="Dropout after each hidden layer.")
    standardize: bool = Field(True, description="Scale features by train mean/std (stored with the checkpoint).")


ModelSection = Annotated[TextModel | CNNModel | MLPModel, Field(discriminator="type")]


class OptimSection(Section):
    lr: float = Field(1e-3, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW decoupled weight decay.")
    batch_size: int = Field(64, gt=0, description="Global batch per optimizer step, over all workers and accumulation.")
    grad_accum_steps: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the global gradient norm; null disables.")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = Field(
        "linear", description="transformers.get_scheduler schedule after warm-up."
    )
    warmup_fraction: float = Field(0.06, ge=0, lt=1, description="Share of all optimizer steps spent warming up.")
    precision: Literal["fp32", "bf16", "auto"] = Field(
        "fp32", description="bf16 runs forward passes under torch.autocast (weights and optimizer stay fp32); auto "
        "picks bf16 on a CUDA device with bf16 and on a CPU with AMX or AVX-512 BF16, else fp32, and prints why.")


class ScalingSection(Section):
    num_workers: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        2, description="Ray Train workers (processes) in the DDP group; auto: one per GPU when the run uses "
        "GPUs, one per node on several CPU nodes, one using every core on a single CPU node (the choice is printed).")
    use_gpu: bool | Literal["auto"] = Field("auto", description="One GPU per worker; auto uses GPUs when the cluster has them.")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker; leave CPUs free for Ray Data.")
    threads_per_worker: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        1, description="torch intra-op threads in each worker; auto: the node's CPUs over its workers.")


class DDPStrategy(Section):
    name: Literal["ddp"] = Field(description="PyTorch DistributedDataParallel via ray.train.torch.prepare_model.")
    find_unused_parameters: bool = Field(False, description="Passed to DDP for models with unused branches.")


DERIVED_DEEPSPEED_KEYS = {
    "train_micro_batch_size_per_gpu": "optim.batch_size and scaling.num_workers",
    "train_batch_size": "optim.batch_size", "gradient_accumulation_steps": "optim.grad_accum_steps",
    "gradient_clipping": "optim.max_grad_norm", "bf16": "optim.precision", "fp16": "optim.precision",
    "optimizer": "optim (lr, weight_decay)", "scheduler": "optim.scheduler and optim.warmup_fraction",
}


class DeepSpeedStrategy(Section):
    name: Literal["deepspeed"] = Field(description="DeepSpeed ZeRO; its config is derived from this job.")
    zero_stage: Literal[1, 2, 3] = Field(2, description="ZeRO stage: 1 shards optimizer state, 2 also gradients, "
                                         "3 also parameters.")
    offload_optimizer: Literal["none", "cpu"] = Field("none", description="Keep optimizer state in CPU memory.")
    deepspeed_config: dict[str, Any] | None = Field(
        None, description="Extra DeepSpeed config merged over the derived one (e.g. zero_optimization.overlap_comm); "
        "keys derived from the job are refused.",
    )

    @model_validator(mode="after")
    def _check(self) -> DeepSpeedStrategy:
        clash = [k for k in (self.deepspeed_config or {}) if k in DERIVED_DEEPSPEED_KEYS]
        if clash:
            k = clash[0]
            raise ValueError(f"strategy.deepspeed_config.{k} is derived from {DERIVED_DEEPSPEED_KEYS[k]}; set that instead")
        zero = (self.deepspeed_config or {}).get("zero_optimization", {})
        if not isinstance(zero, dict) or "stage" in zero or "offload_optimizer" in zero:
            raise ValueError("strategy.deepspeed_config.zero_optimization: set stage and offload through "
                             "strategy.zero_stage and strategy.offload_optimizer")
        return self


StrategySection = Annotated[DDPStrategy | DeepSpeedStrategy, Field(discriminator="name")]


class CheckpointSection(Section):
    keep: int = Field(2, ge=1, description="How many checkpoints to keep, best first by metric.")
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss"] = Field(
        "val_accuracy", description="Validation metric that ranks checkpoints."
    )
    mode: Literal["max", "min"] | None = Field(
        None, description="Whether higher is better; unset infers it from the metric, and a contradiction is refused.")

    @model_validator(mode="after")
    def _check(self) -> CheckpointSection:
        if self.mode is not None and self.mode != self.resolved_mode:
            better = "higher" if HIGHER_IS_BETTER[self.metric] else "lower"
            raise ValueError(f"checkpoint.mode {self.mode} contradicts checkpoint.metric {self.metric}, which is better "
                             f"{better}; leave checkpoint.mode unset")
        return self

    @property
    def resolved_mode(self) -> str:
        return "max" if HIGHER_IS_BETTER[self.metric] else "min"


class FailureSection(Section):
    max_failures: int = Field(
        2, ge=-1, description="Worker-group failures Ray Train recovers from (restart from the latest checkpoint); "
        "-1 means unlimited.",
    )


class RunSection(Section):
    name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
        description="Run name; re-running the same name resumes it. Unset means the config file's name.",
    )
    storage_path: str = Field("runs", description="Where run directories and checkpoints go (local path or URI).")
    epochs: int = Field(5, ge=1, description="Passes over the training data (at most).")
    max_steps: int | None = Field(None, ge=1, description="Stop after this many optimizer steps if fewer than the "
                                  "epochs take; the learning-rate schedule is laid out over them.")
    time_budget_min: float | None = Field(
        None, gt=0, le=10_080, description="Wall-time budget in minutes from the command's start: the first steps "
        "are timed and the learning-rate schedule is laid out over the steps that fit, less the validations and "
        "checkpoints to come, so the run ends, validated and checkpointed, within it (or when the epochs or "
        "max_steps end, if sooner).")
    check_every_steps: int | None = Field(
        None, ge=1, description="Also validate every N optimizer steps during an epoch, on run.check_rows rows of "
        "the validation set (a fixed seeded sample); every epoch still ends with a full validation.")
    check_rows: int | None = Field(
        2048, ge=1, description="Rows of the fixed sample that in-epoch checks score; null: all validation rows.")
    stop_at: float | None = Field(
        None, description="End the run once checkpoint.metric reaches this value at a check or an epoch's "
        "validation (time to accuracy); a full validation and checkpoint follow.")
    seed: int = Field(0, ge=0, description="Seeds every RNG and the train/validation split.")


class TrackingSection(Section):
    backend: Literal["none", "tensorboard", "mlflow"] = Field(
        "mlflow", description="Where params, per-epoch metrics, tags and artifacts go; none turns tracking off.")
    uri: str | None = Field(
        None, description="MLflow tracking URI (http://host:5000, sqlite:////abs/mlflow.db, databricks); unset: "
        "a SQLite file mlflow.db in run.storage_path. Ignored by tensorboard (files go in the run directory).")
    experiment: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                                   description="MLflow experiment name; unset: rayfoundry.")

    @model_validator(mode="after")
    def _no_credentials(self) -> TrackingSection:
        if self.uri and "://" in self.uri and (urlsplit(self.uri).username or urlsplit(self.uri).password):
            raise ValueError("tracking.uri holds credentials, which would be copied into run records and package "
                             "metadata; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or "
                             "MLFLOW_TRACKING_TOKEN) in the environment instead")
        return self


class TrainJob(Section):
    """A complete training job: what to read, what to train, how, where and for how long."""

    data: DataSection
    model: ModelSection
    optim: OptimSection = OptimSection()
    scaling: ScalingSection = ScalingSection()
    strategy: StrategySection = DDPStrategy(name="ddp")
    checkpoint: CheckpointSection = CheckpointSection()
    failure: FailureSection = FailureSection()
    run: RunSection = RunSection()
    tracking: TrackingSection = TrackingSection()

    @model_validator(mode="after")
    def _check(self) -> TrainJob:
        m, d = self.model, self.data
        if m.type == "text" and not d.text_column:
            raise ValueError("data.text_column is required for model.type text")
        if m.type != "text" and d.text_column:
            raise ValueError(f"data.text_column is set but model.type {m.type} takes numeric features")
        if m.type == "text" and m.freeze_embeddings and m.from_config is not None:
            raise ValueError("model.freeze_embeddings keeps pretrained embeddings; with model.from_config they are "
                             "random: unset one of them")
        if m.type != "text" and d.group_by_length:
            raise ValueError(f"data.group_by_length groups text by token length; model.type {m.type} has no text")
        if m.type == "text" and d.train_path.startswith("sklearn:"):
            raise ValueError(f"{d.train_path} has no text; use model.type cnn or mlp")
        if m.type == "cnn" and d.feature_columns is not None and len(d.feature_columns) != 64:
            raise ValueError(f"model.type cnn takes 64 features (8x8); data.feature_columns has {len(d.feature_columns)}")
        stop, metric = self.run.stop_at, self.checkpoint.metric
        if stop is not None and not (0 < stop <= 1 if metric != "val_loss" else stop > 0):
            raise ValueError(f"run.stop_at {stop} is out of range for checkpoint.metric {metric} "
                             f"({'a value in (0, 1]' if metric != 'val_loss' else 'a loss above 0'})")
        per_step = self.scaling.num_workers * self.optim.grad_accum_steps if self.scaling.num_workers != "auto" else \
            self.optim.grad_accum_steps  # auto: checked again once the run has chosen
        if self.optim.batch_size % per_step:
            raise ValueError(
                f"optim.batch_size {self.optim.batch_size} must divide evenly over "
                f"scaling.num_workers x optim.grad_accum_steps = {per_step}"
            )
        return self

    @property
    def micro_batch_size(self) -> int:
        """Rows per worker per forward pass, derived from the global batch (scaling resolved: no auto)."""
        if self.scaling.num_workers == "auto":
            raise ConfigError("scaling.num_workers is auto: resolve it on the cluster first (trainers/hardware.py)")
        return self.optim.batch_size // (self.scaling.num_workers * self.optim.grad_accum_steps)

    def scaled(self, choice) -> TrainJob:
        """This job with its scaling as `choice` (a hardware.ScalingChoice) resolved it; a global batch
        that does not divide over the chosen workers is a ConfigError naming the choice."""
        raw = json.loads(self.model_dump_json())
        raw["scaling"] |= {"num_workers": choice.num_workers, "threads_per_worker": choice.threads_per_worker,
                           "use_gpu": choice.use_gpu}
        try:
            return TrainJob.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(describe_validation_error(e, f"scaling ({choice.reason})")) from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `section.field=value` overrides; values are parsed as YAML scalars/lists."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {key}: '{part}' is not a section")
            node = child
        try:
            node[parts[-1]] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: cannot parse value {value!r}: {e.problem}") from None
    return raw


def parse_job(raw: Any, source: str = "<config>") -> TrainJob:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections (data, model, ...), got {type(raw).__name__}")
    try:
        return TrainJob.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, source)) from None


def read_yaml(path: str | Path) -> Any:
    """A config file's YAML; a missing file or a syntax error is a ConfigError naming file and line."""
    try:
        return yaml.safe_load(Path(path).read_text())
    except (FileNotFoundError, IsADirectoryError):
        raise ConfigError(f"{path}: no such config file") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None


def load_job(path: str | Path, overrides: list[str] = ()) -> TrainJob:
    """Read a job YAML, apply `--set` overrides, validate; every failure is a one-line ConfigError."""
    path = Path(path)
    raw = apply_overrides(read_yaml(path) or {}, list(overrides))
    job = parse_job(raw, str(path))
    if job.run.name is None:
        job.run.name = path.stem
    return job
