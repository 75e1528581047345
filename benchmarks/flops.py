"""Shared yardsticks for the benchmarks: the machine they ran on, a large-matmul FLOP/s peak measured
in the same run, and the MiniLM classifier's parameter count for FLOP estimates."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

import torch


def machine() -> str:
    """CPU model, cores and memory, as every benchmark prints and records them: machines differ."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem = float("nan")
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB"


def matmul_peak_flops(threads: int = 2, n: int = 2048, reps: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of an n x n matmul on `threads` threads: the ceiling achieved FLOP/s is compared to."""
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start)


def non_embedding_params(model: torch.nn.Module | None = None) -> int:
    """Parameters outside the embedding tables (these do the per-token matmul work)."""
    if model is None:
        from trainers.config import TextModel
        from trainers.models import build_model

        model = build_model(TextModel(type="text"), ["0", "1"])
    embedding = sum(p.numel() for n, p in model.named_parameters() if "embeddings" in n)
    return sum(p.numel() for p in model.parameters()) - embedding
