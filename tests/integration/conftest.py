"""Integration fixtures: runs trained once per session and shared by the tests that only read them."""

from __future__ import annotations

import pytest

from tests.conftest import REPO


def pytest_collection_modifyitems(items):
    for item in items:
        if "integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def digits_run(ray_cluster, tmp_path_factory):
    """The default digits job (8 epochs, 2 DDP workers) trained once: (job, summary, storage dir)."""
    from trainers.config import load_job
    from trainers.run import train

    storage = tmp_path_factory.mktemp("digits_run")
    job = load_job(REPO / "ray_apps" / "configs" / "digits_cnn.yaml", [f"run.storage_path={storage}"])
    return job, train(job), storage
