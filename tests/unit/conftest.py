"""Unit tests: no Ray cluster; torch on one thread. Checkpoints are trained once per session."""

from pathlib import Path

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and do not stall when Ray workers share the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """Real checkpoints (written by the training code's own save_checkpoint) of a CNN on digits, an MLP
    on breast cancer and a tiny BERT on synthetic reviews, each trained a few epochs in this process."""
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


class _one_thread:
    """Session fixtures are built before the module-scoped thread setting applies."""

    def __enter__(self):
        self.before = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)
