"""Device choice, seeding and mixed precision."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
import random
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from maskkit.errors import ConfigError

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# The largest mmap threshold glibc accepts on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX).
_MMAP_THRESHOLD_MAX = 32 * 1024 * 1024


def tune_cpu_runtime() -> list[str]:
    """Settings that make training on the CPU faster, applied once per process.

    - glibc's allocator hands large freed buffers back to the kernel and faults them in again at
      every step; raising the trim and mmap thresholds keeps them in the heap (``mallopt``).
    - Subnormal floats (e.g. a sigmoid far in its tail) are flushed to zero; CPUs process them
      orders of magnitude slower than normal floats.

    Returns what was applied, in words (nothing on platforms without glibc).
    """
    applied = []
    if torch.set_flush_denormal(True):
        applied.append("subnormal floats flushed to zero")
    try:
        libc = ctypes.CDLL("libc.so.6")
        trimmed = libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30)
        mapped = libc.mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)
    except (OSError, AttributeError):
        return applied
    if trimmed and mapped:
        applied.append("glibc malloc trim threshold 1 GiB, mmap threshold 32 MiB")
    return applied


def select_device(spec: str = "auto") -> torch.device:
    """``auto`` → CUDA when present, else CPU. An explicit CUDA device must exist."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device '{spec}' was asked for, but CUDA is not available; use --device cpu")
    return torch.device(spec)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    os.environ.setdefault("PYTHONHASHSEED", str(seed))
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """The global random state of the CPU and of every CUDA device, for a checkpoint."""
    return {
        "cpu": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore :func:`rng_state` (the CUDA part only where CUDA is present)."""
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def use_bf16(device: torch.device, precision: str) -> bool:
    """bf16 autocast on CUDA unless fp32 is asked for; CPU runs in fp32 unless bf16 is asked for."""
    if precision == "auto":
        return device.type == "cuda"
    return precision == "bf16"


def use_fused_adamw(device: torch.device, setting: bool | str) -> bool:
    """The config's ``fused_adamw``: ``auto`` is on for the CPU (measured faster there, the same
    update to float rounding: docs/benchmarks.md) and off elsewhere (torch's default kernel)."""
    if setting == "auto":
        return device.type == "cpu"
    return bool(setting)


@contextlib.contextmanager
def autocast(device: torch.device, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    with torch.autocast(device_type=device.type, dtype=torch.bfloat16):
        yield


def full_precision(tensor: torch.Tensor) -> torch.Tensor:
    """Lift bf16/fp16 results to fp32 for losses; leave fp32 and fp64 as they are."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name from /proc/cpuinfo (``platform.processor()`` is
    empty on Linux)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.machine()
    names = [line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name")]
    return names[0] if names else platform.machine()
