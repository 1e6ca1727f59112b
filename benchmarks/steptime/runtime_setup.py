"""How this process computes: torch's thread count and maskkit's CPU tuning.

``maskkit train`` applies :func:`maskkit.runtime.tune_cpu_runtime` (glibc malloc thresholds,
subnormal floats flushed to zero) when it trains on the CPU; the benchmark does the same by
default, so that it times what users get. ``--no-cpu-tuning`` leaves glibc's and the CPU's
defaults, to show the tuning's effect.
"""

from __future__ import annotations

from typing import Any

import torch

from maskkit.runtime import tune_cpu_runtime


def set_threads(threads: int | None) -> None:
    """torch's intra-op threads (``None``: torch's default)."""
    if threads is not None:
        torch.set_num_threads(threads)


def apply_cpu_tuning(device: torch.device, enabled: bool) -> dict[str, Any]:
    """Apply ``tune_cpu_runtime`` to this process as ``maskkit train`` does (on the CPU only),
    unless disabled; returns whether it was asked for and what was applied."""
    applied = tune_cpu_runtime() if enabled and device.type == "cpu" else []
    return {"enabled": enabled, "applies_to_device": device.type == "cpu", "applied": applied}
