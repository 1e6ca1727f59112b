"""Peak memory of one policy's run, the memory it needs at least, and the memory available.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the *process* peak RSS
(``VmHWM`` of ``/proc/self/status``, reset through ``/proc/self/clear_refs``; ``ru_maxrss``
where Linux's files are missing).
"""

from __future__ import annotations

import contextlib
import resource
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

#: Bytes per parameter that any training step keeps: fp32 weight, gradient, AdamW's two moments.
STATE_BYTES_PER_PARAMETER = 16
#: Extra fp32 copies of the pretrain level's weights during the hypergradient (the saved weights
#: of the finite difference, the gradients at ±ε, the vector pushed through the level, ...).
HYPERGRADIENT_COPIES = 5


def state_memory_lower_bound(parameters: dict[str, int], learnable: bool) -> int:
    """Bytes that the weights, gradients, AdamW moments and hypergradient copies need at least
    (activations not included)."""
    total = STATE_BYTES_PER_PARAMETER * parameters["trained"]
    if learnable:
        total += 4 * HYPERGRADIENT_COPIES * parameters["mae"] + 4 * 2 * parameters["policy"]
    return total


def available_memory(device: torch.device) -> int | None:
    """Free device memory on CUDA, ``MemAvailable`` on Linux; ``None`` when unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS, where Linux allows it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _proc_status_bytes("VmHWM") is not None


def peak_rss_bytes() -> tuple[int, str]:
    """This process's peak resident set size and where it was read: ``VmHWM`` of
    ``/proc/self/status`` (Linux), else ``ru_maxrss``.

    ``VmHWM`` is preferred: after ``fork`` + ``exec``, ``ru_maxrss`` starts at the parent's RSS,
    so a small worker started by a large parent reports the parent's peak.
    """
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak, "VmHWM"
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024), "ru_maxrss"


def current_rss_bytes() -> int:
    """This process's resident set size now (its peak where ``VmRSS`` is unavailable)."""
    current = _proc_status_bytes("VmRSS")
    return current if current is not None else peak_rss_bytes()[0]


@dataclass
class PeakMemoryProbe:
    """Resets the peak before a policy's models are built (:meth:`start`) and reads it after its
    iterations (:meth:`read`).

    Attributes:
        device: where the policy runs.
        fresh_process: whether the policy runs in its own worker process (CPU peaks then
            exclude earlier policies).
    """

    device: torch.device
    fresh_process: bool = False
    before_bytes: int = 0
    peak_was_reset: bool = False

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.peak_was_reset = reset_peak_rss()
            self.before_bytes = current_rss_bytes()

    def read(self) -> dict[str, Any]:
        """The peak, what was in use at :meth:`start`, and the increase, in bytes."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            memory: dict[str, Any] = {
                "kind": "cuda_max_memory_allocated",
                "peak_bytes": torch.cuda.max_memory_allocated(self.device),
                "before_bytes": self.before_bytes,
            }
        else:
            peak, source = peak_rss_bytes()
            memory = {
                "kind": "process_peak_rss",
                "source": source,
                "peak_reset_before_policy": self.peak_was_reset,
                "peak_bytes": peak,
                "before_bytes": self.before_bytes,
                "fresh_process": self.fresh_process,
            }
        memory["increase_bytes"] = max(0, memory["peak_bytes"] - self.before_bytes)
        return memory
