"""On a machine with CUDA, the default digits job picks the GPU (NCCL) by itself and still converges."""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from trainers.config import load_job
from trainers.run import train


@pytest.mark.gpu
def test_use_gpu_auto_trains_on_cuda(ray_cluster, tmp_path):
    job = load_job(REPO / "ray_apps/configs/digits_cnn.yaml",
                   [f"run.storage_path={tmp_path}", "scaling.num_workers=1", "optim.batch_size=64"])
    summary = train(job)
    assert summary.use_gpu is True
    assert summary.best_metrics["val_accuracy"] >= 0.95
