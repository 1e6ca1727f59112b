"""The device's dense matmul rate: the reference for the "% of matmul rate" column."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from maskkit.cost.timing import synchronize


def matmul_rate(device: torch.device, dtype: torch.dtype, seconds: float) -> dict[str, Any] | None:
    """The dense matmul rate of ``device`` in ``dtype``, as FLOP/s: a square matmul (8192 on
    CUDA, 2048 on CPU) timed in chunks (10 matmuls on CUDA, 1 on CPU) for about ``seconds``; the
    best chunk counts, so that a moment of contention does not lower the reference. ``None``
    when ``seconds`` is 0."""
    if seconds <= 0:
        return None
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    chunk = 10 if device.type == "cuda" else 1
    for _ in range(3 * chunk):
        torch.mm(a, b)
    synchronize(device)
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(rates) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        for _ in range(chunk):
            torch.mm(a, b)
        synchronize(device)
        rates.append(2 * size**3 * chunk / (time.perf_counter() - started))
    del a, b
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "flops_per_s": max(rates),
        "median_flops_per_s": statistics.median(rates),
        "chunks": len(rates),
        "size": size,
        "dtype": str(dtype).removeprefix("torch."),
    }
