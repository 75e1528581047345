"""Loop functions: one training epoch and one evaluation pass over an iterable of batches.

They take a model (or an Engine from `strategy.py`) and batches from `data.collate`, so they run
without Ray in unit tests and in one process.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def _inputs(batch: dict[str, torch.Tensor], device: torch.device) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    return {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _with_last(items: Iterable) -> Iterator[tuple[bool, Any]]:
    it = iter(items)
    try:
        prev = next(it)
    except StopIteration:
        return
    for item in it:
        yield False, prev
        prev = item
    yield True, prev


def train_epoch(engine, batches: Iterable[dict], *, accum_steps: int, device: torch.device,
                precision: str = "fp32", max_steps: int | None = None,
                on_step: Callable[[dict[str, float]], None] | None = None,
                stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """One pass: forward, backward, and an optimizer step every `accum_steps` micro-batches.

    Gradients of the micro-batches between steps are not synchronized (DDP no_sync); the last
    micro-batch of the epoch always steps so no gradient is carried into the next epoch.
    `on_step`, when given, is called after every optimizer step with this worker's running totals;
    `stop`, after it, ends the epoch when it returns True (the run's plan of steps is done).
    Returns the loss sum, rows and text tokens (padding excluded) seen, optimizer steps, wall seconds
    and the seconds spent waiting for the next batch (input-pipeline stalls) on this worker.
    """
    engine.model.train()
    loss_sum, rows, tokens, steps, micro, data_wait = 0.0, 0, 0, 0, 0, 0.0
    start = waited_from = time.perf_counter()
    for last, batch in _with_last(batches):
        data_wait += time.perf_counter() - waited_from
        inputs, labels = _inputs(batch, device)
        micro += 1
        sync = last or micro % accum_steps == 0 or (max_steps is not None and steps + 1 >= max_steps)
        with engine.sync_gradients(sync), autocast(device, precision):
            loss = F.cross_entropy(logits_of(engine.model(**inputs)).float(), labels)
            engine.backward(loss / accum_steps)
        loss_sum += loss.item() * len(labels)
        rows += len(labels)
        tokens += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else 0
        if sync:
            engine.step()
            steps += 1
            micro = 0
            if on_step is not None:
                on_step({"steps": steps, "rows": rows, "loss": loss_sum / rows, "seconds": time.perf_counter() - start})
            if (max_steps is not None and steps >= max_steps) or (stop is not None and stop()):
                break
        waited_from = time.perf_counter()
    return {"train_loss_sum": loss_sum, "train_rows": rows, "train_tokens": tokens, "steps": steps,
            "seconds": time.perf_counter() - start, "data_wait_seconds": data_wait}


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[dict], num_labels: int, device: torch.device,
             precision: str = "fp32") -> dict[str, torch.Tensor]:
    """Sums over this worker's batches: loss and a confusion matrix [true, predicted]; add them across
    workers before `classification_metrics`."""
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64)
    confusion = torch.zeros(num_labels, num_labels, dtype=torch.int64)
    for batch in batches:
        inputs, labels = _inputs(batch, device)
        with autocast(device, precision):
            logits = logits_of(model(**inputs)).float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").double().cpu()
        index = labels.cpu() * num_labels + logits.argmax(-1).cpu()
        confusion += torch.bincount(index, minlength=num_labels * num_labels).view(num_labels, num_labels)
    return {"loss_sum": loss_sum, "confusion": confusion}


def classification_metrics(sums: dict[str, torch.Tensor]) -> dict[str, float]:
    """val_loss, val_accuracy and val_macro_f1 (mean F1 over classes present in labels or predictions)."""
    cm = sums["confusion"].double()
    total = cm.sum().clamp(min=1)
    tp = cm.diag()
    fp, fn = cm.sum(0) - tp, cm.sum(1) - tp
    present = (tp + fp + fn) > 0
    f1 = (2 * tp / (2 * tp + fp + fn).clamp(min=1))[present]
    return {
        "val_loss": float(sums["loss_sum"] / total),
        "val_accuracy": float(tp.sum() / total),
        "val_macro_f1": float(f1.mean()) if len(f1) else 0.0,
        "val_rows": int(cm.sum()),
    }
