"""Real Ray Train runs on the session's 2-CPU Ray: DDP quality, text checkpoints, the CLI.
(Resume is covered by test_recovery.py: a rerun after a killed driver and after a corrupt checkpoint.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, assert_checkpoint_reproduces_reported_metrics, tiny_text_job
from trainers.run import train

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"


def test_ddp_digits_reaches_95_percent_and_writes_result(digits_run):
    job, summary, storage = digits_run
    assert summary.best_metrics["val_accuracy"] >= 0.95
    assert summary.epochs_completed == job.run.epochs
    on_disk = json.loads((storage / "digits_cnn" / "result.json").read_text())
    assert on_disk == summary.model_dump(mode="json")
    for key in ("final_metrics", "best_checkpoint", "wall_seconds", "samples_per_s"):
        assert on_disk[key]
    best = Path(summary.best_checkpoint)
    assert {"model.safetensors", "config.json", "label_map.json", "optimizer.safetensors", "trainer_state.json",
            "rng_rank0.safetensors", "rng_rank1.safetensors", "checksums.rank0.json"} <= {p.name for p in best.iterdir()}
    assert not [p for p in best.rglob("*") if p.suffix in (".pt", ".bin", ".pkl")]
    kept = sorted(p.name for p in (storage / "digits_cnn").glob("epoch_*"))
    assert len(kept) == job.checkpoint.keep


@pytest.mark.slow  # ~90 s on 2 cores: `make test-fast` skips it
def test_tiny_bert_on_sst2_slice_checkpoint_loads_with_from_pretrained(ray_cluster, shared_data, tmp_path):
    job = tiny_text_job(shared_data, tmp_path)
    summary = train(job)
    assert summary.labels == ["0", "1"]
    assert_checkpoint_reproduces_reported_metrics(job, summary)


def _cli(args, **env):
    return subprocess.run([sys.executable, "-m", "ray_apps", "train", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600, env=os.environ | env)


def test_cli_dry_run_writes_nothing(ray_cluster, tmp_path):
    address = ray_cluster.get_runtime_context().gcs_address
    proc = _cli(["--config", str(DIGITS), "--set", f"run.storage_path={tmp_path}", "--dry-run"], RAY_ADDRESS=address)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK: 2 steps" in proc.stdout
    assert list(tmp_path.iterdir()) == []
