"""Real Ray Train runs on the session's 2-CPU Ray: DDP quality, resume, text checkpoints, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, assert_checkpoint_reproduces_reported_metrics, tiny_text_job
from trainers.config import load_job
from trainers.run import train

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"


def test_ddp_digits_reaches_95_percent_and_writes_result(ray_cluster, tmp_path):
    job = load_job(DIGITS, [f"run.storage_path={tmp_path}"])
    summary = train(job)
    assert summary["best_metrics"]["val_accuracy"] >= 0.95
    assert summary["epochs_completed"] == job.run.epochs
    on_disk = json.loads((tmp_path / "digits_cnn" / "result.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for key in ("final_metrics", "best_checkpoint", "wall_seconds", "samples_per_s"):
        assert on_disk[key]
    best = Path(summary["best_checkpoint"])
    assert {"model.safetensors", "config.json", "label_map.json", "optimizer.safetensors", "trainer_state.json",
            "rng_rank0.safetensors", "rng_rank1.safetensors", "checksums.rank0.json"} <= {p.name for p in best.iterdir()}
    assert not [p for p in best.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    kept = sorted(p.name for p in (tmp_path / "digits_cnn").glob("epoch_*"))
    assert len(kept) == job.checkpoint.keep


def test_rerun_resumes_from_saved_epoch_and_step(ray_cluster, tmp_path):
    base = [f"run.storage_path={tmp_path}", "run.name=resume", "run.epochs=1"]
    first = train(load_job(DIGITS, base))
    assert first["epochs_completed"] == 1
    second = train(load_job(DIGITS, base[:-1] + ["run.epochs=2"]))
    assert second["epochs_completed"] == 2
    assert second["global_step"] == 2 * first["global_step"]
    state = json.loads((tmp_path / "resume" / "epoch_0002" / "trainer_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]
    assert state["history"][0]["val_loss"] == first["final_metrics"]["val_loss"]  # epoch 1 was not re-run
    again = train(load_job(DIGITS, base[:-1] + ["run.epochs=2"]))  # finished: nothing to do
    assert again["epochs_completed"] == 2 and again["wall_seconds"] == second["wall_seconds"]


def test_tiny_bert_on_sst2_slice_checkpoint_loads_with_from_pretrained(ray_cluster, shared_data, tmp_path):
    job = tiny_text_job(shared_data, tmp_path)
    summary = train(job)
    assert summary["labels"] == ["0", "1"]
    assert_checkpoint_reproduces_reported_metrics(job, summary)


def _cli(args, **env):
    return subprocess.run([sys.executable, "-m", "ray_apps", "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=os.environ | env)


def test_cli_trains_on_the_running_cluster_and_writes_json_out(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    out = tmp_path / "summary.json"
    proc = _cli(["--config", str(DIGITS), "--set", f"run.storage_path={tmp_path}", "--set", "run.epochs=2",
                 "--json-out", str(out)], RAY_ADDRESS=address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    epoch_lines = [line for line in proc.stdout.splitlines() if "epoch " in line and "val_accuracy" in line]
    assert len(epoch_lines) == 2, proc.stdout
    assert "done: digits_cnn epochs 2" in proc.stdout
    assert json.loads(out.read_text())["epochs_completed"] == 2


def test_cli_dry_run_writes_nothing(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    proc = _cli(["--config", str(DIGITS), "--set", f"run.storage_path={tmp_path}", "--dry-run"], RAY_ADDRESS=address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK: 2 steps" in proc.stdout
    assert list(tmp_path.iterdir()) == []
