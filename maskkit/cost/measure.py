"""Measure one policy: build its levels, warm up, time MLO iterations, count the FLOPs of one and
profile one more for the breakdown; the result is one row of the report (a dict, as the JSON
holds it)."""

from __future__ import annotations

import contextlib
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from maskkit.config import RunConfig
from maskkit.data import LabelledDataset, MLOSplits
from maskkit.engine.pretrain import Pretrainer

from .breakdown import ScopeFlopCounter, profiled_breakdown
from .formatting import format_bytes
from .machine import load_average
from .memory import PeakMemoryProbe, available_memory, state_memory_lower_bound
from .timing import IterationRecord, run_iteration, synchronize
from .workload import (
    LEVELS,
    built_pretrainer,
    count_parameters,
    is_multilevel,
    steps_per_iteration,
    with_iterations,
)

#: The phases of a measurement, as :class:`IterationDone` names them.
WARMUP, TIMED, FLOP_COUNT, PROFILED = "warm-up", "timed", "FLOP count", "profiled"


@dataclass(frozen=True)
class MeasurePlan:
    """What to measure of each policy.

    Attributes:
        iterations: timed MLO iterations (their median is the figure).
        warmup: untimed MLO iterations before them (the first also counts the FLOPs).
        flops: count the FLOPs of one iteration (``FlopCounterMode``).
        breakdown: profile one more iteration and break its time and FLOPs down by part.
    """

    iterations: int
    warmup: int = 1
    flops: bool = True
    breakdown: bool = True

    @property
    def extra_iterations(self) -> int:
        """Iterations after the timed ones: the FLOP count without a warm-up, the profiled one."""
        return int(self.flops and self.warmup == 0) + int(self.breakdown)

    @property
    def total_iterations(self) -> int:
        """Every MLO iteration a policy runs."""
        return self.warmup + self.iterations + self.extra_iterations


@dataclass(frozen=True)
class IterationDone:
    """One MLO iteration of a measurement has ended (for a progress display).

    Attributes:
        policy: the policy measured.
        phase: :data:`WARMUP`, :data:`TIMED`, :data:`FLOP_COUNT` or :data:`PROFILED`.
        index: its number within the phase, from 1.
        count: iterations in the phase.
        seconds: its wall time.
    """

    policy: str
    phase: str
    index: int
    count: int
    seconds: float


class MeasureHooks:
    """Work a caller adds around a measurement (``benchmarks/step_time.py`` times the learned-mask
    work here); every method does nothing unless overridden."""

    def timed_started(self, pretrainer: Pretrainer) -> None:
        """Before the first timed iteration."""

    def timed_ended(self, pretrainer: Pretrainer) -> None:
        """After the last timed iteration."""

    def finished(self, pretrainer: Pretrainer, result: dict[str, Any]) -> None:
        """After the FLOP count and the breakdown, before peak memory is read; may add to
        ``result``."""


def evaluation_text(counts: dict[str, int]) -> str:
    """``{"pretrain/step": 2, "pretrain/hypergradient": 2, ...}`` → ``pretrain: 2 step + 2
    hypergradient, ...`` (levels in MLO order; the finetune hypergradient evaluates the encoder)."""
    parts = []
    for level in LEVELS:
        purposes = [
            f"{counts[key]} {key.split('/', 1)[1]}"
            + (" (encoder)" if key == "finetune/hypergradient" else "")
            for key in (f"{level}/step", f"{level}/hypergradient")
            if counts.get(key)
        ]
        if purposes:
            parts.append(f"{level}: {' + '.join(purposes)}")
    others = sorted(key for key in counts if key.split("/", 1)[0] not in LEVELS)
    parts.extend(f"{key}: {counts[key]}" for key in others if counts[key])
    return ", ".join(parts)


def describe_policy(config: RunConfig) -> dict[str, Any]:
    """The settings part of a policy's row."""
    learnable = is_multilevel(config.policy)
    levels = config.pretrain
    hypergradient = levels.hypergradient
    return {
        "policy": config.policy,
        "status": "ok",
        "learnable": learnable,
        "steps_per_iteration": steps_per_iteration(config),
        "batch_sizes": {level: levels.level(level).batch_size for level in LEVELS},
        "unroll_steps": {level: levels.level(level).unroll_steps for level in LEVELS},
        "hypergradient": hypergradient.estimator if learnable else None,
        "darts_mode": hypergradient.darts_mode if learnable and hypergradient.estimator == "darts" else None,
        "weighting": levels.weighting,
    }


def summarise_timings(timed: list[IterationRecord], per_iteration: int, batch_size: int) -> dict[str, Any]:
    """Median, spread, per-step time, images/s, CPU use and evaluation counts of the timed
    iterations."""
    seconds = [item.seconds for item in timed]
    median = statistics.median(seconds)
    evaluations = [item.evaluations for item in timed]
    return {
        "iteration_seconds": seconds,
        "step_seconds": [item.step_seconds for item in timed],
        # Median time of the i-th step of an iteration: with 2/1/1 the last one also runs the
        # finetune and mask steps and the hypergradient.
        "step_position_median_s": [
            statistics.median(item.step_seconds[position] for item in timed)
            for position in range(per_iteration)
        ],
        "median_iteration_s": median,
        "min_iteration_s": min(seconds),
        "max_iteration_s": max(seconds),
        "per_pretrain_step_s": median / per_iteration,
        "images_per_s": batch_size * per_iteration / median,
        # Below 1 on CPU: the process got less than its threads' worth of CPU (another process ran).
        "cpu_utilisation": sum(item.cpu_seconds for item in timed) / (sum(seconds) * torch.get_num_threads()),
        "loss_evaluations": evaluations[-1],
        "loss_evaluations_consistent": all(item == evaluations[-1] for item in evaluations),
        "loss_evaluations_text": evaluation_text(evaluations[-1]),
        "level_steps_per_iteration": timed[-1].level_steps,
    }


def add_flops(result: dict[str, Any], counter: ScopeFlopCounter | None) -> None:
    """FLOPs per iteration and the rate achieved at the median iteration (None when not counted)."""
    flops = counter.total_flops if counter is not None else None
    result["flops_per_iteration"] = flops
    result["achieved_flops_per_s"] = flops / result["median_iteration_s"] if flops else None


def does_not_fit(result: dict[str, Any], device: torch.device) -> str | None:
    """Why the policy cannot fit in memory (its weights and optimiser state alone), or None."""
    parameters = result["parameters"]
    lower_bound = state_memory_lower_bound(parameters, result["learnable"])
    available = available_memory(device)
    result["memory_lower_bound_bytes"] = lower_bound
    result["memory_available_bytes"] = available
    if available is None or lower_bound <= available:
        return None
    what = "weights, gradients, AdamW state" + (" and hypergradient copies" if result["learnable"] else "")
    return (
        f"does not fit: {what} alone need ≥ {format_bytes(lower_bound)}, "
        f"{format_bytes(available)} available on {device}"
    )


def measure_policy(
    config: RunConfig,
    dataset: LabelledDataset,
    splits: MLOSplits,
    device: torch.device,
    plan: MeasurePlan,
    on_iteration: Callable[[IterationDone], None] | None = None,
    hooks: MeasureHooks | None = None,
    fresh_process: bool = False,
) -> dict[str, Any]:
    """The row of ``config.policy``: its settings and parameters, then (unless it cannot fit in
    memory: ``status: skipped``) ``plan.warmup`` untimed and ``plan.iterations`` timed MLO
    iterations, the FLOP count and the profiled breakdown, and its peak memory.

    ``config`` is sized to the iterations run (:func:`with_iterations`); ``on_iteration`` hears of
    each iteration as it ends; ``fresh_process``: this process runs this policy alone (what the
    peak memory's row says).
    """
    config = with_iterations(config, plan.total_iterations)
    hooks = hooks or MeasureHooks()
    policy = config.policy
    per_iteration = steps_per_iteration(config)
    result = describe_policy(config)
    result["parameters"] = count_parameters(config)
    reason = does_not_fit(result, device)
    if reason is not None:
        return {**result, "status": "skipped", "error": reason}

    def done(phase: str, index: int, count: int, record: IterationRecord) -> None:
        if on_iteration is not None:
            on_iteration(IterationDone(policy, phase, index, count, record.seconds))

    gc.collect()
    memory = PeakMemoryProbe(device, fresh_process=fresh_process)
    memory.start()
    setup_started = time.perf_counter()
    with built_pretrainer(config, dataset, splits, device) as pretrainer:
        result["setup_seconds"] = time.perf_counter() - setup_started
        last_step = 0

        def iterate(around: contextlib.AbstractContextManager | None = None) -> IterationRecord:
            nonlocal last_step
            record = run_iteration(pretrainer, device, last_step, per_iteration, around)
            last_step += per_iteration
            return record

        flop_counter: ScopeFlopCounter | None = None
        for index in range(plan.warmup):
            counter = ScopeFlopCounter() if plan.flops and index == 0 else None
            done(WARMUP, index + 1, plan.warmup, iterate(counter))
            flop_counter = flop_counter or counter
        result["load_average_before"] = load_average()
        hooks.timed_started(pretrainer)
        timed = []
        for index in range(plan.iterations):
            timed.append(iterate())
            done(TIMED, index + 1, plan.iterations, timed[-1])
        hooks.timed_ended(pretrainer)
        if plan.flops and flop_counter is None:
            flop_counter = ScopeFlopCounter()
            done(FLOP_COUNT, 1, 1, iterate(flop_counter))
        if plan.breakdown:
            breakdown = profiled_breakdown(device, iterate, flop_counter)
            result["breakdown"] = breakdown.to_dict()
            if on_iteration is not None:
                on_iteration(IterationDone(policy, PROFILED, 1, 1, breakdown.total_seconds or 0.0))
        hooks.finished(pretrainer, result)
        synchronize(device)
        result["memory"] = memory.read()

    result.update(summarise_timings(timed, per_iteration, config.pretrain.level("pretrain").batch_size))
    add_flops(result, flop_counter)
    return result
