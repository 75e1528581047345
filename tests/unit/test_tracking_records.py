"""Lineage and tracking without Ray: data fingerprints and their cache, config hashes, the tracking
section, the failure-safe `Tracker` (MLflow on SQLite, TensorBoard), reading runs back, `runs compare`.

Run: .venv/bin/python -m pytest tests/unit/test_tracking_records.py -q
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest

from rayfoundry import storage
from rayfoundry.errors import ConfigError, DataError
from tracking.fingerprint import HashCache, cache_path, changed_sources, fingerprint_data, fingerprint_source
from tracking.records import DataFingerprint, Lineage, SourceFingerprint
from tracking.store import MlflowRuns, RunDirs, compare, open_runs
from tracking.tracker import HTTP_BOUNDS, Tracker, config_hash, flatten
from trainers.config import TrackingSection, apply_overrides, parse_job
from trainers.run import config_changes
from trainers.summary import RunSummary

DIGITS = {"data": {"train_path": "sklearn:digits"}, "model": {"type": "cnn"}}
T0 = 1_700_000_000 * 10**9  # file times (ns) set explicitly: an edit within one clock tick keeps its mtime


def _job(*sets: str) -> dict:
    """A resolved digits TrainJob as JSON, with `--set`-style overrides."""
    return json.loads(parse_job(apply_overrides(copy.deepcopy(DIGITS), list(sets))).model_dump_json())


def _write(path: Path, text: str, mtime_ns: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, ns=(mtime_ns, mtime_ns))


@pytest.fixture(autouse=True)
def bounded_http(monkeypatch):
    """Tracker.client() sets MLflow's HTTP bounds with setdefault; keep them from outliving a test."""
    for key, value in HTTP_BOUNDS.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def hashed(tmp_path, monkeypatch) -> list[str]:
    """The names of the files actually read for a sha256 (cache misses), with a fresh cache directory."""
    monkeypatch.setenv("RAYFOUNDRY_CACHE", str(tmp_path / "cache"))
    read, real = [], storage.sha256
    monkeypatch.setattr(storage, "sha256", lambda path: read.append(Path(path).name) or real(path))
    return read


# -- data fingerprints ------------------------------------------------------------------------------
def test_same_content_same_digest_and_one_changed_byte_another(tmp_path, hashed):
    for root in ("a", "b"):
        _write(tmp_path / root / "part-0.csv", "x,1\n", T0)
        _write(tmp_path / root / "sub" / "part-1.csv", "y,22\n", T0 + 1)
    a, b = fingerprint_data(str(tmp_path / "a")), fingerprint_data(str(tmp_path / "b"))
    assert a.train.entries.keys() == {"part-0.csv", "sub/part-1.csv"}
    assert (a.train.method, a.train.files, a.train.bytes) == ("sha256", 2, 9)
    assert a.train.digest == b.train.digest and a.digest == b.digest
    _write(tmp_path / "b" / "part-0.csv", "x,2\n", T0 + 10**9)  # same size, one byte differs
    changed = fingerprint_data(str(tmp_path / "b"))
    assert changed.digest != a.digest
    assert changed.train.entries["part-0.csv"] != a.train.entries["part-0.csv"]
    assert changed.train.entries["sub/part-1.csv"] == a.train.entries["sub/part-1.csv"]
    single = fingerprint_source(str(tmp_path / "a" / "part-0.csv"), HashCache(cache_path()))
    assert single.entries.keys() == {"part-0.csv"} and single.files == 1


def test_the_cache_spares_unchanged_files_and_rehashes_a_rewritten_one(tmp_path, hashed):
    _write(tmp_path / "d" / "a.csv", "1\n", T0)
    _write(tmp_path / "d" / "b.csv", "2\n", T0)
    first = fingerprint_data(str(tmp_path / "d"))
    assert sorted(hashed) == ["a.csv", "b.csv"] and (tmp_path / "cache" / "fingerprints.json").is_file()
    hashed.clear()
    assert fingerprint_data(str(tmp_path / "d")).digest == first.digest and hashed == []
    _write(tmp_path / "d" / "a.csv", "3\n", T0 + 10**9)
    assert fingerprint_data(str(tmp_path / "d")).digest != first.digest and hashed == ["a.csv"]


@pytest.mark.parametrize("garbage", ["{not json", "[1, 2]", ""])
def test_a_corrupt_cache_file_is_ignored_and_replaced(tmp_path, hashed, garbage):
    _write(tmp_path / "d" / "a.csv", "1\n", T0)
    first = fingerprint_data(str(tmp_path / "d"))
    (tmp_path / "cache" / "fingerprints.json").write_text(garbage)
    hashed.clear()
    assert fingerprint_data(str(tmp_path / "d")).digest == first.digest and hashed == ["a.csv"]
    assert isinstance(json.loads((tmp_path / "cache" / "fingerprints.json").read_text()), dict)


def test_a_missing_or_empty_source_is_a_data_error_naming_it(tmp_path, hashed):
    missing = tmp_path / "nowhere" / "train.csv"
    with pytest.raises(DataError, match=f"^{re.escape(str(missing))}: no such file or directory$"):
        fingerprint_data(str(missing))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"^{re.escape(str(tmp_path / 'empty'))}: holds no data files$"):
        fingerprint_data(str(tmp_path / "empty"))


def test_a_builtin_dataset_has_a_stable_content_digest(hashed):
    digits, again = fingerprint_data("sklearn:digits"), fingerprint_data("sklearn:digits")
    assert (digits.train.method, digits.train.files) == ("builtin", 1) and digits.train.bytes > 0
    assert digits.digest == again.digest and len(digits.digest) == 64
    assert fingerprint_data("sklearn:iris").digest != digits.digest
    assert hashed == []


def test_changed_sources_names_the_field_the_path_and_each_file(tmp_path, hashed):
    train, val = tmp_path / "train", tmp_path / "val.csv"
    _write(train / "a.csv", "1\n", T0)
    _write(train / "b.csv", "2\n", T0)
    _write(val, "v\n", T0)
    recorded = fingerprint_data(str(train), str(val))
    assert changed_sources(recorded, recorded) == []
    _write(train / "a.csv", "10\n", T0 + 10**9)
    (train / "b.csv").unlink()
    _write(train / "c.csv", "3\n", T0)
    _write(val, "w\n", T0 + 10**9)
    now = fingerprint_data(str(train), str(val))
    assert changed_sources(recorded, now) == [f"data.train_path {train}: a.csv changed, b.csv is gone, c.csv is new",
                                              f"data.validation_path {val}: val.csv changed"]
    assert changed_sources(recorded, fingerprint_data(str(train)))[-1] == \
        "data.validation_path: set in one run and not the other"


# -- config hash, flatten, config_changes, the tracking section --------------------------------------
@pytest.mark.parametrize("sets", [["run.name=other"], ["run.storage_path=/elsewhere/runs"],
                                  ["tracking.backend=none", "tracking.uri=http://h:5000", "tracking.experiment=e"]])
def test_config_hash_ignores_where_a_run_lives_and_how_it_is_tracked(sets):
    assert config_hash(_job(*sets)) == config_hash(_job())


def test_config_hash_changes_with_the_recipe():
    assert config_hash(_job("optim.lr=0.003")) != config_hash(_job())


def test_flatten_dots_nested_sections():
    tree = {"optim": {"lr": 1e-3, "betas": {"b1": 0.9}}, "empty": {}, "columns": ["a", "b"]}
    assert flatten(tree) == {"optim.lr": 1e-3, "optim.betas.b1": 0.9, "empty": {}, "columns": ["a", "b"]}


def test_config_changes_reports_the_recipe_not_the_tracking():
    new = _job("optim.lr=0.003", "tracking.backend=tensorboard", "tracking.uri=http://h:5000")
    assert config_changes(_job(), new) == ["optim.lr: 0.001 -> 0.003"]


def test_tracking_defaults_to_mlflow_and_refuses_an_unknown_backend():
    assert parse_job(copy.deepcopy(DIGITS)).tracking == TrackingSection(backend="mlflow", uri=None, experiment=None)
    with pytest.raises(ConfigError, match=r"^job\.yaml: tracking\.backend: .*\(got 'wandb'\)$"):
        parse_job(DIGITS | {"tracking": {"backend": "wandb"}}, "job.yaml")
    with pytest.raises(ConfigError, match=r"^job\.yaml: tracking\.url: unknown field$"):
        parse_job(DIGITS | {"tracking": {"url": "http://h:5000"}}, "job.yaml")


# -- Tracker: MLflow on a SQLite store beside the runs -----------------------------------------------
def _open(section, storage_path: Path, name: str, params: dict, lines: list) -> Tracker:
    return Tracker.open(section, storage_path=str(storage_path), run_dir=str(storage_path / name), run_name=name,
                        params=params, tags={"rayfoundry.kind": "train", "rayfoundry.run_dir": str(storage_path / name)},
                        log=lines.append)


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory):
    """Runs a (lr 0.001, opened twice) and b (lr 0.003) tracked in <storage>/mlflow.db from another cwd."""
    base = tmp_path_factory.mktemp("mlflow")
    (base / "elsewhere").mkdir()
    section, lines = TrackingSection(backend="mlflow", uri=None), []
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(base / "elsewhere")
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        for key, value in HTTP_BOUNDS.items():  # Tracker.client() sets them; undo afterwards
            mp.setenv(key, value)
        a = _open(section, base / "runs", "a", flatten(_job("run.name=a")), lines)
        a.log_metrics({"val_accuracy": 0.5, "train_loss": 1.25, "note": "text", "done": True}, step=1)
        a.log_metrics({"val_accuracy": 0.75}, step=2)
        a.log_text('{"job": "a"}', "result.json")
        a.finish()
        b = _open(section, base / "runs", "b", flatten(_job("run.name=b", "optim.lr=0.003")), lines)
        b.log_metrics({"val_accuracy": 0.9}, step=1)
        b.finish()
        again = _open(section, base / "runs", "a", flatten(_job("run.name=a")), lines)
        again.finish()
    from mlflow import MlflowClient

    return SimpleNamespace(base=base, storage=base / "runs", a=a, b=b, again=again, lines=lines,
                           client=MlflowClient(a.ref.uri))


def test_mlflow_keeps_one_run_per_run_dir_in_a_sqlite_file_beside_the_runs(mlflow_store):
    s = mlflow_store
    assert s.lines == [] and not (s.a.off or s.b.off or s.again.off)
    assert s.a.ref.uri == f"sqlite:///{s.storage}/mlflow.db" and (s.storage / "mlflow.db").is_file()
    assert json.loads((s.storage / "a" / "tracking.json").read_text())["run_id"] == s.a.ref.run_id
    assert s.again.ref.run_id == s.a.ref.run_id != s.b.ref.run_id
    runs = s.client.search_runs([s.a.ref.experiment_id])
    assert sorted(r.info.run_name for r in runs) == ["a", "b"]
    assert not (s.base / "elsewhere" / "mlruns").exists()
    assert [p.read_text() for p in (s.storage / "mlartifacts").rglob("result.json")] == ['{"job": "a"}']


def test_mlflow_run_holds_params_tags_metric_steps_and_its_end(mlflow_store):
    s = mlflow_store
    run = s.client.get_run(s.a.ref.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["rayfoundry.kind"] == "train"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["data.train_path"] == "sklearn:digits"
    history = s.client.get_metric_history(s.a.ref.run_id, "val_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.75)]
    assert set(run.data.metrics) == {"val_accuracy", "train_loss"}  # strings and booleans are not metrics
    assert [a.path for a in s.client.list_artifacts(s.a.ref.run_id)] == ["result.json"]


def test_extending_a_run_keeps_tracking_it(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    shutil.copy(mlflow_store.storage / "mlflow.db", tmp_path / "mlflow.db")
    section, lines = TrackingSection(backend="mlflow", uri=None), []
    first = _open(section, tmp_path, "c", flatten(_job("run.name=c", "run.epochs=2")), lines)
    first.finish()
    extended = _open(section, tmp_path, "c", flatten(_job("run.name=c", "run.epochs=4")), lines)
    extended.log_metrics({"val_accuracy": 0.8}, step=3)
    extended.finish()
    assert lines == [] and extended.ref.run_id == first.ref.run_id
    run = MlflowClient(first.ref.uri).get_run(first.ref.run_id)
    assert run.info.status == "FINISHED" and run.data.params["run.epochs"] == "2"  # MLflow keeps a first value
    assert run.data.tags["rayfoundry.changed_params"] == "run.epochs: 2 -> 4"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["server down", "sqlite under a file", "object store"])
def test_a_tracking_failure_is_one_line_and_then_silence(tmp_path, case):
    (tmp_path / "file").write_text("not a directory")
    port = _closed_port()
    uri, storage_path, named = {
        "server down": (f"http://127.0.0.1:{port}", str(tmp_path / "runs"), f"http://127.0.0.1:{port}"),
        "sqlite under a file": (f"sqlite:///{tmp_path}/file/sub/mlflow.db", str(tmp_path / "runs"), "file/sub"),
        "object store": (None, "s3://bucket/runs", "set tracking.uri"),
    }[case]
    lines = []
    tracker = Tracker.open(TrackingSection(backend="mlflow", uri=uri), storage_path=storage_path,
                           run_dir=f"{storage_path}/a", run_name="a", params={"optim.lr": 0.001}, tags={},
                           log=lines.append)
    assert tracker.off and len(lines) == 1 and lines[0].startswith("tracking:") and named in lines[0]
    tracker.log_params({"x": 1})
    tracker.log_metrics({"val_accuracy": 0.5}, step=1)
    tracker.log_text("{}", "result.json")
    tracker.finish("FAILED")
    assert len(lines) == 1 and not (tmp_path / "runs").exists()


def test_tensorboard_writes_event_files_into_the_run_directory(tmp_path):
    lines = []
    tracker = _open(TrackingSection(backend="tensorboard"), tmp_path, "a", {"optim.lr": 0.001}, lines)
    tracker.log_metrics({"val_accuracy": 0.9}, step=1)
    tracker.finish()
    events = list((tmp_path / "a" / "tensorboard").glob("events.out.tfevents.*"))
    assert lines == [] and not tracker.off and len(events) == 1
    assert b"val_accuracy" in events[0].read_bytes()


# -- reading runs back -----------------------------------------------------------------------------
@pytest.fixture
def run_dirs(tmp_path) -> Path:
    """Two finished runs (result.json) that differ in lr, name, storage and tracking; one Tune-style file."""
    fp = DataFingerprint(digest="d" * 64, train=SourceFingerprint(path="sklearn:digits", method="builtin", files=1,
                                                                  bytes=10, digest="e" * 64))
    for name, sets, acc in (("r1", [], 0.5), ("r2", ["optim.lr=0.003", "run.storage_path=/x", "tracking.backend=none"], 0.7)):
        job = _job(f"run.name={name}", *sets)
        summary = RunSummary(job=name, epochs_completed=2, final_metrics={"val_accuracy": acc, "epoch": 2},
                             best_metrics={"val_accuracy": acc}, config=job,
                             lineage=Lineage(config_hash=config_hash(job), data=fp, rayfoundry_version="test"))
        storage.write_text(str(tmp_path / name / "result.json"), summary.model_dump_json())
    (tmp_path / "trial").mkdir()
    (tmp_path / "trial" / "result.json").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # a Tune trial's JSON lines
    return tmp_path


def test_run_dirs_read_result_json(run_dirs):
    store = open_runs(str(run_dirs), None, None)
    assert isinstance(store, RunDirs) and sorted(r.id for r in store.list(10)) == ["r1", "r2"]
    r1 = store.get("r1")
    assert (r1.name, r1.status, r1.source, r1.params["optim.lr"]) == ("r1", "FINISHED", "run_dir", "0.001")
    assert r1.metrics["best_val_accuracy"] == 0.5 and r1.tags["rayfoundry.config_hash"] == config_hash(_job())
    for missing in ("nope", "trial"):
        with pytest.raises(ConfigError, match=f"^run '{missing}': no finished run"):
            store.get(missing)
    c = compare([r1, store.get("r2")])
    assert c.params == {"optim.lr": ["0.001", "0.003"]} and c.metrics["best_val_accuracy"] == [0.5, 0.7]


def test_mlflow_runs_are_found_by_name_id_and_id_prefix(mlflow_store):
    store = open_runs(str(mlflow_store.storage), None, None)
    assert isinstance(store, MlflowRuns) and sorted(r.name for r in store.list(10)) == ["a", "b"]
    run_id = mlflow_store.a.ref.run_id
    assert store.get("a").id == store.get(run_id).id == store.get(run_id[:8]).id == run_id
    assert store.get("a").artifacts == ["result.json"]
    with pytest.raises(ConfigError, match="^run 'nope': no such run id, id prefix or run name"):
        store.get("nope")
    c = compare([store.get("a"), store.get("b")])
    assert c.params == {"optim.lr": ["0.001", "0.003"]}
    assert c.metrics == {"train_loss": [1.25, None], "val_accuracy": [0.75, 0.9]}


# -- the CLI ---------------------------------------------------------------------------------------
@pytest.fixture
def cli(monkeypatch):
    import ray_apps.__main__ as entry

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(entry, "quiet_process", lambda: None)  # process-wide logging stays as pytest set it
    return entry.main


def test_runs_compare_prints_the_differing_params_and_writes_json(cli, mlflow_store, tmp_path, capsys):
    out_file = tmp_path / "out" / "compare.json"
    assert cli(["runs", "--storage", str(mlflow_store.storage), "compare", "a", "b", "--json-out", str(out_file)]) == 0
    out = capsys.readouterr().out
    lr_line = next(line for line in out.splitlines() if line.startswith("optim.lr"))
    assert "0.001" in lr_line and "0.003" in lr_line and "run.name" not in out
    assert "0.75" in next(line for line in out.splitlines() if line.startswith("val_accuracy"))
    assert json.loads(out_file.read_text())["params"] == {"optim.lr": ["0.001", "0.003"]}


@pytest.mark.parametrize("where, present", [("mlflow", "a"), ("run_dirs", "r1")])
def test_runs_compare_of_a_missing_run_is_one_line_and_exit_2(cli, mlflow_store, run_dirs, capsys, where, present):
    root = mlflow_store.storage if where == "mlflow" else run_dirs
    assert cli(["runs", "--storage", str(root), "compare", present, "nope"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: run 'nope': no ") and captured.err.count("\n") == 1
    assert captured.out == ""


# -- hardening -------------------------------------------------------------------------------------
def test_a_just_written_file_is_not_cached_and_reproduce_trusts_no_cache(tmp_path, hashed):
    fresh = tmp_path / "fresh.csv"
    fresh.write_text("1\n")  # mtime now: a second write in the same clock tick could keep it
    fingerprint_data(str(fresh)), fingerprint_data(str(fresh))
    assert hashed == ["fresh.csv", "fresh.csv"]
    old = tmp_path / "old.csv"
    _write(old, "1\n", T0)
    first = fingerprint_data(str(old))
    _write(old, "2\n", T0)  # same size, mtime put back: the cache cannot tell
    assert fingerprint_data(str(old)).digest == first.digest
    assert fingerprint_data(str(old), cached=False).digest != first.digest


def test_a_rerun_on_changed_data_is_refused_naming_the_file(tmp_path, hashed):
    from trainers.run import open_tracking

    data = tmp_path / "train.csv"
    _write(data, "x,label\n1,0\n", T0)
    job = parse_job(DIGITS | {"data": {"train_path": str(data)}, "model": {"type": "mlp"},
                              "tracking": {"backend": "none"}, "run": {"name": "r", "storage_path": str(tmp_path)}})
    out_dir = str(tmp_path / "r")
    assert open_tracking(job, out_dir, None, print)[1].data.train.files == 1
    assert open_tracking(job, out_dir, None, print)[0].off  # unchanged data: the rerun goes on
    _write(data, "x,label\n2,0\n", T0 + 10**9)
    with pytest.raises(DataError, match=rf"^{re.escape(out_dir)} holds a run started on other data \(data.train_path "
                       rf"{re.escape(str(data))}: train.csv changed\); --restart"):
        open_tracking(job, out_dir, None, print)


def test_a_tracking_json_copied_from_another_run_dir_or_naming_a_lost_run_starts_a_new_run(mlflow_store, tmp_path):
    shutil.copy(mlflow_store.storage / "mlflow.db", tmp_path / "mlflow.db")
    section, lines = TrackingSection(backend="mlflow", uri=None), []
    victim = _open(section, tmp_path, "victim", {"optim.lr": 0.1}, lines)
    victim.finish()
    (tmp_path / "intruder").mkdir()
    shutil.copy(tmp_path / "victim" / "tracking.json", tmp_path / "intruder" / "tracking.json")
    intruder = _open(section, tmp_path, "intruder", {"optim.lr": 0.2}, lines)
    assert intruder.ref.run_id != victim.ref.run_id and lines == []
    stored = json.loads((tmp_path / "victim" / "tracking.json").read_text())
    (tmp_path / "victim" / "tracking.json").write_text(json.dumps(stored | {"run_id": "f" * 32}))  # a lost run
    again = _open(section, tmp_path, "victim", {"optim.lr": 0.1}, lines)
    assert not again.off and again.ref.run_id != victim.ref.run_id and lines == []


def test_credentials_in_the_tracking_uri_are_refused():
    with pytest.raises(ConfigError, match=r"^job\.yaml: tracking: tracking\.uri holds credentials.*"
                       r"MLFLOW_TRACKING_USERNAME"):
        parse_job(DIGITS | {"tracking": {"uri": "https://alice:secret@mlflow.example:5000"}}, "job.yaml")
    with pytest.raises(ConfigError, match=r"tracking\.experiment: String should match pattern"):
        parse_job(DIGITS | {"tracking": {"experiment": "../../etc"}}, "job.yaml")


def test_param_names_mlflow_refuses_are_cleaned_and_huge_numbers_skipped(mlflow_store, tmp_path):
    from mlflow import MlflowClient

    shutil.copy(mlflow_store.storage / "mlflow.db", tmp_path / "mlflow.db")
    lines: list[str] = []
    odd = _open(TrackingSection(backend="mlflow"), tmp_path, "odd", {"model.from_config.id2label.a+b(c)": "x"}, lines)
    odd.log_metrics({"val_accuracy": 0.5, "huge": 10**400}, step=1)
    odd.finish()
    run = MlflowClient(odd.ref.uri).get_run(odd.ref.run_id)
    assert lines == [] and run.data.params == {"model.from_config.id2label.a_b_c_": "x"}
    assert run.data.metrics == {"val_accuracy": 0.5} and run.info.status == "FINISHED"


def test_runs_show_refuses_a_name_that_several_runs_share(mlflow_store, tmp_path):
    shutil.copy(mlflow_store.storage / "mlflow.db", tmp_path / "mlflow.db")
    lines: list[str] = []
    for run_dir in ("one", "two"):
        Tracker.open(TrackingSection(backend="mlflow"), storage_path=str(tmp_path), run_dir=str(tmp_path / run_dir),
                     run_name="same", params={}, tags={"rayfoundry.run_dir": str(tmp_path / run_dir)}, log=lines.append)
    with pytest.raises(ConfigError, match=r"^run 'same': 2 runs match \([0-9a-f]{12}, [0-9a-f]{12}\); give a run id$"):
        open_runs(str(tmp_path), None, None).get("same")


def test_runs_starting_together_on_a_new_store_are_all_tracked(tmp_path):
    """Separate processes creating the same new SQLite store take turns (a lock file beside it)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys; from trainers.config import TrackingSection; from tracking.tracker import Tracker\n"
            "d = sys.argv[1] + '/' + sys.argv[2]\n"
            "t = Tracker.open(TrackingSection(), storage_path=sys.argv[1], run_dir=d, run_name=sys.argv[2], params={},"
            " tags={'rayfoundry.run_dir': d}, log=print)\n"
            "t.finish(); print('off' if t.off else 'on')")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path), f"r{i}"], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, text=True) for i in range(3)]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert outs == ["on", "on", "on"], outs
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert len(client.search_runs([client.get_experiment_by_name("rayfoundry").experiment_id])) == 3
