"""The one place that wraps a model for distributed training and owns optimizer stepping.

`Engine` is the interface: `model` (what forward runs on), `sync_gradients(sync)`, `backward(loss)`,
`step()`, `unwrapped()` and `eval_model()` for the loop, and `full_state_dict()`,
`save_training_state()` and `load_training_state()` for checkpoints. The loop uses nothing else, so
DDP and DeepSpeed ZeRO are two Engines here, both built by `build_engine` from the same config
sections (optim, strategy), not branches in the loop.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch import nn

from trainers.checkpoint import CheckpointError, load_optimizer, load_weights, save_optimizer


@runtime_checkable
class Engine(Protocol):
    """What the loop and the checkpoints use of a distributed-training engine."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    global_step: int

    def unwrapped(self) -> nn.Module: ...

    def eval_model(self) -> nn.Module: ...

    def sync_gradients(self, sync: bool) -> contextlib.AbstractContextManager: ...

    def backward(self, loss: torch.Tensor) -> None: ...

    def step(self) -> None: ...

    def full_state_dict(self) -> dict[str, torch.Tensor] | None: ...

    def save_training_state(self, directory: Path, rank: int) -> None: ...

    def load_training_state(self, directory: Path, trainer_state: dict) -> None: ...


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


def relayout_schedule(engine: Any, optim_cfg: Any, total_steps: int) -> None:
    """Lay the learning-rate schedule out again over `total_steps`, continuing from the engine's current
    step (a time budget's plan, or the plan a resumed run stored): warm-up and decay as the job says,
    ending at the plan's last step. Peak learning rates stay those of the optimizer's groups."""
    import warnings

    with warnings.catch_warnings():  # stepping a fresh scheduler to the current step: not an optimizer misuse
        warnings.simplefilter("ignore", UserWarning)
        # the torch optimizer the current schedule drives (DeepSpeed's engine.optimizer wraps it)
        scheduler = build_scheduler(engine.scheduler.optimizer, optim_cfg, total_steps)
        scheduler.last_epoch = engine.global_step - 1
        scheduler.step()
    engine.scheduler = scheduler
    if hasattr(engine.model, "lr_scheduler"):  # DeepSpeed steps the scheduler it holds
        engine.model.lr_scheduler = scheduler


def apply_hyperparameters(engine: Any, optim_cfg: Any) -> None:
    """Make a restored engine follow this job's lr and weight decay (a PBT clone continues another
    trial's optimizer state with mutated values). The schedule keeps its position; its peak becomes
    optim.lr. Group 0 decays, group 1 (biases, norms) never does: see build_optimizer."""
    scheduler, groups = engine.scheduler, engine.optimizer.param_groups
    scheduler.base_lrs = [optim_cfg.lr] * len(groups)
    for i, (group, factor) in enumerate(zip(groups, (f(scheduler.last_epoch) for f in scheduler.lr_lambdas))):
        group["initial_lr"], group["lr"] = optim_cfg.lr, optim_cfg.lr * factor
        group["weight_decay"] = optim_cfg.weight_decay if i == 0 else 0.0
    scheduler._last_lr = [group["lr"] for group in groups]


class DDPEngine:
    """DDP through ray.train.torch.prepare_model; a single process (local mode) runs unwrapped."""

    def __init__(self, model: nn.Module, optim_cfg: Any, strategy_cfg: Any, total_steps: int, *, distributed: bool,
                 device: torch.device, fresh_model: Callable[[], nn.Module] | None = None):
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

    def eval_model(self) -> nn.Module:
        """The module every rank scores validation with; its forward needs no collectives (ranks score
        different numbers of batches). Buffers come from rank 0 first: DDP broadcasts them only at the
        next training forward, so BatchNorm running statistics drift per rank, and without this the
        reported metrics would not be exactly those of the checkpoint rank 0 saves."""
        module = self.unwrapped()
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            for buffer in module.buffers():
                dist.broadcast(buffer.data, src=0)
        return module

    def full_state_dict(self) -> None:
        return None  # every rank holds the whole model

    def save_training_state(self, directory: Path, rank: int) -> None:
        if rank == 0:
            save_optimizer(self.optimizer, directory / "optimizer.safetensors")

    def load_training_state(self, directory: Path, trainer_state: dict) -> None:
        load_weights(self.unwrapped(), directory / "model.safetensors")
        load_optimizer(self.optimizer, directory / "optimizer.safetensors")
        self.scheduler.load_state_dict(trainer_state["scheduler"])

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


def deepspeed_config(optim_cfg: Any, strategy_cfg: Any, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config, derived from the job's optim and strategy sections so no number is written
    twice; `strategy.deepspeed_config` is merged on top (its keys were checked not to clash)."""
    s = strategy_cfg
    micro_batch = optim_cfg.batch_size // (world_size * optim_cfg.grad_accum_steps)
    zero: dict[str, Any] = {"stage": s.zero_stage, "contiguous_gradients": True, "overlap_comm": False}
    if s.offload_optimizer == "cpu":
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if s.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": optim_cfg.grad_accum_steps,
        "train_batch_size": micro_batch * optim_cfg.grad_accum_steps * world_size,
        "gradient_clipping": optim_cfg.max_grad_norm or 0.0,
        "bf16": {"enabled": optim_cfg.precision == "bf16"},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,   # the client optimizer is torch's (fused) AdamW
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    for key, value in (s.deepspeed_config or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = config[key] | value
        else:
            config[key] = value
    return config


class DeepSpeedEngine:
    """DeepSpeed ZeRO 1/2/3. On GPUs DeepSpeed picks CUDA and NCCL; without, its CPU accelerator and
    gloo, reusing the process group Ray Train created. The optimizer is torch AdamW and the
    scheduler transformers', handed to deepspeed.initialize as client objects."""

    def __init__(self, model: nn.Module, optim_cfg: Any, strategy_cfg: Any, total_steps: int, *, distributed: bool,
                 device: torch.device, fresh_model: Callable[[], nn.Module] | None = None):
        # DeepSpeed JIT-builds its ops against this interpreter's torch; a per-environment build directory
        # keeps two environments (another checkout, another torch) from rebuilding them in turn.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
        import importlib

        import deepspeed

        ds_comm = importlib.import_module("deepspeed.comm.torch")  # `import ... as` would bind the torch it imports
        # Its shared-memory comm op serves only DeepSpeed's inference all-reduce; ZeRO training's
        # collectives go through torch.distributed (gloo here, NCCL on GPUs). Not building it saves a
        # ~2-minute compile on the first CPU run in every new environment.
        ds_comm.build_shm_op = lambda: None

        if not dist.is_initialized():  # Train's local mode (dry run): a one-process group
            import socket

            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        self.stage = strategy_cfg.zero_stage
        self.fresh_model = fresh_model
        model = model.to(device)
        optimizer = build_optimizer(model, optim_cfg)
        self.model, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(optim_cfg, strategy_cfg, dist.get_world_size()),
            lr_scheduler=lambda opt: build_scheduler(opt, optim_cfg, total_steps), dist_init_required=False,
        )
        self.global_step = 0

    def unwrapped(self) -> nn.Module:
        return self.model.module

    def sync_gradients(self, sync: bool):
        self.model.set_gradient_accumulation_boundary(sync)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.model.backward(loss, scale_wrt_gas=False)  # the loop already divided by the accumulation steps

    def step(self) -> None:
        self.model.step()  # clips (gradient_clipping), steps optimizer and scheduler, zeroes grads
        self.global_step += 1

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full weights on every rank; with ZeRO-3 a collective gather that every rank must join."""
        if self.stage < 3:
            return None
        import deepspeed

        module = self.unwrapped()
        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            return {k: v.detach().clone().cpu() for k, v in module.state_dict().items()}

    def eval_model(self) -> nn.Module:
        """ZeRO-3 shards parameters, so forward would need every rank; evaluate a gathered plain copy."""
        if self.stage < 3:
            return self.unwrapped()
        copy = self.fresh_model()
        copy.load_state_dict(self.full_state_dict(), strict=False)
        return copy.to(next(self.unwrapped().parameters()).device)

    def save_training_state(self, directory: Path, rank: int) -> None:
        self.model.save_checkpoint(str(directory / "deepspeed"), tag="state", save_latest=False)

    def load_training_state(self, directory: Path, trainer_state: dict) -> None:
        path, _ = self.model.load_checkpoint(str(directory / "deepspeed"), tag="state", load_optimizer_states=True,
                                             load_lr_scheduler_states=True)
        if path is None:
            raise CheckpointError(f"{directory / 'deepspeed'}: DeepSpeed found no engine state to resume from")


ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine, "deepspeed": DeepSpeedEngine}


def build_engine(model: nn.Module, job: Any, total_steps: int, distributed: bool, device: torch.device,
                 fresh_model: Callable[[], nn.Module] | None = None) -> Engine:
    """The job's strategy as an Engine, from its optim and strategy sections."""
    return ENGINES[job.strategy.name](model, job.optim, job.strategy, total_steps, distributed=distributed,
                                      device=device, fresh_model=fresh_model)


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def agree_min(values: list[float]) -> list[float]:
    """Each value's minimum over the workers (itself in a single process): one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return t.cpu().tolist()


def gather_strings(value: str) -> list[str]:
    """Every worker's `value`, in rank order ([value] in a single process): one collective."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [value]
    out: list[str | None] = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return [str(v) for v in out]


def all_reduce_sum(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum each tensor over the workers (a no-op in a single process)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensors
    device = _collective_device()
    out = {}
    for k, v in tensors.items():
        t = v.to(device)
        dist.all_reduce(t)
        out[k] = t.cpu()
    return out
