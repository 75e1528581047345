"""Places a multi-node job reads or writes: relative local paths are refused on several nodes, naming
the field; URIs, absolute paths and built-in data pass; one node checks nothing."""

from __future__ import annotations

import pytest

from rayfoundry.errors import ConfigError
from rayfoundry.storage import relative_local, require_shared
from trainers.config import parse_job
from trainers.run import shared_places
from trainers.strategy import gather_strings


@pytest.mark.parametrize(("path", "relative"), [
    ("runs", True), ("./runs", True), ("../shared/runs", True), ("sqlite:///mlflow.db", True),
    ("/mnt/nfs/runs", False), ("s3://bucket/runs", False), ("gs://b/r", False), ("file:///mnt/nfs/runs", False),
    ("sqlite:////mnt/nfs/mlflow.db", False), ("http://mlflow:5000", False), ("databricks", False),
    ("databricks://profile", False), ("file:/mnt/nfs/mlruns", False), ("mlruns", True)])
def test_relative_local_paths_are_those_a_working_directory_decides(path, relative):
    assert relative_local(path) is relative


def test_several_nodes_refuse_the_first_relative_place_naming_its_field():
    require_shared({"run.storage_path": "runs"}, nodes=1)  # one node: every process shares its disk
    require_shared({"run.storage_path": "s3://b/runs", "tracking.uri": None}, nodes=4)
    with pytest.raises(ConfigError, match=r"^tracking.uri 'sqlite:///mlflow.db' is a relative local path, which each "
                                          r"of this cluster's 4 nodes resolves on its own disk; give a URI"):
        require_shared({"run.storage_path": "/mnt/nfs/runs", "tracking.uri": "sqlite:///mlflow.db"}, nodes=4)


def test_a_job_names_its_storage_data_model_and_tracking_places_but_not_built_in_data():
    job = parse_job({"data": {"train_path": "sklearn:digits", "label_column": "target"}, "model": {"type": "cnn"},
                     "run": {"storage_path": "/mnt/nfs/runs"}, "tracking": {"uri": "sqlite:///m.db"}})
    assert shared_places(job) == {"run.storage_path": "/mnt/nfs/runs", "model.pretrained_path": None,
                                  "tracking.uri": "sqlite:///m.db"}
    untracked = job.model_copy(update={"tracking": job.tracking.model_copy(update={"backend": "none"})})
    assert "tracking.uri" not in shared_places(untracked)


def test_one_process_gathers_its_own_value():
    assert gather_strings("node-a") == ["node-a"]
