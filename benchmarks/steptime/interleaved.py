"""``--interleave``: one policy's settings side by side in one process, one iteration of each in
turn, so that every setting sees the same machine load (on a shared machine the load drifts
over minutes, and separate runs would measure the drift).

All settings are built first (each seeded as ``maskkit train`` seeds it), then each runs its
``--warmup`` iterations; the first of them is reported on its own (``first_iteration_s``: with
``compile: true`` it includes the compilation, ``compile_seconds`` estimates that as the first
iteration less the median). Then ``--iterations`` rounds run one iteration of every setting,
the order rotated each round. Every setting keeps its own random stream (the global RNG state is
swapped in and out around its iterations), so settings that compute the same thing differently
(``compile``, ``fused_adamw``) see the same masks, dropout and samples, and their losses can be
compared step by step (``loss_agreement``, against the first setting). FLOPs, the breakdown and
the learned-mask costs follow, per setting, after all timed rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import torch
from rich.markup import escape

from maskkit.cost.breakdown import ScopeFlopCounter, profiled_breakdown
from maskkit.cost.machine import load_average
from maskkit.cost.measure import add_flops, describe_policy, does_not_fit, summarise_timings
from maskkit.cost.memory import PeakMemoryProbe
from maskkit.cost.timing import IterationRecord, run_iteration, synchronize
from maskkit.cost.workload import (
    built_pretrainer,
    count_parameters,
    steps_per_iteration,
    synthetic_splits,
    with_iterations,
)
from maskkit.engine.pretrain import Pretrainer
from maskkit.runtime import select_device

from .runner import LearnedMaskCostHooks, stderr, variant_fields
from .workload import benchmark_dataset, make_config


@dataclass
class Contender:
    """One setting of the policy in the interleaved run.

    Attributes:
        index: the variant's index.
        result: its result row, filled in as the run goes.
        pretrainer: its levels.
        per_iteration: pretrain steps per MLO iteration.
        rng: its random state between its iterations (CPU, and CUDA or None).
        step: the last pretrain step it took.
        timed: its timed iterations.
        losses: the level losses after each timed iteration.
        flop_counter: the FLOP count of one of its iterations (after the timed rounds).
    """

    index: int
    result: dict[str, Any]
    pretrainer: Pretrainer | None = None
    per_iteration: int = 1
    rng: tuple[torch.Tensor, torch.Tensor | None] | None = None
    step: int = 0
    timed: list[IterationRecord] = field(default_factory=list)
    losses: list[dict[str, float | None]] = field(default_factory=list)
    flop_counter: ScopeFlopCounter | None = None


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _iterate(
    contender: Contender, device: torch.device, around: contextlib.AbstractContextManager | None = None
) -> IterationRecord:
    """One MLO iteration of ``contender`` on its own random stream."""
    assert contender.pretrainer is not None and contender.rng is not None
    _set_rng_state(contender.rng, device)
    record = run_iteration(contender.pretrainer, device, contender.step, contender.per_iteration, around)
    contender.rng = _rng_state(device)
    contender.step += contender.per_iteration
    return record


def loss_agreement(
    reference: list[dict[str, float | None]], losses: list[dict[str, float | None]]
) -> float | None:
    """The largest relative difference of a level loss between two settings after the same
    iteration (None when they logged no common loss)."""
    differences = [
        abs(b[level] - a[level]) / max(abs(a[level]), 1e-30)
        for a, b in zip(reference, losses, strict=False)
        for level in a
        if a.get(level) is not None and b.get(level) is not None
    ]
    return max(differences) if differences else None


def benchmark_interleaved(args: argparse.Namespace, policy: str, indices: list[int]) -> list[dict[str, Any]]:
    """The rows of ``policy`` in the variants ``indices``, measured interleaved (module docstring)."""
    extra = int(args.flops) + int(args.breakdown)
    contenders: list[Contender] = []
    configs = {}
    for index in indices:
        variant = args.variants[index]
        config = make_config(args, policy, variant)
        configs[index] = config = with_iterations(config, args.warmup + args.iterations + extra)
        result = {**describe_policy(config), **variant_fields(policy, variant, index)}
        result["parameters"] = count_parameters(config)
        result["interleaved"] = True
        contenders.append(Contender(index, result, per_iteration=steps_per_iteration(config)))
    device = select_device(configs[indices[0]].device)
    for contender in contenders:
        reason = does_not_fit(contender.result, device)
        if reason is not None:
            return [{**c.result, "status": "skipped", "error": reason} for c in contenders]

    first = configs[indices[0]]
    dataset = benchmark_dataset(args, first)
    gc.collect()
    memory = PeakMemoryProbe(device, fresh_process=args.worker is not None)
    memory.start()
    with contextlib.ExitStack() as stack:
        for contender in contenders:
            config = configs[contender.index]
            started = time.perf_counter()
            splits = synthetic_splits(config, dataset)
            contender.pretrainer = stack.enter_context(built_pretrainer(config, dataset, splits, device))
            contender.rng = _rng_state(device)
            contender.result["setup_seconds"] = time.perf_counter() - started
        for contender in contenders:
            tag = escape(f"[{contender.result['variant_label']}]")
            for index in range(args.warmup):
                stderr.print(f"  {policy} {tag}: warm-up iteration {index + 1}/{args.warmup}")
                record = _iterate(contender, device)
                if index == 0:
                    contender.result["first_iteration_s"] = record.seconds
        load_before = load_average()
        hooks = [LearnedMaskCostHooks(args.iterations, f" [{c.result['variant_label']}]") for c in contenders]
        for contender, hook in zip(contenders, hooks, strict=True):
            assert contender.pretrainer is not None
            hook.timed_started(contender.pretrainer)
        for round_index in range(args.iterations):
            shift = round_index % len(contenders)
            for contender in contenders[shift:] + contenders[:shift]:
                contender.timed.append(_iterate(contender, device))
                assert contender.pretrainer is not None
                contender.losses.append(dict(contender.pretrainer.mlo.last_losses()))
            stderr.print(
                f"  {policy}: round {round_index + 1}/{args.iterations}: "
                + ", ".join(f"{c.timed[-1].seconds:.3f} s" for c in contenders)
            )
        for contender, hook in zip(contenders, hooks, strict=True):
            assert contender.pretrainer is not None
            hook.timed_ended(contender.pretrainer)
            _finish(args, contender, device, policy, hook)
            contender.result["load_average_before"] = load_before
        synchronize(device)
        process_memory = memory.read()

    rows = []
    reference = contenders[0]
    for contender in contenders:
        row = contender.result
        row["memory"] = process_memory  # one process for all settings
        row.update(
            summarise_timings(
                contender.timed,
                contender.per_iteration,
                configs[contender.index].pretrain.mae.batch_size,
            )
        )
        seconds = row["iteration_seconds"]
        row["mean_iteration_s"] = statistics.fmean(seconds)
        first_s = row.get("first_iteration_s")
        row["compile_seconds"] = None if first_s is None else max(0.0, first_s - row["median_iteration_s"])
        row["level_losses"] = contender.losses
        row["loss_agreement"] = (
            loss_agreement(reference.losses, contender.losses) if contender is not reference else 0.0
        )
        add_flops(row, contender.flop_counter)
        rows.append(row)
    return rows


def _finish(
    args: argparse.Namespace,
    contender: Contender,
    device: torch.device,
    policy: str,
    hooks: LearnedMaskCostHooks,
) -> None:
    """After the timed rounds: the FLOP count, the profiled breakdown and the learned-mask costs
    of one setting."""
    result = contender.result
    tag = escape(f"[{result['variant_label']}]")
    if args.flops:
        stderr.print(f"  {policy} {tag}: counting FLOPs over one more iteration")
        contender.flop_counter = ScopeFlopCounter()
        _iterate(contender, device, contender.flop_counter)
    if args.breakdown:
        stderr.print(f"  {policy} {tag}: profiling one more iteration for the breakdown")
        breakdown = profiled_breakdown(
            device, lambda around: _iterate(contender, device, around), contender.flop_counter
        )
        result["breakdown"] = breakdown.to_dict()
    if args.learned_mask_costs:
        assert contender.pretrainer is not None
        hooks.finished(contender.pretrainer, result)


def run_interleaved(args: argparse.Namespace, policy: str, indices: list[int]) -> list[dict[str, Any]]:
    """:func:`benchmark_interleaved` with errors turned into rows, not a crash."""
    try:
        return benchmark_interleaved(args, policy, indices)
    except Exception as error:  # reported per row, as run_policy does
        if isinstance(error, torch.cuda.OutOfMemoryError | MemoryError):
            message = f"out of memory: {error}".splitlines()[0]
        else:
            traceback.print_exc()
            message = f"{type(error).__name__}: {error}"
        return [
            {"policy": policy, "variant": index, "status": "failed", "error": message} for index in indices
        ]
    finally:
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
