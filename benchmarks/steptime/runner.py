"""Benchmark one policy in one variant: build it, warm up, time, count FLOPs, profile; in this
process or in a fresh one."""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from maskkit.config import RunConfig
from maskkit.errors import MaskkitError
from maskkit.runtime import select_device

from .breakdown import ScopeFlopCounter, attribute_self_times, make_breakdown, time_profiler
from .formatting import format_bytes
from .learned_mask_cost import CallCounter, learned_mask_costs
from .machine import load_average
from .memory import PeakMemoryProbe, available_memory, state_memory_lower_bound
from .timing import IterationRecord, run_iteration, synchronize
from .variants import LEVELS, Variant
from .workload import (
    benchmark_dataset,
    built_pretrainer,
    count_parameters,
    is_multilevel,
    make_config,
    steps_per_iteration,
    synthetic_splits,
)

stderr = Console(stderr=True, highlight=False)
#: The entry point a worker process runs.
SCRIPT = Path(__file__).resolve().parents[1] / "step_time.py"


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


def describe_policy(config: RunConfig, policy: str, variant: Variant, variant_index: int) -> dict[str, Any]:
    """The settings part of a result row."""
    learnable = is_multilevel(policy)
    levels = config.pretrain
    return {
        "policy": policy,
        "status": "ok",
        "learnable": learnable,
        "variant": variant_index,
        "variant_label": (
            variant.label if learnable or variant.changes_pretrain_level else "pretrain level only"
        ),
        "steps_per_iteration": steps_per_iteration(config),
        "batch_sizes": {level: getattr(levels, level).batch_size for level in LEVELS},
        "unroll_steps": {level: getattr(levels, level).unroll_steps for level in LEVELS},
        "hypergradient": levels.hypergradient.estimator if learnable else None,
        "darts_mode": (
            levels.hypergradient.darts_mode
            if learnable and levels.hypergradient.estimator == "darts"
            else None
        ),
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


def benchmark_policy(args: argparse.Namespace, policy: str, variant_index: int = 0) -> dict[str, Any]:
    """Build the policy's levels in variant ``variant_index``, warm up, time ``args.iterations``
    MLO iterations, count the FLOPs of one and profile one more for the breakdown."""
    variant = args.variants[variant_index]
    per_iteration = steps_per_iteration(make_config(args, policy, variant))
    extra = int(args.flops and args.warmup == 0) + int(args.breakdown)
    total_steps = per_iteration * (args.warmup + args.iterations + extra)
    config = make_config(args, policy, variant, total_steps)
    device = select_device(config.device)
    result = describe_policy(config, policy, variant, variant_index)
    result["parameters"] = count_parameters(config)
    reason = does_not_fit(result, device)
    if reason is not None:
        return {**result, "status": "skipped", "error": reason}

    dataset = benchmark_dataset(args, config)
    splits = synthetic_splits(config, dataset)
    gc.collect()
    memory = PeakMemoryProbe(device, fresh_process=args.worker is not None)
    memory.start()
    setup_started = time.perf_counter()
    with built_pretrainer(config, dataset, splits, device) as pretrainer:
        result["setup_seconds"] = time.perf_counter() - setup_started
        step = 0
        flop_counter: ScopeFlopCounter | None = None
        for index in range(args.warmup):
            stderr.print(f"  {policy}: warm-up iteration {index + 1}/{args.warmup}")
            counter = ScopeFlopCounter() if args.flops and index == 0 else None
            run_iteration(pretrainer, device, step, per_iteration, counter)
            flop_counter = flop_counter or counter
            step += per_iteration
        timed = []
        result["load_average_before"] = load_average()
        decisions = CallCounter(pretrainer.objectives.policy)
        for index in range(args.iterations):
            timed.append(run_iteration(pretrainer, device, step, per_iteration))
            step += per_iteration
            stderr.print(f"  {policy}: iteration {index + 1}/{args.iterations}: {timed[-1].seconds:.3f} s")
        decisions.remove()
        if args.flops and flop_counter is None:
            stderr.print(f"  {policy}: counting FLOPs over one more iteration")
            flop_counter = ScopeFlopCounter()
            run_iteration(pretrainer, device, step, per_iteration, flop_counter)
            step += per_iteration
        if args.breakdown:
            stderr.print(f"  {policy}: profiling one more iteration for the breakdown")
            profiler = time_profiler(device)
            profiled = run_iteration(pretrainer, device, step, per_iteration, profiler)
            step += per_iteration
            seconds, calls = attribute_self_times(profiler.events(), device)
            breakdown = make_breakdown(device, profiled.seconds, seconds, calls, flop_counter)
            result["breakdown"] = breakdown.to_dict()
        if args.learned_mask_costs:
            stderr.print(f"  {policy}: timing the learned-mask work")
            result["learned_mask_costs"] = learned_mask_costs(pretrainer, decisions.calls / args.iterations)
        synchronize(device)
        result["memory"] = memory.read()

    result.update(summarise_timings(timed, per_iteration, config.pretrain.pretrain.batch_size))
    result["flops_per_iteration"] = flop_counter.total_flops if flop_counter is not None else None
    flops = result["flops_per_iteration"]
    result["achieved_flops_per_s"] = flops / result["median_iteration_s"] if flops else None
    return result


def run_policy(args: argparse.Namespace, policy: str, variant_index: int = 0) -> dict[str, Any]:
    """:func:`benchmark_policy` with errors turned into a row, not a crash."""
    failed = {"policy": policy, "variant": variant_index, "status": "failed"}
    try:
        return benchmark_policy(args, policy, variant_index)
    except (torch.cuda.OutOfMemoryError, MemoryError) as error:
        return {**failed, "error": f"out of memory: {error}".splitlines()[0]}
    except MaskkitError as error:
        return {**failed, "error": str(error)}
    except Exception as error:
        traceback.print_exc()
        return {**failed, "error": f"{type(error).__name__}: {error}"}
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_policy_subprocess(
    argv: list[str], policy: str, variant_index: int = 0
) -> dict[str, Any] | list[dict[str, Any]]:
    """Run one policy in one variant (with ``--interleave``: in all of its variants, a list of
    rows) in a fresh interpreter (``--worker``) and read its result."""
    with tempfile.TemporaryDirectory(prefix="maskkit-step-time-") as folder:
        output = Path(folder) / "result.json"
        command = [sys.executable, str(SCRIPT), *argv]
        command += [
            "--worker",
            policy,
            "--worker-variant",
            str(variant_index),
            "--worker-output",
            str(output),
        ]
        completed = subprocess.run(command, stdout=subprocess.PIPE, stderr=None, text=True, check=False)
        if completed.returncode == 0 and output.is_file():
            return json.loads(output.read_text())
    if completed.returncode == -9:
        reason = "killed by SIGKILL (most likely out of memory)"
    elif completed.returncode < 0:
        reason = f"killed by signal {-completed.returncode}"
    else:
        reason = f"worker exited with status {completed.returncode}"
    return {"policy": policy, "variant": variant_index, "status": "failed", "error": reason}
