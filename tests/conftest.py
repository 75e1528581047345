"""Shared test fixtures: paths to the shared data, a tiny BERT config, one Ray per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))

# A 2-layer, 32-wide BERT on MiniLM's vocabulary: trains in seconds on CPU.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128}


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set RAYFOUNDRY_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray with 2 CPUs for the whole session; starting one costs seconds."""
    from trainers.run import connect_ray, quiet_libraries

    quiet_libraries()
    connect_ray(num_cpus=2, address="local")  # never join a stray `ray start` head
    import ray

    yield ray
    ray.shutdown()


def pytest_collection_modifyitems(config, items):
    """GPU-only tests carry @pytest.mark.gpu and skip cleanly where torch sees no CUDA device."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is visible to torch")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
