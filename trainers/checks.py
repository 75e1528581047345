"""In-epoch validation on a fixed sample (run.check_every_steps, run.check_rows) and the target that
ends a run once it is reached (run.stop_at).

Every `every` optimizer steps each worker scores its share of a fixed, seeded sample of the
validation rows; the sums are added across workers, so every rank sees the same metrics and stops
at the same step. Each check is a `CheckRecord` whose `train_seconds` count training time only
(validation excluded) from the run's first step, across resumes: the time-to-accuracy figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch

from trainers.data import collate, length_grouped
from trainers.loop import classification_metrics, evaluate
from trainers.summary import CheckRecord


def reached(value: float, target: float | None, mode: str) -> bool:
    return target is not None and (value >= target if mode == "max" else value <= target)


def fixed_sample(batches: Iterable[dict[str, np.ndarray]], total_rows: int, rows: int | None, seed: int,
                 eval_batch: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """A seeded sample of `rows` of the validation rows (all of them when rows is None or at least
    `total_rows`), read in one pass and held as collated batches sorted by length."""
    keep = None if rows is None or rows >= total_rows else \
        np.sort(np.random.default_rng([seed, 7919]).choice(total_rows, size=rows, replace=False))
    parts, offset = [], 0
    for batch in batches:
        n = len(batch["label"])
        picked = np.arange(n) if keep is None else keep[(keep >= offset) & (keep < offset + n)] - offset
        offset += n
        if len(picked):
            parts.append({k: np.asarray(v)[picked] for k, v in batch.items()})
    if not parts:
        return []
    merged = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    if "input_ids" in merged:
        return list(length_grouped([merged], eval_batch, pad_id))
    n = len(merged["label"])
    return [collate({k: v[i:i + eval_batch] for k, v in merged.items()}) for i in range(0, n, eval_batch)]


class SampleCheck:
    """The step hook for in-epoch checks. `epoch_started` resumes its training clock; a check pauses it
    while it scores. `done` says whether a check reached run.stop_at."""

    def __init__(self, batches: list[dict[str, torch.Tensor]], *, every: int, engine, num_labels: int,
                 device: torch.device, precision: str, rank: int, world: int, target: float | None, metric: str,
                 mode: str, all_reduce: Callable[[dict], dict], history: list[dict[str, Any]],
                 log: Callable[[str], None], after: Callable[[float], None] | None = None):
        self.mine = batches[rank::world]
        self.every, self.engine, self.num_labels, self.device, self.precision = every, engine, num_labels, device, precision
        self.target, self.metric, self.mode, self.all_reduce, self.log = target, metric, mode, all_reduce, log
        self.records = [CheckRecord.model_validate(r) for m in history[-1:] for r in m.get("checks", [])]
        self.trained = history[-1].get("train_seconds_total", 0.0) if history else 0.0
        self.after = after  # told each check's seconds (the time budget's clock)
        self.done, self.epoch, self.since, self.spent = False, 0, time.perf_counter(), 0.0

    def epoch_started(self, epoch: int) -> None:
        self.epoch, self.since, self.spent = epoch, time.perf_counter(), 0.0

    def epoch_ended(self) -> float:
        """Training seconds of the run so far (the epoch's validation is not counted). `spent` holds the
        seconds this epoch's checks took."""
        self.trained += time.perf_counter() - self.since
        self.since = time.perf_counter()
        return self.trained

    def __call__(self, _stats: dict[str, float]) -> None:
        step = self.engine.global_step
        if self.done or step % self.every:
            return
        now = time.perf_counter()
        self.trained += now - self.since
        sums = self.all_reduce(evaluate(self.engine.eval_model(), self.mine, self.num_labels, self.device,
                                        self.precision))
        self.engine.model.train()
        m = classification_metrics(sums)
        record = CheckRecord(epoch=self.epoch, global_step=step, train_seconds=self.trained,
                             rows=m["val_rows"], val_loss=m["val_loss"], val_accuracy=m["val_accuracy"],
                             val_macro_f1=m["val_macro_f1"])
        self.records.append(record)
        self.done = reached(m[self.metric], self.target, self.mode)
        took = time.perf_counter() - now
        self.log(f"check  step {step}  {self.metric} {m[self.metric]:.4f} on {record.rows} rows  ({took:.1f}s)"
                 + ("  target reached" if self.done else ""))
        self.spent += took
        if self.after is not None:
            self.after(took)
        self.since = time.perf_counter()
