"""DeepSpeed ZeRO-2/3 with 2 CPU workers (DeepSpeed's CPU accelerator, gloo): the consolidated
checkpoint is a plain Hugging Face model, and the sharded engine state resumes a run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import assert_checkpoint_reproduces_reported_metrics, tiny_text_job
from trainers.run import train


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_and_consolidates_a_from_pretrained_checkpoint(ray_cluster, shared_data, tmp_path, stage):
    job = tiny_text_job(shared_data, tmp_path, f"zero{stage}", {"name": "deepspeed", "zero_stage": stage}, epochs=1)
    summary = train(job)
    assert summary["epochs_completed"] == 1
    ckpt = Path(summary["latest_checkpoint"])
    assert (ckpt / "deepspeed" / "state").is_dir()  # DeepSpeed's own sharded state, for exact resume
    assert (ckpt / "model.safetensors").is_file()
    # The workers scored validation with the DeepSpeed engine's weights (a gathered copy for ZeRO-3);
    # plain from_pretrained on the consolidated file must score it identically.
    assert_checkpoint_reproduces_reported_metrics(job, summary)


def test_zero2_resumes_from_its_sharded_state(ray_cluster, shared_data, tmp_path):
    strategy = {"name": "deepspeed", "zero_stage": 2}
    first = train(tiny_text_job(shared_data, tmp_path, "zero2_resume", strategy, epochs=1))
    second = train(tiny_text_job(shared_data, tmp_path, "zero2_resume", strategy, epochs=2))
    assert second["final_metrics"]["resumed_from"] == "epoch_0001"
    assert second["global_step"] == 2 * first["global_step"]
    state = json.loads((tmp_path / "zero2_resume" / "epoch_0002" / "trainer_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]
