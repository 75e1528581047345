"""Loop functions without Ray: training lowers the loss, accumulation steps correctly, metrics are right."""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import f1_score

from trainers.config import DDPStrategy, OptimSection
from trainers.loop import classification_metrics, evaluate, train_epoch
from trainers.models import TabularMLP
from trainers.strategy import DDPEngine


def LocalEngine(model, optim_cfg, total_steps) -> DDPEngine:
    return DDPEngine(model, optim_cfg, DDPStrategy(name="ddp"), total_steps, distributed=False,
                     device=torch.device("cpu"))


def _blobs(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 3, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + y[:, None].float() * 2.0
    return [{"features": x[i:i + 32], "labels": y[i:i + 32]} for i in range(0, n, 32)]


def test_train_epoch_lowers_loss_and_counts_steps_with_accumulation():
    torch.manual_seed(0)
    batches = _blobs()
    model = TabularMLP(4, 3, [16], 0.0)
    engine = LocalEngine(model, OptimSection(lr=1e-2, warmup_fraction=0.0), total_steps=100)
    first = train_epoch(engine, batches, accum_steps=3, device=torch.device("cpu"))
    for _ in range(5):
        last = train_epoch(engine, batches, accum_steps=3, device=torch.device("cpu"))
    assert first["steps"] == 6  # 16 micro-batches / 3 -> 5 full steps + 1 for the remainder
    assert first["train_rows"] == 512
    assert last["train_loss_sum"] / last["train_rows"] < 0.7 * first["train_loss_sum"] / first["train_rows"]
    assert engine.global_step == 36


def test_both_engines_declare_the_engine_interface():
    import inspect

    from trainers.strategy import ENGINES, Engine

    assert isinstance(LocalEngine(TabularMLP(4, 3, [8], 0.0), OptimSection(), total_steps=1), Engine)
    wanted = [m for m in dir(Engine) if not m.startswith("_")]
    for name, cls in ENGINES.items():  # DeepSpeed needs a process group to build; check its methods
        missing = [m for m in wanted if m not in ("model", "optimizer", "scheduler", "global_step") and not hasattr(cls, m)]
        assert not missing, f"{name}: {missing}"
        assert list(inspect.signature(cls).parameters)[:4] == ["model", "optim_cfg", "strategy_cfg", "total_steps"]


def test_on_step_sees_running_totals_after_each_optimizer_step():
    seen = []
    engine = LocalEngine(TabularMLP(4, 3, [8], 0.0), OptimSection(), total_steps=10)
    train_epoch(engine, _blobs(128), accum_steps=2, device=torch.device("cpu"), on_step=seen.append)
    assert [s["steps"] for s in seen] == [1, 2]
    assert [s["rows"] for s in seen] == [64, 128]
    assert all(s["loss"] > 0 and s["seconds"] > 0 for s in seen)


def test_bf16_autocast_trains_on_cpu():
    engine = LocalEngine(TabularMLP(4, 3, [8], 0.0), OptimSection(precision="bf16"), total_steps=10)
    out = train_epoch(engine, _blobs(128), accum_steps=1, device=torch.device("cpu"), precision="bf16")
    assert out["steps"] == 4 and torch.isfinite(torch.tensor(out["train_loss_sum"]))
    sums = evaluate(engine.model, _blobs(64), 3, torch.device("cpu"), precision="bf16")
    assert classification_metrics(sums)["val_rows"] == 64


def test_max_steps_stops_early():
    engine = LocalEngine(TabularMLP(4, 3, [8], 0.0), OptimSection(), total_steps=10)
    out = train_epoch(engine, _blobs(), accum_steps=1, device=torch.device("cpu"), max_steps=2)
    assert out["steps"] == 2 and out["train_rows"] == 64


def test_evaluate_and_metrics_match_sklearn():
    torch.manual_seed(1)
    model = TabularMLP(4, 3, [8], 0.0)
    batches = _blobs(200, seed=3)
    sums = evaluate(model, batches, num_labels=3, device=torch.device("cpu"))
    m = classification_metrics(sums)
    with torch.no_grad():
        preds = torch.cat([model(b["features"]).argmax(-1) for b in batches])
        losses = torch.cat([torch.nn.functional.cross_entropy(model(b["features"]), b["labels"], reduction="none")
                            for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert m["val_rows"] == 200
    assert m["val_accuracy"] == pytest.approx((preds == labels).float().mean().item())
    assert m["val_macro_f1"] == pytest.approx(f1_score(labels, preds, average="macro"))
    assert m["val_loss"] == pytest.approx(losses.mean().item(), rel=1e-6)


def test_metrics_ignore_classes_absent_from_labels_and_predictions():
    cm = torch.tensor([[5, 0, 0], [1, 4, 0], [0, 0, 0]])
    m = classification_metrics({"loss_sum": torch.tensor(1.0, dtype=torch.float64), "confusion": cm})
    expected = f1_score([0] * 5 + [1] * 5, [0] * 5 + [0] + [1] * 4, average="macro")
    assert m["val_macro_f1"] == pytest.approx(expected)


def test_find_cause_digs_through_ray_style_wrappers():
    from rayfoundry.errors import DataError
    from rayfoundry.ray_env import find_cause

    inner = DataError("x.tsv, line 3: bad")
    task_error = type("RayTaskError", (Exception,), {})("wrapped")
    task_error.cause = inner
    group = type("WorkerGroupError", (Exception,), {})("training failed")
    group.worker_failures = {1: task_error}
    assert find_cause(group, (DataError,)) is inner
    assert find_cause(RuntimeError("unrelated"), (DataError,)) is None
