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

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # run by `make test-heavy` (CI runs it after `make test`)

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"


def test_worker_death_mid_epoch_restarts_and_matches_an_uninterrupted_run(digits_run, tmp_path, monkeypatch):
    """The default job with rank 1 killed mid-epoch ends exactly where the session's uninterrupted run
    of the same job ended; then its newest checkpoint is truncated and the run continues from the
    one before, naming the bad file."""
    _, clean, _ = digits_run
    marker = tmp_path / "exited-once"
    monkeypatch.setenv(FAULT_ENV, f"rank=1,epoch=2,step=7,marker={marker}")
    crashed = train(load_job(DIGITS, [f"run.storage_path={tmp_path}", "run.name=crashed"]))
    monkeypatch.delenv(FAULT_ENV)
    assert marker.read_text() == "exited at step 7\n"  # the fault really fired, mid-epoch
    assert crashed.restarts == 1
    failures = list((tmp_path / "crashed" / "failures").glob(f"{crashed.run_id}-*.json"))
    assert len(failures) == 1 and "1" in json.loads(failures[0].read_text())["ranks"]
    history = json.loads((Path(crashed.latest_checkpoint) / "trainer_state.json").read_text())["history"]
    assert history[1]["resumed_from"] == "epoch_0001"  # epoch 2 restarted from epoch 1's checkpoint
    assert crashed.global_step == clean.global_step
    # Epoch 2 restarts from the epoch-1 checkpoint with every RNG, the optimizer and the data order
    # restored, and gloo's CPU all-reduce sums in a fixed order, so the rerun is bit-for-bit the same
    # computation. The tolerance only absorbs float formatting, not a real difference.
    for key in ("val_loss", "val_accuracy", "val_macro_f1", "train_loss"):
        assert crashed.final_metrics[key] == pytest.approx(clean.final_metrics[key], rel=1e-6, abs=1e-9)

    # A truncated upload of the newest checkpoint costs one epoch, not the run.
    kept = sorted(p.name for p in (tmp_path / "crashed").glob("epoch_*"))
    assert len(kept) >= 2 and kept[-1] == "epoch_0008", kept
    weights = tmp_path / "crashed" / kept[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    previous = json.loads((tmp_path / "crashed" / kept[-2] / "trainer_state.json").read_text())
    resumed = train(load_job(DIGITS, [f"run.storage_path={tmp_path}", "run.name=crashed", "run.epochs=9"]))
    assert resumed.final_metrics["resumed_from"] == kept[-2]
    (note,) = resumed.final_metrics["skipped_checkpoints"]
    assert f"{weights}: sha256 mismatch" in note
    assert resumed.epochs_completed == 9
    assert resumed.global_step == previous["global_step"] + (9 - previous["epoch"]) * clean.global_step // 8
    state = json.loads((Path(resumed.latest_checkpoint) / "trainer_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == list(range(1, 10))
    assert state["history"][:previous["epoch"]] == previous["history"]  # kept, not trained again
    again = train(load_job(DIGITS, [f"run.storage_path={tmp_path}", "run.name=crashed", "run.epochs=9"]))
    assert again.wall_seconds == resumed.wall_seconds  # finished: nothing to do


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
