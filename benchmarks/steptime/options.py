"""The command line: every option of ``benchmarks/step_time.py`` and their resolution against a
named workload."""

from __future__ import annotations

import argparse
from pathlib import Path

from maskkit.config import PRESETS

from .variants import expand_variants, split_list
from .workload import MODEL_OPTIONS
from .workloads import WORKLOADS

DEFAULT_POLICIES = "random,mlo,mlo-light,blockwise,hpm"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Time one MLO iteration (stage 1) per masking policy on synthetic data.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Workloads: "
        + "; ".join(f"{name}: {workload.description}" for name, workload in WORKLOADS.items()),
    )
    parser.add_argument(
        "--preset",
        default="cpu",
        choices=(*PRESETS, *WORKLOADS),
        help="a maskkit config preset, or a named benchmark workload (see below)",
    )
    parser.add_argument("--config", type=Path, default=None, help="YAML file merged over the preset")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="config override, e.g. pretrain.hypergradient.estimator=cg (repeatable)",
    )
    parser.add_argument(
        "--policies",
        default=None,
        help=f"comma-separated policy names (default: {DEFAULT_POLICIES}, or the workload's)",
    )
    parser.add_argument("--iterations", type=int, default=5, help="timed MLO iterations per policy")
    parser.add_argument("--warmup", type=int, default=1, help="untimed MLO iterations before timing")
    for option in MODEL_OPTIONS:
        flag = "--" + option.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"model.{option} (default: the preset's)")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="batch size of all three levels (default: the preset's)"
    )
    compare = parser.add_argument_group("compared MLO settings (every combination is run)")
    compare.add_argument(
        "--unroll",
        default=None,
        metavar="P/F/M[,P/F/M...]",
        help="unroll steps of the pretrain/finetune/mask levels, e.g. 1/1/1,2/1/1 (default: the preset's)",
    )
    compare.add_argument(
        "--darts-mode",
        default=None,
        metavar="MODE[,MODE]",
        help="pretrain.hypergradient.darts_mode: exact, finite-difference, or both (default: the config's)",
    )
    compare.add_argument(
        "--mask-every",
        default=None,
        metavar="K[,K...]",
        help="update the mask level every K finetune steps (sets pretrain.finetune.unroll_steps; "
        "applied after --unroll), e.g. 1,2,4",
    )
    parser.add_argument(
        "--device", default=None, help="auto, cpu, cuda or cuda:N (default: the config's, auto)"
    )
    parser.add_argument(
        "--precision", default=None, choices=("auto", "fp32", "bf16"), help="default: the preset's (auto)"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's, or the workload's)"
    )
    parser.add_argument(
        "--cpu-tuning",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="on the CPU, apply maskkit.runtime.tune_cpu_runtime (glibc malloc thresholds, subnormals "
        "flushed) as `maskkit train` does; --no-cpu-tuning shows its effect",
    )
    parser.add_argument(
        "--num-images",
        type=int,
        default=None,
        help="synthetic training images (default: max(256, 2 × the largest batch))",
    )
    parser.add_argument(
        "--policy-subprocess",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="benchmark each policy in a fresh Python process (clean peak-memory numbers)",
    )
    parser.add_argument(
        "--flops", action=argparse.BooleanOptionalAction, default=True, help="count FLOPs of one iteration"
    )
    parser.add_argument(
        "--breakdown",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="profile one more iteration and break its time and FLOPs down by level and part",
    )
    parser.add_argument(
        "--peak-seconds",
        type=float,
        default=1.0,
        help="seconds spent measuring the dense matmul rate (0 to skip)",
    )
    parser.add_argument(
        "--reference",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="print issue 8's quoted reference figures beside this run's, and its goal",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    parser.add_argument(
        "--markdown",
        nargs="?",
        const="-",
        default=None,
        metavar="PATH",
        help="also print Markdown tables (or write them to PATH)",
    )
    # Internal: run one policy (in one variant) and write its result (used by --policy-subprocess).
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-variant", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-output", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The parsed options, with a workload's defaults filled in and these added:
    ``config_preset`` (the maskkit preset), ``workload`` (the named workload or None),
    ``policy_list`` and ``variants``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.iterations < 1:
        parser.error("--iterations must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    args.workload = WORKLOADS.get(args.preset)
    args.config_preset = args.workload.base_preset if args.workload else args.preset
    if args.workload is not None:
        for option, value in args.workload.options.items():
            if getattr(args, option) is None:
                setattr(args, option, value)
    args.policy_list = split_list(args.policies or DEFAULT_POLICIES)
    if not args.policy_list:
        parser.error("--policies names no policy")
    try:
        args.variants = expand_variants(args.unroll, args.darts_mode, args.mask_every)
    except ValueError as error:
        parser.error(str(error))
    if not 0 <= args.worker_variant < len(args.variants):
        parser.error("--worker-variant is out of range")
    return args
