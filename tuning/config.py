"""The typed config of a sweep (`TuneJob`): a base TrainJob YAML, a search space over its dotted fields,
the metric, the scheduler and search algorithm, and how many trials run at once.

    base: digits_cnn.yaml                  # a TrainJob YAML, relative to this file
    train: {run: {epochs: 6}}              # overrides of the base, for every trial
    scaling: {num_workers: 1, cpus_per_worker: 0.5}   # per-trial Ray Train workers
    space:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      model.hidden: {choice: [32, 64, 128]}
    metric: val_accuracy
    scheduler: {type: asha, grace_period: 1}
    search: {type: random, seed: 0}

Every problem is a `ConfigError` whose one line names the file and the field: an unknown dotted field,
an empty choice, bounds out of order, or a bound the TrainJob itself refuses (e.g. a negative lr).
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from rayfoundry.errors import describe_validation_error
from trainers.config import ConfigError, ScalingSection, Section, TrainJob, apply_overrides, parse_job, read_yaml

DOMAINS = ("uniform", "loguniform", "randint", "choice")
# What PBT may change while a trial continues from another trial's weights: nothing that changes the
# model's shape, the data or the number of steps. Dropout is applied when the model is built.
PBT_MUTABLE = ("optim.lr", "optim.weight_decay", "model.dropout")


class ASHA(Section):
    type: Literal["asha"] = Field(description="Asynchronous successive halving (ray.tune.schedulers.ASHAScheduler).")
    grace_period: int = Field(1, ge=1, description="Epochs every trial runs before it can be stopped.")
    reduction_factor: float = Field(2, gt=1, description="Keep the top 1/reduction_factor at each rung.")
    brackets: int = Field(1, ge=1, description="Number of ASHA brackets.")


class PBT(Section):
    type: Literal["pbt"] = Field(description="Population based training (ray.tune.schedulers.PopulationBasedTraining): "
                                 "weak trials continue from a strong trial's checkpoint with mutated hyperparameters.")
    perturbation_interval: int = Field(2, ge=1, description="Epochs between exploit/explore steps of a trial.")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="Bottom share that copies the top share.")
    resample_probability: float = Field(0.25, ge=0, le=1, description="Chance a mutated value is resampled from the space.")
    synch: bool = Field(False, description="Exploit only when every running trial has reached the perturbation point "
                        "(trials wait for the slowest); false exploits against whatever the others last reported, "
                        "and a trial that already finished is never a donor.")


class FIFO(Section):
    type: Literal["fifo"] = Field(description="Run every trial to the end (no early stopping).")


SchedulerSection = Annotated[ASHA | PBT | FIFO, Field(discriminator="type")]


class SearchSection(Section):
    type: Literal["random", "optuna"] = Field("random", description="random: Tune's random/variant sampling; "
                                              "optuna: Optuna's TPE sampler (ray.tune.search.optuna.OptunaSearch).")
    seed: int | None = Field(0, description="Seed of the sampler; the same seed samples the same configs.")


class RunSection(Section):
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$",
                             description="Sweep name; re-running the same name resumes it. Unset: the config file's name.")
    storage_path: str = Field("runs", description="Where the sweep directory goes (local path or URI).")


class TuneJob(Section):
    """A sweep over one TrainJob."""

    base: str = Field(description="The TrainJob YAML every trial starts from; relative paths are relative to this file.")
    train: dict[str, Any] = Field({}, description="Overrides merged over the base job for every trial, as nested "
                                  "sections (e.g. {run: {epochs: 6}}).")
    scaling: ScalingSection | None = Field(None, description="Ray Train scaling of each trial; unset keeps the base's.")
    space: dict[str, dict[str, Any]] = Field(min_length=1, description="Dotted TrainJob field -> domain: "
                                             "{uniform|loguniform|randint: [low, high]} or {choice: [values]}.")
    metric: Literal["val_accuracy", "val_macro_f1", "val_loss"] = Field("val_accuracy", description="What to optimize.")
    mode: Literal["max", "min"] | None = Field(None, description="Unset: min for val_loss, else max.")
    num_samples: int = Field(8, ge=1, description="Trials to run (configs sampled from the space).")
    scheduler: SchedulerSection = ASHA(type="asha")
    search: SearchSection = SearchSection()
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="Upper bound on trials at once; the derived bound (see README) applies too.")
    reserve_cpus: float = Field(1.0, ge=0, description="CPUs left free for Ray Data and the trial drivers when "
                                "deriving how many trials fit at once.")
    max_failures: int = Field(1, ge=0, description="Times an errored trial is retried from its last checkpoint.")
    keep_checkpoints: int = Field(3, ge=1, description="Checkpoints Tune keeps per trial (best by metric); "
                                  "PBT keeps all, since it clones them.")
    run: RunSection = RunSection()

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric == "val_loss" else "max")

    @model_validator(mode="after")
    def _check(self) -> TuneJob:
        if self.search.type == "optuna":
            for field, domain in self.space.items():
                if any(isinstance(v, (list, dict)) for v in domain.get("choice") or []):
                    raise ValueError(f"space.{field}: Optuna's choices must be single values (numbers, strings, "
                                     "booleans), not lists; use search.type random for list choices")
        if isinstance(self.scheduler, PBT):
            if self.search.type != "random":
                raise ValueError("search.type: PBT samples its own mutations; use search.type random with scheduler pbt")
            for field in self.space:
                if field not in PBT_MUTABLE:
                    raise ValueError(f"space.{field}: PBT continues trials from other trials' weights, so it can only "
                                     f"mutate {', '.join(PBT_MUTABLE)}")
        return self


def _field_exists(job: TrainJob, dotted: str) -> bool:
    node: Any = job
    for part in dotted.split("."):
        if not isinstance(node, BaseModel) or part not in type(node).model_fields:
            return False
        node = getattr(node, part)
    return True


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    node = raw
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _domain_values(field: str, domain: dict[str, Any]) -> list[Any]:
    """The values that bound a domain (both ends, or every choice), after checking its shape."""
    if len(domain) != 1 or next(iter(domain)) not in DOMAINS:
        raise ValueError(f"space.{field}: expected one of {', '.join(DOMAINS)} (got {sorted(domain)})")
    kind, args = next(iter(domain.items()))
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ValueError(f"space.{field}: choice needs a non-empty list of values")
        return args
    if (not isinstance(args, list) or len(args) != 2
            or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in args)):
        raise ValueError(f"space.{field}: {kind} needs [low, high] numbers (got {args!r})")
    low, high = args
    if not low < high:
        raise ValueError(f"space.{field}: {kind} needs low < high (got [{low}, {high}])")
    if kind == "loguniform" and low <= 0:
        raise ValueError(f"space.{field}: loguniform needs 0 < low (got {low})")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise ValueError(f"space.{field}: randint needs integer bounds (got {args!r})")
    return [low, high - 1] if kind == "randint" else [low, high]


def trial_raw(spec: TuneJob, base_raw: dict[str, Any]) -> dict[str, Any]:
    """The base job with the sweep's `train` overrides and per-trial scaling, before sampled values."""
    raw = copy.deepcopy(base_raw)
    for dotted, value in _flatten(spec.train).items():
        set_dotted(raw, dotted, value)
    if spec.scaling is not None:
        raw["scaling"] = spec.scaling.model_dump()
    return raw


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value and key not in ("from_config", "deepspeed_config"):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def job_for(raw: dict[str, Any], values: dict[str, Any], source: str) -> TrainJob:
    """A trial's TrainJob: `raw` with the sampled dotted values set."""
    raw = copy.deepcopy(raw)
    for dotted, value in values.items():
        set_dotted(raw, dotted, value)
    return parse_job(raw, source)


def check_space(spec: TuneJob, raw: dict[str, Any], source: str) -> TrainJob:
    """Every dotted field exists in the base job and every bound or choice makes a valid TrainJob;
    returns the trial base's TrainJob."""
    job = job_for(raw, {}, source)
    for field, domain in spec.space.items():
        if not _field_exists(job, field):
            raise ConfigError(f"{source}: space.{field}: unknown TrainJob field "
                              f"(model.* fields depend on model.type, here {job.model.type})")
        try:
            values = _domain_values(field, domain)
        except ValueError as e:
            raise ConfigError(f"{source}: {e}") from None
        for value in values:
            try:
                job_for(raw, {field: value}, source)
            except ConfigError as e:
                raise ConfigError(f"{source}: space.{field}: the value {value!r} makes an invalid job: "
                                  f"{str(e).split(': ', 1)[-1]}") from None
    return job


class LoadedTune:
    """A validated sweep: the spec, the trial base (as a raw dict, and as the TrainJob it makes before
    sampled values) and where it came from."""

    def __init__(self, spec: TuneJob, trial_base: dict[str, Any], base_job: TrainJob, source: str, base_path: Path):
        self.spec, self.trial_base, self.base_job = spec, trial_base, base_job
        self.source, self.base_path = source, base_path

    def fingerprint(self) -> str:
        """What must not change between a sweep and its resumption."""
        return json.dumps({"spec": self.spec.model_dump(mode="json"), "base": self.trial_base}, sort_keys=True)


def load_tune(path: str | Path, overrides: list[str] = ()) -> LoadedTune:
    """Read a TuneJob YAML and its base TrainJob, apply `--set` overrides, validate everything."""
    path = Path(path)
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping (base, space, ...), got {type(raw).__name__}")
    for item in overrides:  # space.<dotted field>=<domain> sets one domain; anything else is a TuneJob field
        key, sep, value = item.partition("=")
        if key.startswith("space.") and sep:
            raw.setdefault("space", {})[key.removeprefix("space.")] = yaml.safe_load(value)
        else:
            apply_overrides(raw, [item])
    try:
        spec = TuneJob.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(describe_validation_error(e, str(path))) from None
    base_path = Path(spec.base) if Path(spec.base).is_absolute() else path.parent / spec.base
    if not base_path.is_file():
        raise ConfigError(f"{path}: base: no such TrainJob file {base_path}")
    base_raw = read_yaml(base_path) or {}
    raw_trial = trial_raw(spec, base_raw)
    source = f"{path} (base {base_path.name})"
    base_job = check_space(spec, raw_trial, source)
    if spec.run.name is None:
        spec.run.name = path.stem
    return LoadedTune(spec, raw_trial, base_job, source, base_path)
