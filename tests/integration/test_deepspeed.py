"""DeepSpeed ZeRO-2/3 with 2 CPU workers (DeepSpeed's CPU accelerator, gloo): the consolidated
checkpoint is a plain Hugging Face model that exports to ONNX, and the sharded engine state resumes a
run. The ZeRO-3 run has a time budget that ends it before its epochs do."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from model_registry.export import ExportJob, export
from tests.conftest import assert_checkpoint_reproduces_reported_metrics, tiny_text_job
from trainers.run import train

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # run by `make test-heavy` (CI runs it after `make test`)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_trains_consolidates_and_exports(ray_cluster, shared_data, tmp_path, stage):
    job = tiny_text_job(shared_data, tmp_path, f"zero{stage}", {"name": "deepspeed", "zero_stage": stage}, epochs=1)
    if stage == 3:  # a time budget that binds (50 epochs take minutes): the schedule DeepSpeed steps is laid
        job.run.epochs, job.run.time_budget_min = 50, 1.0  # out again over the steps that fit in one
    summary = train(job)
    if stage == 3:
        assert summary.ended_by == "time_budget" and summary.global_step == summary.planned_steps, summary
        assert summary.final_metrics["lr"] == pytest.approx(0.0, abs=1e-9)
    else:
        assert summary.epochs_completed == 1 and summary.ended_by == "epochs"
    ckpt = Path(summary.latest_checkpoint)
    assert (ckpt / "deepspeed" / "state").is_dir()  # DeepSpeed's own sharded state, for exact resume
    assert (ckpt / "model.safetensors").is_file()
    # The workers scored validation with the DeepSpeed engine's weights (a gathered copy for ZeRO-3);
    # plain from_pretrained on the consolidated file must score it identically.
    assert_checkpoint_reproduces_reported_metrics(job, summary)
    if stage == 2:
        _resumes_from_sharded_state(shared_data, tmp_path, summary)
    else:  # the consolidated ZeRO-3 weights export, and ONNX scores the validation set as the workers did
        meta = export(ExportJob(checkpoint=summary.run_dir, name="zero3", registry=str(tmp_path / "registry")),
                      log=lambda *_: None)
        assert meta.parity.max_abs_logit_diff <= 1e-4 and meta.source.strategy == "deepspeed"
        onnx = meta.validation.metrics["onnx"]
        assert onnx["val_rows"] == summary.final_metrics["val_rows"]
        # export takes the run's best checkpoint, which under a budget of several epochs need not be the last
        assert onnx["val_accuracy"] == pytest.approx(summary.best_metrics["val_accuracy"], abs=1e-9)


def _resumes_from_sharded_state(shared_data, tmp_path, first: dict) -> None:
    """Continue the ZeRO-2 run for a second epoch from its sharded optimizer state."""
    second = train(tiny_text_job(shared_data, tmp_path, "zero2", {"name": "deepspeed", "zero_stage": 2}, epochs=2))
    assert second.final_metrics["resumed_from"] == "epoch_0001"
    assert second.global_step == 2 * first.global_step
    state = json.loads((tmp_path / "zero2" / "epoch_0002" / "trainer_state.json").read_text())
    assert [h["epoch"] for h in state["history"]] == [1, 2]
