"""What a measurement ran on, and how busy the machine was: hardware, versions, environment,
load."""

from __future__ import annotations

import contextlib
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from maskkit.runtime import use_bf16

#: Environment variables that change CPU speed a lot (glibc's malloc thresholds, thread counts, a
#: preloaded allocator); shown in the header when set.
ENVIRONMENT_PREFIXES = ("MALLOC_", "OMP_", "MKL_", "LD_PRELOAD", "PYTORCH_", "CUDA_VISIBLE")
#: Share of the CPU busy before a measurement above which it warns (the times would be inflated).
BUSY_WARNING = 0.2


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` is empty on Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def hardware(device: torch.device, precision: str) -> dict[str, Any]:
    """Device, CPU, core and thread counts, versions, compute precision and the speed-relevant
    environment variables."""
    info: dict[str, Any] = {
        "device": str(device),
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compute": "bf16 autocast" if use_bf16(device, precision) else "fp32",
        "environment": {
            key: value for key, value in sorted(os.environ.items()) if key.startswith(ENVIRONMENT_PREFIXES)
        },
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def load_average() -> float | None:
    """The 1-minute load average, where the OS reports it."""
    with contextlib.suppress(OSError):
        return os.getloadavg()[0]
    return None


def _cpu_times() -> tuple[int, int] | None:
    """(idle, total) jiffies of all CPUs from ``/proc/stat`` (Linux)."""
    with contextlib.suppress(OSError, ValueError):
        fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        return fields[3] + fields[4], sum(fields)
    return None


def busy_fraction(seconds: float = 0.5) -> float | None:
    """The share of the machine's CPU time that was not idle over the next ``seconds``."""
    before = _cpu_times()
    time.sleep(seconds)
    after = _cpu_times()
    if before is None or after is None or after[1] == before[1]:
        return None
    return 1.0 - (after[0] - before[0]) / (after[1] - before[1])
