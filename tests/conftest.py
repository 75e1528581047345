"""Shared test fixtures: paths to the shared data, a tiny BERT config, one Ray per session."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYFOUNDRY_SHARED_DATA", REPO.parent / "shared" / "data"))

# A 2-layer, 32-wide BERT on MiniLM's vocabulary: trains in seconds on CPU.
TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
             "max_position_embeddings": 128}


def tiny_text_job(shared_data: Path, tmp_path: Path, name: str = "tiny_sst2", strategy: dict | None = None,
                  epochs: int = 2):
    """A tiny BERT on an 800-row slice of SST-2 train (and of dev for validation), 2 workers, untracked."""
    from trainers.config import parse_job

    return parse_job({
        "data": {"train_path": str(shared_data / "sst2" / "train.tsv"),
                 "validation_path": str(shared_data / "sst2" / "dev.tsv"),
                 "text_column": "sentence", "label_column": "label", "max_rows": 800, "max_length": 64},
        "model": {"type": "text", "from_config": TINY_BERT},
        "optim": {"lr": 1e-3, "batch_size": 32},
        "scaling": {"num_workers": 2, "cpus_per_worker": 0.5},
        "strategy": strategy or {"name": "ddp"},
        "run": {"name": name, "storage_path": str(tmp_path), "epochs": epochs},
        "tracking": {"backend": "none"},  # tracking has its own tests (about 7 s of each run on 2 cores)
    })


def assert_checkpoint_reproduces_reported_metrics(job, summary: dict) -> None:
    """Load the run's latest checkpoint with plain transformers and check it scores the validation set
    exactly as the training engine did when it reported that checkpoint's metrics."""
    import torch
    from transformers import AutoModelForSequenceClassification

    from trainers.loop import classification_metrics, evaluate
    from trainers.models import default_text_model_dir
    from trainers.ray_data import PadCollate, prepare_data

    ckpt = Path(summary.latest_checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(ckpt, local_files_only=True)
    assert model.config.id2label == dict(enumerate(summary.labels))
    data = prepare_data(job, default_text_model_dir())
    batches = data.val.iter_torch_batches(batch_size=64, collate_fn=PadCollate(0))
    metrics = classification_metrics(evaluate(model, batches, len(summary.labels), torch.device("cpu")))
    reported = summary.final_metrics
    assert metrics["val_rows"] == reported["val_rows"] == data.val_rows
    assert metrics["val_accuracy"] == pytest.approx(reported["val_accuracy"], abs=1e-9)
    assert metrics["val_loss"] == pytest.approx(reported["val_loss"], rel=1e-5)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "sst2" / "train.tsv").is_file():
        pytest.skip(f"shared data not found at {SHARED_DATA} (set RAYFOUNDRY_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray with 2 CPUs for the whole session; starting one costs seconds. Serve runs behind
    HAProxy, the ingress `python -m ray_apps serve` starts by default."""
    from rayfoundry.ray_env import connect_ray, quiet_process
    from serve_deployments.app import ingress_env

    quiet_process()
    os.environ.update(ingress_env("haproxy"))
    # A replica leaving HAProxy's pool drains 30 s by default (health checks must see it go); tests
    # delete apps and scale down often, and nothing else shares their service.
    os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"] = "2"
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


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Trained once per session, shared by the unit and serving tests: real checkpoints (written by the
    training code's own save_checkpoint) of a CNN on digits, an MLP on breast cancer and a tiny BERT on
    synthetic reviews, each trained a few epochs in this process."""
    from tests.builders import job_for, make_checkpoint

    tmp = tmp_path_factory.mktemp("ckpts")
    with _one_thread():
        return {kind: make_checkpoint(tmp / kind, job_for(kind, tmp), epochs=3) for kind in ("cnn", "mlp", "text")}


@pytest.fixture(scope="session")
def weak_cnn(tmp_path_factory) -> Path:
    """The CNN after one step's worth of training: clearly worse than `checkpoints['cnn']`."""
    from tests.builders import job_for, make_checkpoint

    tmp = tmp_path_factory.mktemp("weak")
    raw = job_for("cnn", tmp)
    raw["optim"] = {"lr": 1e-5, "batch_size": 32}
    with _one_thread():
        return make_checkpoint(tmp / "weak", raw, epochs=1, seed=1)


@contextlib.contextmanager
def _one_thread():
    """Tiny models train fastest on one thread (and do not stall when Ray workers share the CPUs)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
