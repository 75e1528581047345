"""Tracking and lineage of real runs on the session's Ray: a DDP run is one MLflow run with every
field, epoch, tag and artifact; `runs compare` shows a changed learning rate; a tracking server that
is down costs one line and no run; `train --reproduce` refuses data that changed since the run.
(Sweeps' nested runs are checked in test_tune.py; the served-answer-to-data chain in test_serve.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow import MlflowClient
from sklearn.datasets import load_digits

from ray_apps.__main__ import main
from tests.conftest import REPO
from tests.integration.serving import free_port
from tracking.fingerprint import fingerprint_data
from tracking.tracker import flatten
from trainers.config import load_job
from trainers.run import train

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"


def _store(storage) -> tuple[MlflowClient, list]:
    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    return client, client.search_runs([client.get_experiment_by_name("rayfoundry").experiment_id])


def test_a_ddp_run_is_one_mlflow_run_with_every_field_epoch_tag_and_artifact(digits_run):
    job, summary, storage = digits_run
    client, runs = _store(storage)
    mine = [r for r in runs if r.info.run_name == job.run.name]
    assert len(mine) == 1, [r.info.run_name for r in runs]  # 2 workers, rank 0 alone logs: one run
    run = mine[0]
    assert run.info.run_id == summary.lineage.tracking.run_id and run.info.status == "FINISHED"
    fields = flatten(json.loads(job.model_dump_json()))
    assert set(run.data.params) == set(fields)
    assert run.data.params["optim.lr"] == str(job.optim.lr) and run.data.params["scaling.num_workers"] == "2"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert [m.step for m in history] == list(range(1, job.run.epochs + 1))
    assert history[-1].value == pytest.approx(summary.final_metrics["val_accuracy"])
    for metric in ("train_samples_per_s", "data_wait_seconds", "best_val_accuracy", "wall_seconds"):
        assert metric in run.data.metrics, metric
    tags = run.data.tags
    assert tags["rayfoundry.config_hash"] == summary.lineage.config_hash
    assert tags["rayfoundry.data_fingerprint"] == summary.lineage.data.digest == fingerprint_data("sklearn:digits").digest
    assert tags["rayfoundry.kind"] == "train" and tags["rayfoundry.version"] and tags["rayfoundry.run_dir"] == summary.run_dir
    artifact = client.download_artifacts(run.info.run_id, "result.json", str(storage / "dl"))
    assert json.loads(open(artifact).read())["best_checkpoint"] == summary.best_checkpoint


@pytest.mark.slow  # trains a second digits run (~30 s): `make test-fast` skips it
def test_runs_compare_shows_a_changed_learning_rate(digits_run, capsys, tmp_path):
    job, _, storage = digits_run
    other = load_job(DIGITS, [f"run.storage_path={storage}", "run.name=digits_lr1e-3", "optim.lr=1e-3",
                              "run.epochs=1"])
    train(other, log=lambda *_: None)
    out = tmp_path / "compare.json"
    assert main(["runs", "--storage", str(storage), "compare", job.run.name, other.run.name, "--json-out", str(out)]) == 0
    printed = capsys.readouterr().out
    lr = next(line for line in printed.splitlines() if line.startswith("optim.lr"))
    assert lr.split()[1:] == [str(job.optim.lr), "0.001"], printed
    compared = json.loads(out.read_text())
    assert compared["params"]["optim.lr"] == [str(job.optim.lr), "0.001"]
    assert "run.name" not in compared["params"] and "run.storage_path" not in compared["params"]
    assert len(compared["metrics"]["val_accuracy"]) == 2
    assert main(["runs", "--storage", str(storage), "list"]) == 0
    assert "digits_lr1e-3" in capsys.readouterr().out


@pytest.mark.slow  # trains and exports (~30 s): `make test-fast` skips it
def test_a_down_tracking_server_costs_one_line_and_reproduce_refuses_changed_data(ray_cluster, tmp_path, capsys):
    """One small run on a CSV, tracked at a server that is not there: it trains and says so once. Its
    package then reproduces while the CSV is unchanged, and is refused, naming the file, once it changed."""
    digits = load_digits()
    csv = tmp_path / "digits.csv"
    header = ",".join([f"p{i}" for i in range(64)] + ["target"])
    rows = np.column_stack([digits.data, digits.target]).astype(int)
    csv.write_text(header + "\n" + "\n".join(",".join(map(str, r)) for r in rows[:600]) + "\n")
    job = load_job(DIGITS, [f"data.train_path={csv}", f"run.storage_path={tmp_path / 'runs'}", "run.epochs=1",
                            "scaling.num_workers=1", f"tracking.uri=http://127.0.0.1:{free_port()}"])
    lines: list[str] = []
    summary = train(job, log=lines.append)
    said = [line for line in lines if line.startswith("tracking:")]
    assert len(said) == 1 and "failed to open a run" in said[0] and "goes on without tracking" in said[0], lines
    assert summary.status == "finished" and summary.lineage.tracking is None
    assert set(summary.lineage.data.train.entries) == {"digits.csv"}

    registry = tmp_path / "registry"
    assert main(["export", "--checkpoint", summary.run_dir, "--name", "csvdigits", "--registry", str(registry)]) == 0
    from ray_apps.train import reproduce_job

    again = reproduce_job(str(registry), "csvdigits:1", [])
    assert again.run.name == f"{job.run.name}_reproduce_csvdigits_v1" and again.data.train_path == str(csv)
    capsys.readouterr()
    csv.write_text(csv.read_text().replace("\n0,", "\n1,", 1))  # one pixel of one row
    assert main(["train", "--reproduce", "csvdigits:1", "--registry", str(registry)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: csvdigits:1: the data differs from what its source run read: "
                          f"data.train_path {csv}: digits.csv changed"), err
    assert len(err.splitlines()) == 1
