"""`Tracker`: one run in MLflow (or TensorBoard), opened by the driver and reopened wherever metrics
arrive (the Ray Train controller, the Tune driver). Tracking never stops training: the first failure
(a server down, a bad URI, a full disk) prints one line and turns that tracker off.

    tracker = Tracker.open(job.tracking, storage_path=..., run_dir=..., run_name=..., params=..., tags=..., log=print)
    tracker.log_metrics({"val_accuracy": 0.97}, step=3)
    tracker.log_text(summary_json, "result.json")
    tracker.finish()

MLflow runs go through MLflow's own client (`MlflowClient`). The default store is a SQLite file beside
the runs (`<storage_path>/mlflow.db`, artifacts in `<storage_path>/mlartifacts`), so tracking needs no
server; a remote server is given as `tracking.uri`. A rerun of the same run directory continues the
same MLflow run: its id is kept in `<run_dir>/tracking.json`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Any

from rayfoundry import storage
from tracking.records import Lineage, TrackingRef

TRACKING_FILE = "tracking.json"
TRIAL_TAG = "rayfoundry.trial_id"
DEFAULT_EXPERIMENT = "rayfoundry"
# A tracking server that stops answering must not hold training for minutes (MLflow's defaults are 7
# retries with exponential backoff and a 120 s timeout); users who want more set these themselves.
HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
MAX_PARAM_CHARS = 6000  # MLflow's limit on a parameter value
IDENTITY_FIELDS = ("run.name", "run.storage_path")  # where a run lives, not what it is


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted fields: {"optim": {"lr": 1e-3}} -> {"optim.lr": 1e-3}."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_hash(job_json: dict[str, Any]) -> str:
    """sha256 of a resolved TrainJob (as JSON) without where it runs and how it is tracked: two runs
    of one recipe on the same data share it."""
    flat = {k: v for k, v in flatten(job_json).items() if k not in IDENTITY_FIELDS and not k.startswith("tracking.")}
    return hashlib.sha256(json.dumps(flat, sort_keys=True, default=str).encode()).hexdigest()


def code_revision(cwd: str | None = None) -> str | None:
    """The git commit of the code that runs (with '-dirty' when tracked files changed), or None outside git
    (e.g. a `ray job submit` working directory, which is uploaded without .git). Asked where this file
    lives, not in the current directory: Tune runs trials inside their trial directories."""
    cwd = cwd or str(Path(__file__).resolve().parent)
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def rayfoundry_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rayfoundry")
    except PackageNotFoundError:
        return "unknown"


def default_uri(backend: str, uri: str | None, storage_path: str, run_dir: str) -> tuple[str | None, str]:
    """(the URI to track at, or None when there is none; why, when None)."""
    if backend == "tensorboard":
        return (storage.join(run_dir, "tensorboard"), "") if storage.is_local(run_dir) else \
            (None, f"run storage {run_dir} is not local; TensorBoard files need a local path")
    if uri:
        return uri, ""
    root = storage.resolve(storage_path)
    if not storage.is_local(root):
        return None, (f"run.storage_path {storage_path} is an object store, where a SQLite file cannot live; "
                      f"set tracking.uri to an MLflow server")
    return f"sqlite:///{root.removeprefix('file://')}/mlflow.db", ""


class Tracker:
    """One tracked run; every call is a no-op once tracking is off."""

    def __init__(self, ref: TrackingRef | None, log=print):
        self.ref, self.log, self.off = ref, log, ref is None
        self._client = self._writer = None

    # -- opening -------------------------------------------------------------------------------------
    @classmethod
    def open(cls, section, *, storage_path: str, run_dir: str, run_name: str, params: dict[str, Any],
             tags: dict[str, str], log=print, parent_run_id: str | None = None) -> Tracker:
        """Create the run, or continue the one `<run_dir>/tracking.json` names; log params and tags."""
        if section.backend == "none":
            return cls(None, log)
        uri, why = default_uri(section.backend, section.uri, storage_path, run_dir)
        if uri is None:
            log(f"tracking: off ({why})")
            return cls(None, log)
        tracker = cls(TrackingRef(backend=section.backend, uri=uri), log)
        tracker._safely("open a run", lambda: tracker._open(section, run_dir, run_name, params, tags, parent_run_id))
        return tracker

    @staticmethod
    def warm_up(section, *, storage_path: str, run_dir: str) -> threading.Thread | None:
        """Import MLflow and create a new SQLite store in the background (about 4 s on 2 cores) while the
        driver prepares data; `open` then finds both ready. Failures are left for `open` to report."""
        if section.backend != "mlflow":
            return None
        uri = default_uri(section.backend, section.uri, storage_path, run_dir)[0]

        def work() -> None:
            try:
                from mlflow import MlflowClient

                if uri and uri.startswith("sqlite:///"):
                    with _store_lock(uri):
                        MlflowClient(uri).search_experiments(max_results=1)
            except Exception:
                pass
        thread = threading.Thread(target=work, name="tracking-warm-up", daemon=True)
        thread.start()
        return thread

    def _open(self, section, run_dir: str, run_name: str, params: dict[str, Any], tags: dict[str, str],
              parent_run_id: str | None) -> None:
        if self.ref.backend == "tensorboard":
            writer = self.writer()
            writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in params.items()))
            writer.add_text("tags", "\n".join(f"    {k}: {v}" for k, v in tags.items()))
            return
        _probe(self.ref.uri)
        name = section.experiment or DEFAULT_EXPERIMENT
        with _store_lock(self.ref.uri):  # a new SQLite store's tables and experiment: one process at a time
            client = self.client()
            experiment = client.get_experiment_by_name(name)
            experiment_id = experiment.experiment_id if experiment else client.create_experiment(
                name, artifact_location=_artifact_location(self.ref.uri, name))
        stored = _stored_ref(run_dir)
        previous = _previous_run(client, stored, self.ref.uri, run_dir)
        if previous is not None:
            # The same run continues (resumed, or extended with more epochs). MLflow keeps a parameter's
            # first value: a changed one (run.epochs) is noted in a tag instead.
            self.ref = stored
            client.update_run(self.ref.run_id, status="RUNNING")
            logged = previous.data.params
            changed = [f"{k}: {logged[k]} -> {param_value(v)}" for k, v in params.items()
                       if param_key(k) in logged and logged[param_key(k)] != param_value(v)]
            params = {k: v for k, v in params.items() if param_key(k) not in logged}
            if changed:
                tags = tags | {"rayfoundry.changed_params": "; ".join(changed)}
        else:
            all_tags = tags | ({"mlflow.parentRunId": parent_run_id} if parent_run_id else {})
            run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
            self.ref = TrackingRef(backend="mlflow", uri=self.ref.uri, experiment_id=experiment_id,
                                   run_id=run.info.run_id, parent_run_id=parent_run_id)
            storage.write_text(storage.join(run_dir, TRACKING_FILE), self.ref.model_dump_json(indent=2))
        self.log_params(params)
        self.set_tags(tags)

    # -- logging -------------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            bound_http_retries()
            from mlflow import MlflowClient

            self._client = MlflowClient(self.ref.uri)
        return self._client

    def writer(self):
        if self._writer is None:
            from tensorboardX import SummaryWriter

            self._writer = SummaryWriter(self.ref.uri)
        return self._writer

    def log_params(self, params: dict[str, Any]) -> None:
        if self.off or self.ref.backend != "mlflow":
            return

        def log() -> None:
            from mlflow.entities import Param

            items = [Param(param_key(k), param_value(v)) for k, v in params.items()]
            for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
                self.client().log_batch(self.ref.run_id, params=items[i:i + 100])
        self._safely("log parameters", log)

    def set_tags(self, tags: dict[str, str]) -> None:
        if self.off or self.ref.backend != "mlflow":
            return

        def log() -> None:
            from mlflow.entities import RunTag

            self.client().log_batch(self.ref.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items() if v is not None])
        self._safely("set tags", log)

    def log_metrics(self, metrics: dict[str, Any], step: int) -> None:
        if self.off:
            return
        numeric = _numeric(metrics)
        if self.ref.backend == "tensorboard":
            def write() -> None:
                for key, value in numeric.items():
                    self.writer().add_scalar(key, value, step)
                self.writer().flush()
            self._safely("write TensorBoard scalars", write)
            return

        def log() -> None:
            from mlflow.entities import Metric

            now = _now_ms()
            self.client().log_batch(self.ref.run_id, metrics=[Metric(param_key(k), v, now, step) for k, v in numeric.items()])
        self._safely("log metrics", log)

    def log_text(self, text: str, artifact_file: str) -> None:
        if self.ref is not None and self.ref.backend == "tensorboard":
            self._safely("write TensorBoard text", lambda: self.writer().add_text(artifact_file, f"```\n{text}\n```"))
            return
        self._safely(f"store {artifact_file}", lambda: self.client().log_text(self.ref.run_id, text, artifact_file))

    def finish(self, status: str = "FINISHED") -> None:
        """Mark the run ended (FINISHED, FAILED or KILLED)."""
        if self.ref is not None and self.ref.backend == "tensorboard":
            self._safely("close TensorBoard files", lambda: self.writer().close())
            return
        self._safely("end the run", lambda: self.client().set_terminated(self.ref.run_id, status=status))

    def _safely(self, what: str, fn) -> Any:
        if self.off:
            return None
        try:
            return fn()
        except Exception as e:  # any backend failure: say so once, keep training
            self.off = True
            where = f"{self.ref.backend} at {self.ref.uri}" if self.ref else "tracking"
            message = " ".join(str(e).split())[:300]
            self.log(f"tracking: {where} failed to {what} ({type(e).__name__}: {message}); "
                     f"the run goes on without tracking")
            if self.ref is not None and self.ref.backend == "mlflow" and self.ref.run_id and self._client is not None:
                try:  # best effort: a run that stopped being tracked should not stay RUNNING forever
                    self._client.set_terminated(self.ref.run_id, status="FAILED")
                except Exception:
                    pass
            return None


def _previous_run(client, stored: TrackingRef | None, uri: str, run_dir: str):
    """The MLflow run `tracking.json` names, if it still exists, is active, and belongs to this run
    directory (a tracking.json copied from another run directory is not followed)."""
    from mlflow.exceptions import MlflowException

    if stored is None or stored.backend != "mlflow" or stored.uri != uri or not stored.run_id:
        return None
    try:
        run = client.get_run(stored.run_id)
    except MlflowException:  # the store was replaced or the run deleted: start a new run
        return None
    if run.info.lifecycle_stage != "active" or run.data.tags.get("rayfoundry.run_dir") != run_dir:
        return None
    return run


@contextlib.contextmanager
def _store_lock(uri: str):
    """An exclusive lock beside a local SQLite store while MLflow creates or upgrades its tables; runs
    started together on a new store otherwise race in its migrations."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def find_trial_run(client, experiment_id: str, parent_run_id: str, trial_id: str) -> str | None:
    """The nested run of one trial of a sweep, if it was created before (by an earlier driver)."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`{TRIAL_TAG}` = '{trial_id}' and "
                              f"tags.`mlflow.parentRunId` = '{parent_run_id}'", max_results=1)
    return runs[0].info.run_id if runs else None


def source_run(ref: TrackingRef | None, log=print) -> Tracker:
    """A tracker on the run a lineage names (a sweep trial's run is looked up by its trial id); off when
    there is none."""
    if ref is None or ref.backend != "mlflow":
        return Tracker(None, log)
    if ref.uri.startswith("sqlite:///") and not os.path.isfile(ref.uri.removeprefix("sqlite:///")):
        log(f"tracking: the source run's store {ref.uri} is not on this machine; the export is not recorded against it")
        return Tracker(None, log)
    tracker = Tracker(ref, log)
    if ref.run_id is None and ref.trial_id and ref.parent_run_id:
        parent_experiment = tracker._safely("find the sweep's run",
                                            lambda: tracker.client().get_run(ref.parent_run_id).info.experiment_id)
        found = tracker._safely("find the trial's run", lambda: find_trial_run(
            tracker.client(), parent_experiment, ref.parent_run_id, ref.trial_id)) if parent_experiment else None
        if found is None:
            return Tracker(None, log)
        tracker.ref = ref.model_copy(update={"run_id": found, "experiment_id": parent_experiment})
    return tracker


def _probe(uri: str) -> None:
    """Fail fast on an HTTP tracking server that does not answer, instead of MLflow's long retries."""
    if uri.startswith(("http://", "https://")):
        import requests

        requests.get(uri.rstrip("/") + "/health", timeout=5)


def _stored_ref(run_dir: str) -> TrackingRef | None:
    try:
        text = storage.read_text(storage.join(run_dir, TRACKING_FILE))
        return TrackingRef.model_validate_json(text) if text else None
    except ValueError:
        return None


def _artifact_location(uri: str, experiment: str) -> str | None:
    """Artifacts of a SQLite store go beside the database, not into the current directory's ./mlruns."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri.removeprefix("sqlite:///")).parent.joinpath("mlartifacts", experiment).as_uri()


def param_key(key: str) -> str:
    """A name MLflow accepts (letters, digits, _ - . / and space); free-form config dicts may hold others."""
    return re.sub(r"[^A-Za-z0-9_\-. /]", "_", key)[:250]


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in metrics.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            try:
                out[key] = float(value)
            except OverflowError:  # an int beyond float range is not a metric
                pass
    return out


def param_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)


def build_lineage(job_json: dict[str, Any], data) -> Lineage:
    """A run's lineage (its tracked run is set once the tracker is open)."""
    return Lineage(config_hash=config_hash(job_json), code_revision=code_revision(),
                   rayfoundry_version=rayfoundry_version(), data=data)


def bound_http_retries() -> None:
    """MLflow's HTTP retry and timeout bounds (HTTP_BOUNDS), unless the user set them."""
    for key, value in HTTP_BOUNDS.items():
        os.environ.setdefault(key, value)


def lineage_tags(lineage, kind: str, run_dir: str) -> dict[str, str]:
    """The tags every tracked run carries, so runs can be found by recipe, data or code."""
    return {"rayfoundry.kind": kind, "rayfoundry.config_hash": lineage.config_hash,
            "rayfoundry.data_fingerprint": lineage.data.digest, "rayfoundry.code_revision": lineage.code_revision,
            "rayfoundry.version": lineage.rayfoundry_version, "rayfoundry.run_dir": run_dir}
