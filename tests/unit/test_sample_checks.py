"""In-epoch checks on a fixed validation sample (run.check_every_steps), the run.stop_at target, and
frozen token embeddings (model.freeze_embeddings), without Ray."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from trainers.checks import SampleCheck, fixed_sample, reached
from trainers.config import ConfigError, DDPStrategy, OptimSection, TextModel, parse_job
from trainers.loop import train_epoch
from trainers.models import TabularMLP, build_model
from trainers.strategy import DDPEngine, build_optimizer

TINY_BERT = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}


def text_batches(n_rows: int, batch: int) -> list[dict[str, np.ndarray]]:
    """Rows as Ray gives them: row i has i % 9 + 1 token ids, each equal to i."""
    ids = np.empty(n_rows, dtype=object)
    ids[:] = [np.full(i % 9 + 1, i) for i in range(n_rows)]
    labels = np.arange(n_rows) % 2
    return [{"input_ids": ids[i:i + batch], "label": labels[i:i + batch]} for i in range(0, n_rows, batch)]


def rows_in(batches) -> list[int]:
    return sorted(int(r[0]) for b in batches for r in b["input_ids"])


def test_the_fixed_sample_is_the_same_rows_for_a_seed_however_the_rows_arrive_in_batches():
    one = fixed_sample(text_batches(1000, 100), 1000, 200, seed=3, eval_batch=64, pad_id=0)
    again = fixed_sample(text_batches(1000, 37), 1000, 200, seed=3, eval_batch=64, pad_id=0)
    other = fixed_sample(text_batches(1000, 100), 1000, 200, seed=4, eval_batch=64, pad_id=0)
    assert len(rows_in(one)) == 200 and len(set(rows_in(one))) == 200
    assert rows_in(one) == rows_in(again)
    assert rows_in(one) != rows_in(other)
    assert max(rows_in(one)) > 500  # drawn from the whole set, not its first rows
    assert [len(b["labels"]) for b in one] == [64, 64, 64, 8]


def test_a_sample_at_least_as_large_as_the_set_is_the_whole_set_and_features_batch_in_order():
    assert rows_in(fixed_sample(text_batches(50, 16), 50, None, 0, 64, 0)) == list(range(50))
    assert rows_in(fixed_sample(text_batches(50, 16), 50, 500, 0, 64, 0)) == list(range(50))
    tabular = [{"features": np.arange(40, dtype=np.float32).reshape(10, 4), "label": np.arange(10) % 2}]
    batches = fixed_sample(tabular, 10, None, 0, 4, 0)
    assert [b["features"].shape[0] for b in batches] == [4, 4, 2]
    assert batches[0]["features"][0].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(("value", "target", "mode", "expected"), [
    (0.92, 0.92, "max", True), (0.919, 0.92, "max", False), (0.30, 0.31, "min", True), (0.5, None, "max", False)])
def test_reached_follows_the_metric_direction(value, target, mode, expected):
    assert reached(value, target, mode) is expected


def blobs(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.randn(n, 4, generator=g) + y[:, None].float() * 3.0
    return [{"features": x[i:i + 32], "labels": y[i:i + 32]} for i in range(0, n, 32)]


def check_for(engine, target, history=(), every=4):
    return SampleCheck(blobs(256, seed=1), every=every, engine=engine, num_labels=2, device=torch.device("cpu"),
                       precision="fp32", rank=0, world=1, target=target, metric="val_accuracy", mode="max",
                       all_reduce=lambda sums: sums, history=list(history), log=lambda line: None)


def local_engine():
    torch.manual_seed(0)
    return DDPEngine(TabularMLP(4, 2, [16], 0.0), OptimSection(lr=5e-2, warmup_fraction=0.0),
                     DDPStrategy(name="ddp"), 100, distributed=False, device=torch.device("cpu"))


def test_checks_run_every_n_steps_and_stop_the_epoch_once_the_target_is_reached():
    engine = local_engine()
    check = check_for(engine, target=0.95)
    check.epoch_started(1)
    stats = train_epoch(engine, blobs(), accum_steps=1, device=torch.device("cpu"), on_step=check,
                        stop=lambda: check.done)
    assert [r.global_step for r in check.records] == list(range(4, 4 * len(check.records) + 1, 4))
    assert check.done and len(check.records) == 2 and check.records[-1].val_accuracy >= 0.95
    assert check.records[0].val_accuracy < 0.95
    assert stats["steps"] == check.records[-1].global_step < 16  # stopped at the check, not the epoch's end
    assert all(r.rows == 256 and r.epoch == 1 for r in check.records)
    assert engine.model.training  # a check leaves the model training


def test_check_time_is_not_training_time_and_the_clock_continues_across_a_resume():
    engine = local_engine()
    check = check_for(engine, target=None, every=1)
    slow = check.all_reduce
    check.all_reduce = lambda sums: (time.sleep(0.3), slow(sums))[1]
    check.epoch_started(1)
    started = time.perf_counter()
    train_epoch(engine, blobs(n=128), accum_steps=1, device=torch.device("cpu"), on_step=check)
    trained = check.epoch_ended()
    assert len(check.records) == 4
    assert trained < time.perf_counter() - started - 4 * 0.3 + 0.05  # the four 0.3 s checks are not counted
    history = [{"checks": [r.model_dump() for r in check.records], "train_seconds_total": trained}]
    resumed = check_for(engine, target=None, history=history)
    assert resumed.records == check.records and resumed.trained == trained


def test_stop_at_is_checked_against_the_checkpoint_metric():
    base = {"data": {"train_path": "sklearn:digits"}, "model": {"type": "cnn"}}
    with pytest.raises(ConfigError, match=r"run.stop_at 92.0 is out of range for checkpoint.metric val_accuracy"):
        parse_job(base | {"run": {"stop_at": 92.0}}, "job.yaml")
    with pytest.raises(ConfigError, match=r"run.stop_at -0.1 .* val_loss \(a loss above 0\)"):
        parse_job(base | {"run": {"stop_at": -0.1}, "checkpoint": {"metric": "val_loss"}}, "job.yaml")
    with pytest.raises(ConfigError, match="run.check_every_steps"):
        parse_job(base | {"run": {"check_every_steps": 0}}, "job.yaml")
    job = parse_job(base | {"run": {"stop_at": 0.9, "check_every_steps": 50, "check_rows": None}}, "job.yaml")
    assert (job.run.stop_at, job.run.check_every_steps, job.run.check_rows) == (0.9, 50, None)


def test_frozen_embeddings_get_no_gradient_no_optimizer_state_and_keep_their_values():
    model = build_model(TextModel(type="text", freeze_embeddings=True), ["neg", "pos"])  # the packaged MiniLM
    table = model.get_input_embeddings().weight
    before = table.detach().clone()
    optimizer = build_optimizer(model, OptimSection(lr=1e-2))
    assert all(p is not table for g in optimizer.param_groups for p in g["params"])
    ids = torch.randint(5, 500, (4, 6))
    loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=torch.tensor([0, 1, 0, 1])).loss
    loss.backward()
    optimizer.step()
    assert table.grad is None and torch.equal(table, before)
    trainable = build_model(TextModel(type="text", from_config=TINY_BERT), ["neg", "pos"])
    assert trainable.get_input_embeddings().weight.requires_grad
    raw = {"data": {"train_path": "x.tsv", "text_column": "text"},
           "model": {"type": "text", "from_config": TINY_BERT, "freeze_embeddings": True}}
    with pytest.raises(ConfigError, match="model.freeze_embeddings keeps pretrained embeddings; with "
                                          "model.from_config they are random"):
        parse_job(raw, "job.yaml")


def test_tracking_logs_each_check_once_at_its_optimizer_step(monkeypatch):
    import tracking.train_callback as callback

    logged: list[tuple[dict, int]] = []

    class Recorder:
        def __init__(self, ref, log):
            pass

        def log_metrics(self, metrics, step):
            logged.append((metrics, step))

    monkeypatch.setattr(callback, "Tracker", Recorder)
    tracking = callback.TrainTracking(ref=None)

    def check(step):
        return {"epoch": 1 + (step > 10), "global_step": step, "train_seconds": step / 10, "rows": 9, "val_loss": 0.5,
                "val_accuracy": step / 100, "val_macro_f1": 0.4}

    tracking.after_report(None, [{"epoch": 1, "val_accuracy": 0.5, "checks": [check(4), check(8)]}], None)
    tracking.after_report(None, [{"epoch": 2, "val_accuracy": 0.6, "checks": [check(4), check(8), check(12)]}], None)
    steps = [(step, sorted(m)) for m, step in logged if "check_val_accuracy" in m]
    assert [s for s, _ in steps] == [4, 8, 12]
    assert steps[0][1] == ["check_train_seconds", "check_val_accuracy", "check_val_loss", "check_val_macro_f1"]
    assert [step for m, step in logged if "check_val_accuracy" not in m] == [1, 2]
