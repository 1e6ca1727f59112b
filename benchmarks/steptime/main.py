"""The benchmark's course: options, the machine's state, each policy in each variant, the report."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from maskkit.config import RunConfig
from maskkit.cost.machine import BUSY_WARNING, busy_fraction, hardware, load_average
from maskkit.cost.report import describe_config, write_json
from maskkit.cost.workload import is_multilevel, level_settings
from maskkit.errors import MaskkitError
from maskkit.plugins import policy_info
from maskkit.runtime import select_device, use_bf16

from .interleaved import run_interleaved
from .matmul_rate import matmul_rate
from .options import parse_args
from .peak import device_peak
from .reference import compare
from .report import add_derived, markdown, print_report
from .runner import run_policy, run_policy_subprocess, stderr
from .runtime_setup import apply_cpu_tuning, set_threads
from .workload import make_config


def planned_runs(args: argparse.Namespace) -> list[tuple[str, int]]:
    """(policy, variant index) pairs in the order they run: with one variant, the policies as
    given; with several, the fixed policies once (the MAE baseline), then every variant's
    learnable policies; with named settings (which may change the pretrain level), every policy
    in every variant."""
    if len(args.variants) == 1:
        return [(policy, 0) for policy in args.policy_list]
    if any(variant.changes_pretrain_level for variant in args.variants):
        return [(policy, index) for policy in args.policy_list for index in range(len(args.variants))]
    learnable = {policy: is_multilevel(policy) for policy in args.policy_list}
    runs = [(policy, 0) for policy in args.policy_list if not learnable[policy]]
    for index in range(len(args.variants)):
        runs += [(policy, index) for policy in args.policy_list if learnable[policy]]
    return runs


def interleaved_groups(args: argparse.Namespace) -> list[tuple[str, list[int]]]:
    """With ``--interleave``: each policy with the variant indices it runs in, in one process."""
    groups: dict[str, list[int]] = {}
    for policy, index in planned_runs(args):
        groups.setdefault(policy, []).append(index)
    return list(groups.items())


def _joined(values: list[str]) -> str:
    return ", ".join(dict.fromkeys(values))


def describe_run(
    args: argparse.Namespace, argv: list[str], config: RunConfig, device: torch.device
) -> dict[str, Any]:
    """Everything about the invocation that the report and the JSON need besides the rows."""
    configs = [make_config(args, args.policy_list[0], variant) for variant in args.variants]
    described = describe_config(config)
    return {
        "command": "python benchmarks/step_time.py " + shlex.join(argv),
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "preset": args.config_preset,
        "workload": (
            {"name": args.workload.name, "description": args.workload.description} if args.workload else None
        ),
        "hardware": hardware(device, config.precision),
        **described,
        "variants": [variant.to_dict() for variant in args.variants],
        "run": {
            **described["run"],
            "iterations": args.iterations,
            "warmup": args.warmup,
            "unroll": _joined([level_settings(item)["unroll"] for item in configs]),
            "darts_mode": _joined([item.pretrain.hypergradient.darts_mode for item in configs]),
            "policy_subprocess": args.policy_subprocess,
            "num_images": args.num_images,
            "dataset": args.dataset,
            "flops": args.flops,
            "breakdown": args.breakdown,
            "interleave": args.interleave,
            "learned_mask_costs": args.learned_mask_costs,
        },
    }


def run_worker(args: argparse.Namespace) -> int:
    """``--worker POLICY``: benchmark one policy in one variant and write its row."""
    try:
        device = select_device(make_config(args, args.worker).device)
    except MaskkitError as error:
        stderr.print(f"[red]error:[/] {error}")
        return 2
    apply_cpu_tuning(device, args.cpu_tuning)
    if args.interleave:
        indices = dict(interleaved_groups(args)).get(args.worker, [args.worker_variant])
        result: Any = run_interleaved(args, args.worker, indices)
    else:
        result = run_policy(args, args.worker, args.worker_variant)
    if args.worker_output is None:
        print(json.dumps(result, indent=2))
    else:
        args.worker_output.write_text(json.dumps(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    set_threads(args.threads)
    if args.worker is not None:
        return run_worker(args)

    try:
        config = make_config(args, args.policy_list[0], args.variants[0])
        for name in args.policy_list:
            policy_info(name)
        for variant in args.variants:
            make_config(args, args.policy_list[0], variant)
        device = select_device(config.device)
    except MaskkitError as error:
        stderr.print(f"[red]error:[/] {error}")
        return 2
    meta = describe_run(args, argv, config, device)
    meta["cpu_tuning"] = apply_cpu_tuning(device, args.cpu_tuning)
    meta["load_average_before"] = load_average()
    meta["cpu_busy_before"] = busy = busy_fraction()
    if device.type == "cpu" and busy is not None and busy > BUSY_WARNING:
        stderr.print(
            f"[yellow]warning:[/] {100 * busy:.0f} % of the CPU is busy before the benchmark starts: "
            "other processes compete for the cores, so the times will come out inflated"
        )
    compute_dtype = torch.bfloat16 if use_bf16(device, config.precision) else torch.float32
    if args.peak_seconds > 0:
        stderr.print(
            f"measuring the dense {str(compute_dtype).removeprefix('torch.')} matmul rate on {device}"
        )
    meta["matmul_peak"] = matmul_rate(device, compute_dtype, args.peak_seconds)
    peak = device_peak(device, args.peak_tflops)
    meta["device_peak"] = peak.to_dict() if peak is not None else None

    results: list[dict[str, Any]] = []
    for policy, indices in interleaved_groups(args) if args.interleave else []:
        labels = ", ".join(args.variants[index].label for index in indices)
        stderr.print(f"[bold]{policy}[/] (interleaved: {labels})")
        if args.policy_subprocess:
            rows = run_policy_subprocess(argv, policy, indices[0])
            if isinstance(rows, dict):  # the worker failed as a whole
                rows = [{**rows, "variant": index} for index in indices]
        else:
            rows = run_interleaved(args, policy, indices)
        for row, index in zip(rows, indices, strict=True):
            row.setdefault("variant_label", args.variants[index].label)
            if row.get("status") != "ok":
                stderr.print(f"  [yellow]{policy}: {row['status']}: {row.get('error')}[/]")
        results += rows
    for policy, index in [] if args.interleave else planned_runs(args):
        label = args.variants[index].label
        stderr.print(f"[bold]{policy}[/]" + (f" ({label})" if len(args.variants) > 1 else ""))
        if args.policy_subprocess:
            results.append(run_policy_subprocess(argv, policy, index))
        else:
            results.append(run_policy(args, policy, index))
        results[-1].setdefault("variant_label", label)
        if results[-1].get("status") != "ok":
            stderr.print(f"  [yellow]{policy}: {results[-1]['status']}: {results[-1].get('error')}[/]")
    add_derived(results, meta["matmul_peak"], meta["device_peak"])
    if args.reference:
        meta["reference_comparison"] = compare(results, meta)

    print_report(Console(), meta, results)
    if args.markdown is not None:
        text = markdown(meta, results)
        if args.markdown == "-":
            print()
            print(text, end="")
        else:
            Path(args.markdown).write_text(text)
            stderr.print(f"markdown: {args.markdown}")
    if args.json is not None:
        write_json(args.json, meta, results)
        stderr.print(f"json: {args.json}")
    return 1 if any(row.get("status") == "failed" for row in results) else 0
