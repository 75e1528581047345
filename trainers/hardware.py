"""What the hardware runs fast, for the `auto` choices of a job. Each choice comes with its reason,
which the run prints. No Ray here: the driver describes the cluster's nodes (`NodeShape`).

- `optim.precision: auto` picks bf16 on a CUDA device that supports it and on a CPU with AMX or
  AVX-512 BF16 instructions, else fp32.
- `scaling.num_workers: auto` runs one worker per GPU when the run uses GPUs (DDP over NCCL), one
  per node on a cluster of CPU nodes, and one process using every core on a single CPU node, where
  data parallelism adds an all-reduce per step and no compute. `scaling.threads_per_worker: auto`
  gives each worker its node's CPUs (a GPU worker, its share of them).
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch
from pydantic import BaseModel, Field

FAST_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of bf16 matrix instructions


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux lists them; empty elsewhere (no auto bf16 there)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith(("flags", "Features"))), "")
    return frozenset(line.partition(":")[2].split())


def resolve_precision(choice: str, device: torch.device, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """(fp32 or bf16, why) for optim.precision `choice` on `device`."""
    if choice != "auto":
        return choice, "set in optim.precision"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16"
        return "fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16"
    if device.type == "cpu":
        found = [f for f in FAST_BF16_CPU_FLAGS if f in (cpu_flags() if flags is None else flags)]
        if found:
            return "bf16", f"auto: the CPU has {' and '.join(found)}"
        return "fp32", f"auto: the CPU ({platform.machine()}) has neither {' nor '.join(FAST_BF16_CPU_FLAGS)}"
    return "fp32", f"auto: fp32 on {device.type}"


class NodeShape(BaseModel):
    """One alive Ray node's resources."""

    cpus: float = Field(ge=0)
    gpus: float = Field(0, ge=0)


class ScalingChoice(BaseModel):
    """The scaling a run uses, with `auto` resolved."""

    num_workers: int = Field(ge=1)
    threads_per_worker: int = Field(ge=1)
    use_gpu: bool
    spread: bool = Field(description="One worker per node (placement STRICT_SPREAD).")
    reason: str


def resolve_scaling(scaling, nodes: list[NodeShape]) -> ScalingChoice:
    """`scaling` (a ScalingSection) on a cluster of `nodes`."""
    gpus = sum(int(n.gpus) for n in nodes)
    use_gpu = gpus >= 1 if scaling.use_gpu == "auto" else bool(scaling.use_gpu)
    cpu_nodes = [n for n in nodes if n.cpus >= 1]
    workers, spread, why = scaling.num_workers, False, "set in scaling.num_workers"
    if workers == "auto":
        if use_gpu:
            workers, why = max(gpus, 1), f"auto: one worker per GPU ({gpus} on {sum(n.gpus >= 1 for n in nodes)} node(s))"
        elif len(cpu_nodes) > 1:
            workers, spread = len(cpu_nodes), True
            why = f"auto: one worker per node ({len(cpu_nodes)} CPU nodes)"
        else:
            workers = 1
            why = ("auto: one process using every core of the one CPU node (data parallelism on one machine adds an "
                   "all-reduce per step and no compute)")
    threads = scaling.threads_per_worker
    if threads == "auto":
        gpu_nodes = [n for n in nodes if n.gpus >= 1]
        if use_gpu and gpu_nodes:  # a GPU worker gets its share of its node's CPUs
            per_worker = min(n.cpus / int(n.gpus) for n in gpu_nodes)
        else:  # one worker per node when spread; else the node's CPUs over its workers
            cpus = min((n.cpus for n in cpu_nodes or nodes), default=1)
            per_worker = cpus if spread else cpus / workers
        threads = max(1, int(per_worker))
    return ScalingChoice(num_workers=workers, threads_per_worker=threads, use_gpu=use_gpu, spread=spread,
                         reason=f"{workers} worker(s) x {threads} thread(s){' on GPUs' if use_gpu else ''}: {why}")
