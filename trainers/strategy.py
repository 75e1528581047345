"""The one place that wraps a model for distributed training and owns optimizer stepping.

An Engine exposes `model` (what forward runs on), `sync_gradients(sync)`, `backward(loss)`,
`step()` and `unwrapped()`; the loop in `loop.py` uses nothing else, so a new strategy (DeepSpeed)
is a new Engine here, not a branch in the loop.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.distributed as dist
from torch import nn


def build_optimizer(model: nn.Module, optim_cfg: Any) -> torch.optim.Optimizer:
    """AdamW without weight decay on biases and norm weights (the usual transformer recipe).

    The fused kernel (CPU and CUDA) steps MiniLM's 22.7M parameters ~6x faster than the default
    foreach one on CPU, where the optimizer step otherwise costs as much as forward+backward."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    groups = [{"params": decay, "weight_decay": optim_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=optim_cfg.lr, fused=fused)


def build_scheduler(optimizer: torch.optim.Optimizer, optim_cfg: Any, total_steps: int):
    from transformers import get_scheduler

    warmup = int(round(optim_cfg.warmup_fraction * total_steps))
    return get_scheduler(optim_cfg.scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max(total_steps, 1))


class DDPEngine:
    """DDP through ray.train.torch.prepare_model; a single process (local mode) runs unwrapped."""

    def __init__(self, model: nn.Module, optim_cfg: Any, strategy_cfg: Any, total_steps: int, distributed: bool,
                 device: torch.device):
        if distributed:  # prepare_model moves to the worker's device and wraps (gloo on CPU, NCCL on GPU)
            import ray.train.torch

            model = ray.train.torch.prepare_model(
                model, parallel_strategy_kwargs={"find_unused_parameters": strategy_cfg.find_unused_parameters}
            )
        else:
            model = model.to(device)
        self.model = model
        self.optimizer = build_optimizer(self.unwrapped(), optim_cfg)
        self.scheduler = build_scheduler(self.optimizer, optim_cfg, total_steps)
        self.max_grad_norm = optim_cfg.max_grad_norm
        self.global_step = 0

    def unwrapped(self) -> nn.Module:
        return self.model.module if isinstance(self.model, nn.parallel.DistributedDataParallel) else self.model

    def sync_gradients(self, sync: bool):
        if not sync and isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> None:
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.global_step += 1


def build_engine(model: nn.Module, job: Any, total_steps: int, distributed: bool, device: torch.device):
    if job.strategy.name == "ddp":
        return DDPEngine(model, job.optim, job.strategy, total_steps, distributed, device)
    raise ValueError(f"strategy.name: unknown strategy {job.strategy.name!r}")


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over the workers (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    out = {}
    for k, v in tensors.items():
        t = v.to(device)
        dist.all_reduce(t)
        out[k] = t.cpu()
    return out
