"""Sweeps on the session's 2-CPU Ray: ASHA two trials at a time, resumption after the driver dies,
the best config training with the train CLI, and PBT continuing a weak trial from a strong one's checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = [pytest.mark.slow, pytest.mark.heavy]  # run by `make test-heavy` (CI runs it after `make test`)

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"
GOOD_LR, BAD_LR = 0.005, 0.00001  # after one epoch: ~0.8 vs ~0.1 validation accuracy


def _sweep_yaml(tmp_path: Path, **fields) -> Path:
    """A digits sweep over a good and a hopeless learning rate, 1 worker x 0.45 CPU per trial. With
    seed 1, Tune samples the four trials as [good, bad, bad, bad]: the first wave sets a bar at epoch 1
    that the second wave misses, so ASHA's early stop does not hang on which trial reports first."""
    spec = {"base": str(DIGITS), "train": {"run": {"epochs": 2}},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.45},
            "space": {"optim.lr": {"choice": [GOOD_LR, BAD_LR]}}, "metric": "val_accuracy",
            "search": {"type": "random", "seed": 1}, "run": {"storage_path": str(tmp_path)}} | fields
    path = tmp_path / f"{spec['run'].get('name', 'sweep')}.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _train_runs(trial_dir: Path) -> list[Path]:
    return sorted(trial_dir.glob("train-*"))


def _tracked(storage: Path):
    """(MLflow client, runs by rayfoundry.kind) of the default tracking store under `storage`."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{storage}/mlflow.db")
    runs: dict[str, list] = {"sweep": [], "trial": [], "train": []}
    for run in client.search_runs([client.get_experiment_by_name("rayfoundry").experiment_id]):
        runs[run.data.tags["rayfoundry.kind"]].append(run)
    return client, runs


def _cli(config: Path, *more: str) -> list[str]:
    return [sys.executable, "-m", "ray_apps", "tune", "--config", str(config), *more]


def _env(ray_cluster) -> dict[str, str]:
    return os.environ | {"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}


def test_asha_two_at_a_time_stops_a_hopeless_trial_resumes_after_a_kill_and_its_best_yaml_trains(ray_cluster,
                                                                                                  tmp_path, capsys):
    """One 4-trial ASHA sweep. The driver is killed just after ASHA cut a trial, with trials still
    running; the same command then resumes it. (Tune keeps no scheduler state across a resume, so
    the early stop must happen before the kill for the test to know it happened.)"""
    from ray_apps.__main__ import main

    config = _sweep_yaml(tmp_path, num_samples=4,
                         scheduler={"type": "asha", "grace_period": 1, "reduction_factor": 2})
    driver = subprocess.Popen(_cli(config), cwd=REPO, env=_env(ray_cluster), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    seen, deadline = [], time.time() + 400
    for line in driver.stdout:
        seen.append(line)
        if "stopped early at epoch 1" in line:
            break
        assert time.time() < deadline, "".join(seen[-30:])
    time.sleep(3)  # the sweep's state is snapshotted every 2 s
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    first = "".join(seen)
    assert "2 trial(s) at once" in first and "stopped early at epoch 1" in first, first  # 2 CPUs, no deadlock
    ended = [line.split()[0] for line in seen if line.strip().endswith(("finished", "early at epoch 1"))]
    sweep_dir = tmp_path / "sweep"
    before = {t: (d, (d / "result.json").read_text()) for t in ended
              for d in sweep_dir.iterdir() if d.is_dir() and t in d.name}

    out = tmp_path / "summary.json"
    registry = tmp_path / "registry"
    rerun = subprocess.run(_cli(config, "--json-out", str(out), "--register", "digits", "--registry", str(registry)),
                           cwd=REPO, env=_env(ray_cluster), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming" in rerun.stdout, rerun.stdout
    summary = json.loads(out.read_text())
    rows = summary["leaderboard"]
    assert len(rows) == 4 and all(r["status"] in ("finished", "stopped") for r in rows), rows
    assert sum(r["stopped_early"] and r["epochs"] == 1 for r in rows) >= 1, rows
    assert rows[0]["config"]["optim.lr"] == GOOD_LR and rows[0]["val_accuracy"] > 0.7 and rows[0]["epochs"] == 2
    # Trials that had ended before the kill were not run again: one Train run each, the same results.
    for trial, (trial_dir, results) in before.items():
        assert f"{trial}  epoch" not in rerun.stdout
        assert len(_train_runs(trial_dir)) == 1 and (trial_dir / "result.json").read_text() == results, trial
    # The leaderboard, the best config and checkpoint are printed.
    board = rerun.stdout[rerun.stdout.index("trial  "):]
    assert board.splitlines()[0].split() == ["trial", "optim.lr", "val_accuracy", "epochs", "early", "stop", "status"]
    best = summary["best"]
    assert f"best config:     {best['yaml']}" in rerun.stdout and best["checkpoint"] in rerun.stdout
    assert (Path(best["checkpoint"]) / "model.safetensors").is_file()
    # --register: the best checkpoint is now digits@challenger, exported and scored like any package.
    from model_registry.registry import Registry

    reg = Registry(str(registry))
    assert summary["registered"]["ref"] == "digits:1" and reg.resolve("digits@challenger") == ("digits", "1")
    meta = reg.metadata("digits", "1")
    assert meta.validation.metrics["onnx"]["val_accuracy"] == pytest.approx(best["value"], abs=1e-9)
    # The best YAML is a complete job the train CLI accepts and trains (its dry run: config, data,
    # model and two optimizer steps).
    assert yaml.safe_load(Path(best["yaml"]).read_text())["optim"]["lr"] == best["config"]["optim.lr"]
    assert main(["train", "--config", best["yaml"], "--dry-run"]) == 0
    assert "dry run OK: 2 steps" in capsys.readouterr().out

    # Tracked in MLflow (the default SQLite store beside the runs): one sweep run and one nested run per
    # trial, the same runs across the driver's kill and the resumed sweep, each ended with its reason.
    client, runs = _tracked(tmp_path)
    (sweep,) = runs["sweep"]
    trials = runs["trial"]
    assert len(trials) == 4 and {r.data.tags["mlflow.parentRunId"] for r in trials} == {sweep.info.run_id}
    assert {r.data.tags["rayfoundry.trial_id"] for r in trials} == {r["trial"] for r in rows}
    reasons = sorted(r.data.tags["rayfoundry.end_reason"] for r in trials)
    assert "finished 2 epochs" in reasons and "stopped early by ASHA after epoch 1 of 2" in reasons, reasons
    assert all(r.info.status == "FINISHED" and r.data.params["optim.lr"] in (str(GOOD_LR), str(BAD_LR))
               and r.data.params["data.train_path"] == "sklearn:digits" for r in trials)
    by_trial = {r.data.tags["rayfoundry.trial_id"]: r for r in trials}
    winner = by_trial[best["trial"]]
    # a trial running when the driver was killed repeats the epoch it had not checkpointed
    assert sorted({m.step for m in client.get_metric_history(winner.info.run_id, "val_accuracy")}) == [1, 2]
    assert {a.path for a in client.list_artifacts(sweep.info.run_id)} == {"leaderboard.json", "best_train.yaml"}
    assert sweep.data.metrics["best_val_accuracy"] == pytest.approx(best["value"])
    # --register's export was recorded against the winning trial's run.
    assert winner.data.metrics["package_version"] == 1
    assert winner.data.tags["rayfoundry.config_hash"] == meta.training.lineage.config_hash  # the trial's own recipe
    assert "packages/digits-1" in {a.path for a in client.list_artifacts(winner.info.run_id, "packages")}


def test_pbt_continues_a_weak_trial_from_a_strong_trials_checkpoint(ray_cluster, tmp_path):
    from tuning.config import load_tune
    from tuning.sweep import SweepError, run_sweep

    config = _sweep_yaml(tmp_path, num_samples=2, run={"storage_path": str(tmp_path), "name": "pbt"},
                         scheduler={"type": "pbt", "perturbation_interval": 1, "quantile_fraction": 0.5,
                                    "resample_probability": 0.0, "synch": True}, train={"run": {"epochs": 3}})
    summary = run_sweep(load_tune(config), log=lambda *_: None)
    rows = {Path(r["path"]).name: r for r in summary["leaderboard"]}
    cloned = []
    for name, row in rows.items():
        # Each Train run that ended records what it started from (one Tune stopped has no result.json).
        for run in [r for r in _train_runs(Path(row["path"])) if (r / "result.json").is_file()]:
            source = json.loads((run / "result.json").read_text())["init_checkpoint"] or ""
            cloned += [(name, other) for other in rows if other != name and f"/{other}/checkpoint_" in source]
    # At least one exploit: a trial's Train run started from another trial's Tune checkpoint, which is
    # a copy of our checkpoint directory (safetensors + checksums), not a pickle.
    assert cloned, summary["leaderboard"]
    assert all(r["status"] == "finished" and r["epochs"] == 3 for r in rows.values()), rows
    # The clone is on record in the cloned trial's tracked run, which stays one run per trial.
    _, runs = _tracked(tmp_path)
    assert len(runs["trial"]) == 2
    notes = {r.data.tags["rayfoundry.trial_id"]: r.data.tags.get("rayfoundry.pbt_clones", "") for r in runs["trial"]}
    assert any("continued from" in notes[rows[name]["trial"]] for name, _ in cloned), notes

    # Re-running the same sweep name with another config is refused rather than mixing the two.
    with pytest.raises(SweepError, match="holds a sweep started from another config; re-run with --restart"):
        run_sweep(load_tune(config, ["num_samples=3"]), log=lambda *_: None)
