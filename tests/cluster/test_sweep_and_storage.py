"""A sweep spread over the nodes, counted on the cluster's CPUs; and the places every node must reach
(run storage, tracking, the registry) refused as relative local paths, naming the field, while a URI
or an absolute shared path works."""

from __future__ import annotations

import pytest
import yaml

from tests.cluster.test_training import digits_job
from tests.conftest import REPO

pytestmark = [pytest.mark.cluster, pytest.mark.slow]  # `make test-cluster` runs these

DIGITS = REPO / "ray_apps" / "configs" / "digits_cnn.yaml"


def test_a_sweep_runs_trials_at_once_on_several_nodes_counted_on_the_cluster_cpus(sim_cluster, tmp_path):
    from tuning.config import load_tune
    from tuning.sweep import run_sweep

    spec = {"base": str(DIGITS), "train": {"run": {"epochs": 2}, "optim": {"batch_size": 48},
                                           "tracking": {"backend": "none"}},
            "scaling": {"num_workers": 1, "cpus_per_worker": 1, "threads_per_worker": 1},
            "space": {"optim.lr": {"loguniform": [1.0e-3, 1.0e-2]}}, "metric": "val_accuracy", "num_samples": 4,
            "scheduler": {"type": "fifo"}, "search": {"type": "random", "seed": 0},
            "run": {"name": "cluster_sweep", "storage_path": str(tmp_path)}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    summary = run_sweep(load_tune(path), log=print)
    # Each trial holds 1.01 CPUs: one fits on each 2-CPU node, and one node keeps a whole CPU for Ray Data's
    # tasks. This machine alone has 2 CPUs, where the same rule allows none: the sweep would be refused.
    assert summary["concurrency"].startswith("2 trial(s) at once: min(num_samples 4, 0 + 1 + 1 whole trials of 1.01 "
                                             "CPUs on 3 nodes (2/2/2 CPUs)"), summary["concurrency"]
    rows = summary["leaderboard"]
    assert [r["status"] for r in rows] == ["finished"] * 4, rows
    used = {node for r in rows for node in r["worker_nodes"]}
    assert len(used) >= 2 and used <= set(sim_cluster.node_ids().values()), (used, sim_cluster.node_ids())


@pytest.mark.parametrize(("field", "value"), [("run.storage_path", "runs"), ("tracking.uri", "sqlite:///mlflow.db"),
                                              ("data.train_path", "data/digits.csv")])
def test_relative_local_paths_are_refused_on_a_multi_node_cluster_naming_the_field(sim_cluster, tmp_path, field, value):
    from rayfoundry.errors import ConfigError
    from trainers.config import parse_job
    from trainers.run import train

    raw = digits_job(tmp_path, "refused") | {"tracking": {"backend": "mlflow", "uri": f"sqlite:///{tmp_path}/m.db"}}
    section, key = field.split(".")
    raw[section] = raw.get(section, {}) | {key: value}
    with pytest.raises(ConfigError) as refused:
        train(parse_job(raw), log=print)
    nodes = 1 + len(sim_cluster.workers)  # the head is a node too
    assert str(refused.value).startswith(f"{field} {value!r} is a relative local path, which each of this "
                                         f"cluster's {nodes} nodes resolves on its own disk; give a URI"), refused.value
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_a_registry_given_as_a_relative_path_is_refused_by_the_model_application(sim_cluster):
    from rayfoundry.errors import ConfigError
    from serve_deployments.model import build_app

    with pytest.raises(ConfigError, match=rf"^registry 'registry' is a relative local path, which each of this "
                                          rf"cluster's {1 + len(sim_cluster.workers)} nodes resolves on its own disk"):
        build_app({"registry": "registry", "model": "digits"})


def test_uri_storage_and_an_absolute_tracking_store_work_across_the_nodes(sim_cluster, tmp_path):
    from trainers.config import parse_job
    from trainers.run import train

    db = tmp_path / "mlflow.db"
    raw = digits_job(f"file://{tmp_path}/runs", "uri_storage")
    raw["run"] |= {"epochs": 1}
    raw["tracking"] = {"backend": "mlflow", "uri": f"sqlite:///{db}"}
    summary = train(parse_job(raw), log=print)
    assert summary.run_dir == f"file://{tmp_path}/runs/uri_storage"
    assert len(set(summary.worker_nodes)) == 3
    assert (tmp_path / "runs" / "uri_storage" / "epoch_0001" / "model.safetensors").is_file()
    assert summary.lineage.tracking is not None and db.is_file()
