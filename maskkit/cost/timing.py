"""Timing one MLO iteration: wall time with CUDA synchronised around each step, process CPU time,
and the loss evaluations and level steps it took."""

from __future__ import annotations

import contextlib
import resource
import time
from collections import Counter
from dataclasses import dataclass

import torch

from maskkit.engine.pretrain import Pretrainer


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """User + system CPU time of this process so far, all threads together."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


@dataclass
class IterationRecord:
    """One MLO iteration.

    Attributes:
        seconds: wall time of its steps.
        cpu_seconds: process CPU time over them (all threads).
        step_seconds: wall time of each pretrain step (the last one of an iteration also runs the
            finetune and mask steps and the hypergradient).
        evaluations: loss evaluations by ``"<level>/<purpose>"`` (``Pretrainer.objectives.counts``).
        level_steps: steps each level took.
    """

    seconds: float
    cpu_seconds: float
    step_seconds: list[float]
    evaluations: dict[str, int]
    level_steps: dict[str, int]


def run_iteration(
    pretrainer: Pretrainer,
    device: torch.device,
    last_step: int,
    steps: int,
    around: contextlib.AbstractContextManager | None = None,
) -> IterationRecord:
    """``steps`` calls of ``pretrainer.step`` after global step ``last_step``, each timed with
    CUDA synchronised around it, inside ``around`` (a FLOP counter or a profiler) if given."""
    counts_before = Counter(pretrainer.objectives.counts)
    levels_before = pretrainer.mlo.step_counts()
    times = []
    cpu_before = cpu_seconds()
    with around if around is not None else contextlib.nullcontext():
        for step in range(last_step + 1, last_step + steps + 1):
            synchronize(device)
            started = time.perf_counter()
            pretrainer.step(step)
            synchronize(device)
            times.append(time.perf_counter() - started)
    cpu = cpu_seconds() - cpu_before
    counts = Counter(pretrainer.objectives.counts)
    counts.subtract(counts_before)
    levels_after = pretrainer.mlo.step_counts()
    return IterationRecord(
        seconds=sum(times),
        cpu_seconds=cpu,
        step_seconds=times,
        evaluations={key: value for key, value in sorted(counts.items()) if value},
        level_steps={name: levels_after[name] - levels_before.get(name, 0) for name in levels_after},
    )
