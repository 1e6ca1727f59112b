"""Benchmark one policy in one variant (:func:`maskkit.cost.measure.measure_policy`, with the
learned-mask work when asked for), in this process or in a fresh one."""

from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from maskkit.cost.formatting import format_seconds
from maskkit.cost.measure import IterationDone, MeasureHooks, MeasurePlan, measure_policy
from maskkit.cost.workload import is_multilevel, synthetic_splits
from maskkit.engine.pretrain import Pretrainer
from maskkit.errors import MaskkitError
from maskkit.runtime import select_device

from .learned_mask_cost import CallCounter, learned_mask_costs
from .variants import Variant
from .workload import benchmark_dataset, make_config

stderr = Console(stderr=True, highlight=False)
#: The entry point a worker process runs.
SCRIPT = Path(__file__).resolve().parents[1] / "step_time.py"


def measure_plan(args: argparse.Namespace) -> MeasurePlan:
    """What the command line asks to measure of each policy."""
    return MeasurePlan(args.iterations, args.warmup, args.flops, args.breakdown)


def variant_fields(policy: str, variant: Variant, variant_index: int) -> dict[str, Any]:
    """The variant part of a result row: a fixed policy runs once, as every variant's baseline,
    unless a named setting may change its pretrain level."""
    baseline = not is_multilevel(policy) and not variant.changes_pretrain_level
    return {
        "variant": variant_index,
        "variant_label": "pretrain level only" if baseline else variant.label,
    }


def print_iteration(event: IterationDone, tag: str = "") -> None:
    """One line on stderr per iteration of a policy (``tag``: its setting, when interleaved)."""
    stderr.print(
        f"  {event.policy}{escape(tag)}: {event.phase} iteration {event.index}/{event.count}: "
        f"{format_seconds(event.seconds)}"
    )


class LearnedMaskCostHooks(MeasureHooks):
    """``--learned-mask-costs``: count the policy's mask decisions during the timed iterations,
    then time the learned-mask work per call (:mod:`.learned_mask_cost`)."""

    def __init__(self, iterations: int, tag: str = "") -> None:
        self.iterations = iterations
        self.tag = tag
        self.decisions: CallCounter | None = None

    def timed_started(self, pretrainer: Pretrainer) -> None:
        self.decisions = CallCounter(pretrainer.objectives.policy)

    def timed_ended(self, pretrainer: Pretrainer) -> None:
        assert self.decisions is not None
        self.decisions.remove()

    def finished(self, pretrainer: Pretrainer, result: dict[str, Any]) -> None:
        assert self.decisions is not None
        stderr.print(f"  {result['policy']}{escape(self.tag)}: timing the learned-mask work")
        per_iteration = self.decisions.calls / max(1, self.iterations)
        result["learned_mask_costs"] = learned_mask_costs(pretrainer, per_iteration)


def benchmark_policy(args: argparse.Namespace, policy: str, variant_index: int = 0) -> dict[str, Any]:
    """The row of ``policy`` in variant ``variant_index``: built, warmed up, ``args.iterations``
    MLO iterations timed, the FLOPs of one counted and one more profiled for the breakdown."""
    variant = args.variants[variant_index]
    config = make_config(args, policy, variant)
    device = select_device(config.device)
    dataset = benchmark_dataset(args, config)
    hooks = LearnedMaskCostHooks(args.iterations) if args.learned_mask_costs else None
    row = measure_policy(
        config,
        dataset,
        synthetic_splits(config, dataset),
        device,
        measure_plan(args),
        print_iteration,
        hooks,
        fresh_process=args.worker is not None,
    )
    return {**row, **variant_fields(policy, variant, variant_index)}


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
