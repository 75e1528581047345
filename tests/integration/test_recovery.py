"""Failures a cluster really has: a worker dying mid-epoch, the driver dying, a corrupt checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO
from trainers.config import load_job
from trainers.recovery import FAULT_ENV
from trainers.run import train

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"


def _job(tmp_path, name, epochs=3, *more):
    return load_job(DIGITS, [f"run.storage_path={tmp_path}", f"run.name={name}", f"run.epochs={epochs}", *more])


def test_worker_death_mid_epoch_restarts_and_matches_an_uninterrupted_run(ray_cluster, tmp_path, monkeypatch):
    clean = train(_job(tmp_path, "clean"))
    marker = tmp_path / "exited-once"
    monkeypatch.setenv(FAULT_ENV, f"rank=1,epoch=2,step=7,marker={marker}")
    crashed = train(_job(tmp_path, "crashed"))
    assert marker.read_text() == "exited at step 7\n"  # the fault really fired, mid-epoch
    assert crashed["restarts"] == 1
    failures = list((tmp_path / "crashed" / "failures").glob(f"{crashed['run_id']}-*.json"))
    assert len(failures) == 1 and "1" in json.loads(failures[0].read_text())["ranks"]
    assert crashed["final_metrics"]["resumed_from"] == "epoch_0001"
    assert crashed["global_step"] == clean["global_step"]
    # Epoch 2 restarts from the epoch-1 checkpoint with every RNG, the optimizer and the data order
    # restored, and gloo's CPU all-reduce sums in a fixed order, so the rerun is bit-for-bit the same
    # computation. The tolerance only absorbs float formatting, not a real difference.
    for key in ("val_loss", "val_accuracy", "val_macro_f1", "train_loss"):
        assert crashed["final_metrics"][key] == pytest.approx(clean["final_metrics"][key], rel=1e-6, abs=1e-9)


def test_rerun_after_the_driver_is_killed_continues_from_the_saved_epoch(ray_cluster, tmp_path):
    cmd = [sys.executable, "-m", "ray_apps", "train", "--config", str(DIGITS), "--set", f"run.storage_path={tmp_path}",
           "--set", "run.epochs=3"]
    env = os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    driver = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = tmp_path / "digits_cnn" / "epoch_0001" / "trainer_state.json"
    deadline = time.time() + 300
    while not first.exists() and driver.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert first.exists(), "the first checkpoint was never written"
    assert not (tmp_path / "digits_cnn" / "result.json").exists()

    out = tmp_path / "summary.json"
    rerun = subprocess.run(cmd + ["--json-out", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from epoch_0001 (epoch 1, step 22)" in rerun.stdout or \
        "resumed from epoch_0002 (epoch 2, step 44)" in rerun.stdout, rerun.stdout
    result = json.loads((tmp_path / "digits_cnn" / "result.json").read_text())
    assert result["epochs_completed"] == 3 and result["global_step"] == 66
    assert "epoch 1/3" not in rerun.stdout  # epoch 1 was not trained again
    # The CLI on a running cluster: one line per epoch it trained, a summary line, --json-out.
    trained = [line for line in rerun.stdout.splitlines() if "epoch " in line and "val_accuracy" in line]
    assert 1 <= len(trained) <= 2 and "epoch 3/3" in trained[-1], rerun.stdout
    assert "done: digits_cnn epochs 3" in rerun.stdout
    assert json.loads(out.read_text()) == result


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(ray_cluster, tmp_path):
    first = train(_job(tmp_path, "corrupt", 2, "checkpoint.keep=2"))
    epoch1 = json.loads((tmp_path / "corrupt" / "epoch_0001" / "trainer_state.json").read_text())["history"][0]
    weights = tmp_path / "corrupt" / "epoch_0002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated upload
    resumed = train(_job(tmp_path, "corrupt", 3, "checkpoint.keep=2"))
    assert resumed["final_metrics"]["resumed_from"] == "epoch_0001"
    (note,) = resumed["final_metrics"]["skipped_checkpoints"]
    assert f"{weights}: sha256 mismatch" in note
    assert resumed["epochs_completed"] == 3 and resumed["global_step"] == 3 * first["global_step"] // 2
    state = json.loads((Path(resumed["latest_checkpoint"]) / "trainer_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3]
    assert state["history"][0] == epoch1  # epoch 1 was kept, not trained again
    again = train(_job(tmp_path, "corrupt", 3, "checkpoint.keep=2"))  # finished: nothing to do
    assert again["epochs_completed"] == 3 and again["wall_seconds"] == resumed["wall_seconds"]
