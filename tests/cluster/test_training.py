"""Training across nodes: DDP with one worker per node matches a single-node run step for step, `ray job
submit` to the head trains across the nodes, and a node that dies mid-epoch costs a restart from the last
checkpoint, after which the run ends exactly as an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
import yaml

from tests.builders import job_for
from tests.cluster.conftest import cli_env
from tests.conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # `make test-cluster` runs these

EPOCHS = 4
COMPARED = ("epoch", "global_step", "train_rows", "train_loss", "val_loss", "val_accuracy", "val_macro_f1", "val_rows")


def digits_job(storage: Path | str, name: str, **scaling) -> dict:
    """The digits CNN, one worker per node (num_workers auto on a cluster of CPU nodes), untracked."""
    raw = job_for("cnn", Path("/nonexistent"))
    return raw | {"optim": raw["optim"] | {"batch_size": 48},  # the global batch divides over 3 workers
        "scaling": {"num_workers": "auto", "threads_per_worker": 1, "cpus_per_worker": 1} | scaling,
        "run": {"name": name, "storage_path": str(storage), "epochs": EPOCHS},
        "failure": {"max_failures": 2}, "tracking": {"backend": "none"}}


def same_training(a: dict, b: dict) -> None:
    for key in COMPARED:
        assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), (key, a[key], b[key])


@pytest.fixture(scope="module")
def spread_run(sim_cluster, tmp_path_factory):
    """The digits job trained once on the cluster, uninterrupted: (raw job, summary)."""
    from trainers.config import parse_job
    from trainers.run import train

    raw = digits_job(tmp_path_factory.mktemp("spread"), "spread")
    return raw, train(parse_job(raw), log=print)


def test_ddp_runs_one_worker_per_node_and_matches_a_single_node_run(sim_cluster, spread_run, tmp_path):
    raw, summary = spread_run
    nodes = sim_cluster.node_ids()
    assert summary.num_workers == len(nodes)  # auto: one per CPU node; the head has no CPUs for work
    assert sorted(summary.worker_nodes) == sorted(nodes.values()), (summary.worker_nodes, nodes)

    # The same job on one machine's own Ray, with the same 3 workers packed on it.
    single = raw | {"scaling": raw["scaling"] | {"num_workers": len(nodes), "cpus_per_worker": 0.3},
                    "run": raw["run"] | {"storage_path": str(tmp_path)}}
    config = tmp_path / "single.yaml"
    config.write_text(yaml.safe_dump(single))
    env = os.environ | {"RAY_ADDRESS": "local"}  # a new one-node Ray, not the simulated cluster
    proc = subprocess.run([sys.executable, "-m", "ray_apps", "train", "--config", str(config), "--json-out",
                           str(tmp_path / "single.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    local = json.loads((tmp_path / "single.json").read_text())
    assert len(set(local["worker_nodes"])) == 1 and local["num_workers"] == len(nodes)
    same_training(summary.final_metrics, local["final_metrics"])
    same_training(summary.best_metrics, local["best_metrics"])


def submit_train(dashboard: str, storage: str) -> subprocess.CompletedProcess:
    """`ray job submit` of the default job from the repo root, as docs/clusters.md shows, waiting for its end."""
    command = ["ray", "job", "submit", "--address", dashboard, "--submission-id", f"rayfoundry-{uuid.uuid4().hex[:8]}",
               "--working-dir", ".", "--runtime-env", "cluster_configs/runtime_env.yaml", "--",
               "python", "-m", "ray_apps", "train", "--config", "ray_apps/configs/digits_cnn.yaml",
               "--set", f"run.storage_path={storage}", "--set", "run.epochs=2", "--set", "scaling.num_workers=auto",
               "--set", "scaling.cpus_per_worker=1", "--set", "optim.batch_size=48", "--set", "tracking.backend=none"]
    env = cli_env()
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def test_ray_job_submit_to_the_head_trains_across_the_nodes(sim_cluster, tmp_path):
    proc = submit_train(sim_cluster.dashboard, str(tmp_path / "runs"))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "epoch 2/2" in proc.stdout and "3 worker(s)" in proc.stdout  # the job's log streams back
    result = json.loads((tmp_path / "runs" / "digits_cnn" / "result.json").read_text())
    assert sorted(result["worker_nodes"]) == sorted(sim_cluster.node_ids().values())

    # The same submission with a relative run.storage_path fails at once, naming the field.
    refused = submit_train(sim_cluster.dashboard, "runs")
    assert refused.returncode != 0
    assert "run.storage_path 'runs' is a relative local path" in refused.stdout + refused.stderr, refused.stdout[-3000:]


def test_a_node_lost_mid_epoch_resumes_from_its_checkpoint_and_ends_as_an_uninterrupted_run(
        sim_cluster, spread_run, tmp_path):
    from ray.util.state import list_actors

    from trainers.config import parse_job
    from trainers.run import train

    raw, uninterrupted = spread_run
    job = parse_job(raw | {"run": raw["run"] | {"name": "node_loss", "storage_path": str(tmp_path)}})
    outcome: dict = {}
    runner = threading.Thread(target=lambda: outcome.update(summary=train(job, log=print)), daemon=True)
    runner.start()
    # Ray Train lists a checkpoint in its snapshot once every rank's part of it is stored.
    snapshot = tmp_path / "node_loss" / "checkpoint_manager_snapshot.json"

    def registered() -> bool:
        return snapshot.exists() and '"checkpoint_dir_name":"epoch_0001"' in snapshot.read_text()

    deadline = time.monotonic() + 300
    while not registered() and runner.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert registered(), "the run stored no first checkpoint"
    # The node of a Train worker (not the head): its death ends that worker's process mid-epoch 2.
    workers = [a for a in list_actors(filters=[("state", "=", "ALIVE")], limit=1000)
               if "TrainWorker" in a["class_name"] and sim_cluster.name_of(a["node_id"])]
    assert workers, "no Train worker found on a worker node"
    victim = sim_cluster.name_of(workers[0]["node_id"])
    removed = sim_cluster.remove_worker(victim)
    print(f"removed {victim} ({removed}) at {time.monotonic():.1f}")
    # The run keeps one worker per node: it waits for a third node, as an autoscaler would provide one.
    time.sleep(2)
    replacement = sim_cluster.add_worker()
    assert runner.is_alive()  # still waiting for its third node: the loss cost the run a restart
    runner.join(600)
    assert not runner.is_alive()
    summary = outcome["summary"]
    assert summary.restarts >= 1, summary
    assert summary.final_metrics["resumed_from"], summary.final_metrics
    assert removed not in summary.worker_nodes
    assert sim_cluster.node_ids()[replacement] in summary.worker_nodes
    same_training(summary.final_metrics, uninterrupted.final_metrics)
    same_training(summary.best_metrics, uninterrupted.best_metrics)
