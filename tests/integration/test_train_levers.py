"""The time-to-accuracy levers in real runs on the session's Ray: a time budget that sets the plan of
steps and ends the learning-rate schedule with it, length-grouped batches that are the same for a
seed, and the auto choices of precision and scaling, each printed."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_text_job
from trainers.hardware import resolve_precision
from trainers.recovery import FAULT_ENV
from trainers.run import train

pytestmark = pytest.mark.slow


def levers_job(shared_data, tmp_path, name: str, **run):
    job = tiny_text_job(shared_data, tmp_path, name=name)
    job.data.group_by_length = True
    job.optim.precision = "auto"
    job.scaling.num_workers = job.scaling.threads_per_worker = "auto"
    job.scaling.cpus_per_worker = 1.0  # the other CPU stays free for Ray Data
    for key, value in run.items():
        setattr(job.run, key, value)
    return job


def test_a_time_budget_plans_the_steps_and_the_schedule_ends_with_them(ray_cluster, shared_data, tmp_path):
    job = levers_job(shared_data, tmp_path, "budget", epochs=100, time_budget_min=1.0)
    lines: list[str] = []
    summary = train(job, log=lines.append)
    assert summary.ended_by == "time_budget" and summary.global_step == summary.planned_steps, summary
    assert summary.planned_steps < 100 * summary.train_rows / 32  # the budget, not the epochs, set the plan
    assert summary.final_metrics["lr"] == pytest.approx(0.0, abs=1e-9)  # linear decay reached its end
    assert summary.final_metrics["precision"] == resolve_precision("auto", torch.device("cpu"))[0]
    assert summary.num_workers == 1
    assert any(line.startswith("scaling: 1 worker(s) x 2 thread(s)") and "one process using every core" in line
               for line in lines), lines
    assert any("time budget 1 min from the command's start" in line for line in lines), lines
    print(f"time budget 60 s: wall {summary.wall_seconds:.0f} s, {summary.global_step} steps")
    # Done is done: the same command returns the finished run.
    again: list[str] = []
    assert train(job, log=again.append).global_step == summary.global_step
    assert any("already finished: its time budget ended it" in line for line in again), again


def test_length_grouped_runs_are_the_same_for_a_seed_and_resume_exactly(ray_cluster, shared_data, tmp_path,
                                                                          monkeypatch):
    def run(name: str):
        job = levers_job(shared_data, tmp_path, name, epochs=2, max_steps=15)
        job.data.max_rows = 320  # 10 steps an epoch
        return train(job, log=lambda *_: None)

    first, second = run("grouped_a"), run("grouped_b")
    assert first.ended_by == "max_steps" and first.global_step == 15 and first.epochs_completed == 2
    keys = ("train_loss", "val_loss", "val_accuracy", "lr")
    assert {k: first.final_metrics[k] for k in keys} == {k: second.final_metrics[k] for k in keys}
    # The worker dies in epoch 2; the restarted one replays epoch 2's grouped batches from its start.
    marker = tmp_path / "exited-once"
    monkeypatch.setenv(FAULT_ENV, f"rank=0,epoch=2,step=3,marker={marker}")
    crashed = run("grouped_crashed")
    assert marker.read_text() == "exited at step 3\n" and crashed.restarts == 1
    assert crashed.final_metrics["resumed_from"] == "epoch_0001"
    assert {k: crashed.final_metrics[k] for k in keys} == pytest.approx({k: first.final_metrics[k] for k in keys},
                                                                         rel=1e-6, abs=1e-9)


def test_checks_score_a_fixed_sample_during_epochs_and_a_target_ends_the_run(ray_cluster, shared_data, tmp_path):
    def job_with(name: str, **run):
        job = tiny_text_job(shared_data, tmp_path, name=name, epochs=2)
        job.data.max_rows = 320  # 2 workers x 16 rows: 10 steps an epoch
        job.run.check_every_steps, job.run.check_rows = 4, 100
        for key, value in run.items():
            setattr(job.run, key, value)
        return job

    summary = train(job_with("checked"), log=lambda *_: None)
    assert [(c.epoch, c.global_step) for c in summary.checks] == [(1, 4), (1, 8), (2, 12), (2, 16), (2, 20)]
    assert all(c.rows == 100 for c in summary.checks)  # the sample, not the 320 validation rows
    seconds = [c.train_seconds for c in summary.checks]
    assert seconds == sorted(seconds) and summary.final_metrics["train_seconds_total"] >= seconds[-1]
    assert summary.final_metrics["val_rows"] == 320 and summary.ended_by == "epochs"

    target = train(job_with("target", stop_at=0.01), log=lambda *_: None)
    assert target.ended_by == "target" and target.global_step == 4 and target.epochs_completed == 1, target
    assert target.best_checkpoint and target.final_metrics["val_rows"] == 320  # full validation, checkpointed
    again: list[str] = []
    assert train(job_with("target", stop_at=0.01), log=again.append).global_step == 4
    assert any("already finished: its target ended it" in line for line in again), again
