"""Reading tracked runs back, for `python -m ray_apps runs`: from the MLflow store when there is one,
else from the run directories under the storage path (each run's result.json)."""

from __future__ import annotations

import os
import re
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from rayfoundry import storage
from rayfoundry.errors import ConfigError
from tracking.tracker import DEFAULT_EXPERIMENT, IDENTITY_FIELDS, bound_http_retries, default_uri, flatten, param_value
from trainers.summary import RESULT_FILE, parse_summary


class RunRecord(BaseModel):
    """One run as `runs list/show/compare` print it."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="MLflow run id, or the run directory's name.")
    name: str
    kind: str = Field(description="train, sweep or trial.")
    status: str
    started: str | None = None
    parent: str | None = Field(None, description="The sweep's run id, for a trial.")
    params: dict[str, str] = Field(default_factory=dict)
    metrics: dict[str, float] = Field(default_factory=dict, description="Latest value of each metric.")
    tags: dict[str, str] = Field(default_factory=dict, description="rayfoundry.* tags: lineage and end reason.")
    artifacts: list[str] = Field(default_factory=list)
    source: Literal["mlflow", "run_dir"]


class Comparison(BaseModel):
    runs: list[str]
    params: dict[str, list[str | None]] = Field(description="Only the parameters that differ.")
    metrics: dict[str, list[float | None]]


class MlflowRuns:
    """Runs of one MLflow experiment."""

    def __init__(self, uri: str, experiment: str):
        from mlflow import MlflowClient

        bound_http_retries()  # a server that does not answer: an error, not a hang
        self.uri, self.client = uri, MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            raise ConfigError(f"{uri}: no MLflow experiment {experiment!r}; is tracking.experiment set differently?")
        self.experiment_id = found.experiment_id

    def list(self, limit: int) -> list[RunRecord]:
        return [self._record(r, artifacts=False) for r in
                self.client.search_runs([self.experiment_id], order_by=["attributes.start_time DESC"], max_results=limit)]

    def get(self, ref: str) -> RunRecord:
        from mlflow.exceptions import MlflowException

        if re.fullmatch(r"[0-9a-f]{32}", ref):
            try:
                return self._record(self.client.get_run(ref))
            except MlflowException:
                pass
        runs = self.client.search_runs([self.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
        hits = [r for r in runs if r.info.run_id.startswith(ref)] if len(ref) >= 6 else []
        hits = hits or [r for r in runs if r.info.run_name == ref]
        if not hits:
            raise ConfigError(f"run {ref!r}: no such run id, id prefix or run name in {self.uri}")
        if len(hits) > 1:
            ids = ", ".join(r.info.run_id[:12] for r in hits[:5])
            raise ConfigError(f"run {ref!r}: {len(hits)} runs match ({ids}{', ...' if len(hits) > 5 else ''}); "
                              f"give a run id")
        return self._record(hits[0])

    def _record(self, run, artifacts: bool = True) -> RunRecord:
        tags = run.data.tags
        return RunRecord(
            id=run.info.run_id, name=run.info.run_name or "", kind=tags.get("rayfoundry.kind", "-"), status=run.info.status,
            started=time.strftime("%Y-%m-%d %H:%M", time.localtime(run.info.start_time / 1000)) if run.info.start_time else None,
            parent=tags.get("mlflow.parentRunId"), params=dict(run.data.params), metrics=dict(run.data.metrics),
            tags={k: v for k, v in tags.items() if k.startswith("rayfoundry.")},
            artifacts=self._artifacts(run.info.run_id) if artifacts else [], source="mlflow")

    def _artifacts(self, run_id: str, path: str | None = None) -> list[str]:
        out = []
        for item in self.client.list_artifacts(run_id, path):
            out += self._artifacts(run_id, item.path) if item.is_dir else [item.path]
        return out


class RunDirs:
    """Runs read from `<storage>/<name>/result.json` (tracking off, or no MLflow store)."""

    def __init__(self, storage_path: str):
        self.root = storage.resolve(storage_path)

    def list(self, limit: int) -> list[RunRecord]:
        if not os.path.isdir(self.root):
            raise ConfigError(f"{self.root}: no such run storage directory")
        found = []
        for entry in os.scandir(self.root):
            try:
                record = self._read(entry.path) if entry.is_dir() else None
            except (OSError, UnicodeDecodeError):  # unreadable or a broken link: not a run
                record = None
            if record is not None:
                found.append(record)
        return sorted(found, key=lambda r: r.started or "", reverse=True)[:limit]

    def get(self, ref: str) -> RunRecord:
        path = ref if os.sep in ref else os.path.join(self.root, ref)
        record = self._read(path) if storage.is_plain_name(os.path.basename(path)) else None
        if record is None:
            raise ConfigError(f"run {ref!r}: no finished run (result.json) at {path}")
        return record

    @staticmethod
    def _read(path: str) -> RunRecord | None:
        text = storage.read_text(os.path.join(path, RESULT_FILE))
        summary = parse_summary(text) if text else None
        if summary is None:
            return None
        lineage = summary.lineage
        tags = {"rayfoundry.run_dir": path} | ({
            "rayfoundry.config_hash": lineage.config_hash, "rayfoundry.data_fingerprint": lineage.data.digest,
            "rayfoundry.code_revision": lineage.code_revision or ""} if lineage else {})
        metrics = {k: float(v) for k, v in summary.final_metrics.items() if isinstance(v, int | float)}
        metrics |= {f"best_{k}": float(v) for k, v in summary.best_metrics.items() if k.startswith("val_")}
        started = time.strftime("%Y-%m-%d %H:%M", time.localtime(os.path.getmtime(os.path.join(path, RESULT_FILE))))
        return RunRecord(id=os.path.basename(path), name=summary.job, kind="train", status=summary.status.upper(),
                         started=started, params={k: param_value(v) for k, v in flatten(summary.config or {}).items()},
                         metrics=metrics, tags=tags, artifacts=[RESULT_FILE], source="run_dir")


def open_runs(storage_path: str, uri: str | None, experiment: str | None):
    """The MLflow store at `uri` (default: `<storage>/mlflow.db` when it exists), else the run directories."""
    if uri is None:
        local = default_uri("mlflow", None, storage_path, storage_path)[0]
        if local and os.path.isfile(local.removeprefix("sqlite:///")):
            uri = local
    return MlflowRuns(uri, experiment or DEFAULT_EXPERIMENT) if uri else RunDirs(storage_path)


def compare(records: list[RunRecord]) -> Comparison:
    """Parameters that differ between the runs (where they run and how they are tracked do not count),
    and every metric side by side."""
    keys = sorted(set().union(*(r.params for r in records)))
    keys = [k for k in keys if k not in IDENTITY_FIELDS and not k.startswith("tracking.")]
    params = {k: [r.params.get(k) for r in records] for k in keys if len({r.params.get(k) for r in records}) > 1}
    names = sorted(k for k in set().union(*(r.metrics for r in records)) if not k.startswith("config/"))
    return Comparison(runs=[r.id for r in records], params=params,
                      metrics={k: [r.metrics.get(k) for r in records] for k in names})
