"""The training speed levers that need no Ray: length-grouped batches (data.group_by_length) and the
auto precision choice (optim.precision: auto)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from trainers.config import ConfigError, parse_job
from trainers.data import collate, length_grouped
from trainers.hardware import NodeShape, resolve_precision


def windows(n_rows: int, window: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Shuffled text rows of 1 to 60 tokens, in windows as iter_batches(batch_format="numpy") gives them."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 61, n_rows)
    ids = np.empty(n_rows, dtype=object)
    ids[:] = [np.arange(1, n + 1) + 1000 * i for i, n in enumerate(lengths)]  # row i is recognisable by its ids
    labels = np.arange(n_rows) % 2
    return [{"input_ids": ids[i:i + window], "label": labels[i:i + window]} for i in range(0, n_rows, window)]


def rows_of(batch) -> list[int]:
    return [int(r[0]) // 1000 for r in batch["input_ids"]]


def padding(batches) -> float:
    mask = [b["attention_mask"] for b in batches]
    return 1 - sum(int(m.sum()) for m in mask) / sum(m.numel() for m in mask)


def test_grouped_batches_hold_every_row_once_and_pad_far_less_than_arrival_order():
    ws = windows(2000, 400)
    grouped = list(length_grouped(ws, 32, seed=(0, 1, 0)))
    plain = [collate({k: v[i:i + 32] for k, v in w.items()}) for w in ws for i in range(0, len(w["label"]), 32)]
    assert sorted(r for b in grouped for r in rows_of(b)) == list(range(2000))
    assert len(grouped) == len(plain)  # as many optimizer steps per epoch
    assert padding(grouped) < 0.1 < 0.4 < padding(plain)
    for b in grouped:  # labels travel with their rows
        assert b["labels"].tolist() == [r % 2 for r in rows_of(b)]


def test_grouping_is_the_same_for_a_seed_and_changes_with_it():
    ws = windows(1000, 320)
    first = [rows_of(b) for b in length_grouped(ws, 32, seed=(0, 1, 0))]
    again = [rows_of(b) for b in length_grouped(ws, 32, seed=(0, 1, 0))]
    other_epoch = [rows_of(b) for b in length_grouped(ws, 32, seed=(0, 2, 0))]
    assert first == again  # a restarted epoch sees the same batches in the same order
    assert first != other_epoch and sorted(map(sorted, first)) == sorted(map(sorted, other_epoch))


def test_batch_order_is_drawn_so_lengths_do_not_run_from_short_to_long():
    longest = [int(b["attention_mask"].sum(1).max()) for b in length_grouped(windows(3200, 3200), 32, seed=(0, 1, 0))]
    assert longest != sorted(longest) and longest != sorted(longest, reverse=True)


def test_group_by_length_is_refused_for_a_model_without_text():
    raw = {"data": {"train_path": "sklearn:digits", "group_by_length": True}, "model": {"type": "cnn"}}
    with pytest.raises(ConfigError, match="data.group_by_length groups text by token length; model.type cnn"):
        parse_job(raw, "job.yaml")


@pytest.mark.parametrize(("flags", "expected", "why"), [
    ({"fpu", "avx2", "avx512f", "amx_bf16", "avx512_bf16"}, "bf16", "the CPU has amx_bf16 and avx512_bf16"),
    ({"fpu", "avx512f", "avx512_bf16"}, "bf16", "the CPU has avx512_bf16"),
    ({"fpu", "avx2", "avx512f"}, "fp32", "has neither amx_bf16 nor avx512_bf16"),
])
def test_auto_precision_picks_bf16_only_on_a_cpu_with_bf16_matrix_instructions(flags, expected, why):
    precision, reason = resolve_precision("auto", torch.device("cpu"), frozenset(flags))
    assert precision == expected and why in reason and reason.startswith("auto: ")


def test_a_set_precision_is_kept_whatever_the_hardware():
    assert resolve_precision("fp32", torch.device("cpu"), frozenset({"amx_bf16"})) == ("fp32", "set in optim.precision")
    assert resolve_precision("bf16", torch.device("cpu"), frozenset()) == ("bf16", "set in optim.precision")


@pytest.mark.gpu
def test_auto_precision_picks_bf16_on_a_cuda_device_that_has_it():
    precision, reason = resolve_precision("auto", torch.device("cuda", 0))
    assert precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")
    assert torch.cuda.get_device_name(0) in reason


def scaling(**fields):
    from trainers.config import ScalingSection

    return ScalingSection(**{"num_workers": "auto", "threads_per_worker": "auto"} | fields)


@pytest.mark.parametrize(("nodes", "workers", "threads", "gpu", "spread", "why"), [
    ([(2, 0)], 1, 2, False, False, "one process using every core of the one CPU node"),
    ([(0, 0), (16, 0), (16, 0), (8, 0)], 3, 8, False, True, "one worker per node (3 CPU nodes)"),  # a 0-CPU head
    ([(8, 0), (32, 4), (32, 4)], 8, 8, True, False, "one worker per GPU (8 on 2 node(s))"),
])
def test_auto_scaling_follows_the_cluster(nodes, workers, threads, gpu, spread, why):
    from trainers.hardware import NodeShape, resolve_scaling

    choice = resolve_scaling(scaling(), [NodeShape(cpus=c, gpus=g) for c, g in nodes])
    assert (choice.num_workers, choice.threads_per_worker, choice.use_gpu, choice.spread) == (workers, threads, gpu, spread)
    assert why in choice.reason and choice.reason.startswith(f"{workers} worker(s) x {threads} thread(s)")


def test_set_scaling_is_kept_and_auto_threads_share_the_node():
    from trainers.hardware import NodeShape, resolve_scaling

    choice = resolve_scaling(scaling(num_workers=2, use_gpu=False), [NodeShape(cpus=8)])
    assert (choice.num_workers, choice.threads_per_worker, choice.spread) == (2, 4, False)
    assert "set in scaling.num_workers" in choice.reason


def test_a_batch_that_does_not_divide_over_the_chosen_workers_names_the_choice():
    from trainers.hardware import NodeShape, resolve_scaling

    job = parse_job({"data": {"train_path": "sklearn:digits"}, "model": {"type": "cnn"},
                     "optim": {"batch_size": 64}, "scaling": {"num_workers": "auto", "threads_per_worker": "auto"}},
                    "job.yaml")
    choice = resolve_scaling(job.scaling, [NodeShape(cpus=4)] * 3)
    with pytest.raises(ConfigError, match=r"scaling \(3 worker\(s\) x 4 thread\(s\): auto: one worker per node.*"
                                          r"optim.batch_size 64 must divide evenly"):
        job.scaled(choice)
    assert job.scaled(resolve_scaling(job.scaling, [NodeShape(cpus=4)])).micro_batch_size == 64


def test_a_sweep_refuses_auto_workers():
    from rayfoundry.errors import SweepError
    from tuning.sweep import concurrency

    with pytest.raises(SweepError, match="scaling.num_workers: auto gives one run a whole node"):
        concurrency(None, scaling(), [NodeShape(cpus=8)])
